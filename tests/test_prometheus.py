"""deploy/ against the real Prometheus (Debian's package): promtool checks the config and the
alert rules and fires each alert on crafted series; a live Prometheus scrapes a running
simulation and every dashboard query and every metric a panel or rule names has data.

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


@pytest.fixture
def live_simulation(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """`stamen simulate` in the background with the metrics endpoint on; stopped with SIGINT."""
    port = _free_port()
    out = tmp_path / "run"
    log = open(tmp_path / "simulate.log", "wb")  # noqa: SIM115 - closed below
    # DP on with public statistics and a budget that never runs out, so every privacy,
    # training-loss and per-site series has values; enough rounds to outlast the checks.
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "stamen", "simulate",
            "--clients", "3", "--rounds", "400", "--dataset", "digits",
            "--dp", "--noise-multiplier", "1.0", "--epsilon-budget", "1000000",
            "--set", "dp-public-stats=true", "--set", "min-partition-size=10",
            "--metrics-port", str(port), "--out", str(out), "--no-progress", "--timeout", "900",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )  # fmt: skip
    try:
        yield proc, port, out
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


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    targets = _panel_targets()
    assert len(targets) >= 30
    for title, expr in targets:
        assert "vector(" not in expr and "absent(" not in expr, (title, expr)
        assert set(re.findall(r"\$(\w+)", expr)) <= variables, (title, expr)
    ds_uid = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/stamen.yml").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"] if p["type"] != "row"} == {
        ds_uid["datasources"][0]["uid"]
    }


@pytest.mark.slow
def test_every_panel_query_and_rule_metric_has_data_from_a_live_run(
    tmp_path: Path, live_simulation: tuple[subprocess.Popen[bytes], int, Path]
) -> None:
    sim, port, _ = live_simulation
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
        variable = dashboard["templating"]["list"][0]
        label_query = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"])
        assert label_query, variable["definition"]
        sites = _get(
            f"{prom.url}/api/v1/label/{label_query[2]}/values?" + urllib.parse.urlencode({"match[]": label_query[1]})
        )["data"]
        assert sites == ["site-0000", "site-0001", "site-0002"]
        empty = []
        for value in (sites[0], variable["allValue"]):  # one site, and Grafana's "All"
            for title, expr in _panel_targets():
                result = prom.query(expr.replace("$site", value))
                if not any(math.isfinite(float(r["value"][1])) for r in result):
                    empty.append(f"{title}: {expr} (site={value}) -> {result}")
        names = {m for _, expr in _panel_targets() for m in METRIC.findall(expr)}
        names |= {m for group in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
                  for rule in group["rules"] for m in METRIC.findall(rule["expr"])}  # fmt: skip
        missing = [name for name in sorted(names) if not prom.query(f'{{__name__="{name}"}}')]
        rules = _get(f"{prom.url}/api/v1/rules")["data"]["groups"]
        unhealthy = [(r["name"], r.get("lastError")) for g in rules for r in g["rules"] if r["health"] != "ok"]
        assert sim.poll() is None, "the simulation must still be running while the queries are checked"
    finally:
        prom.stop()
    assert not empty, "panel queries without data:\n" + "\n".join(empty)
    assert not missing, f"metrics named by panels or rules that do not exist: {missing}"
    assert len(names) >= 30
    assert not unhealthy, unhealthy
