"""``flwr run .`` works on the repo as on any Flower app.

flwr 1.41 keeps SuperLink connections in ``$FLWR_HOME/config.toml``; a fresh FLWR_HOME
gets the default connection ``local`` (address ``:local:``), for which ``flwr run``
lazily starts a detached ``flower-superlink --simulation`` that outlives the command.
Flower writes no pid file for it, but its command line names its log file,
``$FLWR_HOME/local-superlink/superlink.log``, which is unique to this test's temporary
FLWR_HOME: that is how the test finds it and stops it by pid.

Every process of the run (SuperLink, the SuperExec it starts, ``flwr-simulation`` and
the Ray cluster that one starts) inherits the environment of ``flwr run``, so a process
whose environment holds this test's ``FLWR_HOME`` belongs to this test and no other;
whatever of those outlives the SuperLink is stopped by pid too and reported.
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

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN_TIMEOUT = 300.0  # seconds for the whole `flwr run --stream`
TERM_GRACE = 20.0  # seconds between SIGTERM and SIGKILL
ORPHAN_GRACE = 15.0  # seconds the SuperLink's children get to exit on their own
ROUNDS = 2


# --- /proc helpers (Linux; no psutil) -------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of ``pid``, or None if there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # comm may hold spaces and parentheses
    return fields[0], int(fields[19])


def _alive(pid: int, start: int) -> bool:
    """Whether the process that had ``start`` as start time still runs (zombies do not)."""
    st = _stat(pid)
    return st is not None and st[1] == start and st[0] not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            yield int(entry.name)


def _superlinks(log_file: Path) -> dict[int, int]:
    """``{pid: start time}`` of every live ``flower-superlink`` logging to ``log_file``."""
    found = {}
    for pid in _pids():
        cmd = _cmdline(pid)
        if not any(Path(arg).name == "flower-superlink" for arg in cmd[:2]):
            continue
        if "--log-file" in cmd[:-1] and cmd[cmd.index("--log-file") + 1] == str(log_file):
            st = _stat(pid)
            if st is not None and st[0] not in ("Z", "X"):
                found[pid] = st[1]
    return found


def _tagged(flwr_home: Path) -> dict[int, tuple[int, str]]:
    """``{pid: (start time, command line)}`` of live processes whose environment has our FLWR_HOME."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    found = {}
    for pid in _pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if marker not in environ.split(b"\0"):
            continue
        st = _stat(pid)
        if st is not None and st[0] not in ("Z", "X"):
            found[pid] = (st[1], " ".join(_cmdline(pid))[:160])
    return found


def _is_ray(cmdline: str) -> bool:
    return any(name in cmdline for name in ("raylet", "gcs_server", "ray::", "/ray/"))


def _stop(pid: int, start: int, grace: float = TERM_GRACE) -> str:
    """SIGTERM ``pid``, SIGKILL it after ``grace`` s; say how it ended."""
    how = "already gone"
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if not _alive(pid, start):
            return how
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return how
        how = sig.name
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _alive(pid, start):
            time.sleep(0.1)
    return how if not _alive(pid, start) else f"still alive after {how}"


def _wait_gone(procs: dict[int, tuple[int, str]], timeout: float) -> dict[int, tuple[int, str]]:
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
    if not Path("/proc/self/environ").exists():
        pytest.skip("needs Linux /proc to find the SuperLink by pid")

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
        # A port of our own, so another local SuperLink (default 39091) is never reused.
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

    proc: subprocess.Popen[str] | None = None
    stopped: dict[int, str] = {}
    left_after_run: dict[int, tuple[int, str]] = {}
    orphans: dict[int, tuple[int, str]] = {}
    remaining: dict[int, tuple[int, str]] = {}
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            output, _ = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(
                f"`flwr run` took over {RUN_TIMEOUT:.0f}s; output tail:\n{output[-4000:]}\n"
                f"SuperLink log tail:\n{_tail(log_file)}"
            )
        elapsed = time.monotonic() - t0
        context = f"\n--- flwr run output (tail) ---\n{output[-6000:]}\n--- SuperLink log ---\n{_tail(log_file)}"

        assert proc.returncode == 0, f"`flwr run` exited with {proc.returncode}{context}"
        assert f"Starting local SuperLink on 127.0.0.1:{port}" in output, context
        assert "Successfully started run" in output, context
        assert "(3 simulated SuperNodes)" in output, context
        # The ServerApp's own log lines, streamed back through the SuperLink.
        for rnd in range(1, ROUNDS + 1):
            assert f"round {rnd}: accuracy" in output, f"no stamen 'round {rnd}' log line{context}"

        summary = json.loads((out_dir / "summary.json").read_text())
        assert summary["status"] == "completed", summary
        assert summary["rounds_completed"] == ROUNDS, summary
        assert math.isfinite(summary["final"]["accuracy"]), summary
        assert 0.0 <= summary["final"]["accuracy"] <= 1.0, summary
        assert (out_dir / "model.safetensors").stat().st_size > 0
        assert (out_dir / "config.json").exists() and (out_dir / "history.csv").exists()

        superlinks = _superlinks(log_file)
        assert len(superlinks) == 1, f"expected the one SuperLink `flwr run` started, found {superlinks}"
        # What of the run is still up now that it has finished (Ray should have shut down).
        ray_procs = {pid: v for pid, v in _tagged(flwr_home).items() if _is_ray(v[1])}
        left_after_run = _wait_gone(ray_procs, 10.0)
        print(f"\n[flwr run] {elapsed:.1f}s, SuperLink pid(s) {sorted(superlinks)} on port {port}")
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # The SuperLink, by pid: found by its log file, which lives in our FLWR_HOME.
        for pid, start in _superlinks(log_file).items():
            stopped[pid] = _stop(pid, start)
        # Its SuperExec exits once it sees the SuperLink gone; anything else is a leak.
        orphans = _wait_gone(_tagged(flwr_home), ORPHAN_GRACE)
        for pid, (start, _) in orphans.items():
            _stop(pid, start, grace=5.0)
        remaining = _tagged(flwr_home)
        for pid, (start, _) in remaining.items():  # last resort, so nothing ever leaks
            _stop(pid, start, grace=0.0)
        if orphans or left_after_run:
            print(f"[flwr run] Ray processes up after the run: {left_after_run}")
            print(f"[flwr run] outlived the SuperLink, stopped by pid: {orphans}")

    assert stopped, "no SuperLink to stop"
    assert all(how in ("SIGTERM", "SIGKILL") for how in stopped.values()), stopped
    assert not _superlinks(log_file), "the SuperLink survived SIGKILL"
    assert not remaining, f"processes of this run survived SIGKILL: {remaining}"
    print(f"[flwr run] SuperLink stopped: {stopped}; nothing of the run left (orphans stopped: {len(orphans)})")
