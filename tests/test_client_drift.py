"""A site's drift scores: a reference frozen after W rounds and kept in the state store, scores
that see a label shift, and under DP scores computed only from charged, cached releases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stamen.client.data import SiteData
from stamen.client.drift import REFERENCE_ENTRY, site_drift
from stamen.client.ledger import PrivacyLedger, PrivacyRefusal
from stamen.client.stat_release import RELEASES_ENTRY
from stamen.common.config import StamenConfig
from stamen.common.datasets import load_dataset
from stamen.common.drift import PSI_ALERT, js_divergence, psi, sliced_psi
from stamen.common.errors import ConfigError, StateError
from stamen.common.state import SiteStore
from stamen.simulations.faults.label_shift import apply_label_shift


def _digits(n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("digits")
    return torch.from_numpy(np.array(data.x_train[:n], dtype=np.float32)), torch.from_numpy(
        np.array(data.y_train[:n], dtype=np.int64)
    )


def _drift(store: SiteStore, x: torch.Tensor, y: torch.Tensor, ledger: PrivacyLedger | None = None, **kw: float):
    return site_drift(
        store,
        x,
        y,
        num_classes=10,
        reference_rounds=2,
        projection_seed=7,
        ledger=ledger,
        noise_multiplier=kw.get("noise", 10.0),
        seed=int(kw.get("seed", 1)),
        budget=kw.get("budget", float("inf")),
    )


def test_unchanged_data_scores_zero_and_the_reference_freezes_after_w_rounds(tmp_path: Path) -> None:
    store = SiteStore(tmp_path, "site-a")
    x, y = _digits()
    for _ in range(4):
        assert _drift(store, x, y) == {"drift-label-psi": 0.0, "drift-label-js": 0.0, "drift-feature-psi": 0.0}
    ref = store.read_json(REFERENCE_ENTRY)
    assert ref["rounds"] == 2
    assert np.array_equal(ref["labels"], 2 * np.bincount(y.numpy(), minlength=10))


def test_a_label_shift_after_the_reference_crosses_the_alert_line(tmp_path: Path) -> None:
    x, y = _digits()
    store = SiteStore(tmp_path, "site-a")
    _drift(store, x, y)
    _drift(store, x, y)
    keep = y < 5
    scores = _drift(SiteStore(tmp_path, "site-a"), x[keep], y[keep])  # a fresh store object: state is on disk
    assert scores["drift-label-psi"] >= PSI_ALERT
    reference, current = np.bincount(y.numpy(), minlength=10), np.bincount(y[keep].numpy(), minlength=10)
    assert scores["drift-label-psi"] == pytest.approx(psi(reference, current))
    assert scores["drift-label-js"] == pytest.approx(js_divergence(reference, current))
    assert 0.25 < scores["drift-label-js"] < 0.35  # uniform over 10 classes vs over 5: 0.31 bits
    assert store.read_json(REFERENCE_ENTRY)["rounds"] == 2, "a frozen reference does not absorb new data"


def test_a_reference_of_another_shape_is_a_clear_state_error(tmp_path: Path) -> None:
    x, y = _digits()
    store = SiteStore(tmp_path, "site-a")
    _drift(store, x, y)
    with pytest.raises(StateError, match="drift reference"):
        site_drift(
            store, x, y, num_classes=3, reference_rounds=2, projection_seed=7, ledger=None, noise_multiplier=1.0, seed=1
        )


def test_under_dp_scores_are_post_processing_of_charged_cached_releases(tmp_path: Path) -> None:
    x, y = _digits()
    store = SiteStore(tmp_path, "site-a")
    ledger = PrivacyLedger.load(store)
    first = _drift(store, x, y, ledger)
    assert first["drift-label-psi"] == 0.0, "the reference is the same release: noise cannot look like drift"
    assert ledger.releases == (10.0, 10.0)  # label histogram + feature sketch
    _drift(store, x, y, ledger, seed=99)
    assert ledger.releases == (10.0, 10.0), "re-sending the same data's statistics is free"

    keep = y < 5
    shifted = _drift(store, x[keep], y[keep], ledger)
    assert ledger.releases == (10.0,) * 4, "new data, new releases"
    cached = store.read_json(RELEASES_ENTRY)
    noisy_labels = np.asarray(cached["label-histogram"]["values"])
    noisy_sketch = np.asarray(cached["feature-sketch"]["values"])
    ref = store.read_json(REFERENCE_ENTRY)
    exact = np.bincount(y[keep].numpy(), minlength=10)
    assert not np.allclose(noisy_labels, exact), "the site sent noised counts"
    assert shifted["drift-label-psi"] == pytest.approx(psi(np.asarray(ref["labels"]), noisy_labels))
    assert shifted["drift-label-js"] == pytest.approx(js_divergence(np.asarray(ref["labels"]), noisy_labels))
    assert shifted["drift-feature-psi"] == pytest.approx(sliced_psi(np.asarray(ref["sketch"]), noisy_sketch))
    assert PrivacyLedger.load(store).releases == ledger.releases, "charges are persisted"


def test_a_release_past_the_budget_is_refused_and_spends_nothing(tmp_path: Path) -> None:
    x, y = _digits()
    store = SiteStore(tmp_path, "site-a")
    ledger = PrivacyLedger.load(store)
    with pytest.raises(PrivacyRefusal, match="releasing") as refused:
        _drift(store, x, y, ledger, budget=1e-4)
    assert refused.value.code == "statistics-release"
    assert PrivacyLedger.load(store).releases == ()
    assert store.read_json(REFERENCE_ENTRY) is None


def _site_data() -> SiteData:
    x, y = _digits(200)
    return SiteData(x, y, x[:10], y[:10])


def test_label_shift_applies_from_its_round_to_the_named_sites_only() -> None:
    cfg = StamenConfig.from_mapping({"label-shift-round": 3, "label-shift-sites": "site-a, site-b"})
    data = _site_data()
    assert apply_label_shift(data, cfg, "site-a", 2, 10) is data
    assert apply_label_shift(data, cfg, "site-c", 3, 10) is data
    shifted = apply_label_shift(data, cfg, "site-b", 4, 10)
    assert set(shifted.y_train.tolist()) == {0, 1, 2, 3, 4}
    assert shifted.num_train == int((data.y_train < 5).sum())
    assert torch.equal(shifted.y_holdout, data.y_holdout), "held-out data is not shifted"
    off = StamenConfig.from_mapping({"label-shift-sites": "site-a"})
    assert apply_label_shift(data, off, "site-a", 9, 10) is data


def test_label_shift_that_leaves_nothing_is_a_clear_error() -> None:
    cfg = StamenConfig.from_mapping({"label-shift-round": 1, "label-shift-sites": "site-a"})
    data = _site_data()
    high = data.y_train >= 5
    only_high = SiteData(data.x_train[high], data.y_train[high], data.x_holdout, data.y_holdout)
    with pytest.raises(ConfigError, match="no records with labels < 5"):
        apply_label_shift(only_high, cfg, "site-a", 1, 10)
