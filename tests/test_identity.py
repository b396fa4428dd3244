"""Site identity and sampling: stable ids, and a sampler a resumed run can continue exactly."""

from __future__ import annotations

import json

import pytest

from stamen.common.errors import ConfigError
from stamen.common.identity import SiteSampler, site_id_from_node_config, validate_site_id

SITES = [f"site-{i:04d}" for i in range(20)]


# --- site-id ---------------------------------------------------------------------------


def test_configured_site_id_is_used() -> None:
    assert site_id_from_node_config({"site-id": "hospital-7"}) == "hospital-7"


def test_configured_site_id_wins_over_partition_id() -> None:
    assert site_id_from_node_config({"site-id": "hospital-7", "partition-id": 3}) == "hospital-7"


def test_partition_id_gives_padded_site_id() -> None:
    assert site_id_from_node_config({"partition-id": 3, "num-partitions": 10}) == "site-0003"
    assert site_id_from_node_config({"partition-id": 12345}) == "site-12345"


def test_neither_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="site-id"):
        site_id_from_node_config({"num-partitions": 10})


@pytest.mark.parametrize(
    "bad",
    ["../x", "", "a b", "x" * 65, "a/b", ".hidden", "-leading-dash", "site\n", "site\x00", "sité"],
    ids=["traversal", "empty", "space", "65-chars", "slash", "dot-first", "dash-first", "newline", "nul", "non-ascii"],
)
def test_invalid_site_ids_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match="site-id"):
        validate_site_id(bad)
    with pytest.raises(ConfigError, match="site-id"):
        site_id_from_node_config({"site-id": bad})


@pytest.mark.parametrize("good", ["x" * 64, "A.b_c-1", "0", "site-0003"])
def test_valid_site_ids_pass_unchanged(good: str) -> None:
    assert validate_site_id(good) == good


def test_non_string_site_id_is_rejected() -> None:
    with pytest.raises(ConfigError):
        validate_site_id(7)  # type: ignore[arg-type]


# --- sampling ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "fraction", "minimum", "expected"),
    [
        (10, 1.0, 1, 10),
        (10, 0.3, 1, 3),
        (10, 0.25, 1, 3),  # ceil(2.5)
        (10, 0.01, 1, 1),  # ceil(0.1)
        (10, 0.1, 5, 5),  # the minimum wins
        (3, 0.1, 5, 3),  # ... capped at the pool
        (25, 0.28, 1, 7),  # 0.28 * 25 is 7.000000000000001 in floating point
        (100, 0.07, 1, 7),  # 0.07 * 100 is 7.000000000000001 too
        (1, 0.5, 1, 1),
    ],
)
def test_sample_size(n: int, fraction: float, minimum: int, expected: int) -> None:
    chosen = SiteSampler(0).sample([f"s{i:03d}" for i in range(n)], fraction, minimum)
    assert len(chosen) == expected


def test_sample_is_sorted_distinct_and_from_the_pool() -> None:
    sampler = SiteSampler(3)
    for _ in range(20):
        chosen = sampler.sample(SITES, 0.4)
        assert chosen == sorted(chosen)
        assert len(set(chosen)) == len(chosen) == 8
        assert set(chosen) <= set(SITES)


def test_empty_pool_gives_no_sites() -> None:
    assert SiteSampler(0).sample([], 0.5) == []


def _sequence(sampler: SiteSampler, rounds: int, pool: list[str] = SITES) -> list[list[str]]:
    """The sites picked over ``rounds`` rounds."""
    return [sampler.sample(pool, 0.3) for _ in range(rounds)]


def test_same_seed_same_sequence_other_seed_another() -> None:
    first = _sequence(SiteSampler(42), 10)
    assert _sequence(SiteSampler(42), 10) == first
    assert _sequence(SiteSampler(43), 10) != first
    assert len({tuple(s) for s in first}) > 1  # the sample changes from round to round


def test_input_order_and_duplicates_do_not_matter() -> None:
    shuffled = list(reversed(SITES)) + SITES[:5]
    assert _sequence(SiteSampler(7), 10, shuffled) == _sequence(SiteSampler(7), 10)


def test_state_dict_through_json_continues_the_same_sequence() -> None:
    uninterrupted = _sequence(SiteSampler(5), 12)

    before = SiteSampler(5)
    head = _sequence(before, 4)
    saved = json.loads(json.dumps(before.state_dict()))
    resumed = SiteSampler(999)  # the seed must not matter once the state is loaded
    resumed.load_state_dict(saved)

    assert head + _sequence(resumed, 8) == uninterrupted
    assert _sequence(before, 8) == uninterrupted[4:]  # saving does not disturb the running sampler
