"""Talking to the sites through Flower's Grid under a deadline, without Flower's 3 s poll.

``Grid.send_and_receive`` pushes the messages, then pulls replies every 3 s until all are
in or the timeout passes: a round that finishes on the sites in 2 s waits up to 3 s more
on the server, every round. :func:`exchange` is the same contract over the Grid's own
``push_messages`` / ``pull_messages`` with a short poll (``reply-poll-interval``), so a
round ends as soon as its last reply lands, and never later than its deadline: a site
that died mid-round simply has not answered when the deadline passes, whatever Flower's
heartbeat (about a minute) believes about its node. Every instruction also gets the
deadline as its time-to-live, so one that a dead node never pulled expires on the
SuperLink instead of being delivered, stale, when the node comes back.

:class:`Receipts` tells each site which of its updates arrived (a reply lost on the way
leaves a record the site reconciles). :func:`wait_for_nodes` bounds the wait for
``min-available-sites`` connected nodes: the round then goes on with whoever is there
(the loop decides whether that is enough).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

log = logging.getLogger("stamen.server")

#: Seconds between two looks at the connected nodes while waiting for enough of them.
NODE_POLL_SECONDS = 0.5


@dataclass
class Exchanged:
    """The replies that arrived in time, and the nodes that sent none."""

    replies: list[Message] = field(default_factory=list)
    silent: list[int] = field(default_factory=list)


def exchange(grid: Grid, messages: Iterable[Message], *, timeout: float, poll: float) -> Exchanged:
    """Push ``messages``; pull replies every ``poll`` s until all arrived or ``timeout`` s passed."""
    messages = list(messages)
    deadline = time.monotonic() + timeout
    ids = list(grid.push_messages(messages))
    pending = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages, strict=True) if mid}
    out = Exchanged(silent=[msg.metadata.dst_node_id for mid, msg in zip(ids, messages, strict=True) if not mid])
    while pending:
        for reply in grid.pull_messages(list(pending)):
            if pending.pop(reply.metadata.reply_to_message_id, None) is not None:
                out.replies.append(reply)
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            break
        time.sleep(min(poll, left))
    out.silent += sorted(pending.values())
    if pending:
        log.warning("deadline of %.1fs passed: no reply from %d node(s) %s", timeout, len(pending), out.silent)
    return out


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """The connected node ids, once at least ``minimum`` are there or ``timeout`` s have passed."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        left = deadline - time.monotonic()
        if len(nodes) >= minimum or left <= 0:
            if len(nodes) < minimum:
                log.warning(
                    "waited %.0fs for %d connected site(s), %d there: going on with them", timeout, minimum, len(nodes)
                )
            return nodes
        time.sleep(min(NODE_POLL_SECONDS, left))


@dataclass
class Receipts:
    """Which sites' train updates arrived, told to each site with its next instruction.

    A site numbers every update it sends (``update-id``, :mod:`stamen.client.receipts`) and,
    from ``receipts-from-round`` and ``received-updates`` in an instruction, settles which of
    its charged updates were lost. This process vouches only for rounds it ran itself (from
    the first round it sent, so a resumed run claims nothing about rounds before it) and for
    the last ``window`` rounds.
    """

    window: int = 32
    from_round: int | None = None
    got: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def stamp(self, config: MutableMapping[str, Any], site: str, server_round: int) -> None:
        """Add ``site``'s receipts to the config of its round-``server_round`` train instruction."""
        if self.from_round is None:
            self.from_round = server_round
        low = max(self.from_round, server_round - self.window)
        config["receipts-from-round"] = low
        ids = [uid for rnd, uid in self.got.get(site, []) if rnd >= low]
        if ids:
            config["received-updates"] = ids

    def record(self, server_round: int, replies: Iterable[Message], sites: Mapping[int, str]) -> None:
        """Note the ``update-id`` of every train reply that arrived (screened out or not: it reached us)."""
        for reply in replies:
            site = sites.get(reply.metadata.src_node_id)
            metrics = None if reply.has_error() else reply.content.metric_records.get("metrics")
            if site is None or metrics is None or "update-id" not in metrics:
                continue
            kept = [(r, u) for r, u in self.got.get(site, []) if r > server_round - self.window]
            self.got[site] = [*kept, (server_round, int(metrics["update-id"]))]
