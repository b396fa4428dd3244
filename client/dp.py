"""Sample-level DP-SGD for one round of local training, through Opacus.

Opacus's ``PrivacyEngine`` does the privacy-critical parts: Poisson sampling of each
logical batch, per-sample clipping to ``max_grad_norm`` and Gaussian noise of
``noise_multiplier * max_grad_norm``; ``BatchMemoryManager`` splits a logical batch of
``batch-size * accum-steps`` into physical batches of ``batch-size``. The rest follows
:func:`client.train.train_local`: the optimizer, the global LR schedule per optimizer
step, bf16 autocast.

Privacy accounting does not trust the configuration: the round's Opacus accountant is
fed by the DP optimizer's step hook, which runs once per noisy step actually taken, and
:meth:`DPTrainResult.commit` writes exactly that to the site's
:class:`~stamen.client.ledger.PrivacyLedger`. A round on a site goes through the site's privacy
front door, :class:`client.privacy.SitePrivacy`: it plans the round (released size, noise,
rate), this module trains it, and the front door charges ``DPTrainResult.commit`` to the
ledger(s) before the reply is built.

Opacus runs with ``secure_mode=False`` (it needs ``torchcsprng``, archived and not built
for this torch): the Poisson sampler and the noise come from torch generators given two
independent seeds, which :mod:`client.noise` makes secret and fresh per attempt (or, under
``dp-noise = seeded``, derives from the run seed).
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from stamen.client.ledger import Ledger, check_accountant
from stamen.client.train import TrainResult, autocast_dtype, make_optimizer
from stamen.common.config import StamenConfig
from stamen.common.errors import ConfigError
from stamen.common.models import check_private_model
from stamen.common.schedule import lr_at

# Per-sample gradients by Opacus's hooks. Measured on CPU (cnn28, 400 examples, one thread),
# "ew" is ~20% faster but fails on an empty Poisson batch and under bf16 autocast, and
# "functorch" is slower and fails on an empty batch through a conv layer.
GRAD_SAMPLE_MODE = "hooks"


@dataclass(frozen=True)
class DPTrainResult(TrainResult):
    """A DP round's report, counted by the optimizer's step hook (``steps`` == ``steps_executed``).

    ``grad_norm`` is the mean norm of the noised gradient (private); ``train_loss`` is
    computed on the raw data and is not.
    """

    steps_executed: int
    sample_rate: float
    noise_multiplier: float

    def commit(self, ledger: Ledger) -> None:
        """Charge this round to the site's ledger; call before the update leaves the site."""
        ledger.record(self.noise_multiplier, self.sample_rate, self.steps_executed)


def dp_schedule(num_examples: int, cfg: StamenConfig) -> tuple[float, int]:
    """``(sample_rate, noisy steps per round)`` for a site of ``num_examples``, to plan before training.

    On a DP site ``num_examples`` is the *released* count (:mod:`client.release`), so the
    schedule — and everything computed from it that leaves the site — is post-processing
    of a charged release, never of the exact size. The rate is ``1 / batches per epoch``
    so that Opacus's Poisson sampler draws exactly ``1 / rate`` batches per epoch.
    """
    logical_batch = int(cfg["batch-size"]) * int(cfg["accum-steps"])
    rate = 1 / math.ceil(num_examples / logical_batch)
    return rate, int(cfg["local-epochs"]) * int(1 / rate)


def train_private(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: StamenConfig,
    *,
    server_round: int,
    seed: int,
    device: torch.device,
    noise_multiplier: float,
    max_grad_norm: float,
    planned_examples: int,
    accountant_name: str = "rdp",
    noise_seed: int | None = None,
) -> DPTrainResult:
    """Run ``local-epochs`` of DP-SGD and load the result into ``model`` (unwrapped keys).

    Opacus wraps a fresh copy each round, so hooks are never added twice to the caller's
    cached model object. ``seed`` drives the Poisson sampler, ``noise_seed`` (default
    ``seed + 1``) the noise; both must come from :mod:`client.noise` on a site. The
    sample rate comes from ``planned_examples`` (the released count, see
    :func:`dp_schedule`) and the noisy sum is divided by the expected batch computed from
    it, so no exact record count enters what leaves the site.
    """
    if not (noise_multiplier > 0 and max_grad_norm > 0):
        raise ConfigError(
            f"DP-SGD needs noise-multiplier > 0 and max-grad-norm > 0, got {noise_multiplier}, {max_grad_norm}"
        )
    check_accountant(accountant_name)
    if cfg["precision"] == "fp16":
        raise ConfigError("precision fp16 is not supported with DP-SGD (no loss scaling there); use bf16 or fp32")
    amp_dtype = autocast_dtype(str(cfg["precision"]), device)
    batch_size, accum, epochs = int(cfg["batch-size"]), int(cfg["accum-steps"]), int(cfg["local-epochs"])

    work = copy.deepcopy(model).to(device).train()
    check_private_model(work)
    rate, _ = dp_schedule(planned_examples, cfg)
    loader = DPDataLoader(TensorDataset(x, y), sample_rate=rate, generator=torch.Generator().manual_seed(seed))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=accountant_name, secure_mode=False)
    dp_model, optimizer, dp_loader = engine.make_private(
        module=work,
        optimizer=make_optimizer(work, cfg),
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        noise_generator=torch.Generator(device=device).manual_seed(seed + 1 if noise_seed is None else noise_seed),
        grad_sample_mode=GRAD_SAMPLE_MODE,
        poisson_sampling=False,  # the loader above already samples Poisson at the planned rate
    )
    optimizer.expected_batch_size = max(1, round(planned_examples * rate))
    accountant_hook = optimizer.step_hook
    norms: list[float] = []

    def on_noisy_step(opt: DPOptimizer) -> None:
        accountant_hook(opt)
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in opt.params]))))

    optimizer.attach_step_hook(on_noisy_step)
    expected_steps = epochs * len(dp_loader)
    loss_sum, seen, lr = 0.0, 0, float(cfg["lr"])
    try:
        with BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=batch_size, optimizer=optimizer) as bmm:
            # Index the tensors directly: the samplers are Opacus's, the per-item collate is skipped.
            sampler = bmm.batch_sampler if accum > 1 else dp_loader.batch_sampler
            for _ in range(epochs):
                for idx in sampler:
                    index = torch.as_tensor(idx, dtype=torch.long)
                    xb, yb = x[index].to(device), y[index].to(device)
                    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
                    with ctx:
                        # mean over the physical batch, 0 (not NaN) for an empty Poisson batch
                        loss = F.cross_entropy(dp_model(xb), yb, reduction="sum") / max(len(yb), 1)
                    loss.backward()
                    loss_sum += float(loss.detach()) * len(yb)
                    seen += len(yb)
                    # only the last physical batch of a logical one steps, so len(norms) is the step index
                    lr = lr_at(server_round - 1 + (len(norms) + 1) / expected_steps, cfg)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        ((sigma, rate, steps),) = engine.accountant.history
        model.load_state_dict(work.state_dict())
    finally:
        dp_model._close()
    return DPTrainResult(
        train_loss=loss_sum / max(seen, 1),
        grad_norm=sum(norms) / max(len(norms), 1),
        lr=lr,
        num_examples=len(y),
        steps=steps,
        steps_executed=steps,
        sample_rate=rate,
        noise_multiplier=sigma,
    )
