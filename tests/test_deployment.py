"""A deployed federation on loopback, as real processes: TLS, node authentication, a node
killed and restarted mid-run, and a node nobody registered.

SuperLink (``stamen superlink``: TLS with a fresh development CA, SuperNode authentication,
a database file), three sites (``stamen node``: each with its own key, a watched data
directory holding an npz shard and a private state directory, DP-SGD with a privacy ledger),
``flwr run`` of 8 rounds with a per-round reply deadline. In round 2 one site's
``flower-supernode`` gets ``kill -9`` while it trains; the deadline ends round 2 with the two
others (Flower itself would notice the dead node only after its heartbeat timeout, about a
minute). The site is started again with the same state directory as round 3 begins; its key
keeps its node id, so it may still catch round 3's instruction before the deadline, and it takes
part in a later round with its epsilon continuing from its ledger. A node whose key was never
registered is refused by the SuperLink.

Run alone with ``pytest -m deployment``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stamen.client.datadir import MANIFEST
from stamen.client.ledger import PrivacyLedger
from stamen.common.state import SiteStore
from stamen.simulations.bench.loopback import Loopback, digits_shards, read_progress

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

ROUNDS = 8
DEADLINE = 45.0  # round-timeout: above a round's compute on a busy 2-core box, below Flower's ~60 s heartbeat
RUN_TIMEOUT = 600.0
DELTA = 1e-5
SITES = ["site-a", "site-b", "site-c"]
VICTIM = "site-b"


def _epsilon(state_dir: Path, site_id: str) -> tuple[float, int]:
    ledger = PrivacyLedger.load(SiteStore(state_dir, site_id), "rdp")
    return ledger.epsilon(DELTA), ledger.steps


def _wait(what: str, cond: Callable[[], bool], timeout: float, fed: Loopback) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.name} ---\n{p.tail(2500)}" for p in fed.procs)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")


def _round2_training(log: Path) -> bool:
    """The site's SuperNode has received its round-2 training instruction."""
    text = log.read_text(errors="replace") if log.exists() else ""
    at = text.find("ROUND 2]")
    return at >= 0 and "Receiving: train message" in text[at:]


def test_deployed_run_survives_a_killed_node_and_refuses_an_unregistered_one(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with Loopback(tmp_path / "fed") as fed:
        fed.start_superlink()
        for site_id, (x, y) in zip(SITES, digits_shards(len(SITES)), strict=True):
            fed.add_site(site_id, x, y)
        rogue_x, rogue_y = digits_shards(1, seed=1)[0]
        fed.add_site("rogue", rogue_x[:50], rogue_y[:50], register=False)
        own = ("--epsilon-budget", "1000")  # each site's own budget: a real node requires DP by default
        nodes = {s: fed.start_node(s, privacy=own) for s in SITES}
        rogue = fed.start_node("rogue", connect_timeout=3.0, privacy=own)

        run = fed.flwr_run(
            {
                "num-server-rounds": ROUNDS,
                "dataset": "digits",
                "out-dir": str(out),
                "round-timeout": DEADLINE,
                "min-available-sites": 3,
                "wait-for-sites": 120.0,
                "lr-schedule": "constant",
                "lr": 0.1,
                "dp": True,
                "noise-multiplier": 0.6,
                "epsilon-budget": 1000.0,
                "seed": 7,
            }
        )

        # An unregistered key: the SuperLink refuses activation, `stamen node` gives up with a clear error.
        assert rogue.popen.wait(timeout=120) == 2, rogue.tail()
        assert "refused node rogue" in rogue.tail(), rogue.tail()

        # kill -9 the victim's SuperNode while it trains in round 2.
        victim = nodes[VICTIM]
        _wait("the victim's round-2 training instruction", lambda: _round2_training(victim.log), RUN_TIMEOUT, fed)
        eps_before, steps_before = _epsilon(fed.sites[VICTIM].state_dir, VICTIM)
        supernode = fed.supernode_pid(victim)
        assert supernode is not None, victim.tail()
        os.kill(supernode, signal.SIGKILL)
        assert read_progress(out)[-1]["round"] == 1, "the kill was meant for round 2"
        assert victim.popen.wait(timeout=120) != 0, "stamen node should end with its SuperNode"

        # Same state directory, started again before round 4 (as round 3 begins).
        _wait("round 2 to complete", lambda: len(read_progress(out)) >= 2, RUN_TIMEOUT, fed)
        assert len(read_progress(out)) < 4
        restarted = fed.start_node(VICTIM, name=f"{VICTIM}-restarted", privacy=own)

        try:
            assert run.popen.wait(timeout=RUN_TIMEOUT) == 0, run.tail()
        except subprocess.TimeoutExpired:
            pytest.fail(f"`flwr run` did not finish in {RUN_TIMEOUT:.0f}s\n{run.tail()}\n{restarted.tail()}")
        eps_after, steps_after = _epsilon(fed.sites[VICTIM].state_dir, VICTIM)
        participation = SiteStore(fed.sites[VICTIM].state_dir, VICTIM).read_json("participation")
        manifests = {s: SiteStore(fed.sites[s].state_dir, s).read_json(MANIFEST) for s in SITES}
        node_view = fed.node_list()

    history = read_progress(out)
    context = f"history: {history}\nrun output:\n{run.tail(4000)}"
    assert [r["round"] for r in history] == list(range(1, ROUNDS + 1)), context
    # `flwr run` exits 0 even when the ServerApp dies: the run's own summary is the proof.
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["rounds_completed"]) == ("completed", ROUNDS), context
    # Round 2 completed with the other two sites and counted the silent one as failed.
    assert (history[1]["replied"], history[1]["failed"]) == (2, 1), context
    # Round 3's instruction waited for the victim's node id, which its restart keeps: whether
    # the restarted node answers it before the deadline depends on how fast it comes up, so
    # both outcomes are right, but every sampled site is accounted for and the round ends.
    assert history[2]["replied"] >= 2 and history[2]["replied"] + history[2]["failed"] == 3, context
    for row in history[1:3]:
        assert row["updated"], context
        assert row["seconds"] < DEADLINE + 30, f"round {row['round']} outlasted its deadline: {context}"
    assert history[0]["replied"] == 3, context
    # The restarted site took part again in a later round, its epsilon continuing from its ledger.
    assert participation["last_round"] >= 4, participation
    assert max(r["replied"] for r in history[3:]) == 3, context
    assert steps_after > steps_before and eps_after > eps_before > 0, (eps_before, eps_after)
    # Each site trained on the shard it found in its watched data directory.
    assert all([shard["name"] for shard in m["shards"]] == ["shard-0.npz"] for m in manifests.values()), manifests
    # The run learned.
    assert history[-1]["central_accuracy"] > history[0]["central_accuracy"] + 0.1, context
    # The rogue key was never a node of this federation.
    assert len(node_view) == len(SITES), node_view


def test_a_serverapp_without_data_runs_a_federation_of_two_nodes_on_one_host(tmp_path: Path) -> None:
    """The ServerApp knows the model's shape from run config only (no dataset loaded, so only
    federated evaluation); both nodes share this host and neither names a Runtime API port."""
    out = tmp_path / "run"
    rounds = 2
    with Loopback(tmp_path / "fed") as fed:
        fed.start_superlink()
        for site_id, (x, y) in zip(SITES[:2], digits_shards(2), strict=True):
            fed.add_site(site_id, x, y).runtime_port = None  # `stamen node` picks a free port
        nodes = [fed.start_node(s) for s in SITES[:2]]
        run = fed.flwr_run(
            {
                "num-server-rounds": rounds,
                "input-shape": "1,8,8",
                "num-classes": 10,
                "out-dir": str(out),
                "round-timeout": 300.0,  # nobody is killed here: a busy box must not cost a reply
                "min-available-sites": 2,
                "wait-for-sites": 120.0,
                "lr-schedule": "constant",
                "lr": 0.1,
                "seed": 5,
            }
        )
        try:
            assert run.popen.wait(timeout=RUN_TIMEOUT) == 0, run.tail()
        except subprocess.TimeoutExpired:
            pytest.fail(f"`flwr run` did not finish in {RUN_TIMEOUT:.0f}s\n{run.tail()}\n{nodes[0].tail()}")
        node_logs = [node.log.read_text(errors="replace") for node in nodes]

    summary = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    context = f"summary: {summary}\nrun output:\n{run.tail(4000)}"
    assert (summary["status"], summary["rounds_completed"]) == ("completed", rounds), context
    assert all(row["replied"] == 2 for row in summary["history"]), context
    assert not any("central_accuracy" in row for row in summary["history"]), "the server has no data to evaluate on"
    assert summary["final"]["source"] == "federated" and 0 <= summary["final"]["accuracy"] <= 1, context
    # each SuperNode serves its Runtime API on the free port its `stamen node` chose for it
    ports = {m for log in node_logs for m in re.findall(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", log)}
    assert len(ports) == 2, node_logs
    # ... and `stamen node`'s own lines are in its log: the port it chose, its policy, each task it ran
    for site_id, log in zip(SITES[:2], node_logs, strict=True):
        assert f"site {site_id}: SuperNode Runtime API on 127.0.0.1:" in log, log[-3000:]
        assert f"site {site_id} privacy policy:" in log, log[-3000:]
        assert len(re.findall(r"train task \(round \d+\) done in", log)) == rounds, log[-3000:]
