"""Poisoning scenarios (simulation only): what each attack sends, and that real nodes refuse them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stamen.client.data import SiteData
from stamen.common.config import StamenConfig
from stamen.common.errors import ConfigError
from stamen.common.state import SiteStore
from stamen.simulations.faults.attack import attack_of, attack_partitions, poison_data, poison_update

GLOBAL = {"w": np.ones((2, 3), np.float32), "steps": np.array([4], np.int64)}
HONEST = {"w": np.full((2, 3), 1.5, np.float32), "steps": np.array([5], np.int64)}


def _cfg(**changes: object) -> StamenConfig:
    return StamenConfig.from_mapping({k.replace("_", "-"): v for k, v in changes.items()})


def test_attack_sites_is_a_count_or_a_list_of_partitions() -> None:
    assert attack_partitions("2") == {0, 1}
    assert attack_partitions("3,7") == {3, 7}
    assert attack_partitions("5,") == {5}
    assert attack_partitions("") == set()
    with pytest.raises(ConfigError, match="attack-sites"):
        attack_partitions("two")


def test_only_named_partitions_attack_and_real_nodes_refuse() -> None:
    cfg = _cfg(attack="scale", attack_sites="2")
    assert attack_of(cfg, {"partition-id": 1, "num-partitions": 10}) == "scale"
    assert attack_of(cfg, {"partition-id": 2, "num-partitions": 10}) is None
    with pytest.raises(ConfigError, match="simulation-only"):
        attack_of(cfg, {"site-id": "hospital-a", "data": "npz:/srv/a.npz"})
    assert attack_of(_cfg(), {"site-id": "hospital-a"}) is None  # no attack: real nodes train as usual


@pytest.mark.parametrize(("kind", "factor"), [("scale", 10.0), ("sign-flip", -10.0)])
def test_scaled_and_sign_flipped_updates(tmp_path: Path, kind: str, factor: float) -> None:
    sent = poison_update(kind, GLOBAL, HONEST, 10.0, SiteStore(tmp_path, "site-0000"))
    np.testing.assert_allclose(sent["w"] - GLOBAL["w"], factor * (HONEST["w"] - GLOBAL["w"]))
    assert sent["w"].dtype == np.float32
    np.testing.assert_array_equal(sent["steps"], HONEST["steps"])  # integer buffers untouched


def test_nan_bomb_and_stale_replay(tmp_path: Path) -> None:
    store = SiteStore(tmp_path, "site-0000")
    assert np.isnan(poison_update("nan", GLOBAL, HONEST, 10.0, store)["w"]).all()
    first = poison_update("stale", GLOBAL, HONEST, 10.0, store)
    np.testing.assert_array_equal(first["w"], HONEST["w"])  # first round: sent as trained, and kept
    later = poison_update("stale", GLOBAL, {k: v * 3 for k, v in HONEST.items()}, 10.0, store)
    np.testing.assert_array_equal(later["w"], HONEST["w"])  # every later round: the first one replayed
    assert poison_update(None, GLOBAL, HONEST, 10.0, store) is HONEST


def test_label_flip_trains_on_mirrored_labels() -> None:
    y = torch.tensor([0, 1, 9, 4])
    data = SiteData(torch.zeros(4, 2), y, torch.zeros(1, 2), torch.tensor([3]))
    flipped = poison_data(data, "label-flip", 10)
    assert flipped.y_train.tolist() == [9, 8, 0, 5]
    assert flipped.y_holdout.tolist() == [3]  # held-out data stays honest
    assert poison_data(data, "scale", 10) is data
