"""Which of a site's sent updates reached the server: the site's record, reconciled each round.

A site charges its privacy ledger before its reply leaves; a reply lost on the way (a
SuperLink that failed the upload, a deadline that passed) leaves a charge the server never
saw. The site therefore records every update it sends under an id of its own (a counter in
its state store, so a redone round is a new id) and puts the id in the reply's metrics
(``update-id``). Each train instruction carries the ids of this site's updates that arrived
(``received-updates``) among those the server can vouch for: sent in rounds from
``receipts-from-round`` on (the first round of the server process, or the window it keeps).
An update of such a round that is not in the list was lost; older ones stay unknown, never
guessed. The count of lost updates (and of lost charged ones) goes out with every reply.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from stamen.common.state import SiteStore

ENTRY = "sent_updates"
#: Pending entries kept at most: older ones are dropped as unknown (counted, never as lost).
MAX_PENDING = 256


def _load(store: SiteStore) -> dict[str, Any]:
    return store.read_json(ENTRY, default={"next_id": 1, "pending": [], "received": 0, "lost": 0, "lost_charged": 0,
                                           "unknown": 0})  # fmt: skip


def reconcile(store: SiteStore, server_round: int, from_round: int | None, received: Iterable[int]) -> None:
    """Settle pending updates the server can vouch for: in ``received`` arrived, else lost.

    ``from_round`` None (an instruction without receipts: a server that keeps none) settles nothing.
    """
    if from_round is None:
        return
    record = _load(store)
    arrived = set(received)
    keep = []
    for entry in record["pending"]:
        if entry["id"] in arrived:
            record["received"] += 1
        elif from_round <= entry["round"] < server_round:
            record["lost"] += 1
            record["lost_charged"] += int(entry["charged"])
        else:
            keep.append(entry)
    record["pending"] = keep
    store.write_json(ENTRY, record)


def record_sent(store: SiteStore, server_round: int, *, charged: bool) -> dict[str, float]:
    """Record an update about to be sent; its id and the site's loss counts, for the reply's metrics."""
    record = _load(store)
    update_id = int(record["next_id"])
    record["next_id"] = update_id + 1
    record["pending"].append({"id": update_id, "round": server_round, "charged": charged})
    if len(record["pending"]) > MAX_PENDING:
        record["unknown"] += len(record["pending"]) - MAX_PENDING
        record["pending"] = record["pending"][-MAX_PENDING:]
    store.write_json(ENTRY, record)
    return {"update-id": update_id, "updates-lost": record["lost"], "updates-lost-charged": record["lost_charged"]}
