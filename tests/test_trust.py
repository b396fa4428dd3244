"""Bounded trust in site reports: weight caps, the update norm bound, outlier rejection, and
robust aggregation rules underneath the server optimizer's momentum."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from flwr.app import RecordDict

from stamen.common.config import StamenConfig
from stamen.common.convert import arrays_to_record, record_to_arrays
from stamen.common.errors import ConfigError
from stamen.common.reply import REJECT_REASONS, SiteReply, Status
from stamen.server.loop import server_update
from stamen.server.observe import RoundObserver
from stamen.server.optimizers.fedavgm import FedAvgM
from stamen.server.trust import RULES, TrustPolicy, capped_weights, median_of, update_norm

GLOBAL = {"w": np.zeros((4, 5), dtype=np.float32), "b": np.zeros(5, dtype=np.float32)}
HONEST = {"w": np.full((4, 5), 0.1, np.float32), "b": np.full(5, 0.1, np.float32)}


def _reply(site: str, arrays: dict[str, np.ndarray], num_examples: float = 10.0) -> SiteReply:
    content = RecordDict({"arrays": arrays_to_record(arrays)})
    return SiteReply(site, Status.OK, metrics={"num-examples": num_examples, "lr": 0.1, "steps": 1.0}, content=content)


def _round(attackers: int, factor: float, n: int = 10, seed: int = 0) -> list[SiteReply]:
    """``n`` sites: honest ones send HONEST plus small noise, attackers send factor * HONEST."""
    rng = np.random.default_rng(seed)
    replies = []
    for i in range(n):
        if i < attackers:
            arrays = {k: v * factor for k, v in HONEST.items()}
        else:
            arrays = {k: (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype) for k, v in HONEST.items()}
        replies.append(_reply(f"site-{i:04d}", arrays))
    return replies


def _policy(**changes: object) -> TrustPolicy:
    return TrustPolicy.from_config(StamenConfig.from_mapping(changes))


def _gap(arrays: dict[str, np.ndarray]) -> float:
    """Distance from the honest update."""
    return float(np.sqrt(sum(np.sum((arrays[k] - HONEST[k]) ** 2) for k in HONEST)))


def test_weight_cap_limits_every_share_and_keeps_the_rest_proportional() -> None:
    weights = capped_weights([1000.0, 10.0, 20.0, 30.0, 40.0], 0.3)
    shares = np.asarray(weights) / sum(weights)
    assert shares.max() == pytest.approx(0.3)
    np.testing.assert_allclose(weights[1:], [10.0, 20.0, 30.0, 40.0])  # uncapped sites keep their ratios
    # two large sites: both capped to the same level
    weights = capped_weights([500.0, 400.0, 10.0, 10.0, 10.0, 10.0], 0.25)
    shares = np.asarray(weights) / sum(weights)
    assert shares[0] == pytest.approx(0.25) and shares[1] == pytest.approx(0.25) and shares.max() <= 0.25 + 1e-12
    assert capped_weights([5.0, 1.0, 1.0], 0.2) == [1.0, 1.0, 1.0]  # a cap below 1/n: equal weights
    assert capped_weights([5.0, 1.0], 0.0) == [5.0, 1.0]  # 0 = off


def test_a_site_claiming_many_examples_is_held_to_its_share() -> None:
    liar = _reply("site-0000", {k: v * 50 for k, v in HONEST.items()}, num_examples=1e6)
    replies = [liar] + [_reply(f"site-{i:04d}", HONEST) for i in range(1, 5)]
    uncapped = _policy().aggregate(replies)
    assert _gap(uncapped) > 40 * float(np.sqrt(25 * 0.01))  # the liar owns the mean
    capped = _policy(**{"max-site-weight": 0.2}).aggregate(replies)
    np.testing.assert_allclose(capped["w"], 0.2 * 50 * 0.1 + 0.8 * 0.1, rtol=1e-5)
    equal = _policy(**{"equal-weights": True}).aggregate(replies)
    np.testing.assert_allclose(equal["w"], capped["w"], rtol=1e-5)


def test_norm_bound_clips_or_rejects_and_counts_by_reason() -> None:
    big = {k: v * 100 for k, v in HONEST.items()}
    bound = 2.0
    rejected: Counter[str] = Counter()
    kept = _policy(**{"update-norm-bound": bound}).screen(GLOBAL, [_reply("a", big), _reply("b", HONEST)], rejected)
    assert len(kept) == 2 and not rejected
    clipped = record_to_arrays(kept[0].content["arrays"])
    assert update_norm(GLOBAL, clipped) == pytest.approx(bound, rel=1e-5)
    np.testing.assert_allclose(clipped["w"] / np.abs(clipped["w"]).max(), 1.0)  # same direction
    np.testing.assert_array_equal(record_to_arrays(kept[1].content["arrays"])["w"], HONEST["w"])  # within: as sent
    kept = _policy(**{"update-norm-bound": bound, "update-norm-action": "reject"}).screen(
        GLOBAL, [_reply("a", big), _reply("b", HONEST)], rejected
    )
    assert [r.site_id for r in kept] == ["b"] and rejected == Counter({"norm_bound": 1})


def test_outlier_updates_are_rejected_against_the_rounds_median_and_mad() -> None:
    rejected: Counter[str] = Counter()
    kept = _policy(**{"outlier-mad-k": 5.0}).screen(GLOBAL, _round(2, 10.0), rejected)
    assert sorted(r.site_id for r in kept) == [f"site-{i:04d}" for i in range(2, 10)]
    assert rejected == Counter({"outlier": 2})
    rejected.clear()
    assert len(_policy(**{"outlier-mad-k": 5.0}).screen(GLOBAL, _round(0, 1.0), rejected)) == 10 and not rejected


@pytest.mark.parametrize("attack", ["scale", "sign-flip"])
def test_robust_rules_hold_where_the_mean_is_dragged(attack: str) -> None:
    replies = _round(2, 10.0 if attack == "scale" else -10.0)
    assert _gap(_policy().aggregate(replies)) > 0.5
    for rule in RULES[1:]:
        assert _gap(_policy(aggregation=rule, **{"byzantine-sites": 2}).aggregate(replies)) < 0.1, rule


def test_krum_picks_one_honest_site_and_multikrum_averages_the_honest_ones() -> None:
    replies = _round(2, 10.0)
    krum = _policy(aggregation="krum", **{"byzantine-sites": 2}).aggregate(replies)
    assert any(np.array_equal(krum["w"], record_to_arrays(r.content["arrays"])["w"]) for r in replies[2:])
    multi = _policy(aggregation="multikrum", **{"byzantine-sites": 2}).aggregate(replies)
    honest_mean = np.mean([record_to_arrays(r.content["arrays"])["w"] for r in replies[2:]], axis=0)
    np.testing.assert_allclose(multi["w"], honest_mean, rtol=1e-5)


def test_server_momentum_steps_towards_the_robust_aggregate_with_its_own_state() -> None:
    """FedAvgM under median: each round equals FedAvgM's step to the median model, and the
    momentum buffer (the checkpointed state) is the one that step built."""
    policy = _policy(aggregation="median")
    optimizer, reference = FedAvgM(momentum=0.9), FedAvgM(momentum=0.9)
    current = dict(GLOBAL)
    for rnd in (1, 2, 3):
        replies = [
            _reply(r.site_id, {k: current[k] + v for k, v in record_to_arrays(r.content["arrays"]).items()})
            for r in _round(2, 10.0, seed=rnd)
        ]
        expected = reference.step(current, median_of([record_to_arrays(r.content["arrays"]) for r in replies]), rnd)
        current = server_update(optimizer, current, replies, rnd, trust=policy)
        for k in GLOBAL:
            np.testing.assert_allclose(current[k], expected[k], rtol=1e-6)
    np.testing.assert_allclose(optimizer.state_dict()["momentum"]["w"], reference.state_dict()["momentum"]["w"])
    assert _gap({k: current[k] / 3 for k in GLOBAL}) > 0.1  # momentum carried: 3 rounds move more than 3 updates


def test_robust_rules_with_client_level_dp_are_refused() -> None:
    for changes in ({"aggregation": "median"}, {"outlier-mad-k": 3.0}, {"max-site-weight": 0.2}):
        with pytest.raises(ConfigError, match="server-dp-clip"):
            StamenConfig.from_mapping({"server-dp-clip": 1.0, **changes})
    StamenConfig.from_mapping({"server-dp-clip": 1.0, "update-norm-bound": 2.0, "update-norm-action": "reject"})


def test_trust_rejections_are_exported_by_reason() -> None:
    assert {"norm_bound", "outlier"} <= set(REJECT_REASONS)
    observer = RoundObserver(StamenConfig.from_mapping({}))
    observer.replies(1, [], Counter({"norm_bound": 2, "outlier": 1}))
    values = {
        s.labels["reason"]: s.value
        for family in observer.exporter.registry.collect()
        for s in family.samples
        if s.name == "stamen_sites_rejected_total"
    }
    assert values["norm_bound"] == 2.0 and values["outlier"] == 1.0 and values["schema"] == 0.0
