"""The Grafana dashboard of a stamen federation, as code.

``stamen dashboard`` writes
``deploy/grafana/dashboards/stamen.json`` from the definition below, so every panel's
queries, unit, thresholds and description live in one reviewed place; a test regenerates
the file and fails when the committed one is stale.

A small builder of our own rather than grafana-foundation-sdk: the dashboard uses two
panel kinds, a row, three kinds of variable and Prometheus annotations — about a tenth of
the JSON model — while the SDK is a large generated package that would become a
dependency of every install for one file written at development time.

Every query is filtered by the ``job`` and ``instance`` variables (added to each metric
selector by :func:`filtered`), so two federations scraped by one Prometheus never mix.
A query declares the run modes (:data:`MODES`) whose series it cannot show and why; its
panel's description says so, and the live-Prometheus test accepts an empty result only
there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stamen.common.config import StamenConfig
from stamen.common.drift import PSI_ALERT, PSI_WATCH
from stamen.common.errors import ConfigError

#: Where the generated dashboard is committed (relative to the repository root).
DASHBOARD_PATH = Path("deploy/grafana/dashboards/stamen.json")
#: The uid of the provisioned datasource (deploy/grafana/provisioning/datasources/stamen.yml).
DATASOURCE_UID = "stamen-prometheus"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: Run modes a query may be unable to fill: a DP run (sites keep raw-record statistics
#: unless dp-public-stats) and a run without DP (no privacy ledger, so no epsilon).
DP, NON_DP = "dp", "non-dp"
MODES = (DP, NON_DP)
MODE_NAMES = {DP: "a DP run", NON_DP: "a run without DP"}
#: The matchers every metric selector gets: one federation at a time.
SELECTOR = 'job="$job", instance="$instance"'
#: StamenTrainingStalled (deploy/prometheus/alerts.yml) fires past this many round timeouts.
STALL_TIMEOUTS = 2
#: StamenSiteNearBudget fires below this fraction of the budget left.
NEAR_BUDGET = 0.1
GRID_WIDTH = 24
PANEL_HEIGHT = 8
ANNOTATION_STEP = "30s"

_DEFAULTS = StamenConfig.from_mapping({})
#: The thresholds drawn on panels, from the code's own constants and config defaults.
ROUND_TIMEOUT = float(_DEFAULTS["round-timeout"])
EPSILON_BUDGET = _DEFAULTS.epsilon_budget

_METRIC = re.compile(r"\b(stamen_[a-z0-9_]+)\b(\{)?")


def filtered(expr: str) -> str:
    """``expr`` with :data:`SELECTOR` added to every stamen metric selector."""
    return _METRIC.sub(lambda m: f"{m[1]}{{{SELECTOR}" + (", " if m[2] else "}"), expr)


@dataclass(frozen=True)
class Query:
    """One PromQL target; ``unfilled`` maps each mode it cannot fill to the reason."""

    expr: str
    legend: str
    unfilled: Mapping[str, str] = field(default_factory=dict)
    #: drawn dashed in red: a limit of this run (its budget, its round timeout), not a measurement
    reference: bool = False


@dataclass(frozen=True)
class Panel:
    """A panel; ``thresholds`` are (value, color) steps above ``base_color``."""

    title: str
    description: str
    width: int
    queries: tuple[Query, ...]
    unit: str = "none"
    kind: str = "timeseries"
    thresholds: tuple[tuple[float, str], ...] = ()
    base_color: str = "green"
    min: float | None = None
    max: float | None = None

    def full_description(self) -> str:
        """The description, with what each mode cannot show (so an empty panel explains itself)."""
        notes = [
            f"Empty on {MODE_NAMES[mode]} ({query.legend}): {why}"
            for mode in MODES
            for query in self.queries
            if (why := query.unfilled.get(mode))
        ]
        return " ".join([self.description, *notes])


@dataclass(frozen=True)
class Row:
    """A dashboard row: a title, a description and lines of panels, each line 24 wide."""

    title: str
    description: str
    lines: tuple[tuple[Panel, ...], ...]


NO_TRAIN_LOSS = "a DP site sends no training loss unless its statistics are declared public (dp-public-stats)"
NO_SITE_DETECTOR = "the change detector on a site's training loss needs that loss (" + NO_TRAIN_LOSS + ")"
NO_LEDGER = "without DP there is no privacy ledger, so no epsilon"


ROWS: tuple[Row, ...] = (
    Row(
        "Convergence",
        "Progress of the rounds and of the global model.",
        (
            (
                Panel(
                    "Round",
                    "The round in progress (or the last one run).",
                    4,
                    (Query("stamen_round", "round in progress"),),
                    kind="stat",
                    unit="short",
                ),
                Panel(
                    "Time since last completed round",
                    f"Seconds since a round last completed. Yellow from the default round-timeout "
                    f"({ROUND_TIMEOUT:g} s), red from {STALL_TIMEOUTS}x it, where StamenTrainingStalled fires.",
                    4,
                    (Query("time() - stamen_last_round_timestamp_seconds", "seconds"),),
                    unit="s",
                    kind="stat",
                    thresholds=((ROUND_TIMEOUT, "yellow"), (STALL_TIMEOUTS * ROUND_TIMEOUT, "red")),
                ),
                Panel(
                    "Rounds completed per minute",
                    "Throughput of the federation: rounds completed over the last minute.",
                    8,
                    (Query("increase(stamen_rounds_completed_total[1m])", "rounds / min"),),
                    unit="short",
                ),
                Panel(
                    "Model version and rollbacks",
                    "The global model version in use; a rollback to the best version (evaluation loss "
                    "diverged) returns to an older number and is marked by the Rollbacks annotation.",
                    8,
                    (
                        Query("stamen_model_version", "model version"),
                        Query("increase(stamen_rollbacks_total[1h])", "rollbacks (1 h)"),
                    ),
                ),
            ),
            (
                Panel(
                    "Round duration",
                    f"Wall time of a round (quantiles over 5 min). The red line is the default round-timeout "
                    f"({ROUND_TIMEOUT:g} s), the dashed series this run's: replies later than it are lost.",
                    8,
                    (
                        Query(
                            "histogram_quantile(0.5, sum by (le) (rate(stamen_round_duration_seconds_bucket[5m])))",
                            "p50",
                        ),
                        Query(
                            "histogram_quantile(0.9, sum by (le) (rate(stamen_round_duration_seconds_bucket[5m])))",
                            "p90",
                        ),
                        Query(
                            "rate(stamen_round_duration_seconds_sum[5m])"
                            " / rate(stamen_round_duration_seconds_count[5m])",
                            "mean",
                        ),
                        Query("stamen_round_timeout_seconds", "round-timeout", reference=True),
                    ),
                    unit="s",
                    thresholds=((ROUND_TIMEOUT, "red"),),
                ),
                Panel(
                    "Loss",
                    "Loss of the global model on held-out data (centralized on the server's test split, "
                    "or federated on the sites'), and the sites' mean training loss.",
                    8,
                    (
                        Query("stamen_eval_loss", "evaluation ({{source}})"),
                        Query("stamen_train_loss", "client training (mean)", {DP: NO_TRAIN_LOSS}),
                    ),
                ),
                Panel(
                    "Accuracy",
                    "Accuracy of the global model on held-out data.",
                    8,
                    (Query("stamen_eval_accuracy", "evaluation ({{source}})"),),
                    unit="percentunit",
                    min=0.0,
                    max=1.0,
                ),
            ),
        ),
    ),
    Row(
        "Participation",
        "Which sites take part in each round and why the others do not.",
        (
            (
                Panel(
                    "Sites per minute",
                    "Sites sampled, replying, failing and refusing for lack of privacy budget, per minute.",
                    10,
                    (
                        Query("increase(stamen_sites_sampled_total[1m])", "sampled"),
                        Query("increase(stamen_sites_replied_total[1m])", "replied"),
                        Query("increase(stamen_sites_failed_total[1m])", "failed"),
                        Query("increase(stamen_sites_refused_budget_total[1m])", "refused (budget)"),
                    ),
                    unit="short",
                ),
                Panel(
                    "Rejected replies by reason (5 min)",
                    "Replies the server's screening rejected, by reason, over 5 minutes.",
                    8,
                    (Query("sum by (reason) (increase(stamen_sites_rejected_total[5m]))", "{{reason}}"),),
                    unit="short",
                ),
                Panel(
                    "Sites",
                    "Sites that answered the handshake, and sites past metrics-max-sites folded into site=other.",
                    6,
                    (
                        Query("stamen_sites_connected", "connected"),
                        Query("stamen_metrics_sites_folded", "folded into site=other"),
                    ),
                    unit="short",
                ),
            ),
        ),
    ),
    Row(
        "Updates and client drift",
        "Size and agreement of the sites' model updates.",
        (
            (
                Panel(
                    "Model bytes",
                    "Model payload sent to and received from the sites.",
                    8,
                    (
                        Query("rate(stamen_sent_bytes_total[1m])", "sent"),
                        Query("rate(stamen_received_bytes_total[1m])", "received"),
                    ),
                    unit="Bps",
                ),
                Panel(
                    "Site update L2 norm (mean over 5 min)",
                    "Mean L2 norm of the sites' updates (their model minus the global model).",
                    8,
                    (
                        Query(
                            "rate(stamen_site_update_l2_norm_sum[5m]) / rate(stamen_site_update_l2_norm_count[5m])",
                            "mean site update",
                        ),
                    ),
                ),
                Panel(
                    "Model drift and server momentum",
                    "L2 norm of the global model's change in the last round, and of the server optimizer's "
                    "momentum buffer.",
                    8,
                    (
                        Query("stamen_model_change_l2_norm", "global model change"),
                        Query("stamen_server_momentum_l2_norm", "server momentum buffer"),
                    ),
                ),
            ),
            (
                Panel(
                    "Client drift: cosine(site update, mean update)",
                    "Cosine between each site's update and the round's mean update: near 1 the sites agree, "
                    "near 0 or below one pulls elsewhere.",
                    12,
                    (
                        Query("stamen_client_drift_cosine_min", "min"),
                        Query("stamen_client_drift_cosine_mean", "mean"),
                    ),
                    min=-1.0,
                    max=1.0,
                ),
                Panel(
                    "Dispersion of site update norms (std / mean)",
                    "Coefficient of variation of the round's site update norms: high when a few sites "
                    "dominate the update.",
                    12,
                    (Query("stamen_update_l2_norm_dispersion", "coefficient of variation"),),
                ),
            ),
        ),
    ),
    Row(
        "Data drift (against each site's reference window)",
        "Distribution shift of each site's data against the reference window of its first rounds.",
        (
            (
                Panel(
                    "Label PSI",
                    f"Population stability index of each site's label histogram against its frozen "
                    f"reference: yellow from {PSI_WATCH:g} (moderate shift), red from {PSI_ALERT:g} "
                    f"(significant; StamenLabelDrift fires).",
                    8,
                    (
                        Query('stamen_site_label_psi{site=~"$site"}', "{{site}}"),
                        Query("stamen_label_psi_max", "max"),
                    ),
                    thresholds=((PSI_WATCH, "yellow"), (PSI_ALERT, "red")),
                    min=0.0,
                ),
                Panel(
                    "Label Jensen-Shannon divergence (bits)",
                    "Jensen-Shannon divergence of each site's label histogram against its reference, in bits "
                    "(0 = same distribution, 1 = disjoint).",
                    8,
                    (
                        Query('stamen_site_label_js{site=~"$site"}', "{{site}}"),
                        Query("stamen_label_js_max", "max"),
                    ),
                    min=0.0,
                    max=1.0,
                ),
                Panel(
                    "Feature-sketch PSI",
                    f"Largest PSI over fixed random 1-D projections of each site's records against its "
                    f"reference: yellow from {PSI_WATCH:g}, red from {PSI_ALERT:g} (StamenFeatureDrift fires).",
                    8,
                    (
                        Query('stamen_site_feature_psi{site=~"$site"}', "{{site}}"),
                        Query("stamen_feature_psi_max", "max"),
                    ),
                    thresholds=((PSI_WATCH, "yellow"), (PSI_ALERT, "red")),
                    min=0.0,
                ),
            ),
        ),
    ),
    Row(
        "Concept drift (Page-Hinkley)",
        "Page-Hinkley change detectors on the global evaluation loss and on each site's training loss.",
        (
            (
                Panel(
                    "Change detected this round",
                    "1 when a change detector fired this round: on the global evaluation loss, and on each "
                    "site's training loss.",
                    12,
                    (
                        Query("stamen_concept_drift_detected", "global evaluation loss"),
                        Query(
                            'stamen_site_concept_drift_detected{site=~"$site"}',
                            "{{site}} training loss",
                            {DP: NO_SITE_DETECTOR},
                        ),
                    ),
                    min=0.0,
                    max=1.0,
                ),
                Panel(
                    "Detections (1 h)",
                    "Change detections over the last hour (also marked by the Concept drift annotations).",
                    12,
                    (
                        Query("increase(stamen_concept_drift_detections_total[1h])", "global"),
                        Query(
                            'sum by (site) (increase(stamen_site_concept_drift_detections_total{site=~"$site"}[1h]))',
                            "{{site}}",
                            {DP: NO_SITE_DETECTOR},
                        ),
                    ),
                ),
            ),
        ),
    ),
    Row(
        "Privacy",
        "Differential-privacy spending of the sites against their budgets.",
        (
            (
                Panel(
                    "Epsilon spent",
                    f"Highest and mean cumulative epsilon over the sites. The red line is the default budget "
                    f"(epsilon {EPSILON_BUDGET:g}, target-epsilon), the dashed series this run's budget.",
                    8,
                    (
                        Query("stamen_epsilon_max", "max", {NON_DP: NO_LEDGER}),
                        Query("stamen_epsilon_mean", "mean", {NON_DP: NO_LEDGER}),
                        Query("stamen_epsilon_budget", "budget", {NON_DP: NO_LEDGER}, reference=True),
                    ),
                    thresholds=((EPSILON_BUDGET, "red"),),
                    min=0.0,
                ),
                Panel(
                    "Epsilon per site",
                    f"Cumulative epsilon each site reported; the red line is the default budget "
                    f"(epsilon {EPSILON_BUDGET:g}). A real node may have its own budget.",
                    8,
                    (Query('stamen_site_epsilon{site=~"$site"}', "{{site}}", {NON_DP: NO_LEDGER}),),
                    thresholds=((EPSILON_BUDGET, "red"),),
                    min=0.0,
                ),
                Panel(
                    "Budget remaining",
                    f"Epsilon each site has left. Red below {NEAR_BUDGET:g} of the default budget "
                    f"({NEAR_BUDGET * EPSILON_BUDGET:g}), where StamenSiteNearBudget fires for it.",
                    8,
                    (
                        Query('stamen_site_epsilon_budget_remaining{site=~"$site"}', "{{site}}", {NON_DP: NO_LEDGER}),
                        Query("stamen_epsilon_budget_remaining_min", "min over sites", {NON_DP: NO_LEDGER}),
                    ),
                    thresholds=((NEAR_BUDGET * EPSILON_BUDGET, "green"),),
                    base_color="red",
                ),
            ),
        ),
    ),
)


@dataclass(frozen=True)
class Annotation:
    """A Prometheus annotation: an event on every time panel wherever ``expr`` has a value."""

    name: str
    expr: str
    color: str
    title: str
    text: str


ANNOTATIONS: tuple[Annotation, ...] = (
    Annotation(
        "Rollbacks",
        f"changes(stamen_rollbacks_total[{ANNOTATION_STEP}]) > 0",
        "red",
        "rollback",
        "the server rolled back to its best model version (evaluation loss diverged)",
    ),
    Annotation(
        "Concept drift (global)",
        f"changes(stamen_concept_drift_detections_total[{ANNOTATION_STEP}]) > 0",
        "orange",
        "concept drift",
        "the change detector on the global evaluation loss fired",
    ),
    Annotation(
        "Concept drift (sites)",
        f'sum by (site) (changes(stamen_site_concept_drift_detections_total{{site=~"$site"}}[{ANNOTATION_STEP}])) > 0',
        "yellow",
        "concept drift at {{site}}",
        "the change detector on the site's training loss fired",
    ),
    Annotation(
        "Data drift",
        f"max(stamen_label_psi_max) >= {PSI_ALERT:g} or max(stamen_feature_psi_max) >= {PSI_ALERT:g}",
        "purple",
        "data drift",
        f"a site's label or feature PSI is at or above {PSI_ALERT:g}",
    ),
)


def layout(rows: tuple[Row, ...]) -> list[tuple[Row | Panel, dict[str, int]]]:
    """Each row and panel with its gridPos; a line that does not fill the width is refused."""
    placed: list[tuple[Row | Panel, dict[str, int]]] = []
    y = 0
    for row in rows:
        placed.append((row, {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}))
        y += 1
        for line in row.lines:
            widths = [p.width for p in line]
            if sum(widths) != GRID_WIDTH:
                raise ConfigError(f"dashboard row {row.title!r}: panel widths {widths} do not add up to {GRID_WIDTH}")
            x = 0
            for panel in line:
                placed.append((panel, {"h": PANEL_HEIGHT, "w": panel.width, "x": x, "y": y}))
                x += panel.width
            y += PANEL_HEIGHT
    return placed


def _field_config(panel: Panel) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "color": {"mode": "thresholds" if panel.kind == "stat" else "palette-classic"},
        "thresholds": {
            "mode": "absolute",
            "steps": [{"color": panel.base_color, "value": None}]
            + [{"color": color, "value": value} for value, color in panel.thresholds],
        },
    }
    if panel.kind == "timeseries":
        defaults["custom"] = {"thresholdsStyle": {"mode": "line" if panel.thresholds else "off"}}
    defaults |= {k: v for k, v in (("min", panel.min), ("max", panel.max)) if v is not None}
    overrides = [
        {
            "matcher": {"id": "byName", "options": q.legend},
            "properties": [
                {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
            ],
        }
        for q in panel.queries
        if q.reference
    ]
    return {"defaults": defaults, "overrides": overrides}


def _options(panel: Panel) -> dict[str, Any]:
    if panel.kind == "stat":
        return {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "none",
            "textMode": "auto",
        }
    return {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}, "tooltip": {"mode": "multi"}}


def _panel_json(item: Row | Panel, grid: dict[str, int], panel_id: int) -> dict[str, Any]:
    if isinstance(item, Row):
        return {
            "type": "row",
            "title": item.title,
            "description": item.description,
            "id": panel_id,
            "gridPos": grid,
            "collapsed": False,
            "panels": [],
        }
    return {
        "type": item.kind,
        "title": item.title,
        "description": item.full_description(),
        "id": panel_id,
        "datasource": DATASOURCE,
        "gridPos": grid,
        "fieldConfig": _field_config(item),
        "options": _options(item),
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": filtered(q.expr), "legendFormat": q.legend}
            for i, q in enumerate(item.queries)
        ],
    }


def _query_variable(name: str, definition: str, *, everything: bool) -> dict[str, Any]:
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": definition, "refId": name},
        "definition": definition,
        "refresh": 2,
        "multi": everything,
        "includeAll": everything,
        **({"allValue": ".*"} if everything else {}),
        "current": {},
        "sort": 1,
    }


def variables() -> list[dict[str, Any]]:
    """datasource, then job and instance (one federation; single-valued), then site (any number)."""
    return [
        {
            "name": "datasource",
            "label": "datasource",
            "type": "datasource",
            "query": "prometheus",
            "current": {"text": "stamen Prometheus", "value": DATASOURCE_UID},
            "refresh": 1,
            "regex": "",
            "multi": False,
            "includeAll": False,
        },
        _query_variable("job", "label_values(stamen_round, job)", everything=False),
        _query_variable("instance", 'label_values(stamen_round{job="$job"}, instance)', everything=False),
        _query_variable("site", filtered("label_values(stamen_site_label_psi, site)"), everything=True),
    ]


def _annotation_json(a: Annotation) -> dict[str, Any]:
    return {
        "name": a.name,
        "datasource": DATASOURCE,
        "enable": True,
        "iconColor": a.color,
        "expr": filtered(a.expr),
        "step": ANNOTATION_STEP,
        "titleFormat": a.title,
        "textFormat": a.text,
        "useValueForTime": False,
    }


def dashboard() -> dict[str, Any]:
    """The dashboard's JSON model."""
    builtin = {
        "builtIn": 1,
        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
        "enable": True,
        "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)",
        "name": "Annotations & Alerts",
        "type": "dashboard",
    }
    return {
        "uid": "stamen-federation",
        "title": "stamen federation",
        "description": "One stamen federation (pick its job and instance): generated by `stamen dashboard`.",
        "tags": ["stamen", "federated-learning"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "5s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": variables()},
        "annotations": {"list": [builtin, *map(_annotation_json, ANNOTATIONS)]},
        "panels": [_panel_json(item, grid, i) for i, (item, grid) in enumerate(layout(ROWS), start=1)],
    }


def render() -> str:
    """The dashboard file's text (stable: regenerating it changes nothing)."""
    return json.dumps(dashboard(), indent=2) + "\n"


def panels() -> list[Panel]:
    """Every panel of the definition, in dashboard order."""
    return [panel for row in ROWS for line in row.lines for panel in line]
