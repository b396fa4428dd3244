"""The replay buffer: each record kept by its own keyed hash, surviving restarts, replaying only the past."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from clientdrive import OneSite, site_terms

from stamen.client.data import SiteData
from stamen.client.noise import SECRET_ENTRY, site_secret
from stamen.client.pool import TrainingPool
from stamen.client.replay import ReplayBuffer, keep_scores, membership_key
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
    """Offer 100 records in 10 rounds of 10 at keep probability 0.2, on 600 sites (600 secrets): each is kept ~20%."""
    counts = np.zeros(100)
    runs = 600
    for run in range(runs):
        buf = ReplayBuffer(_store(tmp_path / str(run)), 20, 100)  # a fresh site: a fresh secret
        for r in range(10):
            buf.offer(_view(range(10 * r, 10 * r + 10)))
        counts[buf.ids] += 1
    share = counts / runs
    assert share.mean() == pytest.approx(0.2, abs=0.01)  # 60 000 draws: sd 0.0016
    # binomial(600, 0.2) has sd 0.016: 5 sd either side, for each of 100 records
    assert share.min() > 0.2 - 0.08 and share.max() < 0.2 + 0.08, (share.min(), share.max())
    # early and late records alike (a buffer that keeps the first or the last records fails this)
    assert abs(share[:50].mean() - share[50:].mean()) < 0.03


def test_the_buffer_holds_its_size_in_expectation_and_offers_each_record_once(tmp_path: Path) -> None:
    sizes = []
    for run in range(40):
        buf = ReplayBuffer(_store(tmp_path / str(run)), 50, 1000)
        for r in range(10):
            assert buf.offer(_view(range(100 * r, 100 * r + 100))) == 100
        assert buf.offer(_view(range(1000))) == 0, "records already offered are not offered again"
        assert buf.seen == 1000 and len(set(buf.ids.tolist())) == len(buf)
        sizes.append(len(buf))
    # binomial(1000, 0.05): mean 50, sd 6.9; the mean of 40 sites has sd 1.1
    assert np.mean(sizes) == pytest.approx(50, abs=5) and max(sizes) < 50 + 5 * 6.9, sizes


def _same_secret(src: Path, dst: Path) -> None:
    """Give the site in ``dst`` the noise secret of the site in ``src`` (one site, two histories)."""
    key = _store(src).dir / SECRET_ENTRY
    site_secret(_store(src))
    _store(dst).dir.mkdir(parents=True, exist_ok=True)
    (_store(dst).dir / SECRET_ENTRY).write_bytes(key.read_bytes())


def test_a_restarted_site_continues_exactly_where_it_stopped(tmp_path: Path) -> None:
    _same_secret(tmp_path / "a", tmp_path / "b")
    straight = ReplayBuffer(_store(tmp_path / "a"), 16, 60)
    for r in range(6):
        straight.offer(_view(range(20 * r, 20 * r + 20)))
    for r in range(6):
        buf = ReplayBuffer(_store(tmp_path / "b"), 16, 60)  # a new object each round: a restart
        buf.offer(_view(range(20 * r, 20 * r + 20)))
        buf.save()
    restored = ReplayBuffer(_store(tmp_path / "b"), 16, 60)
    assert len(straight) > 0 and restored.ids.tolist() == straight.ids.tolist()
    assert np.array_equal(restored.x, straight.x) and restored.seen == 120
    files = sorted(p.name for p in (tmp_path / "b" / "sites" / "site-a").iterdir())
    assert files == [SECRET_ENTRY, "replay-6.safetensors", "replay.json"], "old generations are removed"


def test_adding_or_removing_one_record_changes_the_pool_by_that_record_only(tmp_path: Path) -> None:
    """Neighbouring streams (one record more) give replay pools that differ by that record, every round."""
    _same_secret(tmp_path / "d", tmp_path / "d-plus")
    without, with_x = ReplayBuffer(_store(tmp_path / "d"), 30, 100), ReplayBuffer(_store(tmp_path / "d-plus"), 30, 100)
    extra, differed = 10_000, 0
    for r in range(12):
        batch = list(range(20 * r, 20 * r + 20))
        without.offer(_view(batch))
        with_x.offer(_view([*batch[:7], extra, *batch[7:]] if r == 3 else batch))
        later = _view(range(20 * r + 20, 20 * r + 40))  # the next round's data: everything buffered replays
        pool_d = set(without.replay(later).x[:, 0, 0, 0].long().tolist())
        pool_plus = set(with_x.replay(later).x[:, 0, 0, 0].long().tolist())
        assert pool_d <= pool_plus and pool_plus - pool_d <= {extra}, r
        differed += pool_plus != pool_d
    assert len(without) > 30, "the stream is long enough that a bounded reservoir would have evicted"
    in_buffer = extra in with_x.ids.tolist()
    assert differed == (9 if in_buffer else 0)


@pytest.mark.usefixtures("serverapp_identity")
def test_membership_depends_on_the_sites_secret_not_the_run_seed(tmp_path: Path) -> None:
    """Two runs with different seeds on one site keep the same records; another site's secret keeps others."""
    data = load_dataset("digits")
    np.savez(tmp_path / "site.npz", x=data.x_train[:300], y=data.y_train[:300])
    kept = {}
    _same_secret(tmp_path / "seed1", tmp_path / "seed2")
    for name, seed in (("seed1", 1), ("seed2", 2), ("other", 1)):
        cfg = StamenConfig.from_mapping({"dataset": "digits", "replay-size": 40, "replay-horizon": 300, "seed": seed})
        state = tmp_path / name / "sites"
        node = {"site-id": "site-a", "data": f"npz:{tmp_path / 'site.npz'}", "state-dir": str(state), **site_terms(cfg)}
        site = OneSite(cfg, node, "logreg", (1, 8, 8), 10)
        assert site.train(1)["status"] == "ok"
        kept[name] = sorted(ReplayBuffer(SiteStore(state, "site-a"), 40, 300).ids.tolist())
    assert kept["seed1"] and kept["seed1"] == kept["seed2"]
    assert kept["other"] != kept["seed1"]


def test_a_simulated_site_without_secret_noise_keys_its_buffer_by_the_run_seed(tmp_path: Path) -> None:
    """A non-DP (or seeded-DP) simulated site reproduces from its seed; a real node or secret-noise DP site does not."""
    sim, real = {"partition-id": 0, "num-partitions": 2}, {"site-id": "site-a"}

    def key(where: str, node: dict, private: bool, mode: str = "secret", seed: int = 7) -> bytes:
        store = _store(tmp_path / where)
        return membership_key(store, node_config=node, private=private, noise_mode=mode, public_seed=seed)

    assert key("a", sim, False) == key("b", sim, False) != key("c", sim, False, seed=8)
    assert key("d", sim, True, "seeded") == key("e", sim, True, "seeded")
    assert not (_store(tmp_path / "a").dir / SECRET_ENTRY).exists(), "no secret is made where none is used"
    for node, private in ((sim, True), (real, True), (real, False)):
        first = key(f"f{private}{len(node)}", node, private)
        assert first == site_secret(_store(tmp_path / f"f{private}{len(node)}"))
        assert first != key(f"g{private}{len(node)}", node, private), "another site's secret, another key"
    buffers = []
    for where in ("h", "i"):
        buf = ReplayBuffer(_store(tmp_path / where), 20, 100, key(where, sim, False))
        buf.offer(_view(range(100)))
        buffers.append(buf.ids.tolist())
    assert buffers[0] and buffers[0] == buffers[1]


def test_only_records_absent_from_the_current_data_are_replayed_with_their_shard(tmp_path: Path) -> None:
    buf = ReplayBuffer(_store(tmp_path), 100, 100)  # keep probability 1
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
    buf = ReplayBuffer(_store(tmp_path), 30, 30)
    buf.offer(_view(range(30)))
    buf.save()
    assert len(buf) == 30
    smaller = ReplayBuffer(_store(tmp_path), 10, 30)
    scores = keep_scores(site_secret(_store(tmp_path)), np.arange(30))
    assert 0 < len(smaller) < 30 and smaller.ids.tolist() == np.flatnonzero(scores < 1 / 3).tolist()
    other = SiteView.single_shard(
        SiteData(torch.zeros(3, 5), torch.zeros(3, dtype=torch.int64), torch.zeros(0, 5), torch.zeros(0)), np.arange(3)
    )
    with pytest.raises(StateError, match="holds examples of shape"):
        smaller.replay(other)


def test_damaged_replay_state_is_an_error_not_a_silent_reset(tmp_path: Path) -> None:
    store = _store(tmp_path)
    buf = ReplayBuffer(store, 4, 4)
    buf.offer(_view(range(10)))
    buf.save()
    (store.dir / "replay-1.safetensors").unlink()
    with pytest.raises(StateError, match="arrays are missing"):
        ReplayBuffer(store, 4, 4)


@pytest.mark.usefixtures("serverapp_identity")
def test_on_data_that_never_changes_replay_changes_nothing(tmp_path: Path) -> None:
    """Every buffered record is still in the site's data, so nothing is replayed: the same models."""
    data = load_dataset("digits")
    np.savez(tmp_path / "site.npz", x=data.x_train[:300], y=data.y_train[:300])
    models = {}
    for size in (0, 200):
        cfg = StamenConfig.from_mapping({"dataset": "digits", "replay-size": size})
        node = {"site-id": "node-a", "data": f"npz:{tmp_path / 'site.npz'}", "state-dir": str(tmp_path / f"s{size}")}
        node |= site_terms(cfg)
        site = OneSite(cfg, node, "logreg", (1, 8, 8), 10)
        replies = [site.train(r) for r in (1, 2, 3)]
        assert [r["num-examples"] for r in replies] == [285] * 3
        models[size] = site.arrays
    assert all(np.array_equal(models[0][k], models[200][k]) for k in models[0])
    assert (tmp_path / "s200" / "node-a" / "replay.json").exists()
