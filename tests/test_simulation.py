"""End to end: ``stamen simulate`` on Flower's simulation engine, as a user runs it."""

from __future__ import annotations

import csv
import json
import math
import uuid
from pathlib import Path

import pytest
from conftest import run_stamen_simulate, tagged_env, tagged_processes
from safetensors.numpy import load_file

from stamen.common.config import KEYS


@pytest.mark.slow
def test_three_sites_three_rounds_on_digits(tmp_path: Path) -> None:
    out, tag = tmp_path / "run", uuid.uuid4().hex
    args = ("--clients", "3", "--rounds", "3", "--dataset", "digits", "--local-epochs", "2")
    result = run_stamen_simulate(out, *args, env=tagged_env(tag))
    assert "final accuracy" in result.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["rounds_completed"] == 3
    assert summary["final"]["accuracy"] >= 0.5
    assert summary["final"]["source"] == "centralized"
    assert [row["round"] for row in summary["history"]] == [1, 2, 3]
    for row in summary["history"]:
        assert row["sampled"] == row["replied"] == 3
        assert math.isfinite(row["loss"]) and row["seconds"] > 0
        assert 0 <= row["fed_accuracy"] <= 1
    assert summary["participation"]["replied"] == 9

    record = json.loads((out / "config.json").read_text())
    assert set(record["config"]) == {k.name for k in KEYS}
    assert record["config"]["dataset"] == "digits"

    with open(out / "history.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3
    model = load_file(out / "model.safetensors")
    assert model and not any(k.startswith("_module.") for k in model)
    assert (out / "convergence.png").stat().st_size > 10_000
    for site in ("site-0000", "site-0001", "site-0002"):
        participation = json.loads((out / "sites" / site / "participation.json").read_text())
        assert participation["data"]["rounds"] == 3

    assert tagged_processes(tag) == [], "the simulation left processes behind (Ray's daemons or workers)"
