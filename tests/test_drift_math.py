"""Drift math: PSI and Jensen–Shannon on known histograms, the feature sketch under
covariate shift, and the Page–Hinkley detector on crafted loss series."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import rotate

from stamen.common.datasets import load_dataset
from stamen.common.drift import (
    FEATURE_PROJECTIONS,
    PSI_ALERT,
    PageHinkley,
    feature_sketch,
    js_divergence,
    projection_directions,
    psi,
    sliced_psi,
)


def test_psi_matches_its_formula_and_is_zero_for_equal_shapes() -> None:
    ref, cur = np.array([50.0, 30.0, 20.0]), np.array([20.0, 30.0, 50.0])
    p, q = ref / ref.sum(), cur / cur.sum()
    assert psi(ref, cur) == pytest.approx(float(np.sum((q - p) * np.log(q / p))))
    assert psi(ref, 3 * ref) == pytest.approx(0.0, abs=1e-12)
    assert psi(ref, cur) == pytest.approx(psi(cur, ref))  # PSI is symmetric


def test_psi_of_an_emptied_class_is_large_but_finite() -> None:
    value = psi(np.array([50.0, 50.0]), np.array([100.0, 0.0]))
    assert PSI_ALERT < value < 10 and math.isfinite(value)


def test_noisy_negative_counts_are_clipped_not_crashing() -> None:
    assert math.isfinite(psi(np.array([10.0, -3.0, 5.0]), np.array([9.0, 1.0, 4.0])))
    assert math.isfinite(js_divergence(np.array([-1.0, -2.0]), np.array([1.0, 1.0])))


def test_jensen_shannon_is_in_bits() -> None:
    assert js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0, abs=2e-3)
    assert js_divergence(np.array([3.0, 1.0]), np.array([6.0, 2.0])) == pytest.approx(0.0, abs=1e-12)
    m = np.array([0.5, 0.5])
    p, q = np.array([0.9, 0.1]), np.array([0.1, 0.9])
    kl = lambda a, b: float(np.sum(a * np.log2(a / b)))  # noqa: E731
    assert js_divergence(p, q) == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(q, m))


def _images() -> np.ndarray:
    return np.asarray(load_dataset("mnist5k").x_train[:600], dtype=np.float64)


def test_feature_sketch_counts_every_record_once_per_projection() -> None:
    x = _images()
    sketch = feature_sketch(x, projection_directions(784, seed=1))
    assert sketch.shape[0] == FEATURE_PROJECTIONS
    assert (sketch.sum(axis=1) == len(x)).all()


def test_feature_sketch_psi_moves_under_rotation_and_noise_but_not_resampling() -> None:
    x = _images()
    dirs = projection_directions(784, seed=1)
    first, second = x[:300], x[300:]
    ref = feature_sketch(first, dirs)
    same = sliced_psi(ref, feature_sketch(second, dirs))
    rotated = rotate(second.reshape(-1, 28, 28), 30, axes=(1, 2), reshape=False, order=1).reshape(len(second), -1)
    noisy = second + np.random.default_rng(0).normal(0, 0.5, second.shape)
    assert same < 0.1, "another sample of the same distribution must not look like drift"
    assert sliced_psi(ref, feature_sketch(rotated, dirs)) > PSI_ALERT
    assert sliced_psi(ref, feature_sketch(noisy, dirs)) > PSI_ALERT


def test_page_hinkley_ignores_a_falling_loss_and_catches_a_jump() -> None:
    ph = PageHinkley(threshold=0.5, delta=0.005)
    falling = [2.3, 1.2, 0.8, 0.6, 0.5, 0.45, 0.42, 0.41, 0.40, 0.41, 0.40, 0.39]
    assert not any(ph.update(v) for v in falling)
    fired = [ph.update(v) for v in (1.4, 1.4, 1.4)]
    assert fired[0], "a 1-nat jump fires at once"
    assert not any(fired[1:]), "the test restarts after a detection"


def test_page_hinkley_noise_without_change_does_not_fire() -> None:
    rng = np.random.default_rng(3)
    ph = PageHinkley(threshold=0.5, delta=0.005)
    assert not any(ph.update(0.3 + 0.05 * rng.standard_normal()) for _ in range(500))


def test_page_hinkley_catches_a_small_sustained_rise_within_a_few_rounds() -> None:
    ph = PageHinkley(threshold=0.5, delta=0.005)
    for v in [0.3] * 10:
        assert not ph.update(v)
    fired = [ph.update(0.5) for _ in range(10)]
    assert True in fired[:6]


def test_page_hinkley_state_round_trips_as_plain_numbers() -> None:
    ph = PageHinkley(threshold=0.5, delta=0.005)
    for v in (1.0, 0.8, 0.7):
        ph.update(v)
    state = ph.state_dict()
    assert all(isinstance(v, (int, float)) for v in state.values())
    twin = PageHinkley.from_state(state)
    assert [twin.update(v) for v in (0.7, 1.5)] == [ph.update(v) for v in (0.7, 1.5)]
