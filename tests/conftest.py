"""Shared fixtures: Flower instruction messages as a running ServerApp would stamp them, and a
helper that runs ``stamen simulate`` in a real process."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from flwr.app import Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from simulations.cli import run_simulate_command


@pytest.fixture
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps new messages with the ServerApp's task identity; fake one for the test."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


@pytest.fixture
def instruction(serverapp_identity: None) -> Callable[..., Message]:
    """Build the instruction a ServerApp sends to ``node_id``.

    A reply built with ``Message(..., reply_to=instruction)`` then carries
    ``src_node_id == node_id``, exactly as Flower delivers it to the server.
    """

    def make(node_id: int = 11, message_type: str = MessageType.TRAIN, server_round: int = 1) -> Message:
        return Message(RecordDict(), dst_node_id=node_id, message_type=message_type, group_id=str(server_round))

    return make


def run_stamen_simulate(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``stamen simulate ARGS --out OUT`` as a user runs it (a real process); asserts exit 0."""
    result = run_simulate_command(out, *args, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def ray_processes() -> set[int]:
    """Pids of Ray daemons (raylet, gcs_server) currently alive on this machine."""
    found: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"raylet" in cmd or b"gcs_server" in cmd:
            found.add(int(proc.name))
    return found


@pytest.fixture
def stamen_simulate() -> Callable[..., subprocess.CompletedProcess[str]]:
    """:func:`run_stamen_simulate`, for tests that start a simulation."""
    return run_stamen_simulate
