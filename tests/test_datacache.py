"""The simulation's shared data cache: the same arrays, and a simulated site that imports less.

The engine computes the bundled dataset and the partitions once into ``STAMEN_DATA_CACHE``;
a Ray actor then reads them as numpy files. Checked here: what comes back is exactly what
is computed without the cache, a damaged file is computed again, and a process that loads
a site's data from a filled cache imports none of the libraries behind the computation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stamen.common import datasets, partition
from stamen.common.datacache import ENV

#: What computing the arrays imports and a site reading them from the cache must not.
HEAVY = ("pandas", "pyarrow", "matplotlib", "seaborn", "sklearn", "mlxtend", "datasets", "flwr_datasets")

PROBE = f"""
import json, sys
import stamen.simulations.faults.layer  # the module whose ClientApp the Ray actors run
from stamen.client.data import load_site_data
from stamen.common.config import StamenConfig

cfg = StamenConfig.from_mapping({{"dataset": "digits", "partition": "dirichlet"}})
site = load_site_data({{"partition-id": 1, "num-partitions": 4}}, cfg)
print(json.dumps({{"train": site.y_train.tolist(), "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def _fresh() -> None:
    datasets._load_digits.cache_clear()
    partition._partition_cached.cache_clear()


def _digits_and_parts() -> tuple[datasets.Dataset, list[np.ndarray]]:
    data = datasets.load_dataset("digits")
    return data, partition.partition_indices(data.y_train, 4, "dirichlet", alpha=0.5, seed=3)


def test_cached_arrays_are_the_computed_ones_and_a_damaged_file_is_computed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    _fresh()
    plain, plain_parts = _digits_and_parts()
    monkeypatch.setenv(ENV, str(tmp_path))
    for _ in range(2):  # the first call fills the cache, the second reads it
        _fresh()
        cached, cached_parts = _digits_and_parts()
        for name in ("x_train", "y_train", "x_test", "y_test"):
            a, b = getattr(plain, name), getattr(cached, name)
            assert a.dtype == b.dtype and np.array_equal(a, b), name
        assert all(np.array_equal(a, b) for a, b in zip(plain_parts, cached_parts, strict=True))
        assert not cached_parts[0].flags.writeable
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("dataset-digits") and files[1].startswith("partition-"), files
    damaged = tmp_path / files[1]
    damaged.write_bytes(b"not a zip file")
    _fresh()
    assert all(np.array_equal(a, b) for a, b in zip(plain_parts, _digits_and_parts()[1], strict=True))
    assert damaged.read_bytes()[:2] == b"PK", "the damaged file is replaced by a whole one"
    _fresh()


@pytest.mark.slow
def test_a_site_reading_a_filled_cache_imports_none_of_the_libraries_behind_it(tmp_path: Path) -> None:
    env = {**os.environ, ENV: str(tmp_path)}

    def probe() -> dict[str, list]:
        out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    computing, reading = probe(), probe()
    assert set(HEAVY) - {"mlxtend"} <= set(computing["heavy"]), computing["heavy"]  # they were needed to compute
    assert reading["heavy"] == [], reading["heavy"]
    assert reading["train"] == computing["train"] and reading["train"]
