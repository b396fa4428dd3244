"""The data a site holds in one round: tensors, plus each training record's id and shard.

Every data source (:mod:`client.sources`) returns a :class:`SiteView`. The record ids let
the replay buffer (:mod:`client.replay`) tell old records from new ones; the shards tell
per-shard privacy ledgers (:mod:`client.shard_privacy`) whom a round charges.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from stamen.client.data import SiteData

#: The shard of a site whose data does not arrive in shards (a fixed file or partition).
BASE_SHARD = "base"


@dataclass(frozen=True)
class SiteView(SiteData):
    """One round's data of a site, with each training record's id and shard.

    ``record_ids`` are unique within the site and stable across rounds and restarts;
    ``shard_of[i]`` indexes ``shard_names`` for training row ``i``.
    """

    record_ids: np.ndarray
    shard_of: np.ndarray
    shard_names: tuple[str, ...]

    @classmethod
    def single_shard(cls, data: SiteData, record_ids: np.ndarray, shard: str = BASE_SHARD) -> SiteView:
        """A view whose training records all belong to one shard."""
        return cls(
            data.x_train,
            data.y_train,
            data.x_holdout,
            data.y_holdout,
            np.asarray(record_ids, dtype=np.int64),
            np.zeros(data.num_train, dtype=np.int32),
            (shard,),
        )

    def select_train(self, keep: torch.Tensor) -> SiteView:
        """This view with only the training rows where ``keep`` is true (ids and shards too)."""
        mask = keep.numpy()
        return replace(
            self,
            x_train=self.x_train[keep],
            y_train=self.y_train[keep],
            record_ids=self.record_ids[mask],
            shard_of=self.shard_of[mask],
        )
