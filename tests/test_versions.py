"""Model versions: numbers only grow, the keep policy, export with a model card, pin and promote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from stamen.cli.main import app
from stamen.common.errors import StamenError, StateError
from stamen.server.promotion import export_version, list_versions, pin, promote
from stamen.server.versions import ModelInfo, VersionRegistry, read_releases

MODEL = ModelInfo("cnn8", (1, 8, 8), 10)


def _arrays(version: int) -> dict[str, np.ndarray]:
    return {"fc.weight": np.full((2, 3), version, dtype=np.float32), "fc.bias": np.zeros(2, dtype=np.float32)}


def _entry(server_round: int, parent: int, accuracy: float) -> dict[str, object]:
    return {
        "round": server_round,
        "parent": parent,
        "status": "ok",
        "metrics": {"accuracy": accuracy, "loss": 1 - accuracy, "source": "centralized"},
        "contributors": ["site-0000", "site-0002"],
        "epsilon": {"site-0000": 1.5 + server_round, "site-0001": 0.5, "site-0002": 2.0 + server_round},
    }


def _registry(run_dir: Path, accuracies: list[float], keep: int = 0) -> VersionRegistry:
    registry = VersionRegistry(run_dir, MODEL, keep)
    best, best_acc = 0, -1.0
    for i, acc in enumerate(accuracies, start=1):
        if acc > best_acc:
            best, best_acc = i, acc
        registry.add(i, _arrays(i), _entry(i, i - 1, acc), best=best)
    (run_dir / "config.json").write_text(
        json.dumps({"config": {"dp": True, "delta": 1e-5, "accountant": "rdp", "dataset": "digits"}, "git_commit": "x"})
    )
    return registry


def test_numbers_only_grow_and_survive_a_reload(tmp_path: Path) -> None:
    registry = _registry(tmp_path, [0.5, 0.6])
    with pytest.raises(StateError, match="numbers only grow"):
        registry.add(2, _arrays(2), _entry(3, 2, 0.7), best=2)
    again = VersionRegistry(tmp_path, MODEL, keep=0)
    assert again.highest == 2
    assert again.abandon_after(1) == [2]
    assert again.entry(2)["status"] == "abandoned"
    assert VersionRegistry(tmp_path, MODEL, keep=0).highest == 2, "an abandoned number is never given out again"


def test_keep_policy_prunes_files_but_keeps_entries_best_and_released(tmp_path: Path) -> None:
    registry = _registry(tmp_path, [0.5, 0.9], keep=2)
    pin(tmp_path, 1)
    for i, acc in enumerate([0.6, 0.6, 0.6, 0.6], start=3):
        registry.add(i, _arrays(i), _entry(i, i - 1, acc), best=2)
    files = {e["version"]: e["file"] for e in list_versions(tmp_path)}
    assert sorted(files) == [1, 2, 3, 4, 5, 6]
    assert {v for v, f in files.items() if f} == {1, 2, 5, 6}, "released 1, best 2, newest two 5 and 6"
    assert sorted(p.name for p in (tmp_path / "versions").glob("*.safetensors")) == [
        "v00000001.safetensors",
        "v00000002.safetensors",
        "v00000005.safetensors",
        "v00000006.safetensors",
    ]
    with pytest.raises(StamenError, match="pruned"):
        export_version(tmp_path, 3, tmp_path / "v3.safetensors")


def test_export_writes_the_model_and_a_card_with_each_sites_epsilon(tmp_path: Path) -> None:
    _registry(tmp_path, [0.5, 0.8])
    out, card_json, card_md = export_version(tmp_path, 2, tmp_path / "export" / "m.safetensors")
    np.testing.assert_array_equal(load_file(out)["fc.weight"], _arrays(2)["fc.weight"])
    card = json.loads(card_json.read_text())
    assert (card["version"], card["round"], card["parent"]) == (2, 2, 1)
    assert card["metrics"]["accuracy"] == 0.8
    assert card["contributors"] == ["site-0000", "site-0002"]
    assert card["privacy"]["epsilon_per_site"] == {"site-0000": 3.5, "site-0001": 0.5, "site-0002": 4.0}
    assert card["privacy"]["epsilon_max"] == 4.0 and card["privacy"]["delta"] == 1e-5
    assert card["model"] == {"name": "cnn8", "input_shape": [1, 8, 8], "num_classes": 10}
    text = card_md.read_text()
    assert "version 2" in text and "| site-0002 | 4.0000 |" in text


def test_pin_releases_exactly_and_promote_refuses_a_worse_version(tmp_path: Path) -> None:
    _registry(tmp_path, [0.5, 0.9, 0.7])
    with pytest.raises(StamenError, match="no released version"):
        export_version(tmp_path, None, tmp_path / "r.safetensors")
    assert promote(tmp_path)["version"] == 2, "promote without a version releases the best"
    with pytest.raises(StamenError, match=r"worse than the released version 2"):
        promote(tmp_path, 3)
    assert promote(tmp_path, 3, force=True) == {"version": 3, "previous": 2, "action": "promote"}
    assert pin(tmp_path, 1) == {"version": 1, "previous": 3, "action": "pin"}
    out, *_ = export_version(tmp_path, None, tmp_path / "r.safetensors")
    np.testing.assert_array_equal(load_file(out)["fc.weight"], _arrays(1)["fc.weight"])
    assert [e["version"] for e in read_releases(tmp_path)["log"]] == [2, 3, 1]
    with pytest.raises(StamenError, match="no model version 9"):
        pin(tmp_path, 9)


def test_the_versions_commands(tmp_path: Path) -> None:
    _registry(tmp_path, [0.5, 0.9])
    runner = CliRunner()
    listed = runner.invoke(app, ["versions", "list", str(tmp_path)])
    assert listed.exit_code == 0, listed.output
    assert "0.9000" in listed.output and "ok" in listed.output
    assert runner.invoke(app, ["versions", "pin", str(tmp_path), "1"]).exit_code == 0
    out = tmp_path / "rel.safetensors"
    exported = runner.invoke(app, ["versions", "export", str(tmp_path), "--released", "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    assert json.loads((tmp_path / "rel.card.json").read_text())["version"] == 1
    bad = runner.invoke(app, ["versions", "promote", str(tmp_path), "7"])
    assert bad.exit_code == 2 and "no model version 7" in " ".join(bad.output.split())
    missing = runner.invoke(app, ["versions", "list", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "has no model versions" in " ".join(missing.output.split())


def test_a_rollback_marks_the_abandoned_line_back_to_the_target(tmp_path: Path) -> None:
    registry = _registry(tmp_path, [0.5, 0.9, 0.2, 0.1])
    assert registry.roll_back(4, 2) == [4, 3]
    registry.add(5, _arrays(5), _entry(5, 2, 0.95), best=5)
    assert [e["status"] for e in list_versions(tmp_path)] == ["ok", "ok", "rolled_back", "rolled_back", "ok"]
    with pytest.raises(StamenError, match="status 'rolled_back'"):
        promote(tmp_path, 3, force=True)


def test_an_index_of_another_schema_is_refused_not_rebuilt(tmp_path: Path) -> None:
    _registry(tmp_path, [0.5])
    index = tmp_path / "versions" / "index.json"
    index.write_text(json.dumps({"schema": 99, "versions": []}))
    with pytest.raises(StateError, match="schema 99"):
        VersionRegistry(tmp_path, MODEL, 0)
    assert json.loads(index.read_text())["schema"] == 99, "a newer stamen's index is left as it is"
