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
"""

from __future__ import annotations

from dataclasses import dataclass

from client.dp import DPTrainResult, dp_schedule
from client.ledger import LEDGER_ENTRY, PrivacyLedger, calibrate_noise
from client.pool import TrainingPool
from common.config import StamenConfig
from common.state import SiteStore


def shard_ledger_name(shard: str) -> str:
    """The state-store entry of ``shard``'s ledger."""
    return f"{LEDGER_ENTRY}.{shard}"


@dataclass(frozen=True)
class PrivatePlan:
    """A DP round that fits every budget it touches: its data, noise, rate, steps and ledgers."""

    pool: TrainingPool
    noise_multiplier: float
    sample_rate: float
    steps: int
    ledgers: tuple[PrivacyLedger, ...]
    excluded: frozenset[str]

    def commit(self, result: DPTrainResult) -> None:
        """Charge the executed steps to every ledger of the plan (before the update leaves the site)."""
        for ledger in self.ledgers:
            result.commit(ledger)


def _noise(cfg: StamenConfig, num_examples: int) -> tuple[float, float, int]:
    """(noise multiplier, sample rate, steps) of a round on ``num_examples`` records."""
    rate, steps = dp_schedule(num_examples, cfg)
    sigma = float(cfg["noise-multiplier"]) or calibrate_noise(
        float(cfg["target-epsilon"]),
        float(cfg["delta"]),
        rate,
        steps,
        int(cfg["privacy-horizon-rounds"]),
        str(cfg["accountant"]),
    )
    return sigma, rate, steps


def plan_private_round(pool: TrainingPool, store: SiteStore, cfg: StamenConfig, budget: float) -> PrivatePlan | str:
    """The round to run under ``cfg``'s privacy policy, or why the site must refuse it."""
    delta, accountant = float(cfg["delta"]), str(cfg["accountant"])
    if cfg["privacy-policy"] == "refuse":
        sigma, rate, steps = _noise(cfg, len(pool))
        ledger = PrivacyLedger.load(store, accountant)
        reason = ledger.refusal(sigma, rate, steps, delta, budget)
        return reason or PrivatePlan(pool, sigma, rate, steps, (ledger,), frozenset())
    excluded: frozenset[str] = frozenset()
    last_reason = ""
    # Leaving shards out raises the sample rate and so the cost for the rest: repeat until
    # stable (at most once per shard, since the pool only shrinks).
    while len(pool):
        sigma, rate, steps = _noise(cfg, len(pool))
        ledgers = {s: PrivacyLedger.load(store, accountant, shard_ledger_name(s)) for s in sorted(pool.shards())}
        over = {s: r for s, led in ledgers.items() if (r := led.refusal(sigma, rate, steps, delta, budget))}
        if not over:
            return PrivatePlan(pool, sigma, rate, steps, tuple(ledgers.values()), excluded)
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
