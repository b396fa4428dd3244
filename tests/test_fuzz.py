"""Fuzzing the boundary (hypothesis): whatever a site sends and whatever a data file holds,
stamen answers with a counted rejection or a clear error, never a crash.

Bounded: few examples per property and a per-example deadline, so the file runs in well
under a minute.
"""

from __future__ import annotations

import itertools
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stamen.common.datasets import Dataset, load_dataset
from stamen.common.errors import DataError
from stamen.common.reply import (
    REJECT_REASONS,
    REPLY_SCHEMA_VERSION,
    TRAIN_METRICS,
    RejectedReply,
    SiteReply,
    screen_reply,
)

FUZZ = settings(
    max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
REFERENCE = {"fc.weight": np.zeros((3, 4), np.float32), "fc.bias": np.zeros(3, np.float32)}
_counter = itertools.count()

dtypes = st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.int64, np.uint8, np.bool_, np.complex64])
arrays = dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)))
keys = st.one_of(st.sampled_from(sorted(REFERENCE)), st.text(min_size=0, max_size=12))
metric_keys = st.one_of(st.sampled_from(sorted(TRAIN_METRICS)), st.text(max_size=12))
metric_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-(2**63), max_value=2**63 - 1)
)
meta_values = st.one_of(
    st.none(), st.integers(-3, 3), st.text(max_size=8), st.sampled_from(["ok", "error", "refused_budget"])
)


def _reply(instruction: Message, meta: dict, arrs: dict[str, np.ndarray] | None, metrics: dict | None) -> Message:
    content = RecordDict({"meta": ConfigRecord({k: v for k, v in meta.items() if v is not None})})
    if arrs is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrs.items()})
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    return Message(content=content, reply_to=instruction)


def _screen(msg: Message) -> SiteReply | None:
    try:
        return screen_reply(msg, "train", expected_site="site-0001", reference=REFERENCE)
    except RejectedReply as exc:
        assert exc.reason in REJECT_REASONS
        return None


@FUZZ
@given(
    arrs=st.one_of(st.none(), st.dictionaries(keys, arrays, max_size=4)),
    metrics=st.one_of(st.none(), st.dictionaries(metric_keys, metric_values, max_size=8)),
)
@example(arrs={"fc.weight": np.zeros((3, 4), np.float32), "fc.bias": np.full(3, np.nan, np.float32)}, metrics=None)
@example(arrs={"fc.weight": np.zeros((2000, 500), np.float32), "fc.bias": np.zeros(3, np.float32)}, metrics=None)
@example(arrs={k: np.zeros((0,), np.float32) for k in REFERENCE}, metrics={})
def test_screen_reply_never_crashes_on_random_arrays(
    instruction: Callable[..., Message], arrs: dict[str, np.ndarray] | None, metrics: dict | None
) -> None:
    meta = {"schema": REPLY_SCHEMA_VERSION, "status": "ok", "site-id": "site-0001"}
    metrics = (
        metrics
        if metrics is not None
        else {"num-examples": 10.0, "train-loss": 0.5, "grad-norm": 1.0, "lr": 0.1, "steps": 2.0}
    )
    out = _screen(_reply(instruction(), meta, arrs, metrics))
    if out is not None:  # accepted: then it really matches the reference and is finite
        got = out.content["arrays"]
        assert list(got.keys()) == list(REFERENCE)
        assert all(np.isfinite(got[k].numpy()).all() and got[k].numpy().shape == v.shape for k, v in REFERENCE.items())


@FUZZ
@given(
    meta=st.dictionaries(st.sampled_from(["schema", "status", "site-id", "reason"]), meta_values, max_size=4),
    metrics=st.dictionaries(metric_keys, metric_values, max_size=8),
)
def test_screen_reply_never_crashes_on_random_meta_and_metrics(
    instruction: Callable[..., Message], meta: dict, metrics: dict
) -> None:
    _screen(_reply(instruction(), meta, dict(REFERENCE), metrics))


def _fresh(suffix: str) -> Path:
    """A new file name per example: the loaders cache by path, mtime and size."""
    return Path(tempfile.gettempdir()) / f"stamen-fuzz-{next(_counter)}-{np.random.randint(1 << 30)}{suffix}"


def _load(path: Path, kind: str) -> Dataset | None:
    try:
        return load_dataset(f"{kind}:{path}")
    except DataError as exc:
        assert str(path) in str(exc) or "dataset file" in str(exc)
        return None
    finally:
        path.unlink(missing_ok=True)


@FUZZ
@given(
    x=dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))),
    y=dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=6))),
    cut=st.one_of(st.none(), st.floats(0.0, 1.0)),
    extra=st.booleans(),
)
def test_npz_loader_gives_a_dataset_or_a_data_error(
    x: np.ndarray, y: np.ndarray, cut: float | None, extra: bool
) -> None:
    path = _fresh(".npz")
    np.savez(path, x=x, y=y, **({"x_test": x} if extra else {}))
    if cut is not None:  # truncated file
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * cut)])
    ds = _load(path, "npz")
    if ds is not None:
        assert ds.x_train.dtype == np.float32 and np.isfinite(ds.x_train).all() and (ds.y_train >= 0).all()
        assert len(ds.x_train) == len(ds.y_train) > 0


@FUZZ
@given(content=st.binary(max_size=400))
def test_npz_loader_on_random_bytes(content: bytes) -> None:
    path = _fresh(".npz")
    path.write_bytes(content)
    assert _load(path, "npz") is None


@FUZZ
@given(
    rows=st.lists(
        st.lists(
            st.one_of(st.floats(allow_nan=True), st.integers(-5, 20), st.text(max_size=4)), min_size=1, max_size=4
        ),
        max_size=6,
    ),
    header=st.lists(st.one_of(st.just("label"), st.text(max_size=5)), min_size=0, max_size=4),
    cut=st.one_of(st.none(), st.floats(0.0, 1.0)),
)
def test_csv_loader_gives_a_dataset_or_a_data_error(rows: list[list], header: list[str], cut: float | None) -> None:
    path = _fresh(".csv")
    text = ",".join(header) + "\n" + "\n".join(",".join(map(str, r)) for r in rows)
    if cut is not None:
        text = text[: int(len(text) * cut)]
    path.write_text(text)
    ds = _load(path, "csv")
    if ds is not None:
        assert np.isfinite(ds.x_train).all() and (ds.y_train >= 0).all()


@FUZZ
@given(content=st.binary(max_size=400))
def test_csv_loader_on_random_bytes(content: bytes) -> None:
    path = _fresh(".csv")
    path.write_bytes(content)
    _load(path, "csv")


def test_npz_with_a_pickled_object_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match=r"obj\.npz"):
        load_dataset(f"npz:{path}")
    assert zipfile.is_zipfile(path)
