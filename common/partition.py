"""Split one dataset's indices across simulated sites with flwr-datasets partitioners.

Every simulated client recomputes its partition every round, so results are
cached in-process; the partitioners themselves are used (rather than
hand-written splits) so our non-IID settings mean what the Flower literature
means by them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from stamen.common.datacache import cached_arrays
from stamen.common.errors import DataError

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

SCHEMES = ("iid", "dirichlet", "shards")


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    min_partition_size: int = 10,
    seed: int = 0,
) -> list[np.ndarray]:
    """Return one sorted, read-only index array per site; cached after the first call.

    ``alpha`` only matters for ``dirichlet`` and ``shards_per_partition`` only for
    ``shards``; ``min_partition_size`` is enforced for every scheme.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"labels must be a 1-D integer array, got {y.dtype} with shape {y.shape}")
    digest = hashlib.blake2b(y.tobytes(), digest_size=16).hexdigest()
    key = _Labels(f"{y.dtype.str}:{len(y)}:{digest}", y)
    # Plain ints/floats: flwr-datasets rejects numpy scalars, and they keep cache keys uniform.
    parts = _partition_cached(
        key, int(num_partitions), scheme, float(alpha), int(shards_per_partition), int(min_partition_size), int(seed)
    )
    return list(parts)


def split_holdout(indices: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a site's indices into (train, holdout) for local validation.

    A non-zero ``fraction`` holds out at least one example, and at least one
    example always stays for training, so neither local fit nor local
    evaluation silently runs on nothing.
    """
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.size == 0:
        raise DataError(
            f"cannot split a holdout from {idx.size} indices (shape {idx.shape}); "
            "a site needs at least one training example"
        )
    if idx.dtype.kind not in "iu":
        raise DataError(f"indices must be integers, got dtype {idx.dtype}")
    if not (math.isfinite(fraction) and 0 <= fraction < 1):
        raise DataError(f"holdout fraction must be in [0, 1), got {fraction}")
    if seed < 0:
        raise DataError(f"holdout seed must be >= 0, got {seed}")
    n = len(idx)
    n_hold = 0 if fraction == 0 else min(max(1, round(fraction * n)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(idx[order[n_hold:]]), np.sort(idx[order[:n_hold]])


@dataclass(frozen=True)
class _Labels:
    """Cache key that hashes by content digest but carries the array for a miss."""

    digest: str
    array: np.ndarray = field(compare=False, repr=False)


@functools.lru_cache(maxsize=32)
def _partition_cached(
    labels: _Labels,
    num_partitions: int,
    scheme: str,
    alpha: float,
    shards_per_partition: int,
    min_partition_size: int,
    seed: int,
) -> tuple[np.ndarray, ...]:
    """Validate the request, run the flwr-datasets partitioner (or read its result from the
    simulation's data cache, :mod:`common.datacache`), freeze the result."""
    y = labels.array
    request = _Request(num_partitions, scheme, alpha, shards_per_partition, min_partition_size, seed)
    _check_request(len(y), *request)
    key = hashlib.blake2b(repr((labels.digest, *request)).encode(), digest_size=16).hexdigest()
    parts = cached_arrays(f"partition-{key}", lambda: _partition(y, request))
    return tuple(_freeze(parts[f"site{i}"]) for i in range(num_partitions))


class _Request(NamedTuple):
    """Everything besides the labels that decides a partitioning."""

    num_partitions: int
    scheme: str
    alpha: float
    shards_per_partition: int
    min_partition_size: int
    seed: int


def _partition(y: np.ndarray, request: _Request) -> dict[str, np.ndarray]:
    """Each site's sorted indices, from the flwr-datasets partitioner (``site0`` ... ``site<K-1>``)."""
    import datasets  # here: with the data cache a simulated site imports neither library

    n, (num_partitions, _, alpha, _, min_partition_size, seed) = len(y), request
    partitioner = _make_partitioner(*request)
    # Shuffle rows first: IidPartitioner takes contiguous blocks, so label-sorted
    # input would otherwise give skewed "iid" sites and ignore the seed; for
    # shards the row order decides which samples of a label share a shard.
    order = np.random.default_rng(seed).permutation(n)
    partitioner.dataset = datasets.Dataset.from_dict({"label": y[order], "idx": order})
    with _quiet():
        try:
            parts = [
                partitioner.load_partition(i).with_format("arrow")["idx"].to_numpy() for i in range(num_partitions)
            ]
        except ValueError as exc:  # past _check_request only Dirichlet's retry limit raises
            raise DataError(
                f"Dirichlet partitioning (alpha={alpha}) could not give each of "
                f"{num_partitions} sites at least {min_partition_size} samples in 10 "
                "attempts; use a larger alpha, fewer clients or a smaller "
                "min_partition_size"
            ) from exc
    return {f"site{i}": np.sort(p) for i, p in enumerate(parts)}


def _check_request(
    n: int,
    num_partitions: int,
    scheme: str,
    alpha: float,
    shards_per_partition: int,
    min_partition_size: int,
    seed: int,
) -> None:
    """Reject impossible requests up front with a message the user can act on."""
    if scheme not in SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    if num_partitions < 1:
        raise DataError(f"num_partitions must be at least 1, got {num_partitions}")
    if min_partition_size < 0:
        raise DataError(f"min_partition_size must be >= 0, got {min_partition_size}")
    if seed < 0:
        raise DataError(f"partition seed must be >= 0, got {seed}")
    if num_partitions > n:
        raise DataError(f"{num_partitions} partitions requested but there are only {n} samples")
    if num_partitions * min_partition_size > n:
        raise DataError(f"{n} samples cannot give {num_partitions} sites at least {min_partition_size} each")
    if scheme == "dirichlet" and not (math.isfinite(alpha) and alpha > 0):
        raise DataError(f"Dirichlet alpha must be a finite number > 0, got {alpha}")
    if scheme == "shards":
        if shards_per_partition < 1:
            raise DataError(f"shards_per_partition must be >= 1, got {shards_per_partition}")
        num_shards = num_partitions * shards_per_partition
        if num_shards > n:
            raise DataError(
                f"{n} samples cannot make {num_shards} shards ({num_partitions} sites x {shards_per_partition} shards)"
            )
        per_site = shards_per_partition * (n // num_shards)
        if per_site < min_partition_size:
            raise DataError(
                f"shards give each site {per_site} samples, fewer than "
                f"min_partition_size={min_partition_size}; use fewer sites or shards"
            )


def _make_partitioner(
    num_partitions: int,
    scheme: str,
    alpha: float,
    shards_per_partition: int,
    min_partition_size: int,
    seed: int,
) -> Partitioner:
    """Build the flwr-datasets partitioner for a validated request."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

    if scheme == "iid":
        return IidPartitioner(num_partitions)
    if scheme == "dirichlet":
        # self_balancing=True: a site stops receiving samples once it holds more
        # than N/K, as in the reference code behind the Dirichlet benchmarks.
        # Without it small alphas give a few giant sites (quantity skew on top
        # of label skew) and min_partition_size retries fail far more often.
        return DirichletPartitioner(
            num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=True,
            seed=seed,
        )
    # Shard size is left to flwr-datasets: floor(N / (K * shards)), so all
    # samples are used when that divides evenly and fewer than K * shards are
    # dropped otherwise, keeping every site at exactly the same size.
    return ShardPartitioner(
        num_partitions,
        partition_by="label",
        num_shards_per_partition=shards_per_partition,
        seed=seed,
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide flwr-datasets' per-retry warnings and pyarrow deprecation noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _freeze(a: np.ndarray) -> np.ndarray:
    """Cached arrays are shared by every caller, so make them read-only."""
    a.flags.writeable = False
    return a
