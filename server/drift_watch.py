"""Drift as the server sees it: the sites' data-drift scores, and change detectors on losses.

Data drift is measured on each site (:mod:`client.drift`) and arrives in its train reply;
the server keeps the per-site series for ``summary.json`` and takes the max per round.
Concept drift is a Page–Hinkley test (:class:`common.drift.PageHinkley`) on the global
evaluation loss (centralized when the server has data, else federated) and one per site
on the training loss the site reports. Under DP a site sends no training loss unless its
operator declares its statistics public, and then only the global detector runs: the
server uses what the privacy boundary lets it see.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from stamen.common.config import StamenConfig
from stamen.common.drift import PSI_ALERT, PageHinkley
from stamen.common.reply import SiteReply

#: Reply metric key -> name in history rows and summary.json.
DATA_DRIFT_KEYS = {
    "drift-label-psi": "label_psi",
    "drift-label-js": "label_js",
    "drift-feature-psi": "feature_psi",
}
GLOBAL = "global"


class DriftWatch:
    """Per-run drift state: detectors (with plain-dict state) and the per-site series."""

    def __init__(self, cfg: StamenConfig) -> None:
        self.threshold = float(cfg["drift-ph-threshold"])
        self.delta = float(cfg["drift-ph-delta"])
        self.reference_rounds = int(cfg["drift-reference-rounds"])
        self.detectors: dict[str, PageHinkley] = {}
        self.per_site: dict[str, dict[str, list[float]]] = {}
        self.detections: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        """Detectors' running statistics, the per-site series and every detection so far."""
        return {
            "detectors": {name: d.state_dict() for name, d in self.detectors.items()},
            "per_site": copy.deepcopy(self.per_site),
            "detections": copy.deepcopy(self.detections),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue every detector where it was; the threshold and delta stay this run's config."""
        self.detectors = {}
        for name, saved in state["detectors"].items():
            self._detector(name).load_state_dict({**saved, "threshold": self.threshold, "delta": self.delta})
        self.per_site = copy.deepcopy(state["per_site"])
        self.detections = copy.deepcopy(state["detections"])

    def _detector(self, name: str) -> PageHinkley:
        if name not in self.detectors:
            self.detectors[name] = PageHinkley(threshold=self.threshold, delta=self.delta)
        return self.detectors[name]

    def _detect(self, name: str, value: float, server_round: int) -> bool:
        fired = self._detector(name).update(value)
        if fired:
            self.detections.append({"round": server_round, "series": name})
        return fired

    def sites(self, server_round: int, replies: list[SiteReply]) -> tuple[dict[str, dict[str, float]], dict[str, bool]]:
        """Record the round's data-drift scores and feed the site loss detectors.

        Returns per-site scores (``label_psi`` …) and, for each site whose detector ran,
        whether it fired.
        """
        scores: dict[str, dict[str, float]] = {}
        fired: dict[str, bool] = {}
        for reply in replies:
            values = {name: reply.metrics[key] for key, name in DATA_DRIFT_KEYS.items() if key in reply.metrics}
            if values:
                scores[reply.site_id] = values
                series = self.per_site.setdefault(reply.site_id, {"round": []})
                series["round"].append(server_round)
                for name, value in values.items():
                    series.setdefault(name, []).append(value)
            if "train-loss" in reply.metrics:
                fired[reply.site_id] = self._detect(reply.site_id, reply.metrics["train-loss"], server_round)
        return scores, fired

    def global_loss(self, server_round: int, loss: float) -> bool | None:
        """Feed the global evaluation loss; None when this round has none."""
        if not math.isfinite(loss):
            return None
        return self._detect(GLOBAL, loss, server_round)

    def row(self, scores: dict[str, dict[str, float]]) -> dict[str, float]:
        """The round's data-drift figures for its history row."""
        out: dict[str, float] = {}
        for name in DATA_DRIFT_KEYS.values():
            values = [s[name] for s in scores.values() if name in s]
            if values:
                out[f"drift_{name}_max"] = max(values)
        if scores:
            out["drift_sites_over_threshold"] = sum(
                1 for s in scores.values() if max(s.get("label_psi", 0.0), s.get("feature_psi", 0.0)) >= PSI_ALERT
            )
        return out

    def summary(self) -> dict[str, Any]:
        """The ``drift`` block of ``summary.json``."""
        return {
            "reference_rounds": self.reference_rounds,
            "psi_threshold": PSI_ALERT,
            "detector": {"kind": "page-hinkley", "threshold": self.threshold, "delta": self.delta},
            "detections": self.detections,
            "per_site": dict(sorted(self.per_site.items())),
        }
