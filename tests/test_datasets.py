"""Dataset loading: built-in splits are fixed, file specs round-trip, bad input names the problem."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets as hf
import flwr_datasets
import numpy as np
import pandas as pd
import pytest

from stamen.common.datasets import Dataset, load_dataset
from stamen.common.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def write_npz(path: Path, **arrays: Any) -> str:
    """Write arrays to ``path`` and return its spec."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return f"npz:{path}"


def write_csv(path: Path, text: str) -> str:
    """Write raw CSV text to ``path`` and return its spec."""
    path.write_text(text)
    return f"csv:{path}"


def good_xy(n: int = 12, f: int = 3) -> dict[str, np.ndarray]:
    """A small valid (x, y) pair to corrupt one piece at a time."""
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, f)), "y": np.arange(n) % 3}


def digest(ds: Dataset) -> str:
    """Fingerprint all four arrays so splits can be compared across processes."""
    h = hashlib.sha256()
    for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# --- built-in datasets -----------------------------------------------------------------


def test_digits_shapes_ranges_and_stratified_split() -> None:
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test is not None and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert ds.y_test is not None
    test_share = np.bincount(ds.y_test, minlength=10) / np.bincount(np.concatenate([ds.y_train, ds.y_test]))
    assert np.allclose(test_share, 0.2, atol=0.02)


def test_mnist5k_shapes_ranges_and_split() -> None:
    ds = load_dataset("mnist5k")
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.y_train.shape == (4000,)
    assert ds.x_test is not None and ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.y_test is not None and np.bincount(ds.y_test).tolist() == [100] * 10
    assert ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int64
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() == 1.0
    assert ds.num_classes == 10


def test_builtin_is_cached_identical_and_read_only() -> None:
    first = load_dataset("mnist5k")
    assert load_dataset(" mnist5k ") is first
    with pytest.raises(ValueError):
        first.x_train[0, 0, 0, 0] = 1.0
    with pytest.raises(ValueError):
        first.y_train[0] = 1


def test_digits_split_is_the_same_in_a_fresh_process() -> None:
    code = (
        "import hashlib, numpy as np\n"
        "from stamen.common.datasets import load_dataset\n"
        "ds = load_dataset('digits')\n"
        "h = hashlib.sha256()\n"
        "for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):\n"
        "    h.update(np.ascontiguousarray(a).tobytes())\n"
        "print(h.hexdigest())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=REPO)
    assert out.stdout.strip() == digest(load_dataset("digits"))


# --- npz and csv -----------------------------------------------------------------------


def test_npz_without_test_split(tmp_path: Path) -> None:
    x = np.arange(24, dtype=np.int32).reshape(4, 2, 3)
    spec = write_npz(tmp_path / "d.npz", x=x, y=np.array([0, 2, 1, 2]))
    ds = load_dataset(spec)
    assert ds.x_train.dtype == np.float32 and ds.x_train.shape == (4, 2, 3)
    np.testing.assert_array_equal(ds.x_train, x)
    assert ds.y_train.dtype == np.int64 and ds.y_train.tolist() == [0, 2, 1, 2]
    assert ds.x_test is None and ds.y_test is None
    assert ds.num_classes == 3 and ds.input_shape == (2, 3)


def test_npz_with_test_split_counts_classes_over_both(tmp_path: Path) -> None:
    spec = write_npz(
        tmp_path / "d.npz",
        x=np.ones((3, 2)),
        y=np.array([0.0, 1.0, 1.0]),  # integral floats are accepted as labels
        x_test=np.zeros((2, 2)),
        y_test=np.array([4, 0]),
    )
    ds = load_dataset(spec)
    assert ds.x_test is not None and ds.x_test.shape == (2, 2)
    assert ds.y_test is not None and ds.y_test.tolist() == [4, 0]
    assert ds.y_train.dtype == np.int64 and ds.num_classes == 5


def test_csv_round_trip(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": [0.5, 1.5, -2.0], "label": [1, 0, 1], "b": [3, 4, 5]})
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    ds = load_dataset(f"csv:{path}")
    np.testing.assert_array_equal(ds.x_train, frame[["a", "b"]].to_numpy(dtype=np.float32))
    assert ds.y_train.tolist() == [1, 0, 1] and ds.x_test is None
    assert ds.input_shape == (2,) and ds.num_classes == 2


def test_file_spec_is_cached_until_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    spec = write_npz(path, x=np.zeros((2, 1)), y=np.array([0, 1]))
    first = load_dataset(spec)
    assert load_dataset(spec) is first
    write_npz(path, x=np.zeros((3, 1)), y=np.array([0, 1, 2]))
    later = os.stat(path).st_mtime_ns + 10**9  # same-second rewrites may keep the mtime
    os.utime(path, ns=(later, later))
    reloaded = load_dataset(spec)
    assert reloaded is not first and len(reloaded.y_train) == 3


def test_hf_converts_images_and_finds_test_split(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    splits = {
        "train": hf.Dataset.from_dict({"img": rng.integers(0, 256, (6, 4, 5, 3)), "label": [0, 1, 2, 0, 1, 2]}),
        "test": hf.Dataset.from_dict({"img": rng.integers(0, 256, (2, 4, 5, 3)), "label": [1, 3]}),
    }

    class FakeFds:
        def __init__(self, **kwargs: Any) -> None:
            assert kwargs == {"dataset": "fake/rgb", "partitioners": {"train": 1}}

        def load_partition(self, partition_id: int) -> hf.Dataset:
            return splits["train"]

        def load_split(self, split: str) -> hf.Dataset:
            return splits[split]

    monkeypatch.setattr(flwr_datasets, "FederatedDataset", FakeFds)
    ds = load_dataset("hf:fake/rgb")
    assert ds.x_train.shape == (6, 3, 4, 5) and ds.x_train.dtype == np.float32
    assert ds.x_test is not None and ds.x_test.shape == (2, 3, 4, 5)
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0 and ds.num_classes == 4
    np.testing.assert_allclose(ds.x_train[0, 2], np.asarray(splits["train"][0]["img"])[:, :, 2] / 255.0, rtol=1e-6)


def test_hf_download_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class OfflineFds:
        def __init__(self, **kwargs: Any) -> None:
            pass

        def load_partition(self, partition_id: int) -> hf.Dataset:
            raise ConnectionError("no route to host")

    monkeypatch.setattr(flwr_datasets, "FederatedDataset", OfflineFds)
    with pytest.raises(DataError, match=r"'offline/set'.*network access"):
        load_dataset("hf:offline/set")


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["cifar", "npz:", "parquet:data.pq", "hf:", ""])
def test_unknown_spec_lists_valid_ones(spec: str) -> None:
    with pytest.raises(DataError, match=r"unknown dataset spec.*digits, mnist5k, npz:PATH, csv:PATH, hf:NAME"):
        load_dataset(spec)


@pytest.mark.parametrize("kind", ["npz", "csv"])
def test_missing_file(tmp_path: Path, kind: str) -> None:
    with pytest.raises(DataError, match=r"nope\.dat.*not found"):
        load_dataset(f"{kind}:{tmp_path / 'nope.dat'}")


def test_truncated_npz(tmp_path: Path) -> None:
    path = tmp_path / "cut.npz"
    write_npz(path, **good_xy(200))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match=r"cut\.npz: not a readable \.npz"):
        load_dataset(f"npz:{path}")


def test_npz_that_is_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "text.npz"
    path.write_text("x,y\n1,2\n")
    with pytest.raises(DataError, match=r"text\.npz: not a readable \.npz"):
        load_dataset(f"npz:{path}")


def test_npz_holding_a_single_npy_array(tmp_path: Path) -> None:
    path = tmp_path / "single.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(DataError, match=r"single\.npz: holds a single \.npy array"):
        load_dataset(f"npz:{path}")


def test_npz_with_pickled_object_array(tmp_path: Path) -> None:
    spec = write_npz(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match=r"obj\.npz: not a readable \.npz"):
        load_dataset(spec)


@pytest.mark.parametrize("drop", ["x", "y"])
def test_npz_missing_key(tmp_path: Path, drop: str) -> None:
    arrays = good_xy()
    del arrays[drop]
    spec = write_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=rf"missing array\(s\) {drop};.*needs 'x' and 'y'"):
        load_dataset(spec)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": np.array([[1.0, np.nan]] * 3), "y": np.zeros(3)}, r"x contains 3 NaN or inf"),
        ({"x": np.array([[1.0, np.inf]] * 3), "y": np.zeros(3)}, r"x contains 3 NaN or inf"),
        ({"x": np.full((2, 2), 1e39), "y": np.zeros(2)}, r"x contains 4 NaN or inf"),
        ({"x": np.array([["a", "b"]] * 2), "y": np.zeros(2)}, r"x must be numeric"),
        ({"x": np.zeros(4), "y": np.zeros(4)}, r"x must have shape \(N, features\.\.\.\)"),
        ({"x": np.zeros((4, 0)), "y": np.zeros(4)}, r"no features: x has shape \(4, 0\)"),
        ({"x": np.zeros((0, 3)), "y": np.zeros(0)}, r"empty dataset"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3)}, r"length mismatch: x has 4 examples but y has 3"),
        (
            {"x": np.zeros((3, 2)), "y": np.array([0.0, 1.5, 2.0])},
            r"y must hold non-negative integer labels, found 1\.5",
        ),
        ({"x": np.zeros((3, 2)), "y": np.array([0, -1, 2])}, r"y must hold .*found negative label -1 at index 1"),
        ({"x": np.zeros((3, 2)), "y": np.array([0.0, np.nan, 2.0])}, r"y must hold .*found NaN/inf at index 1"),
        ({"x": np.zeros((2, 2)), "y": np.array(["a", "b"])}, r"y must hold non-negative integer labels, got dtype"),
        ({"x": np.zeros((2, 2)), "y": np.zeros((2, 1))}, r"y must be one label per example"),
        ({"x_test": np.zeros((2, 3))}, r"x_test is given without y_test"),
        ({"y_test": np.zeros(2)}, r"y_test is given without x_test"),
        ({"x_test": np.zeros((2, 4)), "y_test": np.zeros(2)}, r"x_test has per-example shape \(4,\) but x has \(3,\)"),
        ({"x_test": np.zeros((2, 3)), "y_test": np.zeros(3)}, r"length mismatch: x_test has 2 .* y_test has 3"),
        ({"x_test": np.zeros((2, 3)), "y_test": np.array([0, -3])}, r"y_test must hold .*negative label -3"),
    ],
)
def test_npz_bad_arrays(tmp_path: Path, change: dict[str, np.ndarray], message: str) -> None:
    path = tmp_path / "bad.npz"
    spec = write_npz(path, **{**good_xy(), **change})
    with pytest.raises(DataError, match=message) as info:
        load_dataset(spec)
    assert "bad.npz" in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"could not parse as CSV"),
        ("a,b,label\n1,2,0\n1,2,3,4,5\n", r"could not parse as CSV"),
        ("a,b,target\n1,2,0\n", r"no 'label' column in the header row \(columns: a, b, target\)"),
        ("a,colour,label\n1,red,0\n2,blue,1\n", r"non-numeric feature column\(s\): colour"),
        ("a,b,label\n1,,0\n2,3,1\n", r"features contains 1 NaN or inf"),
        ("a,b,label\n1,2,0\n2,3,1.5\n", r"column 'label' must hold non-negative integer labels, found 1\.5"),
        ("a,b,label\n1,2,0\n2,3,-1\n", r"column 'label' must hold .*negative label -1"),
        ("a,b,label\n1,2,0\n2,3,\n", r"column 'label' must hold .*NaN"),
        ("a,b,label\n1,2,cat\n", r"column 'label' must hold .*got dtype object"),
        ("a,b,label\n", r"empty dataset"),
        ("label\n0\n1\n", r"no features: features has shape \(2, 0\)"),
    ],
)
def test_csv_bad_input(tmp_path: Path, text: str, message: str) -> None:
    spec = write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(spec)
    assert "bad.csv" in str(info.value)
