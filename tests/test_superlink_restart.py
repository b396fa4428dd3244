"""The SuperLink is killed mid-run and comes back: the run continues from the server's checkpoint.

Flower cannot continue a run whose ServerApp died with the SuperLink: the new SuperLink
(same database file) still knows the registered nodes — the sites' SuperNodes reconnect on
their own, their node ids unchanged — but the run's ServerApp process is gone. So the
recovery is the procedure the README describes: restart ``stamen superlink`` on the same
database, then ``flwr run`` again with ``resume-from`` set to the run's directory; stamen's
ServerApp continues from its newest checkpoint. This test does exactly that with real
processes and checks that no round completed (and checkpointed) before the kill is lost.

Run alone with ``pytest -m deployment``.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from stamen.simulations.bench.loopback import Loopback, digits_shards, read_progress

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

ROUNDS = 5
RUN_TIMEOUT = 600.0
SITES = ["site-a", "site-b"]


def _checkpointed(out: Path) -> list[int]:
    ckpt = out / "checkpoints"
    return sorted(int(p.stem.split("-")[1]) for p in ckpt.glob("ckpt-*.json")) if ckpt.is_dir() else []


def test_a_killed_superlink_restarts_and_the_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = {
        "num-server-rounds": ROUNDS,
        "dataset": "digits",
        "round-timeout": 120.0,
        "min-available-sites": len(SITES),
        "wait-for-sites": 120.0,
        "lr-schedule": "constant",
        "lr": 0.1,
        "eval-every": 0,
        "seed": 3,
    }
    with Loopback(tmp_path / "fed") as fed:
        superlink = fed.start_superlink()
        for site_id, (x, y) in zip(SITES, digits_shards(len(SITES)), strict=True):
            fed.add_site(site_id, x, y)
        nodes = [fed.start_node(s) for s in SITES]
        first = fed.flwr_run({**config, "out-dir": str(out)})

        deadline = time.monotonic() + RUN_TIMEOUT
        while 2 not in _checkpointed(out):
            assert time.monotonic() < deadline, f"no checkpoint of round 2\n{first.tail()}"
            assert first.popen.poll() is None, first.tail()
            time.sleep(0.2)
        how = fed.stop(superlink, signal.SIGKILL)  # the SuperLink and its ServerApp, at once
        assert how == "SIGKILL", how
        before = {row["round"]: row for row in read_progress(out)}
        saved = _checkpointed(out)
        assert max(saved) < ROUNDS, "the run ended before the kill"

        fed.start_superlink(name="superlink-restarted")
        for node in nodes:
            assert node.popen.poll() is None, f"a site did not survive the SuperLink's restart\n{node.tail()}"
        resumed = fed.flwr_run({**config, "resume-from": str(out)}, name="flwr-run-resumed")
        assert resumed.popen.wait(timeout=RUN_TIMEOUT) == 0, resumed.tail()
        assert all(node.popen.poll() is None for node in nodes)

    after = read_progress(out)
    summary = json.loads((out / "summary.json").read_text())
    context = f"before: {before}\nafter: {after}\n{resumed.tail()}"
    assert [r["round"] for r in after] == list(range(1, ROUNDS + 1)), context
    # `flwr run` exits 0 even when the ServerApp dies: the run's own summary is the proof.
    assert (summary["status"], summary["rounds_completed"]) == ("completed", ROUNDS), context
    for rnd in saved:  # every checkpointed round survives exactly as it was recorded
        assert after[rnd - 1] == before[rnd], context
    assert after[-1]["central_accuracy"] > after[0]["central_accuracy"], context
