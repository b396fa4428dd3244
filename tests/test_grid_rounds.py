"""The server's exchange with the grid: a deadline that holds, and no 3 s poll when replies are in."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Message, MessageType, RecordDict

from stamen.common.config import StamenConfig
from stamen.common.flwr_internal import set_message_id
from stamen.server.grid_rounds import exchange, wait_for_nodes
from stamen.server.loop import Federation, RunFailed


class FakeGrid:
    """Replies from the nodes in ``answering`` become available ``delay`` s after the push."""

    def __init__(self, answering: set[int], delay: float = 0.0, nodes: list[list[int]] | None = None) -> None:
        self.answering = answering
        self.delay = delay
        self.pushed: dict[str, Message] = {}
        self.t0 = 0.0
        self.pulls = 0
        self._nodes = nodes or [[]]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        self.t0 = time.monotonic()
        ids = []
        for i, msg in enumerate(messages):
            mid = f"m{i}"
            self.pushed[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        if time.monotonic() - self.t0 < self.delay:
            return []
        out = []
        for mid in message_ids:
            msg = self.pushed[mid]
            if msg.metadata.dst_node_id in self.answering:
                set_message_id(msg, mid)
                out.append(Message(RecordDict(), reply_to=msg))
        return out

    def get_node_ids(self) -> list[int]:
        return self._nodes.pop(0) if len(self._nodes) > 1 else self._nodes[0]


def _messages(nodes: list[int]) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN, ttl=30.0) for n in nodes]


def test_exchange_returns_as_soon_as_every_reply_is_in(serverapp_identity: None) -> None:
    grid = FakeGrid({1, 2, 3}, delay=0.3)
    got = exchange(grid, _messages([1, 2, 3]), timeout=30.0, poll=0.05)  # type: ignore[arg-type]
    assert len(got.replies) == 3 and got.silent == []
    assert grid.pulls >= 3  # looked again every 0.05 s (Flower's send_and_receive sleeps 3 s between looks)


def test_a_silent_node_is_named_when_the_deadline_passes(serverapp_identity: None) -> None:
    grid = FakeGrid({1, 3})
    t0 = time.monotonic()
    got = exchange(grid, _messages([1, 2, 3]), timeout=0.5, poll=0.05)  # type: ignore[arg-type]
    elapsed = time.monotonic() - t0
    assert sorted(r.metadata.src_node_id for r in got.replies) == [1, 3]
    assert got.silent == [2]
    assert 0.5 <= elapsed < 10.0  # at the deadline, not at the 30 s ttl (slack for a loaded machine)


def test_wait_for_nodes_returns_once_enough_are_connected() -> None:
    grid = FakeGrid(set(), nodes=[[1], [1, 2], [1, 2, 3]])
    assert wait_for_nodes(grid, 3, timeout=30.0) == [1, 2, 3]  # type: ignore[arg-type]


def test_wait_for_nodes_goes_on_with_those_there_after_the_timeout() -> None:
    grid = FakeGrid(set(), nodes=[[4]])
    t0 = time.monotonic()
    assert wait_for_nodes(grid, 3, timeout=0.3) == [4]  # type: ignore[arg-type]
    assert time.monotonic() - t0 >= 0.3


def test_rounds_without_enough_connected_sites_are_skipped_then_the_run_stops(
    tmp_path: Path, serverapp_identity: None
) -> None:
    """No site ever connects: each round waits ``wait-for-sites``, is skipped with its reason
    recorded, and ``max-empty-rounds`` such rounds end the run with a clear error."""
    cfg = StamenConfig.from_mapping(
        {"dataset": "digits", "num-server-rounds": 5, "max-empty-rounds": 2, "wait-for-sites": 0.2,
         "min-available-sites": 2, "out-dir": str(tmp_path)}
    )  # fmt: skip
    grid = FakeGrid(set(), nodes=[[]])
    with pytest.raises(RunFailed, match="0 sites connected"):
        Federation(grid, cfg, tmp_path).run()  # type: ignore[arg-type]
    rows = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert [(r["round"], r["skipped"], r["sampled"], r["updated"]) for r in rows] == [(1, 1, 0, False)]
