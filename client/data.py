"""Where a site's private data comes from.

A real node names its data in node config (``data = "npz:/srv/site/data.npz"``); in
simulation each site is one partition of the run's dataset, picked by the ``partition-id``
Flower gives the virtual node. Either way the site holds out a share of its data for
federated evaluation. Results are cached per process: a simulated client is called every
round and must not reload or re-partition each time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stamen.common.config import StamenConfig
from stamen.common.datasets import load_dataset
from stamen.common.errors import ConfigError
from stamen.common.partition import partition_indices, split_holdout
from stamen.common.runrecord import derive_seeds
from stamen.common.sitedata import entry_dataset, loader_dataset


@dataclass(frozen=True)
class SiteData:
    """A site's training and held-out tensors (read-only by convention)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_holdout: torch.Tensor
    y_holdout: torch.Tensor

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def num_holdout(self) -> int:
        return int(self.y_holdout.shape[0])

    def select_train(self, keep: torch.Tensor) -> SiteData:
        """This data with only the training rows where ``keep`` (a boolean mask) is true."""
        return replace(self, x_train=self.x_train[keep], y_train=self.y_train[keep])


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.array(x, dtype=np.float32)), torch.from_numpy(np.array(y, dtype=np.int64))


@lru_cache(maxsize=4096)
def _simulated_split(
    dataset: str,
    partition_id: int,
    num_partitions: int,
    scheme: str,
    alpha: float,
    shards: int,
    min_size: int,
    holdout: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    data = load_dataset(dataset)
    parts = partition_indices(
        data.y_train,
        num_partitions,
        scheme,
        alpha=alpha,
        shards_per_partition=shards,
        min_partition_size=min_size,
        seed=seed,
    )
    return split_holdout(parts[partition_id], holdout, seed + partition_id)


@lru_cache(maxsize=4096)
def _simulated_site(dataset: str, *split_args: Any) -> SiteData:
    data = load_dataset(dataset)
    train_idx, hold_idx = _simulated_split(dataset, *split_args)
    x_tr, y_tr = _tensors(data.x_train[train_idx], data.y_train[train_idx])
    x_ho, y_ho = _tensors(data.x_train[hold_idx], data.y_train[hold_idx])
    return SiteData(x_tr, y_tr, x_ho, y_ho)


def _split_args(node_config: Mapping[str, Any], cfg: StamenConfig) -> tuple[Any, ...]:
    """The partitioning arguments after the dataset name, as plain (hashable) values."""
    return (
        int(node_config["partition-id"]),
        int(node_config["num-partitions"]),
        str(cfg["partition"]),
        float(cfg["alpha"]),
        int(cfg["shards-per-site"]),
        int(cfg["min-partition-size"]),
        float(cfg["holdout-fraction"]),
        derive_seeds(int(cfg["seed"]))["partition"],
    )


def simulated_split(node_config: Mapping[str, Any], cfg: StamenConfig) -> tuple[np.ndarray, np.ndarray]:
    """A simulated site's (train, holdout) row indices into the run dataset's training split."""
    return _simulated_split(str(cfg["dataset"]), *_split_args(node_config, cfg))


@lru_cache(maxsize=4)
def _node_site(spec: str, holdout: float, seed: int) -> SiteData:
    data = load_dataset(spec)
    if data.x_test is not None and data.y_test is not None:
        x_tr, y_tr = _tensors(data.x_train, data.y_train)
        x_ho, y_ho = _tensors(data.x_test, data.y_test)
        return SiteData(x_tr, y_tr, x_ho, y_ho)
    train_idx, hold_idx = split_holdout(np.arange(len(data.y_train)), holdout, seed)
    x_tr, y_tr = _tensors(data.x_train[train_idx], data.y_train[train_idx])
    x_ho, y_ho = _tensors(data.x_train[hold_idx], data.y_train[hold_idx])
    return SiteData(x_tr, y_tr, x_ho, y_ho)


def _holdout(cfg: StamenConfig) -> tuple[float, int]:
    return float(cfg["holdout-fraction"]), derive_seeds(int(cfg["seed"]))["partition"]


@lru_cache(maxsize=64)
def _loader_site(spec: str, partition_id: int, num_partitions: int, holdout: float, seed: int) -> SiteData:
    """A ``data-loader`` site: its arrays, ``holdout`` of them held out (its ``x_test`` is the server's)."""
    data = loader_dataset(spec, partition_id, num_partitions)
    train_idx, hold_idx = split_holdout(np.arange(len(data.y_train)), holdout, seed + partition_id)
    x_tr, y_tr = _tensors(data.x_train[train_idx], data.y_train[train_idx])
    x_ho, y_ho = _tensors(data.x_train[hold_idx], data.y_train[hold_idx])
    return SiteData(x_tr, y_tr, x_ho, y_ho)


def _dir_site(path: str, holdout: float, seed: int) -> SiteData:
    """Every file in a data directory now, as one dataset (the rounds' view is :mod:`client.datadir`'s)."""
    data = entry_dataset(Path(path))
    train_idx, hold_idx = split_holdout(np.arange(len(data.y_train)), holdout, seed)
    x_tr, y_tr = _tensors(data.x_train[train_idx], data.y_train[train_idx])
    x_ho, y_ho = _tensors(data.x_train[hold_idx], data.y_train[hold_idx])
    return SiteData(x_tr, y_tr, x_ho, y_ho)


def load_site_data(node_config: Mapping[str, Any], cfg: StamenConfig) -> SiteData:
    """This site's data: the node's own ``data`` (or ``data-dir``, as it is now), else its ``data-loader``
    arrays, else its partition.

    A ``site-data`` site arrives here with its entry as ``data`` (:func:`~stamen.common.sitedata.with_site_data`).
    """
    seed = derive_seeds(int(cfg["seed"]))["partition"]
    if "data" in node_config:
        return _node_site(str(node_config["data"]), float(cfg["holdout-fraction"]), seed)
    if "data-dir" in node_config:
        return _dir_site(str(node_config["data-dir"]), *_holdout(cfg))
    if "partition-id" in node_config and "num-partitions" in node_config and cfg["data-loader"]:
        return _loader_site(str(cfg["data-loader"]), *_split_args(node_config, cfg)[:2], *_holdout(cfg))
    if "partition-id" in node_config and "num-partitions" in node_config:
        return _simulated_site(str(cfg["dataset"]), *_split_args(node_config, cfg))
    raise ConfigError('node config names no data: set data = "npz:PATH" or "csv:PATH" for this node')
