"""The Grafana dashboard as code (stamen/dashboard.py): the committed JSON is what the
generator writes, and it has the thresholds, annotations, variables, descriptions and the
full grid the definition promises. Its queries against a live Prometheus: test_prometheus.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from stamen import dashboard as dash
from stamen.cli.main import app as cli_app
from stamen.common.config import KEY_BY_NAME
from stamen.common.drift import PSI_ALERT, PSI_WATCH
from stamen.common.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / dash.DASHBOARD_PATH
METRIC = re.compile(r"\bstamen_[a-z0-9_]+\b")
FILTERED = re.compile(r'\bstamen_[a-z0-9_]+\{job="\$job", instance="\$instance"')


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    return json.loads(COMMITTED.read_text())


def _panel(board: dict[str, Any], title: str) -> dict[str, Any]:
    return next(p for p in board["panels"] if p["title"] == title)


def _steps(panel: dict[str, Any]) -> list[float | None]:
    return [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]]


def _rules() -> dict[str, str]:
    groups = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]
    return {r["alert"]: " ".join(r["expr"].split()) for g in groups for r in g["rules"]}


def test_the_committed_dashboard_is_what_the_command_generates(tmp_path: Path) -> None:
    assert COMMITTED.read_text() == dash.render(), "deploy/grafana is stale: run `stamen dashboard`"
    runner = CliRunner()
    out = tmp_path / "stamen.json"
    written = runner.invoke(cli_app, ["dashboard", "--out", str(out)])
    assert written.exit_code == 0, written.output
    assert out.read_text() == COMMITTED.read_text()
    current = runner.invoke(cli_app, ["dashboard", "--check", "--out", str(COMMITTED)])
    assert current.exit_code == 0 and "is current" in current.output, current.output
    out.write_text(out.read_text().replace("Label PSI", "Label psi"))
    stale = runner.invoke(cli_app, ["dashboard", "--check", "--out", str(out)])
    assert stale.exit_code == 1 and "not current" in stale.output, stale.output
    nowhere = runner.invoke(cli_app, ["dashboard", "--out", str(tmp_path / "no" / "stamen.json")])
    assert nowhere.exit_code == 2 and "does not exist" in " ".join(nowhere.output.split()), nowhere.output


def test_thresholds_come_from_the_codes_constants_and_config_defaults(board: dict[str, Any]) -> None:
    assert (PSI_WATCH, PSI_ALERT) == (0.1, 0.2)
    for title in ("Label PSI", "Feature-sketch PSI"):
        assert _steps(_panel(board, title)) == [None, PSI_WATCH, PSI_ALERT], title
    rules = _rules()
    assert rules["StamenLabelDrift"] == f"stamen_label_psi_max >= {PSI_ALERT:g}"
    assert rules["StamenFeatureDrift"] == f"stamen_feature_psi_max >= {PSI_ALERT:g}"

    budget = KEY_BY_NAME["epsilon-budget"].default or KEY_BY_NAME["target-epsilon"].default
    assert budget == dash.EPSILON_BUDGET == 8.0
    for title in ("Epsilon spent", "Epsilon per site"):
        assert _steps(_panel(board, title)) == [None, budget], title
    assert (
        rules["StamenSiteNearBudget"]
        == f"stamen_epsilon_budget_remaining_min < {dash.NEAR_BUDGET:g} * stamen_epsilon_budget"
    )
    assert _steps(_panel(board, "Budget remaining")) == [None, dash.NEAR_BUDGET * budget]

    timeout = KEY_BY_NAME["round-timeout"].default
    assert _steps(_panel(board, "Round duration")) == [None, timeout]
    assert rules["StamenTrainingStalled"].endswith(f"> {dash.STALL_TIMEOUTS} * stamen_round_timeout_seconds")
    assert _steps(_panel(board, "Time since last completed round")) == [None, timeout, dash.STALL_TIMEOUTS * timeout]
    # Lines are drawn on every time series with thresholds; this run's own limits are dashed series.
    for panel in board["panels"]:
        if panel["type"] == "timeseries":
            style = panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"]
            assert style == ("line" if len(_steps(panel)) > 1 else "off"), panel["title"]
    for title, legend in (("Epsilon spent", "budget"), ("Round duration", "round-timeout")):
        overrides = _panel(board, title)["fieldConfig"]["overrides"]
        assert [o["matcher"]["options"] for o in overrides] == [legend], title


def test_rollbacks_and_drift_detections_are_annotations(board: dict[str, Any]) -> None:
    annotations = {a["name"]: a for a in board["annotations"]["list"] if not a.get("builtIn")}
    expected = {
        "Rollbacks": "stamen_rollbacks_total",
        "Concept drift (global)": "stamen_concept_drift_detections_total",
        "Concept drift (sites)": "stamen_site_concept_drift_detections_total",
        "Data drift": "stamen_label_psi_max",
    }
    assert set(annotations) == set(expected)
    for name, metric in expected.items():
        a = annotations[name]
        assert metric in a["expr"] and a["enable"] and a["titleFormat"] and a["textFormat"], a
        assert a["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
    data = annotations["Data drift"]["expr"]
    assert "stamen_feature_psi_max" in data and data.count(f">= {PSI_ALERT:g}") == 2


def test_variables_pick_the_datasource_and_one_federation_and_filter_every_query(board: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "instance", "site"]
    provisioned = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/stamen.yml").read_text())
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    assert source["current"]["value"] == provisioned["datasources"][0]["uid"] == dash.DATASOURCE_UID
    for name in ("job", "instance"):  # one federation at a time: never All, never several
        assert not variables[name]["multi"] and not variables[name]["includeAll"], name
    assert variables["instance"]["definition"] == 'label_values(stamen_round{job="$job"}, instance)'
    assert variables["site"]["includeAll"] and variables["site"]["allValue"] == ".*"
    exprs = [t["expr"] for p in board["panels"] if p["type"] != "row" for t in p["targets"]]
    exprs += [a["expr"] for a in board["annotations"]["list"] if "expr" in a]
    exprs.append(variables["site"]["definition"])
    assert len(exprs) >= 40
    for expr in exprs:
        assert len(METRIC.findall(expr)) == len(FILTERED.findall(expr)) >= 1, expr
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert {panel["datasource"]["uid"], *(t["datasource"]["uid"] for t in panel["targets"])} == {
                "${datasource}"
            }, panel["title"]


def test_every_panel_has_a_description_saying_what_a_mode_cannot_show(board: dict[str, Any]) -> None:
    assert len(board["panels"]) == len(dash.ROWS) + len(dash.panels())
    for panel in board["panels"]:
        assert len(panel.get("description", "")) > 20, panel["title"]
    for panel in dash.panels():
        described = _panel(board, panel.title)["description"]
        for query in panel.queries:
            assert set(query.unfilled) < set(dash.MODES), f"{panel.title}/{query.legend} shows nothing in any mode"
            for mode, why in query.unfilled.items():
                assert f"Empty on {dash.MODE_NAMES[mode]} ({query.legend}): {why}" in described, panel.title
    assert "Empty on a DP run (client training (mean))" in _panel(board, "Loss")["description"]
    assert "Empty on a run without DP" in _panel(board, "Epsilon per site")["description"]


def test_the_grid_is_full_without_gaps_or_overlaps(board: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= dash.GRID_WIDTH, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]} at {(x, y)}"
                cells[(x, y)] = panel["title"]
    height = max(y for _, y in cells) + 1
    gaps = [(x, y) for x in range(dash.GRID_WIDTH) for y in range(height) if (x, y) not in cells]
    assert not gaps, f"cells no panel covers: {gaps[:10]}"
    assert [p["type"] for p in board["panels"] if p["gridPos"]["w"] == 24 and p["gridPos"]["h"] == 1] == ["row"] * 6


def test_a_line_of_panels_that_does_not_fill_the_width_is_refused() -> None:
    short = dash.Row(
        "Broken", "a line 20 wide", ((dash.Panel("p", "a panel", 20, (dash.Query("stamen_round", "r"),)),),)
    )
    with pytest.raises(ConfigError, match=r"'Broken'.*\[20\] do not add up to 24"):
        dash.layout((short,))
