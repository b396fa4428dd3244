"""The site's privacy front door (client/privacy.py): one read of each ledger per round, one refusal type.

The ClientApp runs in-process (tests/clientdrive.py) on a real data directory and state
store; reads of ledger entries are counted at the store, the only place a ledger is read.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from clientdrive import OneSite, site_terms
from opacus.accountants import RDPAccountant

from stamen.client.ledger import LEDGER_ENTRY, Ledger, PrivacyLedger, PrivacyRefusal
from stamen.client.pool import TrainingPool
from stamen.client.privacy import SitePrivacy
from stamen.client.shard_privacy import ShardLedgers, shard_ledger_name
from stamen.client.view import SiteView
from stamen.common.config import StamenConfig
from stamen.common.datasets import load_dataset
from stamen.common.state import SiteStore

pytestmark = pytest.mark.usefixtures("serverapp_identity", "one_torch_thread")
DELTA = 1e-5


def _site(tmp_path: Path, policy: str, budget: float = 50.0) -> OneSite:
    """A DP site with two data shards in its data directory and a replay buffer."""
    cfg = StamenConfig.from_mapping(
        {
            "dataset": "digits",
            "dp": True,
            "noise-multiplier": 1.0,
            "epsilon-budget": budget,
            "privacy-policy": policy,
            "replay-size": 200,
            "lr-schedule": "constant",
        }
    )
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    data = load_dataset("digits")
    for name, rows in (("a.npz", slice(0, 300)), ("b.npz", slice(300, 500))):
        np.savez(inbox / name, x=data.x_train[rows], y=data.y_train[rows])
    node = {"site-id": "node-a", "data-dir": str(inbox), "state-dir": str(tmp_path / "state"), **site_terms(cfg)}
    return OneSite(cfg, node, "logreg", (1, 8, 8), 10)


def _stored_ledgers(tmp_path: Path) -> dict[str, dict[str, Any]]:
    root = tmp_path / "state" / "node-a"
    return {p.name.removesuffix(".json"): json.loads(p.read_text())["data"] for p in root.glob(f"{LEDGER_ENTRY}*.json")}


def _epsilon(doc: dict[str, Any]) -> float:
    """Epsilon of a stored ledger, recomputed by a fresh Opacus accountant."""
    acc = RDPAccountant()
    acc.history = [tuple(e) for e in doc["history"]] + [(sigma, 1.0, 1) for sigma in doc["releases"]]
    return float(acc.get_epsilon(DELTA))


@pytest.mark.parametrize("policy", ["refuse", "per-shard"])
def test_a_dp_round_reads_each_ledger_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str) -> None:
    site = _site(tmp_path, policy)
    reads: Counter[str] = Counter()
    read_json = SiteStore.read_json

    def counted(store: SiteStore, name: str, default: Any = None) -> Any:
        if name.startswith(LEDGER_ENTRY):
            reads[name] += 1
        return read_json(store, name, default)

    monkeypatch.setattr(SiteStore, "read_json", counted)
    for server_round in (1, 2):
        reads.clear()
        reply = site.train(server_round)
        assert reply["status"] == "ok", reply
        stored = _stored_ledgers(tmp_path)
        # every ledger the round charged or reported was read, and read once
        assert reads == Counter(dict.fromkeys(stored, 1)), reads
        assert all(doc["rounds"] == server_round for doc in stored.values())
        # the front door's in-memory ledgers are what it wrote: the reply matches the files
        worst = max(stored.values(), key=_epsilon)
        assert reply["epsilon"] == pytest.approx(_epsilon(worst))
        assert (reply["ledger-rounds"], reply["ledger-releases"]) == (worst["rounds"], len(worst["releases"]))
        assert reply["ledger-steps"] == sum(e[2] for e in worst["history"])
    if policy == "refuse":
        assert list(stored) == [LEDGER_ENTRY]
    else:
        assert len(stored) == 2 and LEDGER_ENTRY not in stored, "one ledger per shard"


def _view(n_old: int = 100, n_new: int = 200) -> SiteView:
    x = torch.zeros(n_old + n_new, 4)
    return SiteView(
        x,
        torch.zeros(n_old + n_new, dtype=torch.int64),
        x[:0],
        torch.zeros(0, dtype=torch.int64),
        np.arange(n_old + n_new),
        np.repeat(np.array([0, 1], dtype=np.int32), [n_old, n_new]),
        ("old", "new"),
    )


def _cfg(policy: str) -> StamenConfig:
    return StamenConfig.from_mapping({"dp": True, "noise-multiplier": 1.0, "privacy-policy": policy})


def _release_epsilon(sigma: float) -> float:
    acc = RDPAccountant()
    acc.history = [(sigma, 1.0, 1)]
    return float(acc.get_epsilon(DELTA))


def test_a_release_and_a_round_past_the_budget_raise_one_refusal_type_and_spend_nothing(tmp_path: Path) -> None:
    store = SiteStore(tmp_path, "site-a")
    pool = TrainingPool.build(_view())
    cfg = _cfg("refuse")
    with pytest.raises(PrivacyRefusal, match="releasing") as release:
        SitePrivacy(store, cfg, budget=1e-4).plan(pool, seed=0)
    assert release.value.code == "statistics-release"
    assert PrivacyLedger.load(store).releases == ()
    # a budget the size release fits in (dp-stats-noise 10) but a DP-SGD round at noise 1 does not
    budget = 1.5 * _release_epsilon(float(cfg["dp-stats-noise"]))
    with pytest.raises(PrivacyRefusal, match="this round would bring epsilon") as training:
        SitePrivacy(store, cfg, budget=budget).plan(pool, seed=0)
    assert training.value.code == "training-round"
    ledger = PrivacyLedger.load(store)
    assert (ledger.releases, ledger.rounds) == ((10.0,), 0), "the release was charged, the round was not"
    # under refuse, statistics the site cannot pay for refuse the round
    spent = SitePrivacy(store, cfg, budget=1.01 * ledger.epsilon(DELTA))
    with pytest.raises(PrivacyRefusal, match="releasing") as drift:
        spent.release_statistics(["base"], lambda led: _release(led, spent.budget))
    assert drift.value.code == "statistics-release"

    per_shard = SitePrivacy(store, _cfg("per-shard"), budget=1e-4)
    no_scores = per_shard.release_statistics(["old", "new"], lambda led: _release(led, per_shard.budget))
    assert no_scores == {}, "under per-shard, statistics a shard cannot pay for are left out, not refused"
    with pytest.raises(PrivacyRefusal, match="every data shard") as shards:
        per_shard.plan(pool, seed=0)
    assert shards.value.code == "every-shard-spent"
    assert PrivacyLedger.load(store, name=shard_ledger_name("old")).releases == ()


def _release(ledger: Ledger, budget: float) -> dict[str, float]:
    """A stand-in release of one statistic: refuse past ``budget``, else charge it."""
    if reason := ledger.release_refusal(10.0, DELTA, budget):
        raise PrivacyRefusal("statistics-release", reason)
    ledger.record_release(10.0)
    return {"charged": 1.0}


@pytest.mark.parametrize(("budget", "code"), [(1e-4, "statistics-release"), (1.0, "training-round")])
def test_the_clientapp_turns_either_refusal_into_refused_budget(tmp_path: Path, budget: float, code: str) -> None:
    site = _site(tmp_path, "refuse", budget=budget)
    reply = site.train(1)
    assert reply["status"] == "refused_budget" and reply["code"] == reply["reason"] == code, reply
    stored = _stored_ledgers(tmp_path)
    assert all(doc["rounds"] == 0 and _epsilon(doc) <= budget for doc in stored.values()), stored


def test_both_ledgers_implement_the_protocol_and_shards_are_charged_together(tmp_path: Path) -> None:
    store = SiteStore(tmp_path, "site-a")
    load = SitePrivacy(store, _cfg("per-shard"), budget=10.0).ledger
    shards = ShardLedgers.load(load, ["old", "new"])
    assert isinstance(load(LEDGER_ENTRY), Ledger) and isinstance(shards, Ledger)
    shards.ledgers["old"].record(1.0, 0.5, 400)
    assert shards.refusal(1.0, 0.1, 10, DELTA, 10.0).startswith("shard old: privacy budget")
    assert shards.epsilon(DELTA) == pytest.approx(shards.ledgers["old"].epsilon(DELTA))
    shards.record(1.0, 0.1, 10)
    assert [PrivacyLedger.load(store, name=shard_ledger_name(s)).rounds for s in ("new", "old")] == [1, 2]
