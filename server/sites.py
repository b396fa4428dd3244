"""Which Flower node is which site: the identity handshake.

Flower addresses nodes by node id, which changes every time a SuperNode starts; stamen
keys everything by site-id. Before sampling, the server asks each node it has not seen
yet (a ``query`` message) for its site-id, and keeps the mapping while the node stays
connected. A restarted node gets a new node id, answers the handshake again and is
mapped back to its old site-id, so its state and metrics continue.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from stamen.common.reply import RejectedReply, screen_reply
from stamen.server.grid_rounds import exchange

log = logging.getLogger("stamen.server")


class SiteDirectory:
    """site-id <-> node-id mapping, refreshed from the grid before each round."""

    def __init__(self, grid: Grid, content: Callable[[], RecordDict], timeout: float, poll: float) -> None:
        self._grid = grid
        self._content = content
        self._timeout = timeout
        self._poll = poll
        self._site_of: dict[int, str] = {}
        self.rejected: Counter[str] = Counter()

    def refresh(self) -> dict[str, int]:
        """Handshake with new nodes, forget vanished ones; return site-id -> node-id."""
        live = set(self._grid.get_node_ids())
        for node_id in set(self._site_of) - live:
            del self._site_of[node_id]
        new = sorted(live - set(self._site_of))
        if new:
            messages = [
                Message(self._content(), dst_node_id=n, message_type=MessageType.QUERY, ttl=self._timeout) for n in new
            ]
            for reply in exchange(self._grid, messages, timeout=self._timeout, poll=self._poll).replies:
                try:
                    site = screen_reply(reply, "query", expected_site=None)
                except RejectedReply as exc:
                    self.rejected[exc.reason] += 1
                    log.warning("handshake with node %s rejected: %s", reply.metadata.src_node_id, exc)
                    continue
                stale = [n for n, s in self._site_of.items() if s == site.site_id]
                for node_id in stale:
                    del self._site_of[node_id]
                self._site_of[reply.metadata.src_node_id] = site.site_id
        return {site: node for node, site in self._site_of.items()}

    def site_of(self, node_id: int) -> str | None:
        """The site-id a node answered with, if it has."""
        return self._site_of.get(node_id)
