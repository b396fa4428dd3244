"""deploy/ against the real Prometheus (Debian's package): promtool checks the config and the
alert rules and fires each alert on crafted series; a live Prometheus scrapes a running
simulation, DP and non-DP, and every dashboard query and every metric a panel or rule names
has data, except where the dashboard's definition (stamen/dashboard.py) declares that mode
unable to fill a query.

Without the binaries these tests skip locally with the reason; with CI=true that is a failure.
"""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import required_tool

from stamen import dashboard as dash
from stamen.common.drift import PSI_ALERT

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "stamen.json"
METRIC = re.compile(r"\b(stamen_[a-z0-9_]+|up)\b")


def _binary(name: str) -> str:
    return required_tool(name, "Debian package 'prometheus'; .ci/run installs it")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_binary("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=PROM_DIR)


def _alert_names() -> list[str]:
    groups = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_accepts_the_config_and_the_rules() -> None:
    config = _promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    rules = _promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(_alert_names())} rules found" in rules.stdout


def test_every_alert_fires_on_a_crafted_series() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
    firing = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert firing == set(_alert_names()), f"alerts never shown firing: {set(_alert_names()) - firing}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


class Prometheus:
    """A Prometheus on loopback with its own port, data directory and a 1 s scrape interval."""

    def __init__(self, tmp: Path, target_port: int) -> None:
        config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(PROM_DIR / "alerts.yml")]
        config["scrape_configs"] = [
            {"job_name": "stamen-server", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}
        ]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                _binary("prometheus"),
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def ready(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as resp:
            return resp.status == 200

    def query(self, expr: str) -> list[dict[str, Any]]:
        doc = _get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert doc["status"] == "success", (expr, doc)
        return doc["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _wait(condition: Any, timeout: float, what: str, alive: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert alive.poll() is None, f"the simulation ended before {what}"
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}")


#: The two modes the dashboard is proven in: DP with the default posture (sites keep their
#: raw-record statistics) and a budget that never runs out, and no DP at all.
RUN_MODES = {
    dash.DP: ["--dp", "--noise-multiplier", "1.0", "--epsilon-budget", "1000000"],
    dash.NON_DP: [],
}


@pytest.fixture(params=list(RUN_MODES))
def live_simulation(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int, str]]:
    """`stamen simulate` in the background with the metrics endpoint on, in one of RUN_MODES;
    stopped with SIGINT."""
    port = _free_port()
    out = tmp_path / "run"
    log = open(tmp_path / "simulate.log", "wb")  # noqa: SIM115 - closed below
    # enough rounds to outlast the checks
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "stamen", "simulate",
            "--clients", "3", "--rounds", "400", "--dataset", "digits", *RUN_MODES[request.param],
            "--set", "min-partition-size=10",
            "--metrics-port", str(port), "--out", str(out), "--no-progress", "--timeout", "900",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )  # fmt: skip
    try:
        yield proc, port, request.param
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the CLI stops the engine's process group on the way out
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _panel_targets() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def _unfilled() -> dict[tuple[str, str], frozenset[str]]:
    """The modes each (panel title, query) of the definition declares it cannot fill."""
    return {(p.title, dash.filtered(q.expr)): frozenset(q.unfilled) for p in dash.panels() for q in p.queries}


def _substituted(expr: str, values: dict[str, str]) -> str:
    return re.sub(r"\$(\w+)", lambda m: values[m[1]], expr)


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    targets = _panel_targets()
    assert len(targets) >= 30
    for title, expr in targets:
        assert "vector(" not in expr and "absent(" not in expr, (title, expr)
        assert set(re.findall(r"\$(\w+)", expr)) <= variables, (title, expr)
    ds_uid = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/stamen.yml").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"] if p["type"] != "row"} == {"${datasource}"}
    source = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert source["current"]["value"] == ds_uid["datasources"][0]["uid"]
    assert set(_unfilled()) == set(targets), "the committed dashboard is not the definition's"


def test_every_annotation_marks_its_event_on_a_crafted_series(tmp_path: Path) -> None:
    """Each annotation query, as Grafana sends it, run as an alert rule by promtool: it has a
    value (Grafana draws the event) after a rollback, a detection or a PSI over the line, not
    before, and only for the chosen federation."""
    dashboard = json.loads(DASHBOARD.read_text())
    values = {"job": "stamen-server", "instance": "s", "site": ".*"}
    names = {a["name"]: re.sub(r"\W", "_", a["name"]) for a in dashboard["annotations"]["list"] if "expr" in a}
    rules = [
        {"alert": names[a["name"]], "expr": _substituted(a["expr"], values)}
        for a in dashboard["annotations"]["list"]
        if "expr" in a
    ]
    (tmp_path / "annotations.yml").write_text(yaml.safe_dump({"groups": [{"name": "annotations", "rules": rules}]}))
    ours, theirs = 'job="stamen-server", instance="s"', 'job="other", instance="t"'
    event = "0x11 1x11"  # one event at 60 s (5 s scrapes)
    series = {
        f"stamen_rollbacks_total{{{ours}}}": event,
        f"stamen_rollbacks_total{{{theirs}}}": event,
        f"stamen_concept_drift_detections_total{{{ours}}}": event,
        f'stamen_site_concept_drift_detections_total{{{ours}, site="site-0001"}}': event,
        f'stamen_site_concept_drift_detections_total{{{ours}, site="site-0002"}}': "0x23",
        f"stamen_label_psi_max{{{ours}}}": f"0x11 {PSI_ALERT}x11",
        f"stamen_label_psi_max{{{theirs}}}": "0.9x23",
        f"stamen_feature_psi_max{{{ours}}}": "0.05x23",
    }
    labels = {
        "Rollbacks": {"job": "stamen-server", "instance": "s"},
        "Concept drift (global)": {"job": "stamen-server", "instance": "s"},
        "Concept drift (sites)": {"site": "site-0001"},
        "Data drift": {},
    }
    assert set(labels) == set(names)
    cases = [{"eval_time": "50s", "alertname": alert, "exp_alerts": []} for alert in names.values()]
    cases += [
        {"eval_time": "70s", "alertname": names[name], "exp_alerts": [{"exp_labels": labels[name]}]} for name in names
    ]
    test = {"interval": "5s", "input_series": [{"series": k, "values": v} for k, v in series.items()]}
    (tmp_path / "annotations_test.yml").write_text(
        yaml.safe_dump(
            {
                "rule_files": ["annotations.yml"],
                "evaluation_interval": "5s",
                "tests": [{**test, "alert_rule_test": cases}],
            }
        )
    )
    result = subprocess.run(
        [_binary("promtool"), "test", "rules", "annotations_test.yml"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_every_panel_query_and_rule_metric_has_data_from_a_live_run(
    tmp_path: Path, live_simulation: tuple[subprocess.Popen[bytes], int, str]
) -> None:
    """Every query has data, in a DP and in a non-DP run, except where its definition declares
    that mode unable to fill it (and there it is empty); every query is filtered to one federation."""
    sim, port, mode = live_simulation
    prom = Prometheus(tmp_path, port)
    try:
        _wait(prom.ready, 60, "Prometheus to start", sim)
        # a few scraped rounds, so rate() windows hold several samples of moving counters
        _wait(
            lambda: any(float(r["value"][1]) >= 4 for r in prom.query("stamen_rounds_completed_total")),
            600,
            "four rounds to be scraped",
            sim,
        )
        time.sleep(5)
        dashboard = json.loads(DASHBOARD.read_text())
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        values: dict[str, str] = {}
        for name in ("job", "instance", "site"):  # each as Grafana resolves it, from the ones before
            label_query = re.fullmatch(r"label_values\((.+), (\w+)\)", variables[name]["definition"])
            assert label_query, variables[name]["definition"]
            match = _substituted(label_query[1], values)
            found = _get(
                f"{prom.url}/api/v1/label/{label_query[2]}/values?" + urllib.parse.urlencode({"match[]": match})
            )
            values[name] = found["data"][0]
        assert (values["job"], values["instance"]) == ("stamen-server", f"127.0.0.1:{port}")
        assert found["data"] == ["site-0000", "site-0001", "site-0002"]
        unfilled = _unfilled()
        empty, filled, leaked = [], [], []
        for site in (values["site"], variables["site"]["allValue"]):  # one site, and Grafana's "All"
            for title, expr in _panel_targets():
                result = prom.query(_substituted(expr, {**values, "site": site}))
                has_data = any(math.isfinite(float(r["value"][1])) for r in result)
                if not has_data and mode not in unfilled[(title, expr)]:
                    empty.append(f"{title}: {expr} (site={site}) -> {result}")
                if has_data and mode in unfilled[(title, expr)]:
                    filled.append(f"{title}: {expr} (site={site}) is declared empty on {mode}")
                other = _substituted(expr, {**values, "site": site, "job": "another-federation"})
                if prom.query(other):
                    leaked.append(f"{title}: {expr} shows another federation's series")
        for annotation in dashboard["annotations"]["list"]:
            if "expr" in annotation:  # PromQL that evaluates (Prometheus answers "success")
                prom.query(_substituted(annotation["expr"], {**values, "site": variables["site"]["allValue"]}))
        names = {m for _, expr in unfilled for m in METRIC.findall(expr)}
        names |= {m for group in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
                  for rule in group["rules"] for m in METRIC.findall(rule["expr"])}  # fmt: skip
        # a metric only the mode's unfillable queries name may be absent in that mode
        may_be_absent = {m for key, modes in unfilled.items() if mode in modes for m in METRIC.findall(key[1])}
        may_be_absent -= {m for key, modes in unfilled.items() if mode not in modes for m in METRIC.findall(key[1])}
        present = {name for name in sorted(names) if prom.query(f'{{__name__="{name}"}}')}
        missing = sorted(names - present - may_be_absent)
        rules = _get(f"{prom.url}/api/v1/rules")["data"]["groups"]
        unhealthy = [(r["name"], r.get("lastError")) for g in rules for r in g["rules"] if r["health"] != "ok"]
        assert sim.poll() is None, "the simulation must still be running while the queries are checked"
    finally:
        prom.stop()
    assert not empty, f"panel queries without data on a {mode} run:\n" + "\n".join(empty)
    assert not filled, "\n".join(filled)
    assert not leaked, "\n".join(leaked)
    assert not missing, f"metrics named by panels or rules that do not exist: {missing}"
    assert len(names) >= 30
    assert not unhealthy, unhealthy
