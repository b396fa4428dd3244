"""A simulated site's data in one round, as a scenario (:mod:`common.scenario`) shapes it.

The view is a pure function of (scenario, run config, site, round): a restarted or
resumed site sees exactly what it would have seen. Steps, in this order:

1. class-incremental tasks: only the records of the active task's classes (shard
   ``task-<n>``; otherwise every record is shard ``base``);
2. ``join`` (nothing at all before the site joins), ``quiet`` (no training data in the
   quiet rounds; the held-out data stays, so the site can still evaluate) and
   ``label-shift`` (only records of the kept classes);
3. ``label-swap``: the labels of swapped classes are exchanged (concept drift);
4. ``rotate`` and ``noise``: the inputs change (covariate shift), more each round.

Record ids are the records' row numbers in the dataset's training split.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from stamen.client.train import round_seed
from stamen.client.view import BASE_SHARD, SiteView
from stamen.common.config import StamenConfig
from stamen.common.datasets import load_dataset
from stamen.common.runrecord import derive_seeds
from stamen.common.scenario import Event, Scenario


def stream_view(
    scenario: Scenario,
    cfg: StamenConfig,
    site: int,
    train_idx: np.ndarray,
    hold_idx: np.ndarray,
    server_round: int,
) -> SiteView:
    """Site ``site``'s view in ``server_round`` of its partition (``train_idx``, ``hold_idx``)."""
    data = load_dataset(str(cfg["dataset"]))
    labels = data.y_train
    shard = BASE_SHARD
    if scenario.tasks:
        task = scenario.task_index(server_round)
        shard = f"task-{task + 1}"
        train_idx = train_idx[np.isin(labels[train_idx], scenario.tasks[task])]
        hold_idx = hold_idx[np.isin(labels[hold_idx], scenario.tasks[task])]
    active = [ev for ev in scenario.events if ev.applies(site, server_round)]
    for ev in scenario.events:
        if ev.kind == "join" and (ev.sites is None or site in ev.sites) and server_round < ev.from_round:
            train_idx, hold_idx = train_idx[:0], hold_idx[:0]
    for ev in active:
        if ev.kind == "quiet":
            train_idx = train_idx[:0]
        elif ev.kind == "label-shift":
            keep = ev.params["keep-classes"]
            train_idx = train_idx[np.isin(labels[train_idx], keep)]
            hold_idx = hold_idx[np.isin(labels[hold_idx], keep)]
    seed = derive_seeds(int(cfg["seed"]))["client"]
    x_tr, y_tr = _materialise(
        data.x_train, labels, train_idx, active, server_round, round_seed(seed, f"{site}/train", server_round)
    )
    x_ho, y_ho = _materialise(
        data.x_train, labels, hold_idx, active, server_round, round_seed(seed, f"{site}/holdout", server_round)
    )
    return SiteView(
        x_tr, y_tr, x_ho, y_ho, train_idx.astype(np.int64), np.zeros(len(train_idx), dtype=np.int32), (shard,)
    )


def _materialise(
    x_all: np.ndarray, y_all: np.ndarray, idx: np.ndarray, active: list[Event], server_round: int, noise_seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy the rows ``idx`` out of the (read-only) dataset and apply the active changes."""
    x = torch.from_numpy(np.array(x_all[idx], dtype=np.float32))
    y = np.array(y_all[idx], dtype=np.int64)
    for ev in active:
        if ev.kind == "label-swap":
            original = y.copy()
            for a, b in ev.params["pairs"]:
                y[original == a], y[original == b] = b, a
        elif ev.kind == "rotate" and len(x):
            x = rotate(x, ev.strength(server_round))
        elif ev.kind == "noise" and len(x):
            gen = torch.Generator().manual_seed(noise_seed)
            x = x + ev.strength(server_round) * torch.randn(x.shape, generator=gen)
    return x, torch.from_numpy(y)


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate a batch of (C, H, W) images about their centre (bilinear, zero fill)."""
    theta = math.radians(degrees)
    matrix = torch.tensor([[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0]])
    grid = F.affine_grid(matrix.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
