"""What a site already sent: re-sending an identical DP update costs no privacy.

When a server crashes after a round's updates left the sites but before it checkpointed
that round, the resumed server redoes the round. A DP site's ledger was charged the
first time (correctly: the update left the site, and privacy spent is never rolled back).
The redo sends the same global model, and the site's noise and Poisson sampling are
seeded by (run seed, site, round), so on the same data the site computes the very same
update. Releasing bytes the recipient already holds reveals nothing new (it is
post-processing of the first release), so the ledger is not charged again — but only when
the update *and* the metrics sent with it hash to exactly what was sent before; anything
else (new data, a different global model, a nondeterministic kernel) is a new release and
is charged in full.

The digests live in the site's state store (``sent_updates.json``), newest last, capped.
(Record-derived statistics have their own cache of noisy releases: :mod:`client.release`.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from stamen.common.state import SiteStore

SENT_ENTRY = "sent_updates"
KEEP = 256


def update_digest(arrays: Mapping[str, np.ndarray], metrics: Mapping[str, float]) -> str:
    """SHA-256 over every array (name, dtype, shape, bytes) and every metric, in a fixed order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    for key in sorted(metrics):
        h.update(f"{key}={float(metrics[key])!r};".encode())
    return h.hexdigest()


class SentUpdates:
    """The digests of the updates a site has sent, kept in its state store."""

    def __init__(self, store: SiteStore) -> None:
        self._store = store
        self._digests: list[str] = list(store.read_json(SENT_ENTRY, default=[]))

    def __contains__(self, digest: str) -> bool:
        return digest in self._digests

    def add(self, digest: str) -> None:
        """Remember ``digest`` (atomically; call after the ledger is charged for it)."""
        self._digests = [*self._digests, digest][-KEEP:]
        self._store.write_json(SENT_ENTRY, self._digests)
