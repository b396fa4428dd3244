"""The replay buffer: a uniform, seeded reservoir that survives restarts and replays only the past."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from clientdrive import OneSite

from stamen.client.data import SiteData
from stamen.client.pool import TrainingPool
from stamen.client.replay import ReplayBuffer
from stamen.client.view import SiteView
from stamen.common.config import StamenConfig
from stamen.common.datasets import load_dataset
from stamen.common.errors import StateError
from stamen.common.state import SiteStore


def _view(ids: range | list[int], shard: str = "s1") -> SiteView:
    """Records whose inputs and labels encode their id, so a replayed row can be traced."""
    ids_arr = np.asarray(list(ids), dtype=np.int64)
    x = torch.from_numpy(ids_arr.astype(np.float32)).reshape(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
    data = SiteData(x, torch.from_numpy(ids_arr % 10), x[:0], torch.zeros(0, dtype=torch.int64))
    return SiteView.single_shard(data, ids_arr, shard)


def _store(tmp_path: Path) -> SiteStore:
    return SiteStore(tmp_path / "sites", "site-a")


def test_every_record_is_kept_with_equal_probability(tmp_path: Path) -> None:
    """Offer 100 records in 10 rounds of 10 to a 20-slot reservoir, 600 times: each is kept ~20% of runs."""
    counts = np.zeros(100)
    runs = 600
    store = _store(tmp_path)  # never saved to: every run starts empty
    for seed in range(runs):
        buf = ReplayBuffer(store, 20, seed)
        for r in range(10):
            buf.offer(_view(range(10 * r, 10 * r + 10)))
        counts[buf.ids] += 1
    share = counts / runs
    assert share.mean() == pytest.approx(0.2)
    # binomial(600, 0.2) has sd 0.016: 5 sd either side, for each of 100 records
    assert share.min() > 0.2 - 0.08 and share.max() < 0.2 + 0.08, (share.min(), share.max())
    # early and late records alike (a buffer that keeps the first or the last records fails this)
    assert abs(share[:50].mean() - share[50:].mean()) < 0.03


def test_the_buffer_never_exceeds_its_capacity_and_fills_first(tmp_path: Path) -> None:
    buf = ReplayBuffer(_store(tmp_path), 8, seed=1)
    assert buf.offer(_view(range(5))) == 5 and len(buf) == 5
    assert sorted(buf.ids.tolist()) == [0, 1, 2, 3, 4]
    assert buf.offer(_view(range(5, 50))) == 45 and len(buf) == 8
    assert buf.offer(_view(range(50))) == 0, "records already offered are not offered again"
    assert buf.seen == 50


def test_a_restarted_site_continues_exactly_where_it_stopped(tmp_path: Path) -> None:
    straight = ReplayBuffer(_store(tmp_path / "a"), 16, seed=3)
    for r in range(6):
        straight.offer(_view(range(20 * r, 20 * r + 20)))
    for r in range(6):
        buf = ReplayBuffer(_store(tmp_path / "b"), 16, seed=3)  # a new object each round: a restart
        buf.offer(_view(range(20 * r, 20 * r + 20)))
        buf.save()
    restored = ReplayBuffer(_store(tmp_path / "b"), 16, seed=3)
    assert restored.ids.tolist() == straight.ids.tolist()
    assert np.array_equal(restored.x, straight.x) and restored.seen == 120
    files = sorted(p.name for p in (tmp_path / "b" / "sites" / "site-a").iterdir())
    assert files == ["replay-6.safetensors", "replay.json"], "old generations are removed"


def test_only_records_absent_from_the_current_data_are_replayed_with_their_shard(tmp_path: Path) -> None:
    buf = ReplayBuffer(_store(tmp_path), 100, seed=0)
    buf.offer(_view(range(10), "task-1"))
    buf.offer(_view(range(10, 20), "task-2"))
    now = _view(range(15, 25), "task-2")
    replayed = buf.replay(now)
    assert sorted(replayed.x[:, 0, 0, 0].long().tolist()) == list(range(15))
    assert [replayed.shards[i] for i in replayed.shard_of] == ["task-1"] * 10 + ["task-2"] * 5
    assert len(buf.replay(now, exclude_shards=frozenset({"task-1"}))) == 5
    pool = TrainingPool.build(now, replayed)
    assert len(pool) == 25 and pool.replayed == 15 and pool.shards() == {"task-1", "task-2"}
    assert len(pool.without(frozenset({"task-1"}))) == 15
    assert pool.without(frozenset({"task-1"})).replayed == 5


def test_a_smaller_replay_size_keeps_a_subset_and_a_foreign_shape_is_refused(tmp_path: Path) -> None:
    buf = ReplayBuffer(_store(tmp_path), 30, seed=0)
    buf.offer(_view(range(30)))
    buf.save()
    smaller = ReplayBuffer(_store(tmp_path), 10, seed=0)
    assert len(smaller) == 10 and set(smaller.ids.tolist()) <= set(range(30))
    other = SiteView.single_shard(
        SiteData(torch.zeros(3, 5), torch.zeros(3, dtype=torch.int64), torch.zeros(0, 5), torch.zeros(0)), np.arange(3)
    )
    with pytest.raises(StateError, match="holds examples of shape"):
        smaller.replay(other)


def test_damaged_replay_state_is_an_error_not_a_silent_reset(tmp_path: Path) -> None:
    store = _store(tmp_path)
    buf = ReplayBuffer(store, 4, seed=0)
    buf.offer(_view(range(10)))
    buf.save()
    (store.dir / "replay-1.safetensors").unlink()
    with pytest.raises(StateError, match="arrays are missing"):
        ReplayBuffer(store, 4, seed=0)


@pytest.mark.usefixtures("serverapp_identity")
def test_on_data_that_never_changes_replay_changes_nothing(tmp_path: Path) -> None:
    """Every buffered record is still in the site's data, so nothing is replayed: the same models."""
    data = load_dataset("digits")
    np.savez(tmp_path / "site.npz", x=data.x_train[:300], y=data.y_train[:300])
    models = {}
    for size in (0, 200):
        cfg = StamenConfig.from_mapping({"dataset": "digits", "replay-size": size})
        node = {"site-id": "node-a", "data": f"npz:{tmp_path / 'site.npz'}", "state-dir": str(tmp_path / f"s{size}")}
        site = OneSite(cfg, node, "logreg", (1, 8, 8), 10)
        replies = [site.train(r) for r in (1, 2, 3)]
        assert [r["num-examples"] for r in replies] == [285] * 3
        models[size] = site.arrays
    assert all(np.array_equal(models[0][k], models[200][k]) for k in models[0])
    assert (tmp_path / "s200" / "node-a" / "replay.json").exists()
