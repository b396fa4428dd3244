"""``stamen lr-find``: the range test runs on one site's data and suggests a usable rate."""

from __future__ import annotations

import math

import torch
from typer.testing import CliRunner

from stamen.cli.main import app
from stamen.common.config import StamenConfig
from stamen.simulations.lr_find import lr_range_test


def test_range_test_rises_then_suggests_a_rate_inside_the_range() -> None:
    torch.set_num_threads(1)
    cfg = StamenConfig.from_mapping({"dataset": "digits", "momentum": 0.0, "min-partition-size": 10})
    result = lr_range_test(cfg, site=0, clients=3, steps=80, start=1e-4, end=10.0)
    assert result.lrs == sorted(result.lrs)
    assert result.lrs[0] <= result.suggested_lr < result.lrs[-1]
    assert all(math.isfinite(v) for v in result.losses[:-1])
    assert min(result.losses) < result.losses[0], "the loss must fall somewhere on the way up"


def test_cli_prints_a_suggestion_and_refuses_a_bad_site() -> None:
    runner = CliRunner()
    ok = runner.invoke(
        app, ["lr-find", "--dataset", "digits", "--clients", "3", "--steps", "40", "--set", "min-partition-size=10"]
    )
    assert ok.exit_code == 0, ok.output
    assert "suggested lr" in ok.output
    bad = runner.invoke(app, ["lr-find", "--dataset", "digits", "--clients", "3", "--site", "5"])
    assert bad.exit_code == 2
    assert "--site" in bad.output
