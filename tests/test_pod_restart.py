"""What a Kubernetes pod restart does to a site: its ``stamen node`` process ends, a new one
starts on the same state volume, and the site's privacy ledger continues.

A deployed federation on loopback (``stamen superlink``, two ``stamen node`` sites named as
the StatefulSet of deploy/k8s/stamen-sites.yaml names them, DP with each site's own budget,
``flwr run``). After round 1, ``site-1``'s node gets SIGTERM, then SIGKILL after a grace, as
the kubelet ends a container, and is started again at once with the same state directory.
Its ledger, sampled all along, never shows epsilon going down, and it ends with more rounds
and steps than it had at the restart.

Run alone with ``pytest -m deployment``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from stamen.client.ledger import LEDGER_ENTRY, PrivacyLedger
from stamen.common.errors import StateError
from stamen.common.state import SiteStore
from stamen.simulations.bench.loopback import Loopback, digits_shards, read_progress

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

ROUNDS = 4
DELTA = 1e-5
SITES = ["site-0", "site-1"]
RESTARTED = "site-1"
RUN_TIMEOUT = 600.0


def _ledger(state_dir: Path) -> tuple[float, int, int] | None:
    """(epsilon, rounds, steps) of the restarted site's ledger; None before its first DP round."""
    store = SiteStore(state_dir, RESTARTED)
    if store.read_json(LEDGER_ENTRY) is None:
        return None
    ledger = PrivacyLedger.load(store, "rdp")
    return ledger.epsilon(DELTA), ledger.rounds, ledger.steps


class LedgerWatch(threading.Thread):
    """Reads the site's ledger every half second: every epsilon it ever showed, in order."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(daemon=True)
        self.state_dir, self.seen, self.done = state_dir, [], threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            try:
                now = _ledger(self.state_dir)
            except (StateError, ValueError, OSError):  # a write in progress: read it next time
                continue
            if now is not None and (not self.seen or self.seen[-1] != now[0]):
                self.seen.append(now[0])


def _wait_for(cond: object, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.3)


def test_a_site_restarted_on_its_state_volume_continues_its_ledger(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with Loopback(tmp_path / "fed") as fed:
        fed.start_superlink()
        for site_id, (x, y) in zip(SITES, digits_shards(len(SITES)), strict=True):
            fed.add_site(site_id, x, y)
        own = ("--epsilon-budget", "1000")
        nodes = {s: fed.start_node(s, privacy=own) for s in SITES}
        watch = LedgerWatch(fed.sites[RESTARTED].state_dir)
        watch.start()
        run = fed.flwr_run(
            {
                "num-server-rounds": ROUNDS,
                "dataset": "digits",
                "out-dir": str(out),
                "round-timeout": 60.0,
                "min-available-sites": 2,
                "wait-for-sites": 180.0,
                "lr": 0.1,
                "dp": True,
                "noise-multiplier": 0.8,
                "epsilon-budget": 1000.0,
                "seed": 7,
            }
        )
        _wait_for(lambda: len(read_progress(out)) >= 1 and run.popen.poll() is None, "round 1", RUN_TIMEOUT)
        _wait_for(lambda: _ledger(fed.sites[RESTARTED].state_dir) is not None, "the site's first ledger", 60)
        how = fed.stop(nodes[RESTARTED])  # the kubelet: SIGTERM, SIGKILL after the grace
        before = _ledger(fed.sites[RESTARTED].state_dir)
        fed.start_node(RESTARTED, name=f"{RESTARTED}-restarted", privacy=own)
        assert run.popen.wait(timeout=RUN_TIMEOUT) == 0, run.tail()
        watch.done.set()
        watch.join()
        after = _ledger(fed.sites[RESTARTED].state_dir)
        participation = SiteStore(fed.sites[RESTARTED].state_dir, RESTARTED).read_json("participation")

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["rounds_completed"]) == ("completed", ROUNDS), run.tail()
    assert how in ("SIGTERM", "SIGKILL"), how
    assert before is not None and after is not None
    assert after[1] > before[1] and after[2] > before[2], (before, after)  # more rounds, more steps
    assert after[0] > before[0] > 0, (before, after)
    assert participation["last_round"] >= 3, participation  # it trained again after the restart
    assert watch.seen == sorted(watch.seen) and watch.seen[-1] == after[0], watch.seen
