"""The divergence rule, and the rehearsal spike being exactly a larger server learning rate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stamen.common.config import StamenConfig
from stamen.server.observe import RoundObserver
from stamen.server.optimizers.factory import make_server_optimizer
from stamen.server.rollback import DivergenceRule
from stamen.simulations.faults.lr_spike import spiked_step


def test_nan_fires_at_once() -> None:
    rule = DivergenceRule(patience=5, tolerance=0.5)
    assert rule.observe(1.0, best_loss=1.0) is None
    assert rule.observe(math.nan, best_loss=1.0) == "evaluation loss is nan"
    assert rule.observe(math.inf, best_loss=1.0) == "evaluation loss is inf"


def test_patience_counts_bad_rounds_in_a_row_and_a_good_one_resets() -> None:
    rule = DivergenceRule(patience=3, tolerance=0.5)
    assert [rule.observe(x, best_loss=1.0) for x in (1.6, 1.7, 1.2, 1.6, 1.6)] == [None] * 5
    assert rule.streak == 2
    reason = rule.observe(1.51, best_loss=1.0)
    assert reason is not None and "for 3 evaluated round(s)" in reason
    assert rule.streak == 0, "the streak starts again after a rollback"


def test_a_loss_within_tolerance_never_fires_and_zero_patience_is_off() -> None:
    rule = DivergenceRule(patience=1, tolerance=0.5)
    assert all(rule.observe(1.5, best_loss=1.0) is None for _ in range(10))
    off = DivergenceRule(patience=0, tolerance=0.0)
    assert off.observe(math.nan, best_loss=1.0) is None
    assert off.observe(100.0, best_loss=1.0) is None


def test_the_streak_survives_a_checkpoint() -> None:
    rule = DivergenceRule(patience=2, tolerance=0.1)
    rule.observe(2.0, best_loss=1.0)
    again = DivergenceRule(patience=2, tolerance=0.1)
    again.load_state_dict(rule.state_dict())
    assert again.observe(2.0, best_loss=1.0) is not None


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "fedyogi"])
def test_a_spiked_step_is_the_step_with_a_larger_server_lr(name: str) -> None:
    rng = np.random.default_rng(0)
    current = {"w": rng.random((3, 4), dtype=np.float32), "n": np.array([5])}
    aggregates = [{"w": rng.random((3, 4), dtype=np.float32), "n": np.array([6 + i])} for i in range(3)]
    kwargs = {"momentum": 0.9, "nesterov": False, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    plain = make_server_optimizer(name, server_lr=0.1, **kwargs)
    large = make_server_optimizer(name, server_lr=0.1 * 7, **kwargs)
    x = y = current
    for server_round, aggregate in enumerate(aggregates, start=1):
        x = spiked_step(x, plain.step(x, aggregate, server_round), 7.0)
        y = large.step(y, aggregate, server_round)
        np.testing.assert_allclose(x["w"], y["w"], rtol=1e-5, atol=1e-6)
        assert x["n"][0] == y["n"][0] == aggregate["n"][0]
        assert x["w"].dtype == np.float32


def test_model_version_and_rollbacks_are_exported() -> None:
    observer = RoundObserver(StamenConfig.from_mapping({}))
    observer.start_round(7, 3)
    observer.end_round({"round": 7, "seconds": 1.0, "loss": 0.5, "version": 5, "rollbacks": 2})
    registry = observer.exporter.registry
    assert registry.get_sample_value("stamen_model_version") == 5
    assert registry.get_sample_value("stamen_rollbacks_total") == 2
    observer.finish()
