"""The round loop's hook into observability: one object the loop tells what happened.

It turns a round's messages, replies and models into figures for the history row (and so
``history.csv`` and ``summary.json``) and into the Prometheus exporter's series, so the
loop itself only calls :meth:`start_round`, :meth:`traffic`, :meth:`replies`,
:meth:`updates`, :meth:`end_round` and :meth:`finish`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Message

from stamen.common.config import StamenConfig
from stamen.common.convert import record_to_arrays
from stamen.common.reply import REJECT_REASONS, SiteReply
from stamen.server.drift_watch import DATA_DRIFT_KEYS, DriftWatch
from stamen.server.exporter import Exporter
from stamen.server.update_stats import Arrays, change_norm, update_statistics

#: Per-site score name -> per-site gauge.
SITE_SCORE_GAUGES = {
    "label_psi": "stamen_site_label_psi",
    "label_js": "stamen_site_label_js",
    "feature_psi": "stamen_site_feature_psi",
}


def model_bytes(messages: Iterable[Message]) -> int:
    """Bytes of model arrays carried by ``messages`` (error replies carry none)."""
    total = 0
    for msg in messages:
        if msg.has_error():
            continue
        for record in msg.content.array_records.values():
            total += sum(len(array.data) for array in record.values())
    return total


class RoundObserver:
    """Per-run observability state: drift detectors, ε per site, bytes, the exporter."""

    def __init__(self, cfg: StamenConfig) -> None:
        self.exporter = Exporter(cfg)
        self.drift = DriftWatch(cfg)
        self.budget = cfg.epsilon_budget if cfg["dp"] else None
        # Client-level DP on the server covers the released models, not figures of single
        # sites' unclipped updates: with it, only the model's own change is measured.
        self.site_update_stats = not float(cfg["server-dp-clip"])
        self.epsilon: dict[str, float] = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        self.rollbacks_seen = 0

    def start_round(self, server_round: int, sites_connected: int) -> None:
        """A round begins with ``sites_connected`` sites known."""
        self.exporter.round.set(server_round)
        self.exporter.sites_connected.set(sites_connected)
        self.bytes_sent = self.bytes_received = 0

    def traffic(self, sent: list[Message], received: list[Message]) -> None:
        """Count the model bytes of one exchange (training or evaluation)."""
        out, back = model_bytes(sent), model_bytes(received)
        self.bytes_sent += out
        self.bytes_received += back
        self.exporter.sent.inc(out)
        self.exporter.received.inc(back)

    def replies(self, server_round: int, good: list[SiteReply], rejected: Counter[str]) -> dict[str, Any]:
        """The screened train replies: data drift, site loss detectors, ε, rejections."""
        for reason in REJECT_REASONS:
            self.exporter.rejected.labels(reason).inc(rejected[reason])
        scores, fired = self.drift.sites(server_round, good)
        ex = self.exporter
        for name, gauge in SITE_SCORE_GAUGES.items():
            ex.set_sites(gauge, {site: s[name] for site, s in scores.items() if name in s})
        ex.set_sites("stamen_site_concept_drift_detected", {site: float(f) for site, f in fired.items()})
        ex.count_site_detections(fired)
        row = self.drift.row(scores)
        for name in DATA_DRIFT_KEYS.values():
            ex.set_gauge(f"stamen_{name}_max", row.get(f"drift_{name}_max"))
        if fired:
            row["concept_drift_sites"] = sum(fired.values())
        self._privacy({r.site_id: r.metrics["epsilon"] for r in good if "epsilon" in r.metrics})
        for key in ("updates-lost", "updates-lost-charged"):  # the sites' receipts (client/receipts.py)
            gauge = "stamen_site_" + key.replace("-", "_")
            self.exporter.set_sites(gauge, {r.site_id: r.metrics[key] for r in good if key in r.metrics})
        return row

    def _privacy(self, reported: dict[str, float]) -> None:
        if self.budget is None:
            return
        self.epsilon.update(reported)
        ex = self.exporter
        ex.set_sites("stamen_site_epsilon", reported)
        ex.set_sites("stamen_site_epsilon_budget_remaining", {s: self.budget - e for s, e in reported.items()})
        if self.epsilon:
            values = list(self.epsilon.values())
            ex.set_gauge("stamen_epsilon_max", max(values))
            ex.set_gauge("stamen_epsilon_mean", sum(values) / len(values))
            ex.set_gauge("stamen_epsilon_budget_remaining_min", self.budget - max(values))

    def updates(self, before: Arrays, good: list[SiteReply], after: Arrays) -> dict[str, Any]:
        """Update norms and agreement of the round's sites, and the global model's change."""
        stats: dict[str, Any] = {}
        if self.site_update_stats:
            models = [record_to_arrays(r.content.array_records["arrays"]) for r in good if r.content is not None]
            stats = update_statistics(before, models, [r.metrics.get("num-examples", 1.0) for r in good])
        for norm in stats.pop("site_update_norms", []):
            self.exporter.update_norm.observe(norm)
        stats["model_change_norm"] = change_norm(before, after)
        ex = self.exporter
        ex.set_gauge("stamen_update_l2_norm_dispersion", stats.get("update_norm_dispersion"))
        ex.set_gauge("stamen_client_drift_cosine_min", stats.get("cosine_min"))
        ex.set_gauge("stamen_client_drift_cosine_mean", stats.get("cosine_mean"))
        ex.set_gauge("stamen_model_change_l2_norm", stats["model_change_norm"])
        return stats

    def count_refusals(self, refusals: Mapping[str, int]) -> None:
        """Count the round's refusals by reason code (``stamen_sites_refused_total{reason}``)."""
        for code, count in refusals.items():
            self.exporter.refused.labels(code).inc(count)

    def end_round(self, row: dict[str, Any]) -> None:
        """Complete the round's row (bytes, global detector) and publish it."""
        row["bytes_sent"], row["bytes_received"] = self.bytes_sent, self.bytes_received
        fired = self.drift.global_loss(int(row["round"]), float(row.get("loss", math.nan)))
        ex = self.exporter
        if fired is not None:
            row["concept_drift"] = int(fired)
            ex.set_gauge("stamen_concept_drift_detected", float(fired))
            if fired:
                ex.concept_detections.inc()
        for key, name in (("sampled", "sampled"), ("replied", "replied"), ("failed", "failed")):
            ex.counters[name].inc(row.get(key, 0))
        ex.counters["refused_budget"].inc(row.get("refused", 0))
        for source, prefix in (("centralized", "central"), ("federated", "fed")):
            if f"{prefix}_loss" in row:
                ex.eval_loss.labels(source).set(row[f"{prefix}_loss"])
                ex.eval_accuracy.labels(source).set(row[f"{prefix}_accuracy"])
        ex.set_gauge("stamen_train_loss", row.get("train_loss"))
        ex.set_gauge("stamen_server_momentum_l2_norm", row.get("server_buffer_norm"))
        ex.set_gauge("stamen_server_epsilon", row.get("server_epsilon"))
        ex.set_gauge("stamen_model_version", row.get("version"))
        ex.rollbacks.inc(max(0, int(row.get("rollbacks", 0)) - self.rollbacks_seen))
        self.rollbacks_seen = max(self.rollbacks_seen, int(row.get("rollbacks", 0)))
        ex.stamp_round(float(row["seconds"]))

    def finish(self) -> dict[str, Any]:
        """Stop the endpoint; return ``summary.json``'s ``drift`` block."""
        self.exporter.close()
        return self.drift.summary()
