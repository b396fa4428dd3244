"""Checkpoint store: round trip, rotation, fall-back over corruption, schema and resume checks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from stamen.common.errors import StateError
from stamen.server.checkpoint import CHECKPOINT_SCHEMA_VERSION, Checkpoint, CheckpointStore, config_changes


def _checkpoint(server_round: int) -> Checkpoint:
    rng = np.random.default_rng(server_round)
    return Checkpoint(
        round=server_round,
        version=server_round + 10,
        arrays={
            "model": {"conv.weight": rng.random((2, 3), dtype=np.float32), "steps": np.array([server_round])},
            "optimizer:momentum": {"conv.weight": rng.random((2, 3), dtype=np.float32)},
        },
        state={"sampler": {"state": 2**100 + server_round}, "history": [{"round": server_round, "loss": 0.5}]},
    )


def _saved(tmp_path: Path, rounds: range, keep: int = 10) -> CheckpointStore:
    store = CheckpointStore(tmp_path)
    for r in rounds:
        store.save(_checkpoint(r), keep=keep)
    return store


def test_a_checkpoint_reads_back_exactly(tmp_path: Path) -> None:
    store = _saved(tmp_path, range(1, 2))
    got = store.load_latest()
    want = _checkpoint(1)
    assert (got.round, got.version, got.state) == (1, 11, want.state)
    for group, arrays in want.arrays.items():
        assert set(got.arrays[group]) == set(arrays)
        for name, value in arrays.items():
            np.testing.assert_array_equal(got.arrays[group][name], value)
            assert got.arrays[group][name].dtype == value.dtype


def test_only_the_newest_k_are_kept(tmp_path: Path) -> None:
    store = _saved(tmp_path, range(1, 7), keep=3)
    assert store.rounds() == [6, 5, 4]
    assert sorted(p.name for p in store.dir.iterdir()) == [
        f"ckpt-{r:08d}.{ext}" for r in (4, 5, 6) for ext in ("json", "safetensors")
    ]


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: (d / "ckpt-00000003.safetensors").write_bytes(b"\0" * 10),
        lambda d: (d / "ckpt-00000003.safetensors").unlink(),
        lambda d: (d / "ckpt-00000003.json").write_text('{"schema": 1, "round": 3'),
        lambda d: (d / "ckpt-00000003.json").write_text(
            json.dumps({**json.loads((d / "ckpt-00000003.json").read_text()), "arrays_sha256": "0" * 64})
        ),
    ],
    ids=["truncated-arrays", "missing-arrays", "truncated-record", "checksum-mismatch"],
)
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, corrupt: object, caplog: pytest.LogCaptureFixture
) -> None:
    store = _saved(tmp_path, range(1, 4))
    corrupt(store.dir)  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="stamen.server"):
        got = store.load_latest()
    assert got.round == 2
    np.testing.assert_array_equal(got.arrays["model"]["conv.weight"], _checkpoint(2).arrays["model"]["conv.weight"])
    assert "checkpoint of round 3 is unusable" in caplog.text
    assert "resuming from the checkpoint of round 2, not the newest (round 3)" in caplog.text


def test_no_valid_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no checkpoint in"):
        CheckpointStore(tmp_path).load_latest()
    store = _saved(tmp_path, range(1, 3))
    for path in store.dir.glob("*.safetensors"):
        path.write_bytes(b"garbage")
    with pytest.raises(StateError, match=r"no valid checkpoint in .*ckpt-00000002.*ckpt-00000001"):
        store.load_latest()


def test_another_schema_is_an_error_not_a_fall_back(tmp_path: Path) -> None:
    store = _saved(tmp_path, range(1, 3))
    path = store.dir / "ckpt-00000002.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "schema": CHECKPOINT_SCHEMA_VERSION + 1}))
    with pytest.raises(StateError, match=f"schema {CHECKPOINT_SCHEMA_VERSION + 1}.*reads checkpoint schema"):
        store.load_latest()


def test_an_orphan_arrays_file_from_a_crash_is_ignored(tmp_path: Path) -> None:
    store = _saved(tmp_path, range(1, 3))
    (store.dir / "ckpt-00000003.safetensors").write_bytes(b"half written")  # the record was never written
    assert store.load_latest().round == 2
    store.save(_checkpoint(3), keep=2)
    assert store.load_latest().round == 3
    store.save(_checkpoint(4), keep=2)
    assert sorted(p.name for p in store.dir.glob("*.safetensors")) == [
        "ckpt-00000003.safetensors",
        "ckpt-00000004.safetensors",
    ]


def test_resume_may_change_the_horizon_but_not_what_the_state_means() -> None:
    saved = {"num-server-rounds": 3, "seed": 1, "lr": 0.1, "dataset": "digits"}
    assert config_changes(saved, {**saved, "num-server-rounds": 6}) == {"num-server-rounds": [3, 6]}
    with pytest.raises(StateError, match=r"cannot change dataset \('digits' -> 'mnist5k'\), seed \(1 -> 2\)"):
        config_changes(saved, {**saved, "seed": 2, "dataset": "mnist5k"})
