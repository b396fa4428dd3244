"""Which privacy ledgers a DP round charges, under the run's ``privacy-policy``.

``refuse`` (default): the site keeps one ledger for all its data. Every round charges it;
once the next round would pass the budget the site refuses, for good.

``per-shard``: the site keeps one ledger per data shard (a file ingested from its data
directory, a scenario task, or ``base`` for fixed data). DP-SGD's guarantee is about one
record: its privacy loss comes only from the rounds in which it could have been sampled.
So a round is charged to every shard that has rows in the round's training data, the
current data and the replayed records alike (Poisson sampling could pick any of them),
and to no other: shards hold disjoint records, so their ledgers compose in parallel and
fresh data starts with a fresh budget. A shard whose next round would pass the budget is
left out of the training data (its replayed records too) — before the round's sample
rate is computed, so the rate and noise match the data actually trained on. The site
refuses only when every shard it holds is out of budget.

Under both policies the sample rate comes from the training data's *released* size (a
Gaussian release, :mod:`client.release`), charged once per data version to every ledger
the round charges.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from stamen.client.dp import DPTrainResult, dp_schedule
from stamen.client.ledger import LEDGER_ENTRY, OverBudget, PrivacyLedger, calibrate_noise
from stamen.client.pool import TrainingPool
from stamen.client.stat_release import released_count
from stamen.common.config import StamenConfig
from stamen.common.state import SiteStore


def shard_ledger_name(shard: str) -> str:
    """The state-store entry of ``shard``'s ledger."""
    return f"{LEDGER_ENTRY}.{shard}"


@dataclass(frozen=True)
class PrivatePlan:
    """A DP round that fits every budget it touches: its data, released size, noise, rate, steps and ledgers."""

    pool: TrainingPool
    count: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    ledgers: tuple[PrivacyLedger, ...]
    excluded: frozenset[str]

    def commit(self, result: DPTrainResult) -> None:
        """Charge the executed steps to every ledger of the plan (before the update leaves the site)."""
        for ledger in self.ledgers:
            result.commit(ledger)


class ShardLedgers:
    """Several shard ledgers charged together for one release of statistics of their records.

    A statistic over records of several shards (the pool's size, a label histogram) is one
    release that costs each of those shards one Gaussian mechanism (parallel composition
    again). Quacks like the one ledger :func:`client.release.released` expects.
    """

    def __init__(self, ledgers: dict[str, PrivacyLedger]) -> None:
        self.ledgers = ledgers

    @classmethod
    def load(cls, store: SiteStore, accountant: str, shards: Iterable[str]) -> ShardLedgers:
        """The ledgers of ``shards``, from the site's store."""
        return cls({s: PrivacyLedger.load(store, accountant, shard_ledger_name(s)) for s in sorted(set(shards))})

    def broke(self, noise_multiplier: float, delta: float, budget: float) -> dict[str, str]:
        """The shards that cannot pay for one more release, with why."""
        return {s: r for s, led in self.ledgers.items() if (r := led.release_refusal(noise_multiplier, delta, budget))}

    def release_refusal(self, noise_multiplier: float, delta: float, budget: float) -> str | None:
        return next(iter(self.broke(noise_multiplier, delta, budget).values()), None)

    def record_release(self, noise_multiplier: float) -> None:
        for ledger in self.ledgers.values():
            ledger.record_release(noise_multiplier)

    @property
    def releases(self) -> tuple[float, ...]:
        """The longest release history among the shards (noise calibration plans for the worst one)."""
        return max((led.releases for led in self.ledgers.values()), key=len, default=())


def _noise(cfg: StamenConfig, count: int, releases: tuple[float, ...]) -> tuple[float, float, int]:
    """(noise multiplier, sample rate, steps) of a round on a released size of ``count`` records."""
    rate, steps = dp_schedule(count, cfg)
    sigma = float(cfg["noise-multiplier"]) or calibrate_noise(
        float(cfg["target-epsilon"]),
        float(cfg["delta"]),
        rate,
        steps,
        int(cfg["privacy-horizon-rounds"]),
        str(cfg["accountant"]),
        releases,
    )
    return sigma, rate, steps


def plan_private_round(
    pool: TrainingPool, store: SiteStore, cfg: StamenConfig, budget: float, seed: int
) -> PrivatePlan | str:
    """The round to run under ``cfg``'s privacy policy, or why the site must refuse it.

    The round's sample rate comes from the pool's *released* size (:mod:`client.release`,
    charged, cached per data version), never from its exact size.
    """
    delta, accountant = float(cfg["delta"]), str(cfg["accountant"])
    stats_noise = float(cfg["dp-stats-noise"])
    if cfg["privacy-policy"] == "refuse":
        ledger = PrivacyLedger.load(store, accountant)
        try:
            count = released_count(
                store, ledger, pool.y, noise_multiplier=stats_noise, seed=seed, budget=budget, delta=delta
            )
        except OverBudget as exc:
            return str(exc)
        sigma, rate, steps = _noise(cfg, count, ledger.releases)
        reason = ledger.refusal(sigma, rate, steps, delta, budget)
        return reason or PrivatePlan(pool, count, sigma, rate, steps, (ledger,), frozenset())
    excluded: frozenset[str] = frozenset()
    last_reason = ""
    # Leaving shards out changes the pool: its size is released again and the rate rises, so
    # the cost for the rest grows. Repeat until stable (at most once per shard: the pool only shrinks).
    while len(pool):
        shards = ShardLedgers.load(store, accountant, pool.shards())
        # One cache entry per set of shards: a pool that alternates between sets (a spent shard
        # left out) re-sends each set's released size instead of paying for it again.
        key = "num-examples:" + "+".join(sorted(shards.ledgers))
        try:
            count = released_count(
                store, shards, pool.y, noise_multiplier=stats_noise, seed=seed, budget=budget, delta=delta, key=key
            )
        except OverBudget:
            over = shards.broke(stats_noise, delta, budget)
        else:
            sigma, rate, steps = _noise(cfg, count, shards.releases)
            over = {s: r for s, led in shards.ledgers.items() if (r := led.refusal(sigma, rate, steps, delta, budget))}
            if not over:
                return PrivatePlan(pool, count, sigma, rate, steps, tuple(shards.ledgers.values()), excluded)
        last_reason = "; ".join(f"shard {s}: {r}" for s, r in sorted(over.items()))
        excluded |= frozenset(over)
        pool = pool.without(frozenset(over))
    return f"every data shard of this site is out of budget ({last_reason})"


def spent(store: SiteStore, cfg: StamenConfig) -> tuple[float, PrivacyLedger]:
    """The site's reported epsilon and the ledger it comes from: the worst-off record's.

    Under ``refuse`` that is the site ledger; under ``per-shard`` the shard ledger with the
    highest epsilon, over every shard the site ever charged.
    """
    delta, accountant = float(cfg["delta"]), str(cfg["accountant"])
    if cfg["privacy-policy"] == "refuse":
        ledger = PrivacyLedger.load(store, accountant)
        return ledger.epsilon(delta), ledger
    names = sorted(p.name.removesuffix(".json") for p in store.dir.glob(f"{LEDGER_ENTRY}.*.json"))
    ledgers = [PrivacyLedger.load(store, accountant, n) for n in names] or [PrivacyLedger.load(store, accountant)]
    return max(((ledger.epsilon(delta), ledger) for ledger in ledgers), key=lambda pair: pair[0])
