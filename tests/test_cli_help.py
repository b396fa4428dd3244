"""What a user reads first: ``--help`` with every default, and plots that say what they show."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from stamen.cli.main import app
from stamen.simulations.plots import convergence_figure, drift_figure, plot_run, run_title


def test_simulate_help_shows_a_default_for_every_option() -> None:
    result = CliRunner().invoke(app, ["simulate", "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"})
    assert result.exit_code == 0, result.output
    options = [line for line in result.output.splitlines() if re.match(r"^│\s+--(?!help)", line)]
    assert len(options) > 30, result.output
    missing = [line.split()[1] for line in options if "[default:" not in line]
    assert missing == [], f"options without a default in --help: {missing}"
    rounds = next(line for line in options if "--rounds" in line)
    assert "[default: (20)]" in rounds and "num-server-rounds" in rounds


def _summary(**final: Any) -> dict[str, Any]:
    history = [
        {"round": r, "train_loss": 2.0 / r, "update_norm_mean": 1.0 / r, "model_change_norm": 0.5 / r,
         "server_buffer_norm": 0.5 / r, "cosine_mean": 0.9, "cosine_min": 0.8}
        for r in (1, 2, 3)
    ]  # fmt: skip
    return {"final": {"accuracy": None, "loss": None, "source": "none", **final}, "history": history, "drift": {}}


def _texts(ax: Any) -> str:
    return " ".join(" ".join(t.get_text().split()) for t in ax.texts)  # wrapped notes read as one line


def test_plots_have_whole_rounds_a_note_on_empty_panels_and_distinguishable_series() -> None:
    summary = _summary(reason="no evaluation data: the server's dataset (npz:x) has no test split and ...")
    fig = convergence_figure(summary, "digits · cnn8")
    ax_acc, ax_loss = fig.axes
    assert fig._suptitle is not None and fig._suptitle.get_text() == "digits · cnn8"
    assert "no data" in _texts(ax_acc) and "has no test split" in _texts(ax_acc)
    assert _texts(ax_loss) == "" and len(ax_loss.lines) == 1
    fig.canvas.draw()
    ticks = [t for t in ax_loss.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    drift = drift_figure(summary)
    norms = drift.axes[2]
    styles = [(line.get_linestyle(), line.get_marker()) for line in norms.lines]
    assert len(styles) == 3 and len(set(styles)) == 3, styles  # model change and momentum coincide here
    assert "no data" in _texts(drift.axes[0]) and "no data" not in _texts(drift.axes[1])


def test_plot_run_titles_the_figures_with_the_run_settings(tmp_path: Path) -> None:
    config = {"dataset": "npz:/data/mine.npz", "model": "mlp", "strategy": "fedavgm", "num-server-rounds": 3,
              "lr": 0.05, "partition": "iid", "alpha": 0.5, "dp": True, "noise-multiplier": 1.1, "seed": 7}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({"config": config}))
    title = run_title(tmp_path)
    assert title == "mine.npz · mlp · fedavgm · 3 rounds · lr 0.05 · iid · DP (noise 1.1) · seed 7"
    paths = plot_run(_summary(), tmp_path)
    assert [p.name for p in paths] == ["convergence.png", "drift.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_a_title_names_the_sites_own_data_and_a_calibrated_dp_target(tmp_path: Path) -> None:
    """The sites' own data (site-data / data-loader) is named, not the unused default dataset and partition."""
    config = {"dataset": "mnist5k", "model": "mymodel:Net", "strategy": "fedavgm", "num-server-rounds": 3,
              "lr": 0.05, "partition": "dirichlet", "alpha": 0.5, "dp": True, "noise-multiplier": 0.0,
              "target-epsilon": 8.0, "seed": 7, "site-data": "/work/hospitals", "data-loader": ""}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({"config": config}))
    title = run_title(tmp_path)
    assert title == "site-data hospitals · mymodel:Net · fedavgm · 3 rounds · lr 0.05 · DP (target epsilon 8) · seed 7"
    config.update({"site-data": "", "data-loader": "mydata:load_data"})
    (tmp_path / "config.json").write_text(json.dumps({"config": config}))
    assert run_title(tmp_path).startswith("mydata:load_data · mymodel:Net ·") and "mnist5k" not in run_title(tmp_path)


@pytest.mark.parametrize("missing", ["no config.json", "unreadable"])
def test_a_run_without_a_readable_config_gets_plots_without_a_title(tmp_path: Path, missing: str) -> None:
    if missing == "unreadable":
        (tmp_path / "config.json").write_text("{not json")
    assert run_title(tmp_path) == ""
