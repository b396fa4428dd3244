"""What a site trains on in one round: its current data plus replayed records.

Every row keeps the name of the shard it came from, so a privacy policy can drop the
rows of shards that are out of budget (:mod:`client.shard_privacy`) and charge the
round to every shard whose records it could sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stamen.client.replay import Replayed
from stamen.client.view import SiteView


@dataclass(frozen=True)
class TrainingPool:
    """Inputs and labels of one round's training data, with each row's shard name."""

    x: torch.Tensor
    y: torch.Tensor
    shard_of: np.ndarray
    shard_names: tuple[str, ...]
    replayed: int

    @classmethod
    def build(cls, view: SiteView, replayed: Replayed | None = None) -> TrainingPool:
        """The view's rows, then the replayed ones (shard names merged)."""
        if replayed is None or len(replayed) == 0:
            return cls(view.x_train, view.y_train, view.shard_of, view.shard_names, 0)
        names = list(view.shard_names)
        remap = np.array([_index(names, s) for s in replayed.shards], dtype=np.int32)
        return cls(
            torch.cat([view.x_train, replayed.x]),
            torch.cat([view.y_train, replayed.y]),
            np.concatenate([view.shard_of, remap[replayed.shard_of]]),
            tuple(names),
            len(replayed),
        )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def shards(self) -> frozenset[str]:
        """Names of the shards with at least one row here."""
        return frozenset(self.shard_names[i] for i in np.unique(self.shard_of))

    def without(self, shards: frozenset[str]) -> TrainingPool:
        """The pool less every row of ``shards``."""
        dropped = np.array([s in shards for s in self.shard_names], dtype=bool)
        keep = np.flatnonzero(~dropped[self.shard_of]) if len(self) else np.zeros(0, dtype=np.int64)
        index = torch.from_numpy(keep)
        replayed_kept = int(np.count_nonzero(keep >= len(self) - self.replayed))
        return TrainingPool(self.x[index], self.y[index], self.shard_of[keep], self.shard_names, replayed_kept)


def _index(names: list[str], name: str) -> int:
    if name not in names:
        names.append(name)
    return names.index(name)
