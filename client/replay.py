"""The replay buffer: a uniform sample of every record a site has trained on, kept to limit forgetting.

Reservoir sampling (Vitter's algorithm R): after ``n`` records have been offered, each of
them is in the buffer with probability ``capacity / n``, whatever the order they came
in, and the buffer never grows past ``capacity``. It is written here rather than taken
from a library because the buffer, its generator and the ids of the records already
offered must live in the site state store, written atomically, and continue bit for bit
after a restart; none of the replay libraries we looked at (Avalanche, Renate) persist
that way.

Each round the site trains on its current data plus every buffered record that is not
in the current data (by record id), and afterwards offers the round's new records. The
buffer keeps each record's shard, so a per-shard privacy ledger can charge a replayed
record to the shard it came from. Records are copied into the store: the buffer is
private data at rest, like the data directory itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stamen.client.view import SiteView
from stamen.common.errors import StateError
from stamen.common.state import SiteStore

STATE_ENTRY = "replay"


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
    """A site's reservoir of past training records, persisted in its :class:`SiteStore`.

    The JSON state (``replay.json``) names the generation of the arrays file
    (``replay-<g>.safetensors``) it belongs to; a new generation is written before the
    JSON that points at it, so a crash between the two leaves the old buffer intact.
    """

    def __init__(self, store: SiteStore, capacity: int, seed: int) -> None:
        if capacity < 1:
            raise ValueError("a replay buffer needs capacity >= 1")
        self.store = store
        self.capacity = capacity
        state = store.read_json(STATE_ENTRY)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.shards: list[str] = []
        self.generation = 0
        self.x: np.ndarray | None = None
        self.y = np.zeros(0, dtype=np.int64)
        self.ids = np.zeros(0, dtype=np.int64)
        self.shard_of = np.zeros(0, dtype=np.int32)
        self.offered = np.zeros(0, dtype=np.int64)  # sorted ids of every record ever offered
        if state is not None:
            self._restore(state)
        if len(self.y) > capacity:  # the operator lowered replay-size: keep a uniform subset
            keep = np.sort(self.rng.choice(len(self.y), size=capacity, replace=False))
            self._keep(keep)

    def _restore(self, state: dict) -> None:
        where = self.store.dir / f"{STATE_ENTRY}.json"
        try:
            self.rng.bit_generator.state = state["rng"]
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
        """Records offered so far (the reservoir's ``n``)."""
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
        if self.x is None:
            self.x = np.zeros((0, *x_new.shape[1:]), dtype=np.float32)
        shard_map = np.array([self._shard_index(s) for s in view.shard_names], dtype=np.int32)
        y_new, ids_new = view.y_train[new].numpy(), view.record_ids[new]
        s_new = shard_map[view.shard_of[new]]
        fill = min(max(self.capacity - len(self), 0), len(new))
        self.x = np.concatenate([self.x, x_new[:fill]])
        self.y = np.concatenate([self.y, y_new[:fill]])
        self.ids = np.concatenate([self.ids, ids_new[:fill]])
        self.shard_of = np.concatenate([self.shard_of, s_new[:fill]])
        rest = np.arange(fill, len(new))
        if rest.size:
            # the i-th record ever offered (0-based) replaces slot j ~ U{0..i} if j < capacity
            positions = self.seen + rest
            slots = self.rng.integers(0, positions + 1)
            for i, j in zip(rest[slots < self.capacity], slots[slots < self.capacity], strict=True):
                self.x[j], self.y[j], self.ids[j], self.shard_of[j] = x_new[i], y_new[i], ids_new[i], s_new[i]
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
                "rng": self.rng.bit_generator.state,
                "shards": self.shards,
                "generation": self.generation,
                "size": len(self),
                "seen": self.seen,
            },
        )
        (self.store.dir / f"{STATE_ENTRY}-{old}.safetensors").unlink(missing_ok=True)
