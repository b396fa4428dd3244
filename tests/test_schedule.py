"""The LR schedule runs on global progress in rounds: warmup once, decay never restarts per round."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import stamen.client.train as train_module
from stamen.client.train import make_optimizer
from stamen.common.config import StamenConfig
from stamen.common.schedule import lr_at


def cfg(**values: Any) -> StamenConfig:
    """A validated config; keyword names use underscores for hyphens."""
    return StamenConfig.from_mapping({k.replace("_", "-"): v for k, v in values.items()})


# --- hand-computed values --------------------------------------------------------------------

# lr 0.1, no warmup, cosine over 10 rounds down to 0.1 * 0.1:
#   lr(p) = 0.1 * (0.1 + 0.9 * 0.5 * (1 + cos(pi * p / 10)))
COSINE = cfg(lr=0.1, warmup_rounds=0, num_server_rounds=10, lr_min_factor=0.1)


@pytest.mark.parametrize(
    ("progress", "expected"),
    [
        (0.0, 0.1),  # cos 0 = 1: 0.1 * (0.1 + 0.9) = 0.1
        (2.5, 0.08681980515),  # cos(pi/4) = 0.70710678: 0.1 * (0.1 + 0.45 * 1.70710678) = 0.0868198
        (5.0, 0.055),  # cos(pi/2) = 0: 0.1 * (0.1 + 0.45) = 0.055
        (7.5, 0.02318019485),  # cos(3pi/4) = -0.70710678: 0.1 * (0.1 + 0.45 * 0.29289322) = 0.0231802
        (10.0, 0.01),  # cos pi = -1: 0.1 * 0.1
        (14.0, 0.01),  # past the horizon it stays at the floor
    ],
)
def test_cosine_values(progress: float, expected: float) -> None:
    assert lr_at(progress, COSINE) == pytest.approx(expected, rel=1e-9)


# lr 0.05 with one warmup round, then cosine over rounds 1..11 (span 10) down to 0.05 * 0.05.
WARM = cfg(lr=0.05, warmup_rounds=1, num_server_rounds=11, lr_min_factor=0.05)


@pytest.mark.parametrize(
    ("progress", "expected"),
    [
        (0.25, 0.0125),  # 0.05 * 0.25 / 1
        (0.5, 0.025),  # 0.05 * 0.5
        (0.999, 0.04995),  # 0.05 * 0.999
        (1.0, 0.05),  # warmup done: cosine at t = 0
        (6.0, 0.02625),  # t = (6 - 1) / 10 = 0.5: 0.05 * (0.05 + 0.95 * 0.5) = 0.05 * 0.525
        (11.0, 0.0025),  # t = 1: 0.05 * 0.05
    ],
)
def test_warmup_then_cosine_values(progress: float, expected: float) -> None:
    assert lr_at(progress, WARM) == pytest.approx(expected, rel=1e-9)


def test_explicit_horizon_overrides_run_length() -> None:
    c = cfg(lr=0.1, warmup_rounds=0, num_server_rounds=20, lr_horizon_rounds=5, lr_min_factor=0.0)
    assert lr_at(2.5, c) == pytest.approx(0.05)  # t = 0.5: 0.1 * 0.5 * (1 + 0)
    assert lr_at(5.0, c) == pytest.approx(0.0, abs=1e-15)  # t = 1: 0.1 * 0.5 * (1 - 1)
    assert lr_at(12.0, c) == pytest.approx(0.0, abs=1e-15)


# lr 0.1, step schedule: x0.5 every 3 rounds.
@pytest.mark.parametrize(
    ("warmup", "progress", "expected"),
    [
        (0, 0.5, 0.1),  # floor(0.5 / 3) = 0
        (0, 2.9, 0.1),  # floor(2.9 / 3) = 0
        (0, 3.5, 0.05),  # floor(3.5 / 3) = 1: 0.1 * 0.5
        (0, 5.9, 0.05),
        (0, 6.5, 0.025),  # floor(6.5 / 3) = 2: 0.1 * 0.25
        (0, 9.5, 0.0125),  # 0.1 * 0.125
        (1, 0.5, 0.05),  # warmup: 0.1 * 0.5 / 1
        (1, 3.9, 0.1),  # floor((3.9 - 1) / 3) = 0
        (1, 4.5, 0.05),  # floor((4.5 - 1) / 3) = 1
    ],
)
def test_step_values(warmup: float, progress: float, expected: float) -> None:
    c = cfg(lr=0.1, lr_schedule="step", step_rounds=3, step_gamma=0.5, warmup_rounds=warmup)
    assert lr_at(progress, c) == pytest.approx(expected, rel=1e-12)


def test_step_drops_by_gamma_every_step_rounds() -> None:
    c = cfg(lr=0.2, lr_schedule="step", step_rounds=4, step_gamma=0.3, warmup_rounds=0)
    middles = [lr_at(4 * k + 2.0, c) for k in range(5)]  # the middle of each 4-round period
    assert middles == pytest.approx([0.2 * 0.3**k for k in range(5)], rel=1e-12)


def test_constant_after_warmup() -> None:
    c = cfg(lr=0.2, lr_schedule="constant", warmup_rounds=2)
    assert lr_at(1.0, c) == pytest.approx(0.1)  # 0.2 * 1 / 2
    assert [lr_at(p, c) for p in (2.0, 2.5, 10.0, 500.0)] == [0.2] * 4
    assert lr_at(0.01, cfg(lr=0.2, lr_schedule="constant", warmup_rounds=0)) == 0.2


# --- shape of the schedule -------------------------------------------------------------------


def test_warmup_is_linear_within_round_one_and_reaches_lr() -> None:
    progress = np.linspace(0.05, 0.95, 19)
    values = np.array([lr_at(p, WARM) for p in progress])
    np.testing.assert_allclose(values, 0.05 * progress, rtol=1e-12)
    assert lr_at(1.0, WARM) == 0.05


def test_cosine_is_continuous_across_round_boundaries_and_does_not_restart() -> None:
    steps = 4  # a round's steps are at progress r - 1 + k / steps, k = 1..steps
    end_of_round_3, start_of_round_4 = lr_at(3.0, WARM), lr_at(3.0 + 1 / steps, WARM)
    assert lr_at(3.0 - 1e-9, WARM) == pytest.approx(end_of_round_3, abs=1e-9)
    assert lr_at(3.0 + 1e-9, WARM) == pytest.approx(end_of_round_3, abs=1e-9)
    assert start_of_round_4 < end_of_round_3 < lr_at(2.0 + 1 / steps, WARM)
    assert start_of_round_4 < 0.9 * WARM["lr"]  # a per-round scheduler would start round 4 near lr again


def test_cosine_decays_monotonically_to_the_floor() -> None:
    progress = np.linspace(1.0, 11.0, 201)
    values = np.array([lr_at(p, WARM) for p in progress])
    assert values[0] == pytest.approx(0.05)
    assert np.all(np.diff(values) < 0)
    assert values[-1] == pytest.approx(0.05 * 0.05)
    assert min(lr_at(p, WARM) for p in (11.5, 20.0, 1000.0)) == pytest.approx(0.05 * 0.05)


# --- local training follows the schedule --------------------------------------------------------


@pytest.mark.usefixtures("one_torch_thread")
def test_train_local_follows_the_global_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    # 50 examples in micro-batches of 8: 7 micro-batches per epoch; optimizer steps after
    # micro-batches 3, 6 and 7 (accum 3, last one short), so 3 per epoch and 6 per round.
    c = cfg(
        num_server_rounds=4,
        warmup_rounds=1,
        lr=0.1,
        lr_min_factor=0.1,
        batch_size=8,
        accum_steps=3,
        local_epochs=2,
        momentum=0.0,
        device="cpu",
        precision="fp32",
    )
    steps = 6
    progress: list[float] = []
    used: list[float] = []

    def recording_lr_at(p: float, config: StamenConfig) -> float:
        progress.append(p)
        return lr_at(p, config)

    def recording_optimizer(model: nn.Module, config: StamenConfig) -> torch.optim.Optimizer:
        optimizer = make_optimizer(model, config)
        optimizer.register_step_pre_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(train_module, "lr_at", recording_lr_at)
    monkeypatch.setattr(train_module, "make_optimizer", recording_optimizer)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    reported = []
    for server_round in range(1, 5):
        progress.clear()
        used.clear()
        result = train_module.train_local(
            model, x, y, c, server_round=server_round, seed=server_round, device=torch.device("cpu")
        )
        assert result.steps == steps
        # Global progress: round r's steps continue where round r - 1 ended, never from 0.
        assert progress == pytest.approx([server_round - 1 + k / steps for k in range(1, steps + 1)], abs=1e-12)
        assert used == [lr_at(p, c) for p in progress]  # the optimizer stepped with the schedule's rate
        assert result.lr == lr_at(server_round, c)
        assert math.isfinite(result.train_loss) and result.num_examples == 50
        reported.append(result.lr)
    assert reported[0] == 0.1  # warmup ends with round 1
    assert reported == sorted(reported, reverse=True)  # then it decays, round after round
