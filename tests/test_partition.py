"""Partitioning: disjoint, covering, reproducible, skewed as asked, cheap on repeat calls."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from stamen.common import partition as partition_module
from stamen.common.errors import DataError
from stamen.common.partition import partition_indices, split_holdout

N = 2000
LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(10), N // 10))


def max_class_fraction(parts: list[np.ndarray]) -> float:
    """Mean share of each site's most common label: 0.1 is balanced, 1.0 single-label."""
    return float(np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts]))


def assert_disjoint_cover(parts: list[np.ndarray], n: int = N) -> None:
    """Every sample lands on exactly one site."""
    joined = np.concatenate(parts)
    assert sum(len(p) for p in parts) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


# --- properties ------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_everything(scheme: str) -> None:
    parts = partition_indices(LABELS, 7, scheme, alpha=0.5, seed=1)
    assert len(parts) == 7
    assert_disjoint_cover(parts)
    assert all(p.dtype == np.int64 for p in parts)


def test_iid_is_balanced_in_size_and_labels() -> None:
    parts = partition_indices(LABELS, 8, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert max_class_fraction(parts) < 0.2


def test_iid_ignores_input_order() -> None:
    """Label-sorted input must still give mixed sites (the rows are shuffled first)."""
    sorted_labels = np.sort(LABELS)
    parts = partition_indices(sorted_labels, 10, "iid", seed=0)
    assert all(len(np.unique(sorted_labels[p])) == 10 for p in parts)


def test_small_alpha_gives_much_more_label_skew_than_large_alpha() -> None:
    skewed = max_class_fraction(partition_indices(LABELS, 10, "dirichlet", alpha=0.1, seed=0))
    near_iid = max_class_fraction(partition_indices(LABELS, 10, "dirichlet", alpha=100.0, seed=0))
    assert near_iid < 0.2
    assert skewed > near_iid + 0.3


def test_shards_give_equal_sites_with_few_labels() -> None:
    parts = partition_indices(LABELS, 10, "shards", shards_per_partition=2, seed=0)
    assert {len(p) for p in parts} == {200}  # 2000 / (10 * 2) = 100 per shard, all used
    assert_disjoint_cover(parts)
    assert all(len(np.unique(LABELS[p])) <= 4 for p in parts)  # a shard spans at most 2 labels
    assert max_class_fraction(parts) > 0.4


def test_shards_drop_only_the_remainder() -> None:
    labels = LABELS[:1997]
    parts = partition_indices(labels, 10, "shards", shards_per_partition=2, seed=0)
    assert {len(p) for p in parts} == {198}  # shard size floor(1997 / 20) = 99
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined) == 1980


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_same_seed_reproduces_and_other_seed_differs(scheme: str) -> None:
    a = partition_indices(LABELS, 5, scheme, seed=7)
    b = partition_indices(LABELS.copy(), 5, scheme, seed=7)
    c = partition_indices(LABELS, 5, scheme, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_respects_min_partition_size() -> None:
    parts = partition_indices(LABELS, 10, "dirichlet", alpha=0.3, min_partition_size=120, seed=3)
    assert min(len(p) for p in parts) >= 120
    assert_disjoint_cover(parts)


def test_repeat_calls_are_cached_cheap_and_read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    labels = np.random.default_rng(5).integers(0, 10, 3000)
    runs: list[int] = []
    real = partition_module._partition
    monkeypatch.setattr(partition_module, "_partition", lambda y, request: runs.append(1) or real(y, request))
    first = partition_indices(labels, 10, "dirichlet", alpha=0.5, seed=11)
    for _ in range(100):
        again = partition_indices(labels.copy(), 10, "dirichlet", alpha=0.5, seed=11)
    assert len(runs) <= 1, "a repeat call with equal labels ran the partitioner again"
    assert all(x is y for x, y in zip(first, again, strict=True))
    again.pop()  # the returned list is the caller's own; the cache must not change
    assert len(partition_indices(labels, 10, "dirichlet", alpha=0.5, seed=11)) == 10
    with pytest.raises(ValueError):
        first[0][0] = 0


def test_numpy_scalar_arguments_are_accepted() -> None:
    """Config code often hands over numpy ints; flwr-datasets alone would reject them."""
    plain = partition_indices(LABELS, 4, "shards", shards_per_partition=2, seed=3)
    scalars = partition_indices(LABELS, np.int64(4), "shards", shards_per_partition=np.int64(2), seed=np.int64(3))
    assert all(x is y for x, y in zip(plain, scalars, strict=True))


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"num_partitions": 4, "scheme": "pathological"},
            r"unknown partition scheme 'pathological'.*iid, dirichlet, shards",
        ),
        ({"num_partitions": 0}, r"num_partitions must be at least 1, got 0"),
        ({"num_partitions": 4, "min_partition_size": -1}, r"min_partition_size must be >= 0"),
        ({"num_partitions": 4, "seed": -1}, r"partition seed must be >= 0, got -1"),
        (
            {"num_partitions": 2001, "min_partition_size": 0},
            r"2001 partitions requested but there are only 2000 samples",
        ),
        ({"num_partitions": 50, "min_partition_size": 41}, r"2000 samples cannot give 50 sites at least 41 each"),
        ({"num_partitions": 4, "scheme": "dirichlet", "alpha": 0.0}, r"alpha must be a finite number > 0, got 0\.0"),
        ({"num_partitions": 4, "scheme": "dirichlet", "alpha": -1.0}, r"alpha must be a finite number > 0"),
        ({"num_partitions": 4, "scheme": "dirichlet", "alpha": float("inf")}, r"alpha must be a finite number > 0"),
        ({"num_partitions": 4, "scheme": "dirichlet", "alpha": float("nan")}, r"alpha must be a finite number > 0"),
        ({"num_partitions": 4, "scheme": "shards", "shards_per_partition": 0}, r"shards_per_partition must be >= 1"),
        (
            {"num_partitions": 100, "scheme": "shards", "shards_per_partition": 30, "min_partition_size": 0},
            r"2000 samples cannot make 3000 shards \(100 sites x 30 shards\)",
        ),
        (
            {"num_partitions": 10, "scheme": "shards", "shards_per_partition": 3, "min_partition_size": 199},
            r"shards give each site 198 samples, fewer than min_partition_size=199",
        ),
    ],
)
def test_bad_requests(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DataError, match=message):
        partition_indices(LABELS, **kwargs)


def test_dirichlet_that_cannot_meet_min_size_suggests_a_fix() -> None:
    with pytest.raises(DataError, match=r"alpha=0\.01.*10 sites at least 190 samples.*larger alpha"):
        partition_indices(LABELS, 10, "dirichlet", alpha=0.01, min_partition_size=190, seed=0)


@pytest.mark.parametrize("labels", [np.array([0.0, 1.0]), np.zeros((2, 2), dtype=np.int64)])
def test_labels_must_be_a_1d_integer_array(labels: np.ndarray) -> None:
    with pytest.raises(DataError, match=r"labels must be a 1-D integer array"):
        partition_indices(labels, 1)


# --- split_holdout ---------------------------------------------------------------------


def test_holdout_is_deterministic_disjoint_and_complete() -> None:
    idx = np.arange(100, 200)
    train, hold = split_holdout(idx, 0.2, seed=4)
    assert len(hold) == 20 and len(train) == 80
    np.testing.assert_array_equal(np.sort(np.concatenate([train, hold])), idx)
    again = split_holdout(idx, 0.2, seed=4)
    assert np.array_equal(train, again[0]) and np.array_equal(hold, again[1])
    assert not np.array_equal(hold, split_holdout(idx, 0.2, seed=5)[1])


def test_holdout_edge_sizes() -> None:
    train, hold = split_holdout(np.arange(10), 0.0, seed=0)
    assert len(train) == 10 and len(hold) == 0
    assert len(split_holdout(np.arange(10), 0.01, seed=0)[1]) == 1  # non-zero fraction holds out one
    assert len(split_holdout(np.arange(5), 0.99, seed=0)[0]) == 1  # one example always trains
    train, hold = split_holdout(np.array([42]), 0.5, seed=0)
    assert train.tolist() == [42] and len(hold) == 0


@pytest.mark.parametrize(
    ("indices", "fraction", "message"),
    [
        (np.arange(10), 1.0, r"holdout fraction must be in \[0, 1\), got 1\.0"),
        (np.arange(10), -0.1, r"holdout fraction must be in \[0, 1\)"),
        (np.arange(10), float("nan"), r"holdout fraction must be in \[0, 1\)"),
        (np.array([], dtype=np.int64), 0.1, r"cannot split a holdout from 0 indices"),
        (np.array([0.5, 1.5]), 0.1, r"indices must be integers"),
        (np.arange(10), 0.1, r"holdout seed must be >= 0"),
    ],
)
def test_holdout_errors(indices: np.ndarray, fraction: float, message: str) -> None:
    with pytest.raises(DataError, match=message):
        split_holdout(indices, fraction, seed=-1 if "seed" in message else 0)
