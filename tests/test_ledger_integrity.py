"""A site's privacy ledger is tamper-evident and owned by one process (issues 13 and 17).

One site is driven in-process (tests/clientdrive.py) on a real data directory and state
store. Deleting, emptying, truncating, editing or restoring an older copy of its ledger
makes it refuse to train (``ledger-tampered``) until an operator runs
``stamen node ack-ledger``; a second process on the same state dir is refused; the server
refuses a site whose reported epsilon goes down.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from clientdrive import OneSite, site_terms
from typer.testing import CliRunner

from stamen.cli.main import app as cli
from stamen.client.ledger import EVENTS_ENTRY, HEAD_ENTRY, LEDGER_ENTRY, PrivacyLedger
from stamen.common.config import StamenConfig
from stamen.common.datasets import load_dataset
from stamen.common.errors import StateError
from stamen.common.reply import RejectedReply, SiteReply, Status
from stamen.common.state import SiteLock, SiteStore
from stamen.server.loop import Screened
from stamen.server.observe import RoundObserver
from stamen.server.run_state import RunState
from stamen.server.spend import SpendFloor

pytestmark = pytest.mark.usefixtures("serverapp_identity", "one_torch_thread")
TESTS = Path(__file__).parent
SITE = "node-a"


def _cfg() -> StamenConfig:
    return StamenConfig.from_mapping(
        {"dataset": "digits", "dp": True, "noise-multiplier": 1.0, "epsilon-budget": 50.0, "lr-schedule": "constant"}
    )


def _site(tmp_path: Path) -> OneSite:
    """The site of ``tmp_path`` (its data directory and state store persist across calls)."""
    inbox = tmp_path / "inbox"
    if not inbox.exists():
        inbox.mkdir()
        data = load_dataset("digits")
        np.savez(inbox / "a.npz", x=data.x_train[:400], y=data.y_train[:400])
    node = {"site-id": SITE, "data-dir": str(inbox), "state-dir": str(tmp_path / "state"), **site_terms(_cfg())}
    return OneSite(_cfg(), node, "logreg", (1, 8, 8), 10)


def _dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / SITE


def _ledger(tmp_path: Path) -> Path:
    return _dir(tmp_path) / f"{LEDGER_ENTRY}.json"


def _doc(tmp_path: Path) -> dict[str, Any]:
    return json.loads(_ledger(tmp_path).read_text())["data"]


def _write(path: Path, data: Any) -> None:
    path.write_text(json.dumps({"schema": 1, "data": data}))


def _delete(tmp_path: Path, older: bytes) -> str:
    _ledger(tmp_path).unlink()
    return "missing or empty"


def _empty(tmp_path: Path, older: bytes) -> str:
    _write(_ledger(tmp_path), None)
    return "missing or empty"


def _truncate(tmp_path: Path, older: bytes) -> str:
    _write(_ledger(tmp_path), {**_doc(tmp_path), "history": []})
    return "truncated"


def _edit(tmp_path: Path, older: bytes) -> str:
    doc = _doc(tmp_path)
    _write(_ledger(tmp_path), {**doc, "history": [[e[0], e[1], 1] for e in doc["history"]]})
    return "fails its MAC"


def _restore(tmp_path: Path, older: bytes) -> str:
    _ledger(tmp_path).write_bytes(older)
    return "older copy"


def _delete_with_head(tmp_path: Path, older: bytes) -> str:
    _ledger(tmp_path).unlink()
    (_dir(tmp_path) / f"{HEAD_ENTRY}.json").unlink()
    return "participation record 2"


TAMPERS: dict[str, Callable[[Path, bytes], str]] = {
    "delete": _delete,
    "empty": _empty,
    "truncate": _truncate,
    "edit": _edit,
    "restore-older": _restore,
    "delete-ledger-and-head": _delete_with_head,
}


def _two_rounds(tmp_path: Path) -> tuple[OneSite, bytes, dict[str, Any]]:
    """A site that trained two DP rounds; its ledger after round 1 (bytes) and after round 2."""
    site = _site(tmp_path)
    assert site.train(1)["status"] == "ok"
    older = _ledger(tmp_path).read_bytes()
    assert site.train(2)["status"] == "ok"
    return site, older, _doc(tmp_path)


def test_a_fresh_site_starts_and_every_write_is_sealed(tmp_path: Path) -> None:
    site = _site(tmp_path)
    assert site.train(1)["status"] == "ok"
    first = _doc(tmp_path)
    assert first["rounds"] == 1 and first["seq"] >= 1 and len(first["mac"]) == 64
    assert site.train(2)["status"] == "ok"
    second = _doc(tmp_path)  # the round's releases of statistics and its steps are writes of their own
    assert second["rounds"] == 2 and second["seq"] > first["seq"] and second["prev"] not in ("", second["mac"])
    head = json.loads((_dir(tmp_path) / f"{HEAD_ENTRY}.json").read_text())["data"]
    assert head[LEDGER_ENTRY] == second
    assert json.loads((_dir(tmp_path) / "participation.json").read_text())["data"]["dp_rounds"] == 2


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_a_tampered_ledger_refuses_the_round_and_spends_nothing(
    tmp_path: Path, tamper: str, caplog: pytest.LogCaptureFixture
) -> None:
    site, older, _ = _two_rounds(tmp_path)
    expected = TAMPERS[tamper](tmp_path, older)
    before = {p.name: p.read_bytes() for p in _dir(tmp_path).glob("*.json")}
    with caplog.at_level(logging.INFO, logger="stamen.client"):
        reply = site.train(3)
    assert (reply["status"], reply["code"], reply["reason"]) == ("refused_budget", "ledger-tampered", "ledger-tampered")
    logged = "\n".join(r.getMessage() for r in caplog.records)  # the details stay in the site's own log
    assert expected in logged and "stamen node ack-ledger" in logged
    # nothing was trained or charged: every record is byte-identical
    assert {p.name: p.read_bytes() for p in _dir(tmp_path).glob("*.json")} == before


@pytest.mark.parametrize("tamper", ["delete", "restore-older", "delete-ledger-and-head"])
def test_ack_ledger_records_the_event_reseals_from_the_highest_spend_and_the_site_trains(
    tmp_path: Path, tamper: str
) -> None:
    site, older, spent = _two_rounds(tmp_path)
    epsilon = PrivacyLedger.from_doc(SiteStore(tmp_path / "state", SITE), spent, "rdp", LEDGER_ENTRY, 1e-5).epsilon(
        1e-5
    )
    TAMPERS[tamper](tmp_path, older)
    assert site.train(3)["code"] == "ledger-tampered"
    args = ["node", "ack-ledger", "--state-dir", str(tmp_path / "state"), "--site-id", SITE]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 2 and "--reason" in refused.output
    result = CliRunner().invoke(cli, [*args, "--reason", "restored the disk from a backup"])
    assert result.exit_code == 0, result.output
    events = json.loads((_dir(tmp_path) / f"{EVENTS_ENTRY}.json").read_text())["data"]
    assert [e["reason"] for e in events] == ["restored the disk from a backup"]
    resealed = _doc(tmp_path)
    assert resealed["acknowledged"] == 1
    if tamper == "delete-ledger-and-head":  # no copy survives: the counted rounds are kept, their noise is lost
        assert (resealed["rounds"], resealed["history"], events[0]["lost_rounds"]) == (2, [], 2)
    else:  # the head's copy is the highest spend any record proves
        assert events[0]["ledgers"][LEDGER_ENTRY]["source"] == "head"
        assert {k: resealed[k] for k in ("history", "rounds", "releases")} == {
            k: spent[k] for k in ("history", "rounds", "releases")
        }
        assert events[0]["ledgers"][LEDGER_ENTRY]["epsilon"] == pytest.approx(epsilon)
    reply = site.train(3)
    assert reply["status"] == "ok", reply
    assert _doc(tmp_path)["rounds"] == 3
    if tamper != "delete-ledger-and-head":
        assert reply["epsilon"] > epsilon


def test_a_schema_2_ledger_from_before_sealing_is_sealed_on_its_first_check(tmp_path: Path) -> None:
    site, _, spent = _two_rounds(tmp_path)
    _write(_ledger(tmp_path), {k: v for k, v in spent.items() if k not in ("seq", "prev", "mac")})
    (_dir(tmp_path) / f"{HEAD_ENTRY}.json").unlink()
    assert site.train(3)["status"] == "ok"
    doc = _doc(tmp_path)
    assert doc["rounds"] == 3 and doc["seq"] >= 2  # sealed as it stood (write 1), then charged
    head = json.loads((_dir(tmp_path) / f"{HEAD_ENTRY}.json").read_text())["data"]
    assert head[LEDGER_ENTRY] == doc


#: The first process: holds the site dir's lock for its life, as ``stamen node`` does, and trains.
_HOLDER = """
import sys
from pathlib import Path
from stamen.common.flwr_internal import SUPERLINK_NODE_ID, TaskIdentity
from stamen.common.state import SiteLock
from test_ledger_integrity import _dir, _site
TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = 1, 1, SUPERLINK_NODE_ID
tmp = Path(sys.argv[1])
site = _site(tmp)
SiteLock.acquire(_dir(tmp))  # like stamen node: the lock for this process's life
charged = [site.train(r)["status"] for r in (1, 2)]
print("charged", charged.count("ok"), flush=True)
sys.stdin.readline()
"""


def test_a_second_process_on_one_site_dir_is_refused_and_the_ledger_counts_the_first_ones_rounds(
    tmp_path: Path,
) -> None:
    _site(tmp_path)  # the data directory
    _dir(tmp_path).mkdir(parents=True)
    first = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)],
        cwd=TESTS,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout is not None and first.stdin is not None
        line = first.stdout.readline()
        assert line.split()[:1] == ["charged"], line
        charged = int(line.split()[1])
        refused = re.escape(f"{_dir(tmp_path).resolve()} is in use by another process (pid {first.pid})")
        with pytest.raises(RejectedReply, match=f"client_error: site state dir {refused}"):
            _site(tmp_path).train(3)  # this process is the second on the dir: an error reply, nothing trained
        assert (charged, _doc(tmp_path)["rounds"]) == (2, 2)
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.wait(timeout=60) == 0
    finally:
        first.kill()
    # the first process is gone, and the OS dropped its lock: no stale lock, this one trains
    assert _site(tmp_path).train(3)["status"] == "ok"
    assert _doc(tmp_path)["rounds"] == 3


def test_the_lock_is_reentrant_within_a_process_and_a_forked_child_is_refused(tmp_path: Path) -> None:
    store = SiteStore(tmp_path, SITE)
    with SiteLock.held(store.dir), SiteLock.held(store.dir):
        assert (store.dir / ".lock").read_text().strip() == str(os.getpid())
        child = os.fork()
        if child == 0:  # shares the parent's descriptor, yet is a second process on the dir
            try:
                SiteLock.acquire(store.dir)
            except StateError:
                os._exit(3)
            os._exit(0)
        assert os.waitpid(child, 0)[1] >> 8 == 3
    with SiteLock.held(store.dir):  # released and taken again
        pass


def _reply(site: str, epsilon: float) -> SiteReply:
    return SiteReply(site, Status.OK, metrics={"epsilon": epsilon})


def test_the_server_refuses_and_counts_a_site_whose_spend_decreased() -> None:
    floor = SpendFloor()
    first = Screened(good=[_reply("a", 1.5), _reply("b", 2.0)])
    floor.screen(first)
    assert [r.site_id for r in first.good] == ["a", "b"]
    # the run is checkpointed and resumed: the floor is part of its state
    state = RunState()
    state.register("spend", floor)
    resumed, registry = SpendFloor(), RunState()
    registry.register("spend", resumed)
    registry.load_state_dict(json.loads(json.dumps(state.state_dict())))
    second = Screened(good=[_reply("a", 1.2), _reply("b", 2.0), _reply("c", 0.1)])
    resumed.screen(second)
    assert [r.site_id for r in second.good] == ["b", "c"]
    assert (second.refused, second.refusals) == (["a"], Counter({"spend-decreased": 1}))
    assert resumed.last == {"a": 1.5, "b": 2.0, "c": 0.1}
    observer = RoundObserver(_cfg())
    observer.count_refusals(second.refusals)
    registry_ = observer.exporter.registry
    assert registry_.get_sample_value("stamen_sites_refused_total", {"reason": "spend-decreased"}) == 1
