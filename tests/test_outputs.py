"""Outputs that never mislead: strict JSON files, a stated reason when a run has no accuracy,
a server that holds no data, and an endpoint that is still there for the last scrape."""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_stamen_simulate
from prometheus_client.parser import text_string_to_metric_families

from stamen.common.config import StamenConfig
from stamen.common.errors import ConfigError
from stamen.common.state import atomic_write_json
from stamen.server.evaluate import load_server_data, why_no_accuracy
from stamen.server.exporter import Exporter, metrics_url
from stamen.server.loop import scores_text
from stamen.server.outputs import RunOutputs
from stamen.simulations.bench.loopback import free_port


def _refuse(constant: str) -> Any:
    raise ValueError(f"non-standard JSON constant {constant}")


def strict_load(path: Path) -> Any:
    """Parse as a strict parser (every language's standard one) does: NaN and Infinity are errors."""
    return json.loads(path.read_text(), parse_constant=_refuse)


def test_user_json_is_strict_and_unknown_figures_are_null(tmp_path: Path) -> None:
    outputs = RunOutputs(tmp_path)
    outputs.add_round({"round": 1, "accuracy": math.nan, "loss": np.float32("inf")})
    summary = outputs.write_summary({"final": {"accuracy": math.nan}, "best": {"accuracy": -math.inf, "round": 0}})
    doc = strict_load(summary)
    assert doc["final"]["accuracy"] is None and doc["best"] == {"accuracy": None, "round": 0}
    assert doc["history"] == [{"round": 1, "accuracy": None, "loss": None}]
    progress = (tmp_path / "progress.jsonl").read_text().splitlines()
    assert [json.loads(line, parse_constant=_refuse) for line in progress] == doc["history"]
    atomic_write_json(tmp_path / "bench.json", [{"seconds": (1.5, math.inf)}])
    assert strict_load(tmp_path / "bench.json") == [{"seconds": [1.5, None]}]


def test_internal_state_keeps_non_finite_values_exactly(tmp_path: Path) -> None:
    """Checkpoints round-trip a best accuracy of -inf (nothing evaluated yet): they opt out."""
    atomic_write_json(tmp_path / "state.json", {"best": -math.inf}, strict=False)
    assert json.loads((tmp_path / "state.json").read_text()) == {"best": -math.inf}


def test_a_server_with_the_model_shape_and_no_dataset_loads_none() -> None:
    data = load_server_data(StamenConfig.from_mapping({"input-shape": "20", "num-classes": 3}))
    assert (data.input_shape, data.num_classes, data.x_test) == ((20,), 3, None)


def test_a_named_dataset_must_still_match_the_given_shape() -> None:
    with pytest.raises(ConfigError, match="does not match dataset digits"):
        load_server_data(StamenConfig.from_mapping({"dataset": "digits", "input-shape": "20", "num-classes": 10}))


def test_a_one_class_model_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 2 classes"):
        load_server_data(StamenConfig.from_mapping({"input-shape": "20", "num-classes": 1}))


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_endpoint_serves_the_last_round_for_the_linger_time_after_the_run() -> None:
    port = free_port()
    cfg = StamenConfig.from_mapping({"metrics-port": port, "metrics-linger-seconds": 2.0})
    exporter = Exporter(cfg)
    exporter.round.set(3)
    exporter.stamp_round(0.1)  # the run's last round
    closing = threading.Thread(target=exporter.close)
    started = time.monotonic()
    closing.start()  # the run has ended: the server closes its exporter
    time.sleep(1.0)
    served = _scrape(metrics_url(cfg))
    closing.join()
    assert served["stamen_round"] == 3 and served["stamen_rounds_completed_total"] == 1
    assert time.monotonic() - started >= 1.9
    with pytest.raises(OSError):
        _scrape(metrics_url(cfg))


@pytest.mark.slow
def test_a_dp_run_on_data_without_a_test_split_says_why_it_has_no_accuracy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((240, 6)).astype(np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    out = tmp_path / "run"
    result = run_stamen_simulate(
        out, "--clients", "2", "--rounds", "2", "--dataset", f"npz:{tmp_path / 'mine.npz'}", "--dp",
        "--noise-multiplier", "1.0", "--no-progress",
    )  # fmt: skip
    summary = strict_load(out / "summary.json")
    assert summary["rounds_completed"] == 2
    assert summary["final"]["accuracy"] is None and summary["final"]["source"] == "none"
    assert summary["best"]["accuracy"] is None
    reason = summary["final"]["reason"]
    assert "has no test split" in reason and "dp-public-stats" in reason and "x_test" in reason
    assert "final accuracy n/a" in result.stdout and reason in " ".join(result.stdout.split())
    assert "nan" not in result.stdout.lower()
    log = (out / "simulation.log").read_text()
    assert "round 2: not evaluated, model version 2" in log and "accuracy nan" not in log
    strict_load(out / "config.json")
    for line in (out / "progress.jsonl").read_text().splitlines():
        assert json.loads(line, parse_constant=_refuse)["accuracy"] is None


def test_a_rounds_log_line_says_not_evaluated_instead_of_nan_scores() -> None:
    assert scores_text({"accuracy": math.nan, "loss": math.nan}) == "not evaluated"
    assert scores_text({}) == "not evaluated"
    assert scores_text({"accuracy": 0.91234, "loss": 0.25}) == "accuracy 0.9123 loss 0.2500"


def test_the_reason_for_no_accuracy_names_what_is_missing() -> None:
    no_data = StamenConfig.from_mapping({"input-shape": "20", "num-classes": 3, "dp": True, "noise-multiplier": 1.0})
    reason = why_no_accuracy(no_data, load_server_data(no_data))
    assert "the server holds no data" in reason and "dp-public-stats is off" in reason
    no_holdout = StamenConfig.from_mapping({"dataset": "digits", "server-eval": False, "holdout-fraction": 0.0})
    reason = why_no_accuracy(no_holdout, load_server_data(no_holdout))
    assert "server-eval is off" in reason and "holdout-fraction 0" in reason
