"""Shared fixtures: Flower instruction messages as a running ServerApp would stamp them, and a
helper that runs ``stamen simulate`` in a real process."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from flwr.app import Message, MessageType, RecordDict

from stamen.common.flwr_internal import SUPERLINK_NODE_ID, TaskIdentity
from stamen.simulations.run import run_simulate_command


@pytest.fixture
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps new messages with the ServerApp's task identity; fake one for the test."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


@pytest.fixture
def fixed_entropy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a site's secret noise repeatable in this process: its OS entropy comes from a seeded PRNG.

    For tests whose assertions are about budgets and plans at particular noise draws, not
    about the noise's secrecy (tests/test_secret_noise.py tests that, without this fixture).
    tests/test_shard_privacy.py's budget arithmetic needs a released size on the right side
    of a batch-count boundary, as it needed the run seed's draws before noise was secret.
    """
    import random

    monkeypatch.setattr("stamen.client.noise.os.urandom", random.Random(2).randbytes)


@pytest.fixture
def instruction(serverapp_identity: None) -> Callable[..., Message]:
    """Build the instruction a ServerApp sends to ``node_id``.

    A reply built with ``Message(..., reply_to=instruction)`` then carries
    ``src_node_id == node_id``, exactly as Flower delivers it to the server.
    """

    def make(node_id: int = 11, message_type: str = MessageType.TRAIN, server_round: int = 1) -> Message:
        return Message(RecordDict(), dst_node_id=node_id, message_type=message_type, group_id=str(server_round))

    return make


def required_tool(name: str, how: str, *, path: str | None = None) -> str:
    """The executable ``name`` (from ``path`` if given, else PATH); a machine without it skips
    the test locally, naming ``how`` to install it, and fails it under CI=true."""
    found = shutil.which(name, path=path) or (shutil.which(name) if path else None)
    if found is None:
        reason = f"{name!r} is not installed ({how})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: in CI this test must run")
        pytest.skip(reason)
    return found


def run_stamen_simulate(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``stamen simulate ARGS --out OUT`` as a user runs it (a real process); asserts exit 0."""
    result = run_simulate_command(out, *args, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def ray_processes() -> set[int]:
    """Pids of Ray daemons (raylet, gcs_server) currently alive on this machine."""
    found: set[int] = set()
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            cmd = " ".join(proc.cmdline())
            if "raylet" in cmd or "gcs_server" in cmd:
                found.add(proc.pid)
    return found


def _stat(proc: psutil.Process) -> tuple[int, int, float] | None:
    """(parent pid, session id, creation time) of a live process, None if gone or a zombie."""
    try:
        with proc.oneshot():
            if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                return None
            return proc.ppid(), os.getsid(proc.pid), proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, PermissionError):
        return None


def _live() -> dict[int, tuple[int, int, float]]:
    return {proc.pid: st for proc in psutil.process_iter() if (st := _stat(proc)) is not None}


def session_processes(root: int) -> dict[int, float]:
    """``{pid: start}`` of every process in the sessions that ``root``'s descendants opened.

    ``stamen simulate`` starts its engine in a session of its own, and Ray's daemons stay in
    it after their parents exit; unlike a scan for Ray's names, this finds only this run's
    processes while other simulations run on the machine.
    """
    procs = _live()
    found, todo = set(), [root]
    while todo:
        parent = todo.pop()
        children = [pid for pid, st in procs.items() if st[0] == parent and pid not in found]
        found.update(children)
        todo.extend(children)
    own = procs[root][1] if root in procs else -1
    sessions = {procs[pid][1] for pid in found} - {own}
    return {pid: st[2] for pid, st in procs.items() if st[1] in sessions}


def still_running(processes: dict[int, float]) -> list[int]:
    """The processes of :func:`session_processes` that are still alive (a reused pid is not)."""
    live = _live()
    return [pid for pid, start in processes.items() if pid in live and live[pid][2] == start]


@pytest.fixture
def stamen_simulate() -> Callable[..., subprocess.CompletedProcess[str]]:
    """:func:`run_stamen_simulate`, for tests that start a simulation."""
    return run_stamen_simulate
