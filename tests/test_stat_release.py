"""DP releases of a site's statistics (client/stat_release.py): independent noise per statistic,
charged once per data version, exact only with DP off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stamen.client.ledger import PrivacyLedger
from stamen.client.stat_release import fingerprint, released, released_count
from stamen.common.state import SiteStore

SIGMA = 2.0


def _store(tmp_path: Path) -> SiteStore:
    return SiteStore(tmp_path / "sites", "site-a")


def _release(
    store: SiteStore, ledger: PrivacyLedger, key: str, exact: np.ndarray, y: torch.Tensor, seed: int
) -> np.ndarray:
    return released(store, key=key, fingerprint=fingerprint(y), exact=exact, l2_sensitivity=1.0, ledger=ledger,
                    noise_multiplier=SIGMA, seed=seed)  # fmt: skip


def _histogram(store: SiteStore, ledger: PrivacyLedger, y: torch.Tensor, seed: int) -> np.ndarray:
    return _release(store, ledger, "label-histogram", np.bincount(y.numpy(), minlength=3).astype(np.float64), y, seed)


def test_the_count_and_the_histogram_draw_independent_noise(tmp_path: Path) -> None:
    """Finding of issue 13: with one stream, noisy count - noisy bin 0 equalled n - c0 exactly."""
    y = torch.tensor([0] * 40 + [1] * 25 + [2] * 35)
    for seed in range(5):
        store = _store(tmp_path / str(seed))
        ledger = PrivacyLedger.load(store)
        count_noise = _release(store, ledger, "num-examples", np.array([len(y)]), y, seed)[0] - len(y)
        bin0_noise = _histogram(store, ledger, y, seed)[0] - 40
        assert abs(count_noise - bin0_noise) > 1e-6, (seed, count_noise, bin0_noise)
        assert len(ledger.releases) == 2


def test_the_same_statistic_of_the_same_data_is_charged_once_and_new_data_again(tmp_path: Path) -> None:
    store = _store(tmp_path)
    ledger = PrivacyLedger.load(store)
    y = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    first = _histogram(store, ledger, y, seed=11)
    again = _histogram(store, PrivacyLedger.load(store), y, seed=11)
    np.testing.assert_array_equal(first, again)
    assert len(PrivacyLedger.load(store).releases) == 1
    grown = torch.cat([y, torch.tensor([1])])
    other = _histogram(store, PrivacyLedger.load(store), grown, seed=11)
    assert not np.allclose(other - np.bincount(grown.numpy()), first - np.bincount(y.numpy()))
    assert PrivacyLedger.load(store).releases == (SIGMA, SIGMA)


def test_dp_off_returns_the_exact_count_and_charges_nothing(tmp_path: Path) -> None:
    y = torch.arange(17) % 3
    assert released_count(_store(tmp_path), None, y, noise_multiplier=SIGMA, seed=0) == 17
    assert PrivacyLedger.load(_store(tmp_path)).releases == ()
