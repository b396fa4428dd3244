"""The server's Prometheus endpoint (prometheus-client): a run's convergence, participation,
updates, drift and privacy, as the round loop observes them.

Sites are not scraped: they send their figures in their replies and the server exports
them. The address is run config (``metrics-port``, 0 = off; ``metrics-host``, loopback by
default; ``metrics-certfile`` + ``metrics-keyfile`` for TLS), because in deployment the
ServerApp is a process the SuperLink starts.

Per-site series carry one label, ``site`` (the site-id). At most ``metrics-max-sites``
site-ids get their own series, in the order they are first seen; every later site is
folded into ``site="other"`` (gauges take the worst value of the folded sites: max for
drift and ε, min for budget remaining; counters add up) and counted in
``stamen_metrics_sites_folded``. With ``metrics-per-site = false`` no per-site series
exist at all (aggregates only), for federations where participation itself is sensitive.

Names follow Prometheus conventions: ``stamen_`` prefix, base units (seconds, bytes),
``_total`` for counters. Gauges that have no value yet (no DP, no server test set, no
site sent its training loss) are not exported rather than exported as 0.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, start_http_server

from stamen.common.config import StamenConfig
from stamen.common.errors import ConfigError, StateError
from stamen.common.reply import REFUSAL_CODES, REJECT_REASONS

log = logging.getLogger("stamen.server")

OTHER = "other"
ROUND_SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Per-site gauges: name -> (help, how folded sites combine).
SITE_GAUGES: dict[str, tuple[str, Callable[[Iterable[float]], float]]] = {
    "stamen_site_label_psi": ("label-distribution PSI of a site against its reference window", max),
    "stamen_site_label_js": ("label-distribution Jensen-Shannon divergence (bits) against the reference", max),
    "stamen_site_feature_psi": ("feature-sketch PSI (max over projections) against the reference window", max),
    "stamen_site_concept_drift_detected": ("1 if the change detector on a site's training loss fired", max),
    "stamen_site_epsilon": ("cumulative epsilon a site reported (at the run's delta)", max),
    "stamen_site_epsilon_budget_remaining": ("epsilon-budget minus a site's cumulative epsilon", min),
    "stamen_site_updates_lost": ("updates a site sent that never reached the server (its own count)", max),
    "stamen_site_updates_lost_charged": ("of those, updates the site's privacy ledger was charged for", max),
}
#: Aggregate gauges set from a round's figures: name -> help.
GAUGES: dict[str, str] = {
    "stamen_train_loss": "mean training loss of the sites that sent it (example-weighted)",
    "stamen_update_l2_norm_dispersion": "coefficient of variation of the round's site update L2 norms",
    "stamen_model_change_l2_norm": "L2 norm of the global model's change in the last round (model drift)",
    "stamen_server_momentum_l2_norm": "L2 norm of the server optimizer's momentum buffer",
    "stamen_client_drift_cosine_min": "lowest cosine between a site's update and the round's mean update",
    "stamen_client_drift_cosine_mean": "mean cosine between the sites' updates and the round's mean update",
    "stamen_label_psi_max": "highest label PSI reported in the last round",
    "stamen_label_js_max": "highest label Jensen-Shannon divergence reported in the last round",
    "stamen_feature_psi_max": "highest feature-sketch PSI reported in the last round",
    "stamen_concept_drift_detected": "1 if the change detector on the global evaluation loss fired this round",
    "stamen_epsilon_max": "highest cumulative epsilon over the sites",
    "stamen_epsilon_mean": "mean cumulative epsilon over the sites",
    "stamen_epsilon_budget": "the per-site epsilon budget of the run",
    "stamen_epsilon_budget_remaining_min": "smallest remaining epsilon budget over the sites",
    "stamen_server_epsilon": "epsilon of client-level DP on the server (DP-FedAvg) so far",
    "stamen_model_version": "number of the global model version in use (a rollback returns to an older one)",
}


class SiteLabels:
    """site-id -> label value: the first ``cap`` sites seen keep their own, the rest are 'other'."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._own: set[str] = set()
        self.folded: set[str] = set()

    def __call__(self, site: str) -> str:
        if site in self._own:
            return site
        if len(self._own) < self.cap:
            self._own.add(site)
            return site
        self.folded.add(site)
        return OTHER

    def state_dict(self) -> dict[str, Any]:
        return {"own": sorted(self._own), "folded": sorted(self.folded)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._own, self.folded = set(state["own"]), set(state["folded"])


class Exporter:
    """The run's metrics registry and, when ``metrics-port`` is set, its HTTP(S) endpoint."""

    def __init__(self, cfg: StamenConfig) -> None:
        self.registry = CollectorRegistry()
        self.per_site = bool(cfg["metrics-per-site"])
        self.dp = bool(cfg["dp"])
        self.labels = SiteLabels(int(cfg["metrics-max-sites"]))
        self._gauges: dict[str, Gauge] = {}
        reg = self.registry
        self.round = Gauge("stamen_round", "the round in progress (or last run)", registry=reg)
        self.rounds_completed = Counter("stamen_rounds_completed", "rounds completed", registry=reg)
        self.rollbacks = Counter("stamen_rollbacks", "rollbacks to the best model version", registry=reg)
        self.round_seconds = Histogram(
            "stamen_round_duration_seconds", "wall time of a round", buckets=ROUND_SECONDS_BUCKETS, registry=reg
        )
        self.last_round = Gauge(
            "stamen_last_round_timestamp_seconds", "Unix time the last round completed", registry=reg
        )
        Gauge("stamen_round_timeout_seconds", "round-timeout of the run", registry=reg).set(float(cfg["round-timeout"]))
        self.eval_loss = Gauge("stamen_eval_loss", "evaluation loss of the global model", ["source"], registry=reg)
        self.eval_accuracy = Gauge(
            "stamen_eval_accuracy", "evaluation accuracy of the global model", ["source"], registry=reg
        )
        self.sites_connected = Gauge("stamen_sites_connected", "sites that answered the handshake", registry=reg)
        self.counters = {
            name: Counter(f"stamen_sites_{name}", text, registry=reg)
            for name, text in (
                ("sampled", "site instructions sent for training"),
                ("replied", "usable training replies"),
                ("failed", "sampled sites that did not reply in time"),
                ("refused_budget", "sites that refused a round for their privacy budget"),
            )
        }
        self.rejected = Counter("stamen_sites_rejected", "replies rejected by screening", ["reason"], registry=reg)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.refused = Counter("stamen_sites_refused", "site refusals by reason code", ["reason"], registry=reg)
        for code in REFUSAL_CODES:
            self.refused.labels(code)
        self.sent = Counter("stamen_sent_bytes", "model bytes sent to sites", registry=reg)
        self.received = Counter("stamen_received_bytes", "model bytes received from sites", registry=reg)
        self.update_norm = Summary("stamen_site_update_l2_norm", "L2 norm of each site's update", registry=reg)
        self.concept_detections = Counter(
            "stamen_concept_drift_detections", "change detections on the global evaluation loss", registry=reg
        )
        self.folded = Gauge(
            "stamen_metrics_sites_folded", "sites past metrics-max-sites, in site='other'", registry=reg
        )
        if self.per_site:
            self.site_gauges = {
                name: Gauge(name, text, ["site"], registry=reg) for name, (text, _) in SITE_GAUGES.items()
            }
            self.site_detections = Counter(
                "stamen_site_concept_drift_detections",
                "change detections on a site's training loss",
                ["site"],
                registry=reg,
            )
        if self.dp:
            self.set_gauge("stamen_epsilon_budget", cfg.epsilon_budget)
        self._server = None
        self.linger = float(cfg["metrics-linger-seconds"])
        self._last_stamp: float | None = None
        port = int(cfg["metrics-port"])
        if port:
            self._server = _serve(port, str(cfg["metrics-host"]), cfg, self.registry)
            log.info("metrics: %s", metrics_url(cfg))

    def _counters(self) -> dict[str, Counter]:
        """Every counter of the run, by metric name."""
        found = [self.rounds_completed, self.rollbacks, *self.counters.values(), self.rejected, self.refused, self.sent]
        found += [self.received, self.concept_detections, *([self.site_detections] if self.per_site else [])]
        return {c.collect()[0].name: c for c in found}

    def state_dict(self) -> dict[str, Any]:
        """Every counter's value per label set, and which sites have their own series.

        A resumed run's counters continue from these rather than from 0, as the run's
        totals in ``summary.json`` do.
        """
        values: dict[str, list[list[Any]]] = {}
        for name, counter in self._counters().items():
            values[name] = [
                [s.labels, s.value] for metric in counter.collect() for s in metric.samples if s.name.endswith("_total")
            ]
        return {"counters": values, "sites": self.labels.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the counters of ``state`` (this exporter's counters are still at 0)."""
        counters = self._counters()
        unknown = sorted(set(state["counters"]) - set(counters))
        if unknown:
            raise StateError(f"saved metrics state has unknown counter(s) {', '.join(unknown)}")
        self.labels.load_state_dict(state["sites"])
        for name, samples in state["counters"].items():
            for labels, value in samples:
                (counters[name].labels(**labels) if labels else counters[name]).inc(float(value))
        if self.per_site:
            self.folded.set(len(self.labels.folded))

    def set_gauge(self, name: str, value: float | None) -> None:
        """Set an aggregate gauge, registering it at its first value (None or NaN: leave it)."""
        if value is None or not math.isfinite(value):
            return
        if name not in self._gauges:
            self._gauges[name] = Gauge(name, GAUGES[name], registry=self.registry)
        self._gauges[name].set(value)

    def set_sites(self, name: str, values: Mapping[str, float]) -> None:
        """Set a per-site gauge for the sites in ``values`` (folded past the cap)."""
        if not self.per_site or not values:
            return
        grouped: dict[str, list[float]] = {}
        for site, value in values.items():
            grouped.setdefault(self.labels(site), []).append(value)
        combine = SITE_GAUGES[name][1]
        for label, vals in grouped.items():
            self.site_gauges[name].labels(label).set(combine(vals))
        self.folded.set(len(self.labels.folded))

    def count_site_detections(self, detected: Mapping[str, bool]) -> None:
        """Per-site detection counters (created at 0 for every site seen)."""
        if not self.per_site:
            return
        for site, fired in detected.items():
            child = self.site_detections.labels(self.labels(site))
            if fired:
                child.inc()

    def close(self) -> None:
        """Stop serving (the registry stays readable), ``metrics-linger-seconds`` after the last round.

        Prometheus pulls: an endpoint that stopped right after a short run's last round would
        never be scraped with it. Blocking here rather than in a timer thread, because Flower
        force-exits a finished ServerApp process a few seconds after it returns.
        """
        if self._server is not None and self._last_stamp is not None:
            time.sleep(max(0.0, self._last_stamp + self.linger - time.monotonic()))
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def stamp_round(self, seconds: float) -> None:
        """A round completed, taking ``seconds``."""
        self.rounds_completed.inc()
        self.round_seconds.observe(seconds)
        self.last_round.set(time.time())
        self._last_stamp = time.monotonic()


def metrics_url(cfg: StamenConfig) -> str:
    """Where the endpoint serves, e.g. ``http://127.0.0.1:9464/metrics``."""
    scheme = "https" if cfg["metrics-certfile"] else "http"
    host = str(cfg["metrics-host"])
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{cfg['metrics-port']}/metrics"


def _serve(port: int, host: str, cfg: StamenConfig, registry: CollectorRegistry) -> WSGIServer:
    certfile, keyfile = str(cfg["metrics-certfile"]), str(cfg["metrics-keyfile"])
    for path in filter(None, (certfile, keyfile)):
        if not Path(path).is_file():
            raise ConfigError(f"metrics TLS file {path!r} does not exist on the server")
    try:
        server, _ = start_http_server(
            port, addr=host, registry=registry, certfile=certfile or None, keyfile=keyfile or None
        )
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
    return server
