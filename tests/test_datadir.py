"""A real node's watched data directory, driven through the ClientApp round after round.

Done-when of the continual issue: good and bad shards dropped between rounds; the bad
ones land in quarantine with a reason, nothing crashes, the good ones are really trained
on (accuracy on a class only the new shard holds rises), under DP the ledger's sample
rate follows the new data size, and what was ingested survives a restart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from clientdrive import OneSite, site_terms

from stamen.client.datadir import MANIFEST, DataDir
from stamen.client.dp import dp_schedule
from stamen.common.config import StamenConfig
from stamen.common.datasets import load_dataset
from stamen.common.state import SiteStore

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("serverapp_identity", "one_torch_thread")
SHAPE = (1, 8, 8)
NEW_CLASS = 9


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    data = load_dataset("digits")
    return {"x": data.x_train, "y": data.y_train, "x_test": data.x_test, "y_test": data.y_test}


def _shards(d: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Shard A: 600 records of classes 0-8. Shard B: every 9 and 200 other records (the only 9s)."""
    old = np.flatnonzero(d["y"] != NEW_CLASS)
    nines = np.flatnonzero(d["y"] == NEW_CLASS)
    a, b = old[:600], np.concatenate([nines, old[600:800]])
    return {"x": d["x"][a], "y": d["y"][a]}, {"x": d["x"][b], "y": d["y"][b]}


def _drop_bad_shards(data_dir: Path, shard_a: dict[str, np.ndarray]) -> dict[str, str]:
    """Bad files of every kind; returns name -> a phrase its reason file must contain."""
    (data_dir / "garbage.npz").write_bytes(b"this is not a zip archive")
    np.savez(data_dir / "wrong-shape.npz", x=np.zeros((20, 1, 7, 7), np.float32), y=np.zeros(20, np.int64))
    rows = "\n".join(",".join(["0.5"] * 64 + ["12"]) for _ in range(5))
    (data_dir / "labels.csv").write_text(",".join([f"f{i}" for i in range(64)] + ["label"]) + "\n" + rows + "\n")
    np.savez(data_dir / "again.npz", **shard_a)  # the same records under another name
    return {
        "garbage.npz": "not a readable .npz",
        "wrong-shape.npz": "shape (1, 7, 7)",
        "labels.csv": "label 12 is out of range",
        "again.npz": "duplicate of already ingested shard a.npz",
    }


def _site(tmp_path: Path, **raw: object) -> OneSite:
    cfg = StamenConfig.from_mapping({"dataset": "digits", "lr-schedule": "constant", "local-epochs": 2, **raw})
    data_dir = tmp_path / "inbox"
    data_dir.mkdir(exist_ok=True)
    node = {"site-id": "node-a", "data-dir": str(data_dir), "state-dir": str(tmp_path / "state"), **site_terms(cfg)}
    return OneSite(cfg, node, "logreg", SHAPE, 10)


def test_good_shards_are_trained_on_and_bad_ones_quarantined(tmp_path: Path, digits: dict[str, np.ndarray]) -> None:
    site = _site(tmp_path)
    inbox = tmp_path / "inbox"
    shard_a, shard_b = _shards(digits)
    x_new = torch.from_numpy(digits["x_test"][digits["y_test"] == NEW_CLASS])
    y_new = torch.full((len(x_new),), NEW_CLASS)

    assert site.train(1)["status"] == "no_data", "an empty directory: nothing to train on, not an error"
    np.savez(inbox / "a.npz", **shard_a)
    for server_round in (2, 3, 4):
        assert site.train(server_round)["status"] == "ok"
    before = site.accuracy(x_new, y_new)
    assert before == 0.0, "no record of class 9 has been seen yet"

    reasons = _drop_bad_shards(inbox, shard_a)
    np.savez(inbox / "b.npz", **shard_b)
    (inbox / ".b2.npz.partial").write_bytes(b"still being copied")
    (inbox / "README.txt").write_text("not a shard")
    replies = [site.train(server_round) for server_round in (5, 6, 7, 8)]
    assert all(r["status"] == "ok" for r in replies)

    quarantine = inbox / "quarantine"
    assert sorted(p.name for p in quarantine.iterdir() if p.suffix != ".reason") == sorted(reasons)
    for name, phrase in reasons.items():
        assert phrase in (quarantine / f"{name}.reason").read_text(), name
    assert sorted(p.name for p in inbox.iterdir()) == [".b2.npz.partial", "README.txt", "a.npz", "b.npz", "quarantine"]

    manifest = json.loads((tmp_path / "state" / "node-a" / f"{MANIFEST}.json").read_text())["data"]
    assert [(s["name"], s["round"]) for s in manifest["shards"]] == [("a.npz", 2), ("b.npz", 5)]
    holdout_a = round(0.05 * len(shard_a["y"]))
    holdout_b = round(0.05 * len(shard_b["y"]))
    assert replies[0]["num-examples"] == len(shard_a["y"]) + len(shard_b["y"]) - holdout_a - holdout_b
    after = site.accuracy(x_new, y_new)
    assert after > 0.5, f"class 9 accuracy {before} -> {after}: the new shard was not trained on"


def test_under_dp_the_ledger_sample_rate_follows_the_data_size(tmp_path: Path, digits: dict[str, np.ndarray]) -> None:
    site = _site(tmp_path, dp=True, **{"noise-multiplier": 1.0, "epsilon-budget": 1000.0})
    inbox = tmp_path / "inbox"
    shard_a, shard_b = _shards(digits)
    np.savez(inbox / "a.npz", **shard_a)
    first = [site.train(r) for r in (1, 2)]
    np.savez(inbox / "b.npz", **shard_b)
    _drop_bad_shards(inbox, shard_a)
    second = [site.train(r) for r in (3, 4)]

    # a DP site's size is a Gaussian release (std dp-stats-noise = 10), made once per data version
    n_a = len(shard_a["y"]) - round(0.05 * len(shard_a["y"]))
    n_ab = n_a + len(shard_b["y"]) - round(0.05 * len(shard_b["y"]))
    counts = [int(r["num-examples"]) for r in first + second]
    assert counts[0] == counts[1] and counts[2] == counts[3]
    assert abs(counts[0] - n_a) < 50 and abs(counts[2] - n_ab) < 50
    rate_a, rate_ab = dp_schedule(counts[0], site.cfg)[0], dp_schedule(counts[2], site.cfg)[0]
    assert rate_ab < rate_a
    assert [r["sample-rate"] for r in first + second] == [rate_a, rate_a, rate_ab, rate_ab]
    ledger = json.loads((tmp_path / "state" / "node-a" / "privacy_ledger.json").read_text())["data"]
    assert [(sigma, rate) for sigma, rate, _ in ledger["history"]] == [(1.0, rate_a), (1.0, rate_ab)]
    # released once per data version: its size, its label histogram and its feature sketch (drift)
    assert ledger["rounds"] == 4 and len(ledger["releases"]) == 2 * 3
    assert second[-1]["epsilon"] > first[-1]["epsilon"] > 0


def test_what_was_ingested_survives_a_restart(tmp_path: Path, digits: dict[str, np.ndarray]) -> None:
    site = _site(tmp_path)
    inbox = tmp_path / "inbox"
    shard_a, shard_b = _shards(digits)
    np.savez(inbox / "a.npz", **shard_a)
    site.train(1)
    np.savez(inbox / "b.npz", **shard_b)
    _drop_bad_shards(inbox, shard_a)
    expected = site.train(2)["num-examples"]
    manifest = tmp_path / "state" / "node-a" / f"{MANIFEST}.json"
    written = manifest.read_text()
    script = (
        "import sys; from stamen.client.datadir import DataDir; from stamen.common.state import SiteStore\n"
        "d = DataDir(sys.argv[1], SiteStore(sys.argv[2], 'node-a'), (1, 8, 8), 10)\n"
        "v = d.view(3, 0.05, ingest=True)\n"
        "print(v.num_train, ','.join(v.shard_names))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(inbox), str(tmp_path / "state")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    assert int(out[0]) == expected
    doc = json.loads(written)["data"]
    assert out[1] == ",".join(s["id"] for s in doc["shards"])
    assert manifest.read_text() == written, "a restarted node ingests nothing twice"
    assert len(list((inbox / "quarantine").glob("*.reason"))) == 4


def test_a_shard_changed_after_ingestion_is_withdrawn_and_a_renamed_one_kept(
    tmp_path: Path, digits: dict[str, np.ndarray]
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    store = SiteStore(tmp_path / "state", "node-a")
    shard_a, shard_b = _shards(digits)
    np.savez(inbox / "a.npz", **shard_a)
    np.savez(inbox / "b.npz", **shard_b)
    first = DataDir(str(inbox), store, SHAPE, 10).view(1, 0.05, ingest=True)
    ids = first.shard_names
    os.replace(inbox / "a.npz", inbox / "a-renamed.npz")
    np.savez(inbox / "b.npz", x=shard_b["x"][:10], y=shard_b["y"][:10])
    directory = DataDir(str(inbox), store, SHAPE, 10)
    second = directory.view(2, 0.05, ingest=True)
    assert second.shard_names == (ids[0],), "the renamed shard keeps its identity (and its ledger)"
    assert [s.name for s in directory.shards] == ["a-renamed.npz"]
    assert [s.name for s in directory.withdrawn] == ["b.npz"]
    assert "content changed after it was ingested" in (inbox / "quarantine" / "b.npz.reason").read_text()
    assert np.array_equal(second.record_ids, first.record_ids[first.shard_of == 0])


def test_a_directory_that_cannot_be_written_skips_bad_files_without_failing(
    tmp_path: Path, digits: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    store = SiteStore(tmp_path / "state", "node-a")
    np.savez(inbox / "a.npz", **_shards(digits)[0])
    (inbox / "garbage.npz").write_bytes(b"junk")

    real_replace = os.replace

    def read_only_inbox(src: str, dst: str) -> None:
        """The data directory is read-only (as root, chmod would not stop us); the state store is not."""
        if Path(dst).is_relative_to(inbox):
            raise PermissionError("read-only file system")
        real_replace(src, dst)

    monkeypatch.setattr("stamen.client.datadir.os.replace", read_only_inbox)
    view = DataDir(str(inbox), store, SHAPE, 10).view(1, 0.05, ingest=True)
    assert view.num_train > 0 and (inbox / "garbage.npz").exists()
    again = DataDir(str(inbox), store, SHAPE, 10)
    assert again.unmovable[0]["name"] == "garbage.npz" and "not a readable" in again.unmovable[0]["reason"]
    assert again.ingest(2) == [], "a file that could not be moved is not retried"
