"""Privacy over a run that never ends: the two privacy policies, on a node whose data keeps arriving.

``per-shard``: fresh data gets fresh budget; replayed records stay charged to their own
shard; a shard out of budget leaves the training data. ``refuse``: one ledger, and once it
is spent the site refuses forever, new data or not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from clientdrive import OneSite, site_terms
from opacus.accountants import RDPAccountant

from stamen.client.dp import dp_schedule
from stamen.client.ledger import PrivacyLedger
from stamen.client.pool import TrainingPool
from stamen.client.shard_privacy import plan_private_round, shard_ledger_name, spent
from stamen.client.view import SiteView
from stamen.common.config import StamenConfig
from stamen.common.datasets import load_dataset
from stamen.common.state import SiteStore

pytestmark = pytest.mark.usefixtures("serverapp_identity", "one_torch_thread")
BUDGET = 4.0
#: One logical batch holds every pool these tests build (at most ~1,300 records), so the sample
#: rate is 1 and a round's steps are fixed whatever the released (noisy) size: the budget
#: arithmetic holds for any secret noise draw, far from any batch-count boundary.
WHOLE_POOL_BATCH = 4096
DELTA = 1e-5


def _site(tmp_path: Path, policy: str) -> OneSite:
    cfg = StamenConfig.from_mapping(
        {
            "dataset": "digits",
            "dp": True,
            "noise-multiplier": 2.5,  # at rate 1, one step a round: a shard affords a few rounds of BUDGET
            "batch-size": WHOLE_POOL_BATCH,
            "epsilon-budget": BUDGET,
            "privacy-policy": policy,
            "replay-size": 1000,
            "replay-horizon": 1000,  # keep probability 1: every record the site trained on replays
            "lr-schedule": "constant",
        }
    )
    (tmp_path / "inbox").mkdir()
    node = {"site-id": "node-a", "data-dir": str(tmp_path / "inbox"), "state-dir": str(tmp_path / "state")}
    node |= site_terms(cfg)
    return OneSite(cfg, node, "logreg", (1, 8, 8), 10)


def _drop(tmp_path: Path, name: str, rows: slice) -> int:
    """Write rows of digits as shard ``name``; return how many of them are trained on (5% are held out)."""
    data = load_dataset("digits")
    np.savez(tmp_path / "inbox" / name, x=data.x_train[rows], y=data.y_train[rows])
    n = len(data.y_train[rows])
    return n - round(0.05 * n)


def _ledgers(tmp_path: Path) -> dict[str, dict]:
    store = tmp_path / "state" / "node-a"
    return {p.name: json.loads(p.read_text())["data"] for p in store.glob("privacy_ledger*.json")}


def test_per_shard_fresh_data_gets_fresh_budget_and_replay_is_charged_to_its_shard(tmp_path: Path) -> None:
    site = _site(tmp_path, "per-shard")
    n_a = _drop(tmp_path, "a.npz", slice(0, 600))
    replies, spent_after = {}, {}

    def train(server_round: int) -> None:
        replies[server_round] = site.train(server_round)
        spent_after[server_round] = {
            name: (doc["rounds"], len(doc["releases"])) for name, doc in _ledgers(tmp_path).items()
        }

    for r in (1, 2):
        train(r)
    os.remove(tmp_path / "inbox" / "a.npz")  # A's records now exist only in the replay buffer
    n_b = _drop(tmp_path, "b.npz", slice(600, 1000))
    for r in range(3, 9):
        train(r)
    n_c = _drop(tmp_path, "c.npz", slice(1000, 1300))
    for r in (9, 10):
        train(r)

    a, b, c = (f"privacy_ledger.shard-{_sha(tmp_path, name)}.json" for name in ("a", "b", "c"))
    assert "privacy_ledger.json" not in spent_after[10], "per-shard keeps no site-wide ledger"
    rounds_of = {r: {k: v[0] for k, v in spent.items()} for r, spent in spent_after.items()}
    # A trained from its file in rounds 1-2, then only through replay, each round charged to A
    assert rounds_of[3][a] == 3 and rounds_of[3][b] == 1
    # the sizes a DP site sends are Gaussian releases (std dp-stats-noise = 10): within 5 std of the truth
    assert replies[1]["num-examples"] == pytest.approx(n_a, abs=50)
    assert replies[3]["num-examples"] == pytest.approx(n_a + n_b, abs=50)
    # a round where A is out of budget: A and its replayed records leave the data, B trains alone
    alone = [r for r in range(4, 9) if replies[r]["status"] == "ok" and rounds_of[r][a] == rounds_of[r - 1][a]]
    assert alone, "A never ran out of budget before B"
    r = alone[0]
    assert rounds_of[r][b] == rounds_of[r - 1][b] + 1
    assert replies[r]["num-examples"] == pytest.approx(n_b, abs=50)
    assert replies[r]["sample-rate"] == dp_schedule(int(replies[r]["num-examples"]), site.cfg)[0]
    # then B is spent too: the site refuses, and a refusing site pays for nothing
    refused = [r for r in range(4, 9) if replies[r]["status"] == "refused_budget"]
    assert refused and refused == list(range(refused[0], 9))
    assert replies[refused[-1]]["code"] == replies[refused[-1]]["reason"] == "every-shard-spent"
    assert spent_after[refused[-1]] == spent_after[refused[0]]
    # fresh data, fresh budget: C arrives and the site trains again; on its own the round after
    assert replies[9]["status"] == replies[10]["status"] == "ok"
    assert rounds_of[10][c] == 2
    assert replies[10]["num-examples"] == pytest.approx(n_c, abs=50)
    epsilons = {name: _epsilon(doc) for name, doc in _ledgers(tmp_path).items()}
    assert all(eps <= BUDGET for eps in epsilons.values()), epsilons
    assert replies[10]["epsilon"] == pytest.approx(max(epsilons.values()))


def test_refuse_keeps_one_ledger_and_refuses_forever_even_when_new_data_arrives(tmp_path: Path) -> None:
    site = _site(tmp_path, "refuse")
    _drop(tmp_path, "a.npz", slice(0, 600))
    replies = {r: site.train(r) for r in (1, 2, 3)}
    _drop(tmp_path, "b.npz", slice(600, 1000))
    replies.update({r: site.train(r) for r in range(4, 9)})
    refused = [r for r, reply in replies.items() if reply["status"] == "refused_budget"]
    assert refused and refused == list(range(refused[0], 9)), "once refused, always refused"
    assert replies[8]["reason"] == replies[8]["code"] in {"statistics-release", "training-round"}
    ledgers = _ledgers(tmp_path)
    assert list(ledgers) == ["privacy_ledger.json"]
    assert ledgers["privacy_ledger.json"]["rounds"] == refused[0] - 1
    assert _epsilon(ledgers["privacy_ledger.json"]) <= BUDGET


def test_a_plan_drops_spent_shards_before_it_sets_the_rate(tmp_path: Path) -> None:
    store = SiteStore(tmp_path / "state", "site-a")
    cfg = StamenConfig.from_mapping({"dp": True, "noise-multiplier": 1.0, "privacy-policy": "per-shard"})
    x = torch.zeros(300, 4)
    view = SiteView(
        x,
        torch.zeros(300, dtype=torch.int64),
        x[:0],
        torch.zeros(0, dtype=torch.int64),
        np.arange(300),
        np.repeat(np.array([0, 1], dtype=np.int32), [100, 200]),
        ("old", "new"),
    )
    pool = TrainingPool.build(view)
    first = plan_private_round(pool, store, cfg, budget=50.0, seed=0)
    assert not isinstance(first, str) and first.sample_rate == dp_schedule(first.count, cfg)[0]
    assert first.count == pytest.approx(300, abs=50)  # a charged release of the size, to both shards
    assert [len(ledger.releases) for ledger in first.ledgers] == [1, 1]
    old = PrivacyLedger.load(store, "rdp", shard_ledger_name("old"))
    old.record(1.0, 0.5, 400)  # spent: one more round would pass a budget of 10
    plan = plan_private_round(pool, store, cfg, budget=10.0, seed=0)
    assert not isinstance(plan, str)
    assert plan.excluded == {"old"} and len(plan.pool) == 200
    assert plan.count == pytest.approx(200, abs=50) and plan.sample_rate == dp_schedule(plan.count, cfg)[0]
    assert [ledger.rounds for ledger in plan.ledgers] == [0]  # only "new" will be charged
    assert spent(store, cfg)[0] == pytest.approx(old.epsilon(DELTA))
    refuse_cfg = cfg.replace(privacy_policy="refuse")
    site_plan = plan_private_round(pool, store, refuse_cfg, budget=10.0, seed=0)
    assert not isinstance(site_plan, str) and len(site_plan.pool) == 300, "refuse ignores shard ledgers"


def _sha(tmp_path: Path, name: str) -> str:
    manifest = json.loads((tmp_path / "state" / "node-a" / "data_manifest.json").read_text())["data"]
    return next(s["sha256"][:16] for s in manifest["shards"] if s["name"] == f"{name}.npz")


def _epsilon(doc: dict) -> float:
    """Epsilon of a stored ledger (DP-SGD steps and releases of the size), recomputed by a fresh Opacus accountant."""
    acc = RDPAccountant()
    acc.history = [tuple(e) for e in doc["history"]] + [(sigma, 1.0, 1) for sigma in doc["releases"]]
    return float(acc.get_epsilon(DELTA))
