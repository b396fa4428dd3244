"""The replay buffer: past training records a site keeps to limit forgetting, each by its own keyed hash.

A record is kept iff ``HMAC-SHA256(site secret, its record id)``, read as a number in
[0, 1), is below the keep probability ``p = min(1, replay-size / replay-horizon)``. So a
record's membership is a function of that record alone (and of the site's secret, which
the server never sees, never of the run seed): adding or removing one record changes the
buffer by that record only. That is what the add/remove DP accountant and the per-shard
ledgers (parallel composition over disjoint shards) need; a reservoir (Vitter's algorithm
R), used before, evicts *another* record when one arrives, so neighbouring data sets gave
buffers that differ by a substitution. The price: the buffer holds ``p`` of every record
offered, ``replay-size`` in expectation once ``replay-horizon`` records have arrived, and
grows past it (by ``p`` per record) if more do. Lowering ``p`` later (a smaller
``replay-size``) drops exactly the records above the new threshold; a record once dropped
does not come back.

It is written here because the buffer and the ids of the records already offered must
live in the site state store, written atomically; none of the replay libraries we looked
at (Avalanche, Renate) persist that way.

Each round the site trains on its current data plus every buffered record that is not
in the current data (by record id), and afterwards offers the round's new records. The
buffer keeps each record's shard, so a per-shard privacy ledger can charge a replayed
record to the shard it came from. Records are copied into the store: the buffer is
private data at rest, like the data directory itself.

The key is the site's secret wherever a privacy guarantee could rest on it: every real
node, and every DP simulated site under ``dp-noise = "secret"``. A simulated site that
trains without DP, or under the research opt-in ``dp-noise = "seeded"``, keys by the
public run seed instead (:func:`membership_key`), so a simulation reproduces from its seed
like the rest of its randomness.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stamen.client.noise import site_secret
from stamen.client.view import SiteView
from stamen.common.errors import StateError
from stamen.common.identity import simulated
from stamen.common.state import SiteStore

STATE_ENTRY = "replay"
_HASH_SCALE = float(2**64)


def keep_scores(secret: bytes, ids: np.ndarray) -> np.ndarray:
    """Each record id's keyed hash as a number in [0, 1): a record is kept iff its score is below ``p``."""
    digests = (
        hmac.new(secret, b"stamen-replay/" + int(i).to_bytes(8, "little", signed=True), hashlib.sha256).digest()
        for i in ids
    )
    return np.fromiter((int.from_bytes(d[:8], "little") / _HASH_SCALE for d in digests), float, len(ids))


def membership_key(
    store: SiteStore, *, node_config: Mapping[str, Any], private: bool, noise_mode: str, public_seed: int
) -> bytes:
    """The key of the buffer's keyed hash: the site's secret, unless nothing private rests on it.

    Only a simulated site that is not DP, or is DP under the seeded research opt-in (whose
    noise the run seed already fixes), gets a key derived from ``public_seed``.
    """
    if simulated(node_config) and (not private or noise_mode == "seeded"):
        return hashlib.sha256(f"stamen-replay-public/{public_seed}/{store.site_id}".encode()).digest()
    return site_secret(store)


@dataclass(frozen=True)
class Replayed:
    """Buffered records not in the current view: inputs, labels and each record's shard."""

    x: torch.Tensor
    y: torch.Tensor
    shards: tuple[str, ...]
    shard_of: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])


class ReplayBuffer:
    """A site's buffer of past training records, persisted in its :class:`SiteStore`.

    The JSON state (``replay.json``) names the generation of the arrays file
    (``replay-<g>.safetensors``) it belongs to; a new generation is written before the
    JSON that points at it, so a crash between the two leaves the old buffer intact.
    """

    def __init__(self, store: SiteStore, capacity: int, horizon: int, key: bytes | None = None) -> None:
        if capacity < 1 or horizon < 1:
            raise ValueError(f"a replay buffer needs capacity >= 1 and horizon >= 1, got {capacity}, {horizon}")
        self.store = store
        self.capacity = capacity
        self.keep = min(1.0, capacity / horizon)
        self._secret = site_secret(store) if key is None else key
        state = store.read_json(STATE_ENTRY)
        self.shards: list[str] = []
        self.generation = 0
        self.x: np.ndarray | None = None
        self.y = np.zeros(0, dtype=np.int64)
        self.ids = np.zeros(0, dtype=np.int64)
        self.shard_of = np.zeros(0, dtype=np.int32)
        self.offered = np.zeros(0, dtype=np.int64)  # sorted ids of every record ever offered
        if state is not None:
            self._restore(state)
        if len(self):  # a lower keep probability than before drops the records above it, and only them
            self._keep(np.flatnonzero(keep_scores(self._secret, self.ids) < self.keep))

    def _restore(self, state: dict) -> None:
        where = self.store.dir / f"{STATE_ENTRY}.json"
        try:
            self.shards = [str(s) for s in state["shards"]]
            self.generation = int(state["generation"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"replay state {where} is malformed: {exc}") from exc
        arrays = self.store.read_arrays(f"{STATE_ENTRY}-{self.generation}")
        if arrays is None or not {"x", "y", "ids", "shard_of", "offered"} <= set(arrays):
            raise StateError(f"replay state {where} points at generation {self.generation}, whose arrays are missing")
        self.x, self.y, self.ids = arrays["x"], arrays["y"], arrays["ids"]
        self.shard_of, self.offered = arrays["shard_of"], arrays["offered"]

    def _keep(self, rows: np.ndarray) -> None:
        if self.x is None:
            return
        self.x, self.y, self.ids, self.shard_of = self.x[rows], self.y[rows], self.ids[rows], self.shard_of[rows]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def seen(self) -> int:
        """Records offered so far."""
        return int(self.offered.shape[0])

    def replay(self, view: SiteView, exclude_shards: frozenset[str] = frozenset()) -> Replayed:
        """Buffered records that are not in ``view`` (by id) and whose shard is not excluded."""
        shape = tuple(view.x_train.shape[1:])
        if self.x is None or len(self) == 0:
            return Replayed(torch.zeros((0, *shape)), torch.zeros(0, dtype=torch.int64), (), np.zeros(0, np.int32))
        if tuple(self.x.shape[1:]) != shape:
            raise StateError(
                f"replay buffer in {self.store.dir} holds examples of shape {tuple(self.x.shape[1:])}, "
                f"this round's data has {shape}; set replay-size=0 or remove {STATE_ENTRY}.json to start afresh"
            )
        allowed = np.array([s not in exclude_shards for s in self.shards], dtype=bool)
        rows = np.flatnonzero(~np.isin(self.ids, view.record_ids) & allowed[self.shard_of])
        return Replayed(
            torch.from_numpy(np.array(self.x[rows], dtype=np.float32)),
            torch.from_numpy(np.array(self.y[rows], dtype=np.int64)),
            tuple(self.shards),
            self.shard_of[rows],
        )

    def offer(self, view: SiteView) -> int:
        """Offer the view's records never offered before (in view order); return how many."""
        new = np.flatnonzero(~np.isin(view.record_ids, self.offered))
        if new.size == 0:
            return 0
        x_new = view.x_train[new].numpy().astype(np.float32)
        if self.x is None or len(self) == 0:  # an emptied buffer takes the shape of what comes now
            self.x = np.zeros((0, *x_new.shape[1:]), dtype=np.float32)
        shard_map = np.array([self._shard_index(s) for s in view.shard_names], dtype=np.int32)
        y_new, ids_new = view.y_train[new].numpy(), view.record_ids[new]
        s_new = shard_map[view.shard_of[new]]
        kept = keep_scores(self._secret, ids_new) < self.keep
        self.x = np.concatenate([self.x, x_new[kept]])
        self.y = np.concatenate([self.y, y_new[kept]])
        self.ids = np.concatenate([self.ids, ids_new[kept]])
        self.shard_of = np.concatenate([self.shard_of, s_new[kept]])
        self.offered = np.union1d(self.offered, ids_new)
        return int(new.size)

    def _shard_index(self, name: str) -> int:
        if name not in self.shards:
            self.shards.append(name)
        return self.shards.index(name)

    def save(self) -> None:
        """Persist the buffer: a new arrays generation, then the state that points at it."""
        if self.x is None:
            return
        old, self.generation = self.generation, self.generation + 1
        self.store.write_arrays(
            f"{STATE_ENTRY}-{self.generation}",
            {"x": self.x, "y": self.y, "ids": self.ids, "shard_of": self.shard_of, "offered": self.offered},
        )
        self.store.write_json(
            STATE_ENTRY,
            {
                "capacity": self.capacity,
                "keep": self.keep,
                "shards": self.shards,
                "generation": self.generation,
                "size": len(self),
                "seen": self.seen,
            },
        )
        (self.store.dir / f"{STATE_ENTRY}-{old}.safetensors").unlink(missing_ok=True)
