"""Which Flower node is which site: the identity handshake.

Flower addresses nodes by node id, which changes every time a SuperNode starts; stamen
keys everything by site-id. Before sampling, the server asks each node it has not seen
yet (a ``query`` message) for its site-id, and keeps the mapping while the node stays
connected. A restarted node gets a new node id, answers the handshake again and is
mapped back to its old site-id, so its state and metrics continue.

A site-id is bound to a key (:class:`SiteKeys`, part of the run's checkpointed state): in
deployment the query carries a fresh nonce per node, the site signs it with its SuperNode key
(common/identity.py), and the first valid proof for a site-id binds that key. A node that
proves another key, or none, for a bound site-id is refused, counted as
``stamen_sites_refused_total{reason="identity"}`` and logged; the site keeps its node. Only an
operator's ``stamen rebind SITE`` (a request file in the run's out-dir) frees the binding.
Simulation has no node keys: there the handshake stays unsigned and the site-id is taken as said.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from stamen.common.errors import StamenError, StateError
from stamen.common.identity import IDENTITY_RECORD, PROOF_KEY, validate_site_id, verify_identity
from stamen.common.reply import RejectedReply, screen_reply
from stamen.server.grid_rounds import exchange

log = logging.getLogger("stamen.server")

REBIND_DIR = "rebind"  # under the run's out-dir: one request file per site to unbind


def deployment_grid(grid: Grid) -> bool:
    """Whether ``grid`` talks to real SuperNodes (which hold keys), not simulated ones."""
    from stamen.common.flwr_internal import HttpGrid

    return isinstance(grid, HttpGrid)


def request_rebind(out_dir: Path, site_id: str, reason: str) -> Path:
    """The operator's rebind: a request the running (or resumed) ServerApp applies at its next handshake."""
    validate_site_id(site_id)
    if not reason.strip():
        raise StateError("a rebind needs a --reason: it is recorded with the run's state")
    folder = Path(out_dir) / REBIND_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{site_id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"site": site_id, "reason": reason, "requested_at": time.time(), "uid": os.getuid()}))
    os.replace(tmp, path)
    return path


class SiteKeys:
    """site-id -> fingerprint of the key that first proved it, and every bind/refuse/rebind event."""

    def __init__(self) -> None:
        self.bound: dict[str, str] = {}
        self.events: list[dict[str, Any]] = []

    def claim(self, site_id: str, fingerprint: str, node_id: int) -> bool:
        """Bind an unbound site-id to ``fingerprint``; whether the claim holds."""
        held = self.bound.get(site_id)
        if held == fingerprint:
            return True
        kind = "bind" if held is None else "refused"
        self.events.append({"event": kind, "site": site_id, "key": fingerprint, "node": node_id, "at": time.time()})
        if held is None:
            self.bound[site_id] = fingerprint
            log.info("site %s bound to key %s (node %s)", site_id, fingerprint[:23], node_id)
            return True
        log.warning(
            "node %s claims site %s with key %s, but the site is bound to key %s: refused (operator: stamen rebind)",
            node_id,
            site_id,
            fingerprint[:23],
            held[:23],
        )
        return False

    def rebind(self, site_id: str, request: dict[str, Any]) -> None:
        """Forget ``site_id``'s key (an operator's request); the next valid proof binds anew."""
        old = self.bound.pop(site_id, None)
        self.events.append({"event": "rebind", "site": site_id, "key": old, "at": time.time(), "request": request})
        log.warning("site %s unbound from key %s by operator request: %s", site_id, old, request.get("reason"))

    def state_dict(self) -> dict[str, Any]:
        return {"bound": dict(self.bound), "events": [dict(e) for e in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state.get("bound"), dict) or not isinstance(state.get("events"), list):
            raise StateError("saved site keys lack 'bound' or 'events'")
        self.bound = {str(k): str(v) for k, v in state["bound"].items()}
        self.events = [dict(e) for e in state["events"]]


class SiteDirectory:
    """site-id <-> node-id mapping, refreshed from the grid before each round."""

    def __init__(
        self,
        grid: Grid,
        content: Callable[[], RecordDict],
        timeout: float,
        poll: float,
        *,
        require_proof: bool | None = None,
        rebind_dir: Path | None = None,
    ) -> None:
        self._grid = grid
        self._content = content
        self._timeout = timeout
        self._poll = poll
        self._site_of: dict[int, str] = {}
        self._refused_nodes: set[int] = set()  # nodes refused for identity: not asked again while connected
        self.rejected: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()  # since the last take_refused(): for the metric
        self.keys = SiteKeys()
        self.require_proof = deployment_grid(grid) if require_proof is None else require_proof
        self.rebind_dir = rebind_dir

    def refresh(self) -> dict[str, int]:
        """Handshake with new nodes, forget vanished ones; return site-id -> node-id."""
        self._apply_rebinds()
        live = set(self._grid.get_node_ids())
        for node_id in set(self._site_of) - live:
            del self._site_of[node_id]
        self._refused_nodes &= live
        new = sorted(live - set(self._site_of) - self._refused_nodes)
        if new:
            nonces = {n: secrets.token_hex(16) for n in new}
            messages = [self._query(n, nonces[n]) for n in new]
            for reply in exchange(self._grid, messages, timeout=self._timeout, poll=self._poll).replies:
                node_id = reply.metadata.src_node_id
                try:
                    site = screen_reply(reply, "query", expected_site=None)
                except RejectedReply as exc:
                    self.rejected[exc.reason] += 1
                    log.warning("handshake with node %s rejected: %s", node_id, exc)
                    continue
                if not self._proven(reply, site.site_id, nonces.get(node_id, "")):
                    self.refused["identity"] += 1
                    self._refused_nodes.add(node_id)
                    continue
                stale = [n for n, s in self._site_of.items() if s == site.site_id]
                for stale_node in stale:
                    del self._site_of[stale_node]
                self._site_of[node_id] = site.site_id
        return {site: node for node, site in self._site_of.items()}

    def take_refused(self) -> Counter[str]:
        """The identity refusals since the last call (the caller counts them in the exporter)."""
        taken, self.refused = self.refused, Counter()
        return taken

    def _query(self, node_id: int, nonce: str) -> Message:
        content = self._content()
        content[IDENTITY_RECORD] = ConfigRecord({"nonce": nonce})
        return Message(content, dst_node_id=node_id, message_type=MessageType.QUERY, ttl=self._timeout)

    def _proven(self, reply: Message, site_id: str, nonce: str) -> bool:
        """Whether the reply proves a key for ``site_id`` that the site is (or now gets) bound to."""
        node_id = reply.metadata.src_node_id
        meta = reply.content.config_records["meta"]
        if PROOF_KEY not in meta:
            if self.require_proof or site_id in self.keys.bound:
                log.warning("node %s answered for site %s without a key proof: refused", node_id, site_id)
                return False
            return True  # simulation: no node keys, the site-id is taken as said
        try:
            fingerprint = verify_identity(meta, site_id, reply.metadata.run_id, nonce)
        except ValueError as exc:
            log.warning("node %s answered for site %s with a bad key proof (%s): refused", node_id, site_id, exc)
            return False
        return self.keys.claim(site_id, fingerprint, node_id)

    def _apply_rebinds(self) -> None:
        if self.rebind_dir is None or not self.rebind_dir.is_dir():
            return
        for path in sorted(self.rebind_dir.glob("*.json")):
            try:
                request = json.loads(path.read_text())
                site_id = validate_site_id(str(request["site"]))
            except (OSError, ValueError, KeyError, StamenError) as exc:
                log.error("ignoring rebind request %s: %s", path, exc)
                continue
            self.keys.rebind(site_id, request)
            for node_id in [n for n, s in self._site_of.items() if s == site_id]:
                del self._site_of[node_id]  # handshake again: the next proof binds
            self._refused_nodes.clear()  # a refused node may now be the site's new key
            path.unlink()

    def site_of(self, node_id: int) -> str | None:
        """The site-id a node answered with, if it has."""
        return self._site_of.get(node_id)
