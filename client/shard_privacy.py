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

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

from stamen.client.dp import DPTrainResult, dp_schedule
from stamen.client.ledger import LEDGER_ENTRY, Ledger, PrivacyLedger, PrivacyRefusal, calibrate_noise
from stamen.client.pool import TrainingPool
from stamen.client.stat_release import released_count
from stamen.common.config import StamenConfig
from stamen.common.state import SiteStore

#: Gives the ledger a store entry names (``privacy_ledger`` or a shard's); the front door
#: (:class:`client.privacy.SitePrivacy`) passes one that reads each entry once per round.
LedgerLoader = Callable[[str], PrivacyLedger]


def shard_ledger_name(shard: str) -> str:
    """The state-store entry of ``shard``'s ledger."""
    return f"{LEDGER_ENTRY}.{shard}"


def store_loader(store: SiteStore, cfg: StamenConfig) -> LedgerLoader:
    """A loader that reads ``store`` on every call, with the run's accountant and delta."""
    return partial(_load, store, str(cfg["accountant"]), delta=float(cfg["delta"]))


def _load(store: SiteStore, accountant: str, name: str, *, delta: float) -> PrivacyLedger:
    return PrivacyLedger.load(store, accountant, name, delta)


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


class ShardLedgers(Ledger):
    """Several shard ledgers charged together, for one release of statistics of their records or one round.

    A statistic over records of several shards (the pool's size, a label histogram) is one
    release that costs each of those shards one Gaussian mechanism (parallel composition
    again); so is a DP-SGD round on them. A charge fits only if it fits every shard.
    """

    def __init__(self, ledgers: dict[str, PrivacyLedger]) -> None:
        self.ledgers = ledgers

    @classmethod
    def load(cls, load: LedgerLoader, shards: Iterable[str]) -> ShardLedgers:
        """The ledgers of ``shards``, each from ``load``."""
        return cls({s: load(shard_ledger_name(s)) for s in sorted(set(shards))})

    def broke(self, noise_multiplier: float, delta: float, budget: float) -> dict[str, str]:
        """The shards that cannot pay for one more release, with why."""
        return {s: r for s, led in self.ledgers.items() if (r := led.release_refusal(noise_multiplier, delta, budget))}

    def over(
        self, noise_multiplier: float, sample_rate: float, steps: int, delta: float, budget: float
    ) -> dict[str, str]:
        """The shards that cannot pay for the round, with why."""
        return {
            s: r
            for s, led in self.ledgers.items()
            if (r := led.refusal(noise_multiplier, sample_rate, steps, delta, budget))
        }

    @property
    def releases(self) -> tuple[float, ...]:
        """The longest release history among the shards (noise calibration plans for the worst one)."""
        return max((led.releases for led in self.ledgers.values()), key=len, default=())

    def epsilon(self, delta: float) -> float:
        return max((led.epsilon(delta) for led in self.ledgers.values()), default=0.0)

    def refusal(
        self, noise_multiplier: float, sample_rate: float, steps: int, delta: float, budget: float
    ) -> str | None:
        return _joined(self.over(noise_multiplier, sample_rate, steps, delta, budget))

    def release_refusal(self, noise_multiplier: float, delta: float, budget: float) -> str | None:
        return _joined(self.broke(noise_multiplier, delta, budget))

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        for ledger in self.ledgers.values():
            ledger.record(noise_multiplier, sample_rate, steps)

    def record_release(self, noise_multiplier: float) -> None:
        for ledger in self.ledgers.values():
            ledger.record_release(noise_multiplier)


def _joined(reasons: dict[str, str]) -> str | None:
    """One reason naming every shard that cannot pay, or None when all can."""
    return "; ".join(f"shard {s}: {r}" for s, r in sorted(reasons.items())) or None


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
    pool: TrainingPool,
    store: SiteStore,
    cfg: StamenConfig,
    budget: float,
    seed: int,
    load: LedgerLoader | None = None,
) -> PrivatePlan:
    """The round to run under ``cfg``'s privacy policy; :class:`PrivacyRefusal` if the site must refuse it.

    The round's sample rate comes from the pool's *released* size (:mod:`client.release`,
    charged, cached per data version), never from its exact size. ``load`` gives the
    ledgers (default: read from ``store`` each time).
    """
    load = load or store_loader(store, cfg)
    delta = float(cfg["delta"])
    stats_noise = float(cfg["dp-stats-noise"])
    if cfg["privacy-policy"] == "refuse":
        ledger = load(LEDGER_ENTRY)
        count = released_count(
            store, ledger, pool.y, noise_multiplier=stats_noise, seed=seed, budget=budget, delta=delta
        )
        sigma, rate, steps = _noise(cfg, count, ledger.releases)
        if reason := ledger.refusal(sigma, rate, steps, delta, budget):
            raise PrivacyRefusal("training-round", reason)
        return PrivatePlan(pool, count, sigma, rate, steps, (ledger,), frozenset())
    excluded: frozenset[str] = frozenset()
    over: dict[str, str] = {}
    # Leaving shards out changes the pool: its size is released again and the rate rises, so
    # the cost for the rest grows. Repeat until stable (at most once per shard: the pool only shrinks).
    while len(pool):
        shards = ShardLedgers.load(load, pool.shards())
        # One cache entry per set of shards: a pool that alternates between sets (a spent shard
        # left out) re-sends each set's released size instead of paying for it again.
        key = "num-examples:" + "+".join(sorted(shards.ledgers))
        try:
            count = released_count(
                store, shards, pool.y, noise_multiplier=stats_noise, seed=seed, budget=budget, delta=delta, key=key
            )
        except PrivacyRefusal:
            over = shards.broke(stats_noise, delta, budget)
        else:
            sigma, rate, steps = _noise(cfg, count, shards.releases)
            over = shards.over(sigma, rate, steps, delta, budget)
            if not over:
                return PrivatePlan(pool, count, sigma, rate, steps, tuple(shards.ledgers.values()), excluded)
        excluded |= frozenset(over)
        pool = pool.without(frozenset(over))
    raise PrivacyRefusal("every-shard-spent", f"every data shard of this site is out of budget ({_joined(over) or ''})")


def spent(store: SiteStore, cfg: StamenConfig, load: LedgerLoader | None = None) -> tuple[float, PrivacyLedger]:
    """The site's reported epsilon and the ledger it comes from: the worst-off record's.

    Under ``refuse`` that is the site ledger; under ``per-shard`` the shard ledger with the
    highest epsilon, over every shard the site ever charged. ``load`` as in :func:`plan_private_round`.
    """
    load = load or store_loader(store, cfg)
    delta = float(cfg["delta"])
    if cfg["privacy-policy"] == "refuse":
        ledger = load(LEDGER_ENTRY)
        return ledger.epsilon(delta), ledger
    ledgers = [load(n) for n in shard_ledger_names(store)] or [load(LEDGER_ENTRY)]
    return max(((ledger.epsilon(delta), ledger) for ledger in ledgers), key=lambda pair: pair[0])


def shard_ledger_names(store: SiteStore) -> list[str]:
    """The store entries of every shard ledger the site keeps."""
    return sorted(p.name.removesuffix(".json") for p in store.dir.glob(f"{LEDGER_ENTRY}.*.json"))
