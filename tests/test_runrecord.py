"""The run record (config.json): everything needed to reproduce a run, written atomically."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from stamen.common.config import KEYS, StamenConfig
from stamen.common.runrecord import (
    RUN_RECORD_SCHEMA_VERSION,
    build_run_record,
    derive_seeds,
    git_commit,
    write_run_record,
)
from stamen.server.dp_fedavg import seeded_noise_seed

CFG = StamenConfig.from_mapping({"seed": 7, "lr": 0.1, "strategy": "fedadam", "dataset": "digits"})


@pytest.fixture
def record(tmp_path: Path) -> dict[str, Any]:
    """A record as the server writes it, read back from disk."""
    path = write_run_record(tmp_path, build_run_record(CFG, extra={"model": "mlp"}))
    assert path == tmp_path / "config.json"
    return json.loads(path.read_text())


def test_holds_the_full_resolved_config(record: dict[str, Any]) -> None:
    assert set(record["config"]) == {k.name for k in KEYS}
    assert record["config"] == CFG.as_dict()
    assert (record["config"]["seed"], record["config"]["lr"], record["config"]["strategy"]) == (7, 0.1, "fedadam")
    assert record["config"]["num-server-rounds"] == 20  # defaults are recorded too


def test_holds_package_versions(record: dict[str, Any]) -> None:
    versions = record["versions"]
    for name in ("flwr", "torch", "numpy"):
        assert versions[name] is not None
        assert versions[name] == metadata.version(name)
    assert versions["python"]


def test_holds_every_derived_seed(record: dict[str, Any]) -> None:
    assert record["seeds"] == derive_seeds(7)
    assert {"master", "model_init", "sampling", "partition", "client"} <= set(record["seeds"])
    assert record["seeds"]["master"] == 7


def test_holds_schema_git_commit_and_extras(record: dict[str, Any]) -> None:
    assert record["schema"] == RUN_RECORD_SCHEMA_VERSION
    assert "git_commit" in record
    commit = record["git_commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit)
    assert record["model"] == "mlp"
    assert record["created"]


def test_the_record_lists_no_dp_noise_seed_and_a_seeded_run_keeps_its_server_noise_seed(
    record: dict[str, Any],
) -> None:
    """DP noise is secret; the seeded server noise keeps seed + 4, which older records list as
    ``seeds.server_noise``, so an older seeded run still reproduces."""
    assert "server_noise" not in record["seeds"] and "server_noise" not in derive_seeds(7)
    assert seeded_noise_seed(7) == 7 + 4
    assert seeded_noise_seed(7) not in derive_seeds(7).values()


def test_derived_seeds_follow_the_master_seed() -> None:
    assert derive_seeds(7) != derive_seeds(8)
    assert all(isinstance(v, int) for v in derive_seeds(7).values())


def test_git_commit_outside_git_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_commit(tmp_path) is None


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_commit_names_head_and_local_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.txt").write_text("1")
    git("add", "a.txt")
    git("commit", "-q", "-m", "first")
    head = git("rev-parse", "HEAD")
    assert git_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("2")
    assert git_commit(tmp_path) == head + "+dirty"


def test_rewrite_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_run_record(tmp_path, build_run_record(CFG))
    before = path.read_text()

    def crash(*_: object) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        write_run_record(tmp_path, build_run_record(CFG.replace(seed=8)))
    monkeypatch.undo()
    assert path.read_text() == before
    assert json.loads(before)["seeds"] == derive_seeds(7)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
