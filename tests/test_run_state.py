"""The run-state registry: every stateful part of a Federation registered, saved and restored as one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stamen.common.config import StamenConfig
from stamen.common.drift import PageHinkley
from stamen.common.errors import ConfigError, StateError
from stamen.common.stateful import Stateful
from stamen.server.checkpoint import CheckpointStore
from stamen.server.drift_watch import GLOBAL, DriftWatch
from stamen.server.exporter import Exporter
from stamen.server.loop import Federation
from stamen.server.rollback import DivergenceRule
from stamen.server.run_state import Attributes, RunState, join_arrays, split_arrays

BASE = {"dataset": "digits", "num-server-rounds": 4, "min-partition-size": 10}


def _federation(out: Path, **extra: Any) -> Federation:
    # No grid is used before the first round: construction only builds state.
    return Federation(None, StamenConfig.from_mapping({**BASE, **extra}), out)  # type: ignore[arg-type]


class _Number:
    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = int(state["n"])


def test_parts_round_trip_and_names_are_unique() -> None:
    state, part = RunState(), _Number()
    state.register("number", part)
    part.n = 7
    saved = state.state_dict()
    part.n = 0
    state.load_state_dict(saved)
    assert part.n == 7 and state.names == ["number"] and part in state
    with pytest.raises(ValueError, match="registered twice"):
        state.register("number", _Number())
    with pytest.raises(TypeError, match="no state_dict"):
        state.register("plain", object())  # type: ignore[arg-type]


def test_a_checkpoint_missing_a_part_or_with_an_unknown_one_is_refused_before_any_change() -> None:
    state, a, b = RunState(), _Number(), _Number()
    state.register("a", a)
    state.register("b", b)
    with pytest.raises(StateError, match="lacks b"):
        state.load_state_dict({"a": {"n": 3}})
    with pytest.raises(StateError, match="unknown part"):
        state.load_state_dict({"a": {"n": 3}, "b": {"n": 4}, "c": {"n": 5}})
    assert a.n == b.n == 0, "nothing was loaded from a checkpoint that does not match"


def test_a_checkpoint_of_an_older_stamen_resumes_without_a_part_added_later(caplog: pytest.LogCaptureFixture) -> None:
    state, old, new = RunState(), _Number(), _Number()
    state.register("old", old)
    state.register("new", new, added_later=True)
    new.n = 0
    state.load_state_dict({"old": {"n": 3}})
    assert (old.n, new.n) == (3, 0) and "'new'" in caplog.text
    with pytest.raises(StateError, match="lacks old"):
        state.load_state_dict({"new": {"n": 1}})


def test_array_groups_go_to_safetensors_and_come_back() -> None:
    w = {"w": np.arange(3, dtype=np.float32)}
    parts, arrays = split_arrays({"model": {"name": "m", "arrays": w}, "optimizer": {"momentum": w}, "rule": {}})
    assert parts == {"model": {"name": "m"}, "optimizer": {}, "rule": {}}
    assert set(arrays) == {"model:arrays", "optimizer:momentum"}
    joined = join_arrays(parts, arrays)
    assert joined["model"]["name"] == "m" and joined["optimizer"]["momentum"] is w
    with pytest.raises(StateError, match="belongs to no saved run-state part"):
        join_arrays({}, arrays)


def _claimed(fed: Federation) -> tuple[set[str], list[object]]:
    """Attribute names of ``fed`` saved by adapter parts, and the other objects adapters save from."""
    names: set[str] = set()
    owners: list[object] = []
    for _, part in fed.state:
        owner = getattr(part, "owner", None)
        attributes = part.loaders if isinstance(part, Attributes) else getattr(part, "attributes", ())
        if owner is fed:
            names.update(attributes)
        elif owner is not None:
            owners.append(owner)
    return names, owners


def _unaccounted(fed: Federation) -> list[str]:
    """Attributes of ``fed`` that are neither registered run state nor declared transient."""
    names, owners = _claimed(fed)
    found = []
    for name, value in vars(fed).items():
        if name in Federation.TRANSIENT or name in names or value in fed.state or value is None:
            continue
        if any(value is o for o in owners):  # a holder (the observer): what stateful it holds is registered itself
            found += [f"{name}.{n}" for n, v in vars(value).items() if isinstance(v, Stateful) and v not in fed.state]
        else:
            found.append(name)
    return found


@pytest.mark.parametrize("extra", [{}, {"server-dp-clip": 1.0, "server-dp-noise": 1.0}], ids=["plain", "server-dp"])
def test_every_stateful_part_of_a_federation_is_registered(tmp_path: Path, extra: dict[str, Any]) -> None:
    """Fails when someone adds state to a Federation and forgets to register it (or to say why not)."""
    fed = _federation(tmp_path / "run", **extra)
    assert _unaccounted(fed) == [], "neither registered in Federation.state nor listed in Federation.TRANSIENT"
    assert fed.observer.drift in fed.state and fed.observer.exporter in fed.state
    assert ("server_dp" in fed.state.names) == bool(extra)
    assert not set(Federation.TRANSIENT) - set(vars(fed)), "TRANSIENT names only real attributes"


def test_the_registry_check_catches_a_forgotten_part(tmp_path: Path) -> None:
    fed = _federation(tmp_path / "run")
    fed.second_rule = DivergenceRule(2, 0.1)  # type: ignore[attr-defined]
    fed.observer.extra_detector = DivergenceRule(2, 0.1)  # type: ignore[attr-defined]
    fed.seen_sites = {"site-0000"}  # type: ignore[attr-defined]
    assert sorted(_unaccounted(fed)) == ["observer.extra_detector", "second_rule", "seen_sites"]


def _comparable(state: dict[str, Any]) -> dict[str, Any]:
    parts, arrays = split_arrays(state)
    parts["run"].pop("resumes")
    return {"parts": parts, "arrays": {g: {k: v.tolist() for k, v in a.items()} for g, a in arrays.items()}}


def test_a_resumed_federation_holds_the_state_it_saved(tmp_path: Path) -> None:
    out = tmp_path / "run"
    fed = _federation(out)
    fed.arrays = {k: v + 1 for k, v in fed.arrays.items()}
    fed.sampler.sample([f"site-{i}" for i in range(5)], 0.5)
    fed.best.improve(2, 0.5, 1.2, fed.arrays, 2)
    fed.totals.update(sampled=4, replied=3)
    fed.version, fed.empty, fed.privacy = 2, 1, {"site-0000": {"epsilon": 1.5}}
    fed.rule.streak = 1
    fed.directory.rejected["schema"] += 1
    drift = fed.observer.drift
    for loss in (1.0, 0.9, 0.8, 3.0):
        drift.global_loss(1, loss)
    drift.global_loss(2, 0.7)
    drift.per_site["site-0000"] = {"round": [1], "label_psi": [0.3]}
    fed.observer.exporter.rollbacks.inc(2)
    fed.observer.rollbacks_seen = 2
    fed.outputs.add_round({"round": 1, "loss": 1.0})
    fed._save_checkpoint(2, elapsed=12.5)

    again = _federation(out, **{"resume-from": str(out)})
    assert drift.detections and again.observer.drift.detections == drift.detections
    assert again.observer.drift.detectors[GLOBAL] == drift.detectors[GLOBAL]
    assert _comparable(again.state.state_dict()) == _comparable(fed.state.state_dict())
    assert again.start_round == 3 and again.elapsed_before == 12.5
    assert list(again.arrays) == list(fed.arrays) and list(again.best.arrays or {}) == list(fed.arrays)
    assert again.observer.exporter.state_dict()["counters"]["stamen_rollbacks"] == [[{}, 2.0]]
    assert again.resumes[-1]["after_round"] == 2


def test_a_checkpoint_without_run_state_parts_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    fed = _federation(out)
    fed._save_checkpoint(1, elapsed=1.0)
    ckpt = CheckpointStore(out).load_latest()
    del ckpt.state["parts"]["drift"]
    with pytest.raises(StateError, match="lacks drift"):
        fed.state.load_state_dict(join_arrays(ckpt.state["parts"], ckpt.arrays))


def test_drift_detectors_continue_across_a_checkpoint_exactly() -> None:
    cfg = StamenConfig.from_mapping({**BASE, "drift-ph-threshold": 0.3})
    series = [1.0, 0.8, 0.7, 0.65, 1.2, 1.5, 0.6, 0.5, 0.5, 1.4, 1.6, 1.7]
    straight, first = DriftWatch(cfg), DriftWatch(cfg)
    for r, loss in enumerate(series, start=1):
        straight.global_loss(r, loss)
    for r, loss in enumerate(series[:6], start=1):
        first.global_loss(r, loss)
    resumed = DriftWatch(cfg)
    resumed.load_state_dict(first.state_dict())
    for r, loss in enumerate(series[6:], start=7):
        resumed.global_loss(r, loss)
    assert len(straight.detections) >= 2 and any(d["round"] <= 6 for d in straight.detections)
    assert resumed.summary() == straight.summary()


def test_page_hinkley_refuses_an_unknown_field() -> None:
    with pytest.raises(StateError, match="unknown field"):
        PageHinkley(0.5, 0.005).load_state_dict({"bogus": 1.0})


def test_exporter_counters_continue_after_a_resume() -> None:
    cfg = StamenConfig.from_mapping({**BASE, "metrics-max-sites": 1})
    ex = Exporter(cfg)
    ex.counters["sampled"].inc(5)
    ex.rejected.labels("schema").inc(2)
    ex.count_site_detections({"site-0000": True, "site-0001": True})
    again = Exporter(cfg)
    again.load_state_dict(ex.state_dict())
    assert again.state_dict() == ex.state_dict()
    assert again.labels("site-0001") == "other" and again.labels("site-0000") == "site-0000"


def test_history_csv_keeps_its_column_order_across_a_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    fed = _federation(out)
    fed.outputs.add_round({"round": 1, "sampled": 2, "loss": 1.0})
    fed.outputs.add_round({"round": 2, "sampled": 2, "loss": 0.9, "rolled_back_to": 1, "accuracy": 0.5})
    header = (out / "history.csv").read_text().splitlines()[0]
    assert header == "round,sampled,loss,rolled_back_to,accuracy"
    fed._save_checkpoint(2, elapsed=1.0)
    (out / "history.csv").unlink()
    again = _federation(out, **{"resume-from": str(out)})
    assert (out / "history.csv").read_text().splitlines()[0] == header
    assert again.outputs.history == fed.outputs.history


def _add_version(fed: Federation, server_round: int) -> None:
    fed._new_version([f"site-000{server_round}"])
    fed.privacy = {"site-0000": {"epsilon": 0.5 * server_round}}
    fed._register_version(server_round, {"round": server_round, "loss": 1.0, "accuracy": 0.1 * server_round})


def _stale_temp(directory: Path, name: str) -> Path:
    path = directory / f".{name}.k1ll3d_x.tmp"  # the name atomic_write_bytes gives its temp file
    path.write_bytes(b"half a write")
    os.utime(path, (0, 0))
    return path


@pytest.mark.parametrize("damage", ["{ torn", "", '{"schema": 1}'], ids=["torn", "empty", "no-versions"])
def test_a_corrupt_versions_index_is_rebuilt_from_the_checkpoint_on_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    out = tmp_path / "run"
    fed = _federation(out)
    for server_round in (1, 2):
        _add_version(fed, server_round)
    fed._save_checkpoint(2, elapsed=3.0)
    _add_version(fed, 3)  # made after the checkpoint: lost to the crash, its number never reused
    index = out / "versions" / "index.json"
    before = json.loads(index.read_text())["versions"]
    index.write_text(damage)
    stale = [_stale_temp(out / "checkpoints", "ckpt-00000003.json"), _stale_temp(out / "versions", "index.json")]
    kept = out / "checkpoints" / "notes.tmp"
    kept.write_text("not ours")

    with pytest.raises(ConfigError, match="already holds"):
        _federation(out)  # only a resume rebuilds: a new run in its directory is still refused
    with caplog.at_level("WARNING", logger="stamen"):
        again = _federation(out, **{"resume-from": str(out)})

    after = json.loads(index.read_text())
    assert [e["version"] for e in after["versions"]] == [1, 2, 3]
    assert after["versions"][:2] == before[:2], "contributors, epsilon and metrics come back from the checkpoint"
    assert after["versions"][2]["status"] == "abandoned" and after["versions"][2]["round"] == 3
    assert again.resumes[-1]["abandoned_versions"] == [3] and again.start_round == 3
    (aside,) = (out / "versions").glob("index.json.corrupt-*")
    assert aside.read_text() == damage, "the damaged file is kept"
    assert "rebuilt it from the checkpoint" in caplog.text
    assert not any(p.exists() for p in stale) and kept.exists()
    _add_version(again, 3)
    assert [e["version"] for e in json.loads(index.read_text())["versions"]] == [1, 2, 3, 4]
