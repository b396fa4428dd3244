"""Local mini-batch SGD on a site's data: the training practice stamen clients offer.

One round of local training: shuffled mini-batches from a seeded generator; SGD with
momentum (optionally Nesterov) and weight decay, or AdamW; the learning rate from the
global schedule (:mod:`common.schedule`), so warmup and decay follow the federation's
rounds rather than restarting each round; gradient accumulation over micro-batches;
clipping by global norm; bf16 autocast (or fp16 with a GradScaler) on CUDA. Local
optimizer state starts fresh each round: the server owns the momentum that persists.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from stamen.common.config import StamenConfig
from stamen.common.schedule import lr_at


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training reports (the reply's train metrics)."""

    train_loss: float
    grad_norm: float
    lr: float
    num_examples: int
    steps: int

    def metrics(self) -> dict[str, float]:
        return {
            "train-loss": self.train_loss,
            "grad-norm": self.grad_norm,
            "lr": self.lr,
            "num-examples": float(self.num_examples),
            "steps": float(self.steps),
        }


def round_seed(base: int, site_id: str, server_round: int) -> int:
    """A seed unique to (run seed, site, round), stable across processes and machines."""
    digest = hashlib.blake2b(f"{base}/{site_id}/{server_round}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def pick_device(preference: str) -> torch.device:
    """``auto`` means CUDA when this client has it, else CPU."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. fp16 needs CUDA (and a GradScaler)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16" and device.type == "cuda":
        return torch.float16
    return None


def make_optimizer(model: nn.Module, cfg: StamenConfig) -> torch.optim.Optimizer:
    """The local optimizer named by the run config."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=float(cfg["lr"]), weight_decay=float(cfg["weight-decay"]))
    return torch.optim.SGD(
        params,
        lr=float(cfg["lr"]),
        momentum=float(cfg["momentum"]),
        nesterov=bool(cfg["nesterov"]) and float(cfg["momentum"]) > 0,
        weight_decay=float(cfg["weight-decay"]),
    )


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of one epoch, reshuffled by ``generator`` (last batch may be short)."""
    order = torch.randperm(n, generator=generator)
    yield from order.split(batch_size)


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: StamenConfig,
    *,
    server_round: int,
    seed: int,
    device: torch.device,
) -> TrainResult:
    """Run ``local-epochs`` of mini-batch training in place on ``model``."""
    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(seed)
    accum = int(cfg["accum-steps"])
    batch_size = int(cfg["batch-size"])
    clip = float(cfg["clip-norm"])
    amp_dtype = autocast_dtype(str(cfg["precision"]), device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype is torch.float16 else None
    micro_per_epoch = math.ceil(len(y) / batch_size)
    total_steps = max(1, int(cfg["local-epochs"]) * math.ceil(micro_per_epoch / accum))

    loss_sum, seen, norm_sum, step, lr = 0.0, 0, 0.0, 0, float(cfg["lr"])
    pending = 0
    optimizer.zero_grad(set_to_none=True)
    for _ in range(int(cfg["local-epochs"])):
        batches = list(shuffled_batches(len(y), batch_size, generator))
        for i, idx in enumerate(batches):
            xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
            ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with ctx:
                loss = F.cross_entropy(model(xb), yb)
            scaled = loss / accum
            (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += float(loss.detach()) * len(yb)
            seen += len(yb)
            pending += 1
            if pending == accum or i == len(batches) - 1:
                lr = lr_at(server_round - 1 + (step + 1) / total_steps, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if scaler:
                    scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)
                norm_sum += float(norm)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                pending = 0
    return TrainResult(
        train_loss=loss_sum / max(seen, 1),
        grad_norm=norm_sum / max(step, 1),
        lr=lr,
        num_examples=len(y),
        steps=step,
    )
