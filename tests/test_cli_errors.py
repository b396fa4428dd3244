"""Bad input to ``stamen simulate`` ends with one clear message and a non-zero exit.

These fail in the pre-flight checks, before any engine starts, so they are fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stamen.cli.main import app

runner = CliRunner()


def _simulate(tmp_path: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["simulate", "--out", str(tmp_path / "run"), "--no-progress", *args])
    return result.exit_code, result.output


def _npz(tmp_path: Path, **arrays: np.ndarray) -> str:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return f"npz:{path}"


def _csv(tmp_path: Path, text: str) -> str:
    path = tmp_path / "data.csv"
    path.write_text(text)
    return f"csv:{path}"


GOOD_X = np.random.default_rng(0).random((200, 4)).astype(np.float32)
GOOD_Y = np.arange(200) % 3


@pytest.mark.parametrize(
    ("make_spec", "extra", "expected"),
    [
        (lambda p: "nosuchdata", [], "nosuchdata"),
        (lambda p: f"npz:{p / 'missing.npz'}", [], "missing.npz"),
        (lambda p: (p / "bad.npz").write_bytes(b"not a zip") and f"npz:{p / 'bad.npz'}", [], "bad.npz"),
        (lambda p: _npz(p, x=np.where(GOOD_X > 0.99, np.nan, GOOD_X), y=GOOD_Y), [], "NaN"),
        (lambda p: _npz(p, x=GOOD_X, y=GOOD_Y - 1), [], "label"),
        (lambda p: _npz(p, x=GOOD_X, y=GOOD_Y + 0.5), [], "label"),
        (lambda p: _npz(p, x=GOOD_X, y=GOOD_Y[:150]), [], "150"),
        (lambda p: _csv(p, "a,b\n1,2\n3,4\n"), [], "label"),
        (lambda p: _csv(p, "a,label\n1,0\nx,1\n"), [], "data.csv"),
        (lambda p: "digits", ["--alpha", "0"], "alpha"),
        (lambda p: "digits", ["--alpha", "-1"], "alpha"),
        (lambda p: _npz(p, x=GOOD_X[:20], y=GOOD_Y[:20]), ["--clients", "30", "--set", "min-partition-size=1"], "30"),
        (lambda p: _npz(p, x=GOOD_X, y=np.full(200, 2)), ["--clients", "2"], "one class only"),
    ],
    ids=[
        "unknown-dataset",
        "missing-file",
        "malformed-npz",
        "nan-features",
        "negative-labels",
        "fractional-labels",
        "length-mismatch",
        "csv-no-label",
        "csv-non-numeric",
        "alpha-zero",
        "alpha-negative",
        "more-clients-than-samples",
        "one-class",
    ],
)
def test_bad_input_gives_one_clear_error(tmp_path: Path, make_spec, extra: list[str], expected: str) -> None:
    code, output = _simulate(tmp_path, "--dataset", make_spec(tmp_path), *extra)
    assert code == 2, output
    assert "error:" in output
    assert expected in output
    assert "Traceback" not in output
    assert not (tmp_path / "run").exists(), "nothing may be written for a run that never started"


def test_unknown_set_key_is_named(tmp_path: Path) -> None:
    code, output = _simulate(tmp_path, "--set", "lerning-rate=0.1")
    assert code == 2
    assert "lerning-rate" in output


def test_existing_run_directory_is_not_overwritten(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    code, output = _simulate(tmp_path, "--dataset", "digits", "--clients", "2")
    assert code == 2
    assert "not empty" in output
    assert (run / "summary.json").read_text() == "{}"


@pytest.mark.parametrize(
    ("text", "extra", "expected"),
    [
        ("events: [{kind: join, sites: [0], from-round: soon}]", [], "events[0].from-round must be an integer >= 1"),
        ("events: [{kind: join, sites: [5], from-round: 2}]", ["--clients", "3"], "names site 5, but the simulation"),
        ("tasks: {rounds-per-task: 2, classes: [[0, 11]]}", [], "classes [11] do not exist"),
        ("tasks: [oops", [], "not readable YAML"),
    ],
    ids=["bad-field", "absent-site", "absent-class", "not-yaml"],
)
def test_a_bad_scenario_is_refused_before_the_engine_starts(
    tmp_path: Path, text: str, extra: list[str], expected: str
) -> None:
    path = tmp_path / "scenario.yaml"
    path.write_text(text + "\n")
    code, output = _simulate(tmp_path, "--dataset", "digits", "--scenario", str(path), *extra)
    assert code == 2, output
    assert "scenario" in output and expected in " ".join(output.split())
    assert not (tmp_path / "run").exists()


def test_an_unknown_scenario_name_lists_the_bundled_ones(tmp_path: Path) -> None:
    code, output = _simulate(tmp_path, "--scenario", "split-fashion")
    assert code == 2
    assert "split-fashion" in output and "split-mnist" in output
