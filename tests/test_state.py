"""The per-site state store: round trips, crash-safe writes, and clear errors on bad state."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from stamen.common.errors import ConfigError, StateError
from stamen.common.state import STATE_SCHEMA_VERSION, SiteStore, atomic_write_bytes

SITE = "site-0001"


@pytest.fixture
def store(tmp_path: Path) -> SiteStore:
    return SiteStore(tmp_path / "sites", SITE)


def mode(path: Path) -> int:
    """Permission bits of ``path``."""
    return stat.S_IMODE(path.stat().st_mode)


def crash(*_: object, **__: object) -> None:
    """Stands in for a system call that dies mid-write."""
    raise OSError("simulated crash")


# --- layout and round trips ------------------------------------------------------------


def test_store_lives_under_root_slash_site_id(tmp_path: Path, store: SiteStore) -> None:
    assert store.dir == tmp_path / "sites" / SITE
    assert store.dir.is_dir()
    assert mode(store.dir) == 0o700


def test_reopening_keeps_what_was_stored(tmp_path: Path, store: SiteStore) -> None:
    store.write_json("ledger", {"epsilon": 1.5})
    assert SiteStore(tmp_path / "sites", SITE).read_json("ledger") == {"epsilon": 1.5}


def test_invalid_site_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        SiteStore(tmp_path, "../escape")
    assert list(tmp_path.iterdir()) == []


def test_json_round_trip(store: SiteStore) -> None:
    data = {"rounds": [1, 2, 5], "epsilon": 0.25, "nested": {"a": None, "b": "x"}, "flag": True}
    store.write_json("ledger", data)
    assert store.read_json("ledger") == data
    store.write_json("ledger", [3])
    assert store.read_json("ledger") == [3]


def test_json_file_is_versioned_and_owner_only(store: SiteStore) -> None:
    store.write_json("ledger", {"x": 1})
    path = store.dir / "ledger.json"
    assert json.loads(path.read_text()) == {"schema": STATE_SCHEMA_VERSION, "data": {"x": 1}}
    assert mode(path) == 0o600


def test_missing_entries_give_the_default(store: SiteStore) -> None:
    assert store.read_json("nothing") is None
    assert store.read_json("nothing", default={"fresh": True}) == {"fresh": True}
    assert store.read_arrays("nothing") is None


def test_arrays_round_trip(store: SiteStore) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.normal(size=(3, 4)).astype(np.float32),
        "transposed": rng.normal(size=(2, 5)).T,  # not C-contiguous
        "counts": np.arange(7, dtype=np.int64),
        "scalar": np.array(2.5),
    }
    store.write_arrays("replay", arrays)
    loaded = store.read_arrays("replay")
    assert loaded is not None and set(loaded) == set(arrays)
    for key, value in arrays.items():
        assert loaded[key].dtype == value.dtype
        np.testing.assert_array_equal(loaded[key], value)
    assert mode(store.dir / "replay.safetensors") == 0o600


@pytest.mark.parametrize("file_mode", [0o600, 0o640])
def test_atomic_write_sets_the_mode_asked_for(tmp_path: Path, file_mode: int) -> None:
    path = tmp_path / "deep" / "er" / "f.bin"
    atomic_write_bytes(path, b"abc", mode=file_mode)
    assert path.read_bytes() == b"abc"
    assert mode(path) == file_mode


# --- crash safety --------------------------------------------------------------------------


@pytest.mark.parametrize("syscall", ["replace", "fsync"])
def test_crash_mid_json_write_keeps_old_content_and_no_temp_files(
    store: SiteStore, monkeypatch: pytest.MonkeyPatch, syscall: str
) -> None:
    store.write_json("ledger", {"version": 1})
    monkeypatch.setattr(os, syscall, crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.write_json("ledger", {"version": 2})
    monkeypatch.undo()
    assert store.read_json("ledger") == {"version": 1}
    assert sorted(p.name for p in store.dir.iterdir()) == ["ledger.json"]


def test_crash_mid_arrays_write_keeps_old_content_and_no_temp_files(
    store: SiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write_arrays("replay", {"x": np.ones(3)})
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.write_arrays("replay", {"x": np.zeros(3)})
    monkeypatch.undo()
    loaded = store.read_arrays("replay")
    assert loaded is not None
    np.testing.assert_array_equal(loaded["x"], np.ones(3))
    assert sorted(p.name for p in store.dir.iterdir()) == ["replay.safetensors"]


def test_crash_on_first_write_leaves_nothing(store: SiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.write_json("ledger", {"version": 1})
    monkeypatch.undo()
    assert list(store.dir.iterdir()) == []
    assert store.read_json("ledger") is None


# --- bad state -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"\xff\xfe\x00garbage", b'{"schema": 1, "data": '],
    ids=["syntax", "empty", "not-utf8", "truncated"],
)
def test_corrupt_json_is_a_state_error_naming_the_file(store: SiteStore, content: bytes) -> None:
    path = store.dir / "ledger.json"
    path.write_bytes(content)
    with pytest.raises(StateError, match="unreadable") as info:
        store.read_json("ledger")
    assert str(path) in str(info.value)


def test_unreadable_json_is_a_state_error_naming_the_file(store: SiteStore) -> None:
    path = store.dir / "ledger.json"
    path.mkdir()  # reading a directory fails with an OSError even for root
    with pytest.raises(StateError) as info:
        store.read_json("ledger")
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "doc",
    [{"schema": STATE_SCHEMA_VERSION + 1, "data": 1}, {"schema": 0, "data": 1}, {"data": 1}, [1, 2], "text"],
    ids=["newer", "older", "unversioned", "list", "string"],
)
def test_other_schema_is_a_state_error_naming_the_file(store: SiteStore, doc: object) -> None:
    path = store.dir / "ledger.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(StateError, match="schema") as info:
        store.read_json("ledger")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"garbage", b"\xff" * 32])
def test_corrupt_arrays_are_a_state_error_naming_the_file(store: SiteStore, content: bytes) -> None:
    path = store.dir / "replay.safetensors"
    path.write_bytes(content)
    with pytest.raises(StateError) as info:
        store.read_arrays("replay")
    assert str(path) in str(info.value)


OPERATIONS: dict[str, Callable[[SiteStore, str], object]] = {
    "read_json": lambda s, name: s.read_json(name),
    "write_json": lambda s, name: s.write_json(name, {}),
    "read_arrays": lambda s, name: s.read_arrays(name),
    "write_arrays": lambda s, name: s.write_arrays(name, {"x": np.zeros(1)}),
}


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", ".hidden", ""])
def test_bad_entry_names_are_state_errors(tmp_path: Path, store: SiteStore, operation: str, name: str) -> None:
    with pytest.raises(StateError, match="plain file name"):
        OPERATIONS[operation](store, name)
    assert list(store.dir.iterdir()) == []
    assert sorted(tmp_path.rglob("*")) == [tmp_path / "sites", store.dir]


@pytest.mark.parametrize(("durable", "fsyncs"), [(True, 2), (False, 0)])
def test_a_durable_write_syncs_file_and_directory_and_a_light_one_neither(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool, fsyncs: int
) -> None:
    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    path = tmp_path / "entry.json"
    path.write_text("old")
    atomic_write_bytes(path, b"new", durable=durable)
    assert path.read_bytes() == b"new"
    assert len(calls) == fsyncs
    assert [p.name for p in tmp_path.iterdir()] == ["entry.json"], "no temporary file is left behind"


def killed_write(path: Path) -> Path:
    """The temp file a process killed inside :func:`atomic_write_bytes` leaves (before its rename)."""
    script = (
        "import os, sys\n"
        "from stamen.common import state\n"
        "os.replace = lambda *a: os._exit(9)\n"
        "state.atomic_write_bytes(sys.argv[1], b'half')\n"
    )
    assert subprocess.run([sys.executable, "-c", script, str(path)], timeout=60).returncode == 9
    (left,) = [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
    old = time.time() - 3600
    os.utime(left, (old, old))
    return left


def test_opening_a_site_store_removes_stale_temp_files_and_nothing_else(tmp_path: Path, store: SiteStore) -> None:
    store.write_json("ledger", {"x": 1})
    stale = [killed_write(store.dir / "ledger.json"), killed_write(store.dir / "replay.safetensors")]
    fresh = store.dir / ".ledger.json.abcd1234.tmp"  # a write in progress in another process
    fresh.write_bytes(b"")
    others = [store.dir / n for n in (".hidden", "notes.tmp", ".ledger.json.tmp", ".x.toolong123.tmp")]
    for path in others:
        path.write_bytes(b"keep")
        os.utime(path, (0, 0))
    SiteStore(tmp_path / "sites", SITE)
    assert not any(p.exists() for p in stale)
    assert fresh.exists() and all(p.exists() for p in others)
    assert SiteStore(tmp_path / "sites", SITE).read_json("ledger") == {"x": 1}
