"""The site owns its privacy (client/site_policy.py): a run config may only ask for something stricter.

One site is driven in-process (tests/clientdrive.py) on a real data directory and state
store. Every weakening instruction is refused with its reason code, nothing is trained
and the ledger file is byte-identical; the ledger records delta, accountant and policy;
the server counts refusals by reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from clientdrive import NODE_ID, OneSite
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from stamen.client import app as client_app
from stamen.client.ledger import LEDGER_ENTRY, PrivacyLedger, migrate_ledger
from stamen.client.site_policy import SitePolicy, load_policy_file, with_site_policy
from stamen.common.config import StamenConfig
from stamen.common.datasets import load_dataset
from stamen.common.errors import ConfigError, StateError
from stamen.common.reply import RejectedReply, Status, make_reply
from stamen.common.state import SiteStore
from stamen.server.loop import screen_round
from stamen.server.observe import RoundObserver

pytestmark = pytest.mark.usefixtures("serverapp_identity", "one_torch_thread")
RECORDS = 500
#: A site that requires DP, at delta 1e-5 or smaller, noise 0.8 or more, its own budget.
OWN = {"site-dp": True, "epsilon-budget": 50.0, "site-delta": 1e-5, "site-min-noise": 0.8}
#: A simulated site (Flower's engine sets partition-id) without --site-policy: the run's values are its policy.
SIMULATED = {"partition-id": 0}


def _cfg(**changes: Any) -> StamenConfig:
    base = {"dataset": "digits", "dp": True, "noise-multiplier": 1.0, "epsilon-budget": 50.0, "lr-schedule": "constant"}
    return StamenConfig.from_mapping({**base, **changes})


def _site(tmp_path: Path, cfg: StamenConfig, policy: dict[str, Any]) -> OneSite:
    """The site of ``tmp_path`` (its data directory and state store persist across calls)."""
    inbox = tmp_path / "inbox"
    if not inbox.exists():
        inbox.mkdir()
        data = load_dataset("digits")
        np.savez(inbox / "a.npz", x=data.x_train[:RECORDS], y=data.y_train[:RECORDS])
    node = {"site-id": "node-a", "data-dir": str(inbox), "state-dir": str(tmp_path / "state"), **policy}
    return OneSite(cfg, node, "logreg", (1, 8, 8), 10)


def _ledger_bytes(tmp_path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (tmp_path / "state" / "node-a").glob(f"{LEDGER_ENTRY}*.json")}


def _ledger_doc(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "state" / "node-a" / f"{LEDGER_ENTRY}.json").read_text())["data"]


@pytest.mark.parametrize(
    ("own", "changes", "code"),
    [
        (True, {"dp": False}, "policy-dp-off"),
        (True, {"delta": 1e-3}, "policy-delta"),
        (True, {"noise-multiplier": 0.5}, "policy-noise"),
        (True, {"privacy-policy": "per-shard"}, "policy-switch"),
        (True, {"accountant": "prv"}, "policy-accountant"),
        # A simulated site with no policy of its own: its ledger alone pins delta, accountant and policy.
        (False, {"delta": 1e-3}, "policy-delta"),
        (False, {"privacy-policy": "per-shard"}, "policy-switch"),
        (False, {"accountant": "prv"}, "policy-accountant"),
    ],
)
def test_a_weaker_instruction_is_refused_with_its_code_and_the_ledger_is_untouched(
    tmp_path: Path, own: bool, changes: dict[str, Any], code: str
) -> None:
    policy = OWN if own else SIMULATED
    first = _site(tmp_path, _cfg(), policy).train(1)
    assert first["status"] == "ok" and first["ledger-rounds"] == 1
    before = _ledger_bytes(tmp_path)
    weaker = _site(tmp_path, _cfg(**changes), policy)
    global_model = dict(weaker.arrays)
    reply = weaker.train(2)
    assert (reply["status"], reply["code"]) == (Status.REFUSED_BUDGET.value, code)
    assert all(np.array_equal(global_model[k], weaker.arrays[k]) for k in global_model), "nothing was trained"
    assert _ledger_bytes(tmp_path) == before
    again = _site(tmp_path, _cfg(), policy).train(2)
    assert again["status"] == "ok" and again["ledger-rounds"] == 2, "the site's own terms still train"


def test_a_real_node_without_privacy_configuration_has_the_strict_default(tmp_path: Path) -> None:
    """No site-dp on a real node: DP required, delta 1e-5, rdp, refuse, its own budget (none: no DP round)."""
    assert _site(tmp_path, _cfg(dp=False), {}).train(1)["code"] == "policy-dp-off"
    no_budget = _site(tmp_path, _cfg(), {}).train(1)
    assert (no_budget["status"], no_budget["code"]) == (Status.REFUSED_BUDGET.value, "policy-no-budget")
    assert _ledger_bytes(tmp_path) == {}, "nothing was charged"
    budget = {"epsilon-budget": 50.0}
    for changes, code in (
        ({"delta": 1e-4}, "policy-delta"),
        ({"accountant": "prv"}, "policy-accountant"),
        ({"privacy-policy": "per-shard"}, "policy-switch"),
    ):
        assert _site(tmp_path, _cfg(**changes), budget).train(1)["code"] == code
    assert _ledger_bytes(tmp_path) == {}
    # The run's own epsilon-budget (50) is not the site's: its own budget of 0.01 refuses the round.
    assert _site(tmp_path, _cfg(), {"epsilon-budget": 0.01}).train(1)["code"] == "statistics-release"
    trained = _site(tmp_path, _cfg(), budget).train(1)
    assert trained["status"] == "ok" and trained["ledger-rounds"] == 1
    assert (_ledger_doc(tmp_path)["delta"], _ledger_doc(tmp_path)["accountant"]) == (1e-5, "rdp")


def test_accepting_a_run_without_dp_takes_an_explicit_site_dp_false(tmp_path: Path) -> None:
    reply = _site(tmp_path, _cfg(dp=False), {"site-dp": False}).train(1)
    assert reply["status"] == "ok" and "epsilon" not in reply
    assert _ledger_bytes(tmp_path) == {}
    policy = SitePolicy.of({"site-id": "node-a", "site-dp": "false"}, _cfg())
    assert (policy.source, policy.dp_required) == ("site", False)
    simulated = SitePolicy.of(SIMULATED, _cfg(delta=1e-3))
    assert (simulated.source, simulated.dp_required, simulated.delta) == ("run", False, 1e-3)


def test_a_stricter_instruction_trains_and_the_ledger_keeps_the_smallest_delta(tmp_path: Path) -> None:
    assert _site(tmp_path, _cfg(), OWN).train(1)["status"] == "ok"
    stricter = _site(tmp_path, _cfg(**{"delta": 1e-6, "noise-multiplier": 1.5}), OWN).train(2)
    assert stricter["status"] == "ok"
    assert _ledger_doc(tmp_path)["delta"] == 1e-6
    assert _site(tmp_path, _cfg(), OWN).train(3)["code"] == "policy-delta", "1e-5 is now weaker than recorded"


def test_a_calibrated_noise_below_the_sites_minimum_is_refused(tmp_path: Path) -> None:
    cfg = _cfg(**{"noise-multiplier": 0.0, "target-epsilon": 40.0, "privacy-horizon-rounds": 1})
    reply = _site(tmp_path, cfg, {**OWN, "site-min-noise": 5.0}).train(1)
    assert reply["code"] == "policy-noise"
    assert PrivacyLedger.load(SiteStore(tmp_path / "state", "node-a")).rounds == 0


def test_a_sample_rate_above_the_sites_largest_is_refused(tmp_path: Path) -> None:
    reply = _site(tmp_path, _cfg(), {**OWN, "site-max-sample-rate": 0.01}).train(1)
    assert reply["code"] == "policy-sample-rate"
    assert PrivacyLedger.load(SiteStore(tmp_path / "state", "node-a")).rounds == 0


@pytest.mark.parametrize("own", [True, False])
def test_a_delta_not_below_one_over_n_is_refused(tmp_path: Path, own: bool) -> None:
    policy = {**OWN, "site-delta": 0.5} if own else SIMULATED
    reply = _site(tmp_path, _cfg(delta=2 / RECORDS), policy).train(1)  # n: at most RECORDS train records
    assert reply["code"] == "policy-delta-vs-n", reply
    assert _ledger_bytes(tmp_path) == {}
    assert _site(tmp_path, _cfg(delta=0.5 / RECORDS), policy).train(1)["status"] == "ok"


def test_the_ledger_records_delta_accountant_and_policy_and_an_old_one_is_refused(tmp_path: Path) -> None:
    assert _site(tmp_path, _cfg(delta=1e-4), SIMULATED).train(1)["status"] == "ok"
    doc = _ledger_doc(tmp_path)
    assert (doc["ledger-schema"], doc["delta"], doc["accountant"], doc["policy"]) == (2, 1e-4, "rdp", "refuse")
    store = SiteStore(tmp_path / "state", "node-a")
    old = {k: v for k, v in doc.items() if k not in ("ledger-schema", "delta", "policy")}
    store.write_json(LEDGER_ENTRY, old)
    with pytest.raises(StateError, match=r"schema 1.*migrate"):
        PrivacyLedger.load(store, delta=1e-4)
    with pytest.raises(RejectedReply, match="schema 1"):
        _site(tmp_path, _cfg(delta=1e-4), SIMULATED).train(2)
    migrate_ledger(store, LEDGER_ENTRY, delta=1e-5)
    assert PrivacyLedger.load(store, delta=1e-5).delta == 1e-5
    assert _site(tmp_path, _cfg(delta=1e-4), SIMULATED).train(2)["code"] == "policy-delta"


def test_a_site_dp_policy_needs_its_own_budget(tmp_path: Path) -> None:
    with pytest.raises(RejectedReply, match="site-dp = true needs epsilon-budget"):
        _site(tmp_path, _cfg(), {"site-dp": True}).train(1)
    with pytest.raises(ConfigError, match="but not site-dp"):
        SitePolicy.of({"site-delta": 1e-6}, _cfg())


def test_a_dp_site_sends_no_exact_count_when_the_run_turns_dp_off(tmp_path: Path) -> None:
    site = _site(tmp_path, _cfg(dp=False), OWN)
    query = client_app.query(site._message("query", 0), site.context)
    assert dict(query.content.metric_records["metrics"]) == {}


def test_the_server_counts_refusals_by_reason(tmp_path: Path) -> None:
    arrays = {"w": np.zeros(2, dtype=np.float32)}
    replies = []
    codes = {1: "policy-delta", 2: "policy-delta", 3: "policy-switch", 4: ""}
    for node, code in codes.items():
        ins = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN)
        replies.append(make_reply(ins, f"s{node}", Status.REFUSED_BUDGET, reason="refused", code=code))
    screened = screen_round(replies, {n: f"s{n}" for n in codes}, "train", arrays)
    assert screened.refused == ["s1", "s2", "s3", "s4"]
    observer = RoundObserver(_cfg())
    registry = observer.exporter.registry
    assert registry.get_sample_value("stamen_sites_refused_total", {"reason": "policy-noise"}) == 0
    observer.count_refusals(screened.refusals)
    value = registry.get_sample_value
    assert value("stamen_sites_refused_total", {"reason": "policy-delta"}) == 2
    assert value("stamen_sites_refused_total", {"reason": "policy-switch"}) == 1
    assert value("stamen_sites_refused_total", {"reason": "unknown"}) == 1
    assert value("stamen_sites_refused_total", {"reason": "policy-noise"}) == 0
    assert NODE_ID not in codes


def test_a_site_policy_file_is_checked_and_put_into_every_simulated_sites_node_config(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('site-dp = true\nepsilon-budget = 3.0\nsite-delta = 1e-6\nsite-accountant = "prv"\n')
    keys = load_policy_file(path)
    seen: list[SitePolicy] = []

    def handler(msg: Message, context: Context) -> Message:
        seen.append(SitePolicy.of(context.node_config, _cfg()))
        return msg

    context = Context(1, NODE_ID, {"partition-id": 3}, RecordDict(), {})
    with_site_policy(keys, Message(RecordDict(), dst_node_id=NODE_ID, message_type=MessageType.TRAIN), context, handler)
    (policy,) = seen
    assert (policy.own, policy.dp_required, policy.budget, policy.delta, policy.accountant) == (
        True,
        True,
        3.0,
        1e-6,
        "prv",
    )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"site-dp": True, "epsilon-budget": 1.0, "site-noise": 2.0}))
    with pytest.raises(ConfigError, match=r"unknown key.*site-noise"):
        load_policy_file(bad)
    bad.write_text(json.dumps({"site-dp": True, "epsilon-budget": 1.0, "site-delta": 2.0}))
    with pytest.raises(ConfigError, match="site-delta must be in"):
        load_policy_file(bad)
