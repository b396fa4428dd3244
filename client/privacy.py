"""The site's privacy front door: one object per DP round, as Opacus has ``PrivacyEngine``.

A DP round touches the site's ledger(s) four times: releases of statistics (drift
histograms), the round's plan (released size, noise, rate, which shards), the charge of
the executed steps, and the report sent with the update. :class:`SitePrivacy` does all
four over ledgers it reads from the store **once per round** and keeps in memory; every
charge is written atomically through them (:meth:`PrivacyLedger.record`) before the
caller builds its reply, so a crash can only over-count. Anything refused raises
:class:`~stamen.client.ledger.PrivacyRefusal`, the one refusal type, and spends nothing.

A round on a site::

    privacy = SitePrivacy(store, cfg, budget, policy)
    privacy.admit(len(pool))                   # PrivacyRefusal if the run asks for less than the site's policy
    drift = privacy.release_statistics(view.shard_names, lambda ledger: site_drift(..., ledger=ledger))
    plan = privacy.plan(pool, seed)            # PrivacyRefusal if the round would overspend
    result = train_private(model, plan.pool.x, plan.pool.y, ..., noise_multiplier=plan.noise_multiplier)
    privacy.charge(plan, result)
    reply arrays with {**result.metrics(), **drift, **privacy.report(plan, result)}
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from stamen.client.dp import DPTrainResult
from stamen.client.ledger import LEDGER_ENTRY, Ledger, LedgerTampered, PrivacyLedger, PrivacyRefusal, check_integrity
from stamen.client.pool import TrainingPool
from stamen.client.shard_privacy import PrivatePlan, ShardLedgers, plan_private_round, shard_ledger_names, spent
from stamen.client.site_policy import SitePolicy, check_ledgers
from stamen.common.config import StamenConfig
from stamen.common.state import SiteStore

log = logging.getLogger("stamen.client")

__all__ = ["Ledger", "PrivacyRefusal", "SitePrivacy"]


class SitePrivacy:
    """One DP round's privacy on one site, under the run's ``privacy-policy`` and the site's ``budget``.

    ``policy`` is the site's own (:class:`client.site_policy.SitePolicy`; default: the run's
    values); :meth:`admit` checks the run against it and the stored ledgers. Build a new one
    every round: it caches the ledgers it reads, and a ledger changed by another process
    between rounds must be read again.
    """

    def __init__(self, store: SiteStore, cfg: StamenConfig, budget: float, policy: SitePolicy | None = None) -> None:
        self._store = store
        self._cfg = cfg
        self.budget = budget
        self.policy = policy or SitePolicy.of_run(cfg)
        self._ledgers: dict[str, PrivacyLedger] = {}
        self._docs: dict[str, dict[str, Any] | None] = {}

    def _doc(self, name: str) -> dict[str, Any] | None:
        """The stored document of ledger ``name``, read once per round."""
        if name not in self._docs:
            self._docs[name] = self._store.read_json(name)
        return self._docs[name]

    def admit(self, num_records: int) -> None:
        """PrivacyRefusal (a ``policy-*`` code) if the run asks for less privacy than the site's policy
        or its ledgers allow, ``ledger-tampered`` if a ledger is not the one the site last sealed
        (:func:`client.ledger.check_integrity`; it seals a ledger from before sealing, else writes nothing)."""
        try:
            self._docs.update(check_integrity(self._store, self._doc))
        except LedgerTampered as exc:
            raise PrivacyRefusal(
                "ledger-tampered",
                f"{exc}; nothing is trained until an operator checks the site and runs: stamen node ack-ledger "
                f"--state-dir {self._store.dir.parent} --site-id {self._store.site_id} --reason TEXT",
            ) from exc
        self.policy.check_run(self._cfg, num_records)
        shards = shard_ledger_names(self._store)
        if self.per_shard:
            spent_otherwise = (self._store.dir / f"{LEDGER_ENTRY}.json").exists()
            check_ledgers(self._cfg, [self._doc(s) for s in shards], spent_otherwise)
        else:
            check_ledgers(self._cfg, [self._doc(LEDGER_ENTRY)], bool(shards))

    @property
    def per_shard(self) -> bool:
        return self._cfg["privacy-policy"] != "refuse"

    def ledger(self, name: str = LEDGER_ENTRY) -> PrivacyLedger:
        """The ledger stored as ``name``, read from the store the first time this round asks for it."""
        if name not in self._ledgers:
            accountant, delta = str(self._cfg["accountant"]), float(self._cfg["delta"])
            self._ledgers[name] = PrivacyLedger.from_doc(self._store, self._doc(name), accountant, name, delta)
        return self._ledgers[name]

    def statistics_ledger(self, shards: Iterable[str]) -> Ledger:
        """Who pays for releasing statistics of data from ``shards``: the site's ledger, or every one of them."""
        return ShardLedgers.load(self.ledger, shards) if self.per_shard else self.ledger()

    def release_statistics(
        self, shards: Iterable[str], release: Callable[[Ledger], dict[str, float]]
    ) -> dict[str, float]:
        """``release(ledger)``: statistics of data from ``shards``, charged to who pays for them.

        Under ``refuse`` a release the site cannot pay for refuses the round (it raises);
        under ``per-shard`` it only means no such statistics this round: the plan then
        decides which shards may still train.
        """
        try:
            return release(self.statistics_ledger(shards))
        except PrivacyRefusal as exc:
            if not self.per_shard:
                raise
            log.info("site %s: no statistics this round (a shard cannot pay for them): %s", self._store.site_id, exc)
            return {}

    def plan(self, pool: TrainingPool, seed: int) -> PrivatePlan:
        """The round to run (:func:`client.shard_privacy.plan_private_round`); PrivacyRefusal if none fits."""
        plan = plan_private_round(pool, self._store, self._cfg, self.budget, seed, self.ledger)
        self.policy.check_plan(plan.noise_multiplier, plan.sample_rate)
        if plan.excluded:
            left_out = ", ".join(sorted(plan.excluded))
            log.info("site %s: shards out of budget left out: %s", self._store.site_id, left_out)
        return plan

    def charge(self, plan: PrivatePlan, result: DPTrainResult) -> None:
        """Charge the executed round to the plan's ledgers.

        Every attempt is charged, a redone round too (the server resumed from an older
        checkpoint): its noise is fresh (:mod:`client.noise`), so it is a new release.
        Under ``dp-noise = seeded`` a redo may repeat an update; it is charged anyway, as
        privacy spent is never under-counted.
        """
        plan.commit(result)

    def report(self, plan: PrivatePlan, result: DPTrainResult) -> dict[str, float]:
        """The reply's privacy metrics: the round's released size, noise and rate, and the worst-off ledger."""
        epsilon, ledger = spent(self._store, self._cfg, self.ledger)
        return {
            "num-examples": plan.count,
            "epsilon": epsilon,
            "noise-multiplier": plan.noise_multiplier,
            "sample-rate": result.sample_rate,
            "ledger-steps": ledger.steps,
            "ledger-rounds": ledger.rounds,
            "ledger-releases": len(ledger.releases),
        }
