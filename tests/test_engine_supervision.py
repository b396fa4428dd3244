"""The simulation engine supervises itself: it dies with its CLI and enforces its own timeout.

Processes are identified by pid: the CLI's descendants recorded while the run is going, and
the engine's process group; never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from stamen.simulations.run import engine_spec, plan_simulation

SMALL = ["--clients", "3", "--dataset", "digits", "--rounds", "200", "--local-epochs", "1", "--stop-grace", "300"]


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still running (a zombie has ended: only its exit status is left)."""
    left = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
    return left


def _group(pgid: int) -> list[psutil.Process]:
    """The processes of process group ``pgid`` (the engine's session: it and Ray's processes)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid:
                found.append(proc)
    return found


def _wait_for(condition: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.5)
    return False


def _rounds_done(out: Path) -> int:
    progress = out / "progress.jsonl"
    return len(progress.read_text().splitlines()) if progress.exists() else 0


ORPHAN = """
import subprocess, sys, time
from stamen.simulations.engine import end_descendants, started_processes
# A child that starts a grandchild and exits: the grandchild is re-parented to init, no
# descendant any more, yet in this process group (as a Ray worker forked while raylet ends).
sleeper = "import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], "
sleeper += "stdout=subprocess.DEVNULL).pid)"
subprocess.run([sys.executable, "-c", sleeper])
time.sleep(0.5)
found = started_processes()
end_descendants(grace=2.0)
print(len(found), len(started_processes()))
"""


def test_ending_the_engine_also_ends_an_orphan_left_in_its_process_group() -> None:
    out = subprocess.run(
        [sys.executable, "-c", ORPHAN], capture_output=True, text=True, timeout=120, start_new_session=True
    )
    assert out.returncode == 0, out.stderr
    orphan, counts = out.stdout.split("\n")[:2]
    pid = int(orphan)
    left = _alive([psutil.Process(pid)]) if psutil.pid_exists(pid) else []
    for proc in left:  # only when the test fails: the sleeper it started
        proc.kill()
    assert counts == "1 0" and left == [], f"the orphan {pid} still ran: {out.stdout}"


@pytest.mark.slow
def test_killing_the_cli_leaves_no_process_of_the_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "stamen", "simulate", *SMALL, "--out", str(out), "--no-progress"]
    cli = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    recorded: list[psutil.Process] = []
    try:
        assert _wait_for(lambda: _rounds_done(out) >= 1, 600), "the run never completed a round"
        recorded = psutil.Process(cli.pid).children(recursive=True)
        assert len(recorded) > 2, "the engine child and the Ray processes it started"
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait(10)
        assert _wait_for(lambda: not _alive(recorded), 420), [p.pid for p in _alive(recorded)]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "stopped", "the orphaned engine ended its round with a checkpoint"
        assert 1 <= len(summary["history"]) < 200 and any((out / "checkpoints").glob("ckpt-*.json"))
    finally:
        if cli.poll() is None:  # failed before the kill: end the CLI and what it started
            recorded += psutil.Process(cli.pid).children(recursive=True)
            cli.kill()
        for proc in _alive(recorded):
            proc.kill()


# Long enough for a machine three times slower than idle to start Ray and end round 1 (idle: ~10 s).
TIMEOUT = 40.0


@pytest.mark.slow
def test_the_engine_stops_at_its_own_timeout_without_the_cli(tmp_path: Path) -> None:
    plan = plan_simulation(
        {"dataset": "digits", "num-server-rounds": 200, "local-epochs": 1}, clients=3, out=tmp_path / "run"
    )
    plan.out_dir.mkdir(parents=True)
    spec_path = plan.out_dir / "simulation.json"
    spec_path.write_text(json.dumps(engine_spec(plan, timeout=TIMEOUT, stop_grace=400.0)))
    started = time.monotonic()
    engine = subprocess.Popen(  # no CLI and no timer around it: the engine alone
        [sys.executable, "-m", "stamen.simulations.engine", str(spec_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        rc = engine.wait(900)
        seconds = time.monotonic() - started
        left = _alive(_group(engine.pid))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(engine.pid, signal.SIGKILL)
    assert rc == 124 and seconds < TIMEOUT + 400 + 60  # timeout + grace (a loaded machine's first round) + exit
    summary = json.loads((plan.out_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and 1 <= len(summary["history"]) < 200
    assert left == [], "nothing of the engine's process group is left"
