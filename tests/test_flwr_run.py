"""``flwr run .`` works on the repo as on any Flower app.

flwr 1.42 keeps SuperLink connections in ``$FLWR_HOME/config.toml``; a fresh FLWR_HOME
gets the default connection ``local`` (address ``:local:``), for which ``flwr run``
lazily starts a detached ``flower-superlink --simulation`` that outlives the command.
Flower writes no pid file for it, but its command line names its log file,
``$FLWR_HOME/local-superlink/superlink.log``, unique to this test's temporary
FLWR_HOME: that is how the test finds it, and it stops it by pid.

The SuperLink runs in a session of its own and starts a SuperExec in another one, which
starts ``flwr-simulation`` and, through it, a Ray cluster in that same session. So the
processes of this run are those in the sessions of the SuperLink and of its descendants,
started after ``flwr run`` (or with this test's FLWR_HOME in their environment). Ray
renames its processes (``ray::DashboardAgent``) over their environment, and once their
parents are gone their parent pid is 1, so neither the environment nor the process tree
finds all of them afterwards; the sessions do. Whatever of the run outlives the
SuperLink is stopped by pid too, and reported.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN_TIMEOUT = 300.0  # seconds for the whole `flwr run --stream`
TERM_GRACE = 20.0  # seconds between SIGTERM and SIGKILL for the SuperLink
ORPHAN_GRACE = 15.0  # seconds the SuperLink's children get to exit on their own
ROUNDS = 2


# --- process helpers (psutil) ---------------------------------------------------------

GONE = (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, PermissionError)


class Stat(NamedTuple):
    ppid: int
    sid: int
    start: float  # creation time: with the pid, names one process exactly


def _stat(proc: psutil.Process) -> Stat | None:
    """``proc``'s :class:`Stat`; None if it is gone or a zombie (a zombie has stopped)."""
    try:
        with proc.oneshot():
            if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                return None
            return Stat(proc.ppid(), os.getsid(proc.pid), proc.create_time())
    except GONE:
        return None


def _alive(pid: int, start: float) -> bool:
    """Whether the process ``(pid, start)`` still runs: a reused pid is another process."""
    try:
        st = _stat(psutil.Process(pid))
    except GONE:
        return False
    return st is not None and st.start == start


def _procs() -> Iterator[psutil.Process]:
    yield from (proc for proc in psutil.process_iter() if proc.pid != os.getpid())


def _superlinks(log_file: Path) -> dict[int, float]:
    """``{pid: start}`` of every live ``flower-superlink`` logging to ``log_file``."""
    found = {}
    for proc in _procs():
        try:
            args = proc.cmdline()
        except GONE:
            continue
        if not any(Path(a).name == "flower-superlink" for a in args[:2]) or "--log-file" not in args[:-1]:
            continue
        if args[args.index("--log-file") + 1] == str(log_file) and (st := _stat(proc)) is not None:
            found[proc.pid] = st.start
    return found


class RunProcesses:
    """The processes of one ``flwr run``, found by session, start time and FLWR_HOME."""

    def __init__(self, flwr_home: Path) -> None:
        """Call before starting ``flwr run`` (with ``start_new_session``), then :meth:`add_session`."""
        self.since = time.time() - 1.0
        self.sids: set[int] = set()
        self.log_file = flwr_home / "local-superlink" / "superlink.log"
        self.flwr_home = str(flwr_home)

    def add_session(self, sid: int) -> None:
        self.sids.add(sid)

    def refresh(self) -> None:
        """Add the sessions of the SuperLink and of all its descendants."""
        procs = {proc.pid: st for proc in _procs() if (st := _stat(proc)) is not None}
        todo = list(self._mine(procs))
        seen = set(todo)
        while todo:
            pid = todo.pop()
            self.sids.add(procs[pid].sid)
            kids = [c for c, st in procs.items() if st.ppid == pid and c not in seen]
            seen.update(kids)
            todo += kids

    def _mine(self, procs: dict[int, Stat]) -> Iterator[int]:
        yield from (pid for pid in _superlinks(self.log_file) if pid in procs)
        yield from (pid for pid, st in procs.items() if st.sid in self.sids and st.start >= self.since)

    def members(self) -> dict[int, tuple[float, str]]:
        """``{pid: (start, command line)}`` of every live process of the run."""
        found = {}
        for proc in _procs():
            st = _stat(proc)
            if st is None or st.start < self.since:
                continue
            try:
                if st.sid not in self.sids and proc.environ().get("FLWR_HOME") != self.flwr_home:
                    continue
                found[proc.pid] = (st.start, " ".join(proc.cmdline())[:120])
            except GONE:
                continue
        return found


def _is_ray(cmdline: str) -> bool:
    return any(name in cmdline for name in ("raylet", "gcs_server", "ray::", "/ray/"))


def _stop(pid: int, start: float, grace: float) -> str:
    """SIGTERM ``(pid, start)``, SIGKILL it after ``grace`` s; say how it ended."""
    how = "already gone"
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if not _alive(pid, start):
            return how
        try:
            psutil.Process(pid).send_signal(sig)
        except GONE:
            return how
        how = sig.name
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _alive(pid, start):
            time.sleep(0.1)
    return how if not _alive(pid, start) else f"still alive after {how}"


def _wait_gone(procs: dict[int, tuple[float, str]], timeout: float) -> dict[int, tuple[float, str]]:
    """Those of ``procs`` still alive after up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        left = {pid: v for pid, v in procs.items() if _alive(pid, v[0])}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"<{exc}>"


# --- the test ----------------------------------------------------------------------


@pytest.mark.slow
def test_flwr_run_streams_a_local_simulation_and_writes_the_run_directory(tmp_path: Path) -> None:
    flwr = BIN / "flwr"
    if not flwr.exists() or not (BIN / "flower-superlink").exists():
        pytest.skip(f"no flwr / flower-superlink next to {sys.executable}")

    flwr_home = tmp_path / "flwr-home"
    out_dir = tmp_path / "run"
    log_file = flwr_home / "local-superlink" / "superlink.log"
    port = _free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # Else each ServerApp launch runs `uv sync` on stamen's dependencies (no internet).
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # A port of our own, so that a local SuperLink already up on the default port
        # (39091, e.g. someone's `flwr run`) is not reused, nor ours reused by another.
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        # `flwr` starts `flower-superlink` by name.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(flwr), "run", ".", "--stream",
        "--federation-config", "num-supernodes=3 client-resources-num-cpus=1",
        "--run-config",
        f"num-server-rounds={ROUNDS} dataset='digits' min-partition-size=8 out-dir='{out_dir}'",
    ]  # fmt: skip

    run = RunProcesses(flwr_home)
    stopped: dict[int, str] = {}
    ray_after_run: dict[int, tuple[int, str]] = {}
    orphans: dict[int, tuple[int, str]] = {}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    run.add_session(proc.pid)  # start_new_session: the CLI's pid is its session's id
    try:
        while True:  # retrying communicate() loses no output; meanwhile, note the sessions
            try:
                output, _ = proc.communicate(timeout=2.0)
                break
            except subprocess.TimeoutExpired:
                run.refresh()
                if time.monotonic() - t0 > RUN_TIMEOUT:
                    os.killpg(proc.pid, signal.SIGKILL)
                    output, _ = proc.communicate()
                    pytest.fail(
                        f"`flwr run` took over {RUN_TIMEOUT:.0f}s; output tail:\n{output[-4000:]}\n"
                        f"SuperLink log tail:\n{_tail(log_file)}"
                    )
        elapsed = time.monotonic() - t0
        run.refresh()
        context = f"\n--- flwr run output (tail) ---\n{output[-6000:]}\n--- SuperLink log ---\n{_tail(log_file)}"

        # `flwr run --stream` exits 0 even when the run fails (e.g. Flower exit code 608
        # when `uv sync` of the app's dependencies fails): the run directory is the proof.
        assert proc.returncode == 0, f"`flwr run` exited with {proc.returncode}{context}"
        assert "Exit Code:" not in output, f"the run failed{context}"
        assert f"Starting local SuperLink on 127.0.0.1:{port}" in output, context
        assert "Successfully started run" in output, context
        assert "(3 simulated SuperNodes)" in output, context
        # The ServerApp's own log lines, streamed back through the SuperLink.
        for rnd in range(1, ROUNDS + 1):
            assert f"round {rnd}: accuracy" in output, f"no stamen 'round {rnd}' log line{context}"

        assert (out_dir / "summary.json").exists(), f"no {out_dir}/summary.json{context}"
        summary = json.loads((out_dir / "summary.json").read_text())
        assert summary["status"] == "completed", summary
        assert summary["rounds_completed"] == ROUNDS, summary
        assert math.isfinite(summary["final"]["accuracy"]), summary
        assert 0.0 <= summary["final"]["accuracy"] <= 1.0, summary
        assert (out_dir / "model.safetensors").stat().st_size > 0
        assert (out_dir / "config.json").exists() and (out_dir / "history.csv").exists()

        superlinks = _superlinks(log_file)
        assert len(superlinks) == 1, f"expected the one SuperLink `flwr run` started, found {superlinks}"
        # The run is over: its Ray cluster should be shut down (the SuperLink stays up).
        ray_after_run = _wait_gone({p: v for p, v in run.members().items() if _is_ray(v[1])}, 10.0)
        print(f"\n[flwr run] {elapsed:.1f}s; SuperLink pid {next(iter(superlinks))} on port {port}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        run.refresh()  # a last look at the sessions while the SuperLink is up
        # The SuperLink, by pid: the one whose log file is in our FLWR_HOME.
        for pid, start in _superlinks(log_file).items():
            stopped[pid] = _stop(pid, start, TERM_GRACE)
        # Its SuperExec exits once it sees the SuperLink gone; what else stays is a leak.
        orphans = _wait_gone(run.members(), ORPHAN_GRACE)
        for pid, (start, _) in orphans.items():
            _stop(pid, start, grace=5.0)
        for pid, (start, _) in run.members().items():  # anything that showed up meanwhile
            _stop(pid, start, grace=0.0)
        if ray_after_run or orphans:
            print(f"[flwr run] Ray processes still up after the run: {ray_after_run}")
            print(f"[flwr run] outlived the SuperLink, stopped by pid: {orphans}")

    assert stopped, "no SuperLink to stop"
    assert all(how in ("SIGTERM", "SIGKILL") for how in stopped.values()), stopped
    assert not _superlinks(log_file), "the SuperLink survived SIGKILL"
    remaining = run.members()
    assert not remaining, f"processes of this run survived SIGKILL: {remaining}"
    print(f"[flwr run] stopped SuperLink {stopped}; nothing of the run left ({len(orphans)} orphans stopped)")
