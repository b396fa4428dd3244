"""The learning-rate range test: grow the rate exponentially, watch the loss, pick a rate.

Train on one site's data for a fixed number of steps while the learning rate climbs from
``start`` to ``end``; the loss first falls, then blows up. The suggestion is the rate
where the smoothed loss fell fastest, a common, conservative reading of the curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from stamen.client.data import load_site_data
from stamen.client.train import make_optimizer, round_seed, shuffled_batches
from stamen.common.config import StamenConfig
from stamen.common.errors import DataError
from stamen.common.models import build_model
from stamen.common.sitedata import with_site_data
from stamen.server.evaluate import load_server_data


@dataclass(frozen=True)
class RangeTest:
    """The curve and the suggested rate."""

    lrs: list[float]
    losses: list[float]
    suggested_lr: float


def lr_range_test(
    cfg: StamenConfig, *, site: int = 0, clients: int = 10, steps: int = 100, start: float = 1e-5, end: float = 1.0
) -> RangeTest:
    """Run the range test on simulated site ``site`` of ``clients``."""
    data = load_site_data(with_site_data({"partition-id": site, "num-partitions": clients}, cfg), cfg)
    shape = load_server_data(cfg)
    model = build_model(str(cfg["model"]), shape.input_shape, shape.num_classes, seed=int(cfg["seed"]))
    model.train()
    optimizer = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(round_seed(int(cfg["seed"]), "lr-find", site))
    factor = (end / start) ** (1 / max(steps - 1, 1))
    lrs: list[float] = []
    losses: list[float] = []
    smooth, best = 0.0, math.inf
    batches: list[torch.Tensor] = []
    for step in range(steps):
        if not batches:
            batches = list(shuffled_batches(data.num_train, int(cfg["batch-size"]), gen))
        idx = batches.pop()
        lr = start * factor**step
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        smooth = 0.9 * smooth + 0.1 * float(loss.detach())
        debiased = smooth / (1 - 0.9 ** (step + 1))
        lrs.append(lr)
        losses.append(debiased)
        best = min(best, debiased)
        if not math.isfinite(debiased) or debiased > 4 * best:
            break
    if len(losses) < 3:
        raise DataError("the range test diverged at once; lower --start")
    slopes = [losses[i + 1] - losses[i] for i in range(len(losses) - 1)]
    steepest = min(range(len(slopes)), key=slopes.__getitem__)
    return RangeTest(lrs, losses, lrs[steepest])
