"""The learning-rate schedule, driven by global progress in rounds.

Progress is ``(server_round - 1) + (step + 1) / steps_this_round`` (so the first step
already has a non-zero rate): the same number on every
site, continuous across rounds, so warmup happens once and decay does not restart each
round (a per-round scheduler would). Sites that skip rounds pick the schedule up where
the federation is.
"""

from __future__ import annotations

import math

from stamen.common.config import StamenConfig


def lr_at(progress: float, cfg: StamenConfig) -> float:
    """The learning rate at ``progress`` rounds into the run."""
    base = float(cfg["lr"])
    warmup = float(cfg["warmup-rounds"])
    if warmup > 0 and progress < warmup:
        return base * progress / warmup
    kind = cfg["lr-schedule"]
    if kind == "constant":
        return base
    if kind == "step":
        return base * float(cfg["step-gamma"]) ** math.floor((progress - warmup) / int(cfg["step-rounds"]))
    horizon = cfg.lr_horizon_rounds
    span = max(horizon - warmup, 1e-9)
    t = min(max((progress - warmup) / span, 0.0), 1.0)
    floor = float(cfg["lr-min-factor"])
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
