"""Shared fixtures: Flower instruction messages as a running ServerApp would stamp them, and a
helper that runs ``stamen simulate`` in a real process."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import psutil
import pytest
from flwr.app import Message, MessageType, RecordDict

from stamen.common.flwr_internal import SUPERLINK_NODE_ID, TaskIdentity
from stamen.simulations.run import run_simulate_command


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``pytest -n`` (pytest-xdist, ``--dist loadgroup``: ``make test``) every deployment test
    goes to one worker, in order: each starts a SuperLink and SuperNodes and mostly waits on them,
    so they run beside the simulations rather than against each other's round timeouts."""
    for item in items:
        if item.get_closest_marker("deployment"):
            item.add_marker(pytest.mark.xdist_group("deployment"))


@pytest.fixture
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps new messages with the ServerApp's task identity; fake one for the test."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for the test (the machine's cores are shared), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def run_stamen_simulate(
    out: Path, *args: str, timeout: float = 300, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``stamen simulate ARGS --out OUT`` as a user runs it (a real process); asserts exit 0."""
    result = run_simulate_command(out, *args, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


#: An environment variable every process of one command inherits (Ray's daemons included).
TAG_VARIABLE = "STAMEN_TEST_TAG"


def tagged_env(tag: str) -> dict[str, str]:
    """This environment plus ``TAG_VARIABLE=tag``: whatever a command run with it starts carries the tag."""
    return {**os.environ, TAG_VARIABLE: tag}


def tagged_processes(tag: str) -> list[int]:
    """Pids of live processes whose environment carries :func:`tagged_env`'s ``tag``.

    Only the processes one command started (and theirs), whatever else runs on the machine:
    a scan for Ray's daemon names would also see other tests' simulations.
    """
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(TAG_VARIABLE) == tag:
                found.append(proc.pid)
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
