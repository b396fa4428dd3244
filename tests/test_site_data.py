"""Data per simulated site: ``--site-data DIR`` (one file or sub-directory per site) and a
``data-loader`` hook ``fn(partition_id, num_partitions)``, Flower's ``load_data`` shape."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from stamen.client.data import load_site_data
from stamen.client.sources import site_view
from stamen.common.config import StamenConfig
from stamen.common.errors import ConfigError, DataError
from stamen.common.sitedata import loader_dataset, site_entries, with_site_data
from stamen.common.state import SiteStore
from stamen.server.evaluate import load_server_data
from stamen.simulations.lr_find import lr_range_test
from stamen.simulations.run import plan_simulation, preflight

#: Rows of each site's own file: unequal, so a site that got another's file would show it.
SITE_ROWS = (300, 400, 500)

HOOK = '''
import numpy as np
from sklearn.datasets import load_digits


def load_data(partition_id, num_partitions):
    """Flower's template shape: this partition's training rows, and the run's test split."""
    digits = load_digits()
    x = (digits.images / 16.0)[:, None]
    order = np.random.default_rng(0).permutation(len(digits.target))
    train, test = order[:1500], order[1500:]
    part = np.array_split(train, num_partitions)[partition_id]
    return {"x": x[part], "y": digits.target[part], "x_test": x[test], "y_test": digits.target[test]}
'''


def digits() -> tuple[np.ndarray, np.ndarray]:
    bunch = load_digits()
    x = (bunch.images / 16.0)[:, None].astype(np.float32)
    order = np.random.default_rng(0).permutation(len(bunch.target))
    return x[order], bunch.target[order]


def write_sites(root: Path, *, server: bool = True) -> Path:
    """Three per-site npz files (site0..2, SITE_ROWS rows each) and the server's test split."""
    x, y = digits()
    root.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, rows in enumerate(SITE_ROWS):
        np.savez(root / f"site{i}.npz", x=x[start : start + rows], y=y[start : start + rows])
        start += rows
    if server:
        np.savez(root / "server.npz", x=x[start:], y=y[start:])
    return root


def run_cli(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The ``stamen`` console script in ``cwd``, as a user in that directory runs it."""
    stamen = Path(sys.executable).parent / "stamen"
    return subprocess.run([str(stamen), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout + 60)


def test_entries_are_the_sites_in_name_order_without_the_servers_file(tmp_path: Path) -> None:
    root = write_sites(tmp_path / "sites")
    (root / "site3").mkdir()
    (root / ".partial.npz").write_bytes(b"")
    (root / "notes.txt").write_text("not data")
    assert [p.name for p in site_entries(str(root))] == ["site0.npz", "site1.npz", "site2.npz", "site3"]
    cfg = StamenConfig.from_mapping({"site-data": str(root)})
    assert with_site_data({"partition-id": 1, "num-partitions": 4}, cfg)["data"] == f"npz:{root / 'site1.npz'}"
    assert with_site_data({"partition-id": 3, "num-partitions": 4}, cfg)["data-dir"] == str(root / "site3")
    assert with_site_data({"data": "npz:/srv/x.npz"}, cfg) == {"data": "npz:/srv/x.npz"}, "a real node keeps its own"


def test_a_site_loads_its_own_file_and_the_server_its_test_split(tmp_path: Path) -> None:
    root = write_sites(tmp_path / "sites")
    cfg = StamenConfig.from_mapping({"site-data": str(root), "holdout-fraction": 0.1})
    for i, rows in enumerate(SITE_ROWS):
        site = load_site_data(with_site_data({"partition-id": i, "num-partitions": 3}, cfg), cfg)
        assert site.num_train + site.num_holdout == rows
        assert site.num_holdout == pytest.approx(rows * 0.1, abs=2)
    server = load_server_data(cfg)
    assert server.input_shape == (1, 8, 8) and server.num_classes == 10
    assert server.x_test is not None and len(server.x_test) == 1797 - sum(SITE_ROWS)


def _preflight(raw: dict, out: Path, clients: int | None = None) -> None:
    """Plan a run and run its preflight, as the engine child does before it writes anything."""
    plan = plan_simulation(raw, clients=clients, out=out)
    preflight(plan.cfg, plan.clients)


def test_the_site_count_follows_the_files_and_another_clients_is_refused(tmp_path: Path) -> None:
    root = write_sites(tmp_path / "sites")
    plan = plan_simulation({"site-data": str(root), "num-server-rounds": 1}, out=tmp_path / "run")
    assert plan.clients == 3
    with pytest.raises(ConfigError, match=r"--clients 5, but site-data .* has 3 sites"):
        _preflight({"site-data": str(root)}, tmp_path / "run", clients=5)
    assert not (tmp_path / "run").exists()


def test_bad_site_files_fail_with_the_datasets_errors(tmp_path: Path) -> None:
    root = write_sites(tmp_path / "sites", server=False)
    np.savez(root / "site1.npz", x=np.ones((20, 1, 8, 8)), y=np.full(20, -1))
    with pytest.raises(DataError, match=r"site1\.npz.*negative label"):
        _preflight({"site-data": str(root)}, tmp_path / "run")
    np.savez(root / "site1.npz", x=np.ones((20, 5)), y=np.zeros(20))
    with pytest.raises(DataError, match=r"site 1 .*shape \(5,\), the model takes \(1, 8, 8\)"):
        _preflight({"site-data": str(root)}, tmp_path / "run")
    with pytest.raises(DataError, match="is not a directory"):
        _preflight({"site-data": str(tmp_path / "nowhere")}, tmp_path / "run")
    with pytest.raises(ConfigError, match="set one of them"):
        StamenConfig.from_mapping({"site-data": str(root), "data-loader": "hook:load_data"})
    with pytest.raises(ConfigError, match="scenario"):
        StamenConfig.from_mapping({"site-data": str(root), "scenario": "label-shift"})


def test_a_loader_hook_gives_each_site_its_partition_and_the_server_its_test_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sitehook.py").write_text(HOOK)
    monkeypatch.chdir(tmp_path)
    cfg = StamenConfig.from_mapping({"data-loader": "sitehook:load_data", "holdout-fraction": 0.1})
    sizes = []
    for i in range(4):
        site = load_site_data({"partition-id": i, "num-partitions": 4}, cfg)
        sizes.append(site.num_train + site.num_holdout)
        assert site.num_holdout > 0
    assert sizes == [375, 375, 375, 375]
    server = load_server_data(cfg)
    assert server.input_shape == (1, 8, 8) and server.num_classes == 10
    assert server.x_test is not None and len(server.x_test) == 297


def test_a_loader_that_returns_something_else_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "badhook.py").write_text(
        "import numpy as np\n"
        "def nothing(partition_id, num_partitions):\n    return None\n"
        "def nan(partition_id, num_partitions):\n    return np.full((4, 2), np.nan), np.zeros(4)\n"
        "def boom(partition_id, num_partitions):\n    raise FileNotFoundError('no /data/site.csv')\n"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"returned NoneType; expected \(x, y\)"):
        loader_dataset("badhook:nothing", 0, 2)
    with pytest.raises(DataError, match="partition 0/2: x contains 8 NaN"):
        loader_dataset("badhook:nan", 0, 2)
    with pytest.raises(DataError, match=r"failed for partition 1 of 2 \(FileNotFoundError: no /data/site.csv\)"):
        loader_dataset("badhook:boom", 1, 2)
    with pytest.raises(ConfigError, match="cannot import module 'nohook'"):
        loader_dataset("nohook:load_data", 0, 2)


def check_summary(out: Path, rounds: int, sites: int) -> dict[str, object]:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["rounds_completed"] == rounds
    accuracy = summary["final"]["accuracy"]
    assert isinstance(accuracy, float) and math.isfinite(accuracy) and accuracy > 0.15, "no better than chance (0.1)"
    assert summary["final"]["source"] == "centralized"
    assert all(row["replied"] == sites for row in summary["history"])
    return summary


@pytest.mark.slow
def test_simulate_with_a_site_data_directory_trains_and_evaluates(tmp_path: Path) -> None:
    write_sites(tmp_path / "sites")
    out = tmp_path / "run"
    result = run_cli(tmp_path, "simulate", "--site-data", "sites", "--rounds", "2", "--out", "run", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    check_summary(out, rounds=2, sites=3)
    record = json.loads((out / "config.json").read_text())["config"]
    assert record["site-data"] == str(tmp_path / "sites")
    names = json.loads((out / "site-data.json").read_text())
    assert names == {
        "site-data": str(tmp_path / "sites"),
        "sites": {"site-0000": "site0.npz", "site-0001": "site1.npz", "site-0002": "site2.npz"},
    }


@pytest.mark.slow
def test_simulate_with_a_data_loader_hook_trains_and_evaluates(tmp_path: Path) -> None:
    (tmp_path / "sitehook.py").write_text(HOOK)
    result = run_cli(
        tmp_path, "simulate", "--set", "data-loader=sitehook:load_data", "--clients", "3", "--rounds", "2",
        "--out", "run", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    check_summary(tmp_path / "run", rounds=2, sites=3)


def test_a_sub_directory_site_is_a_watched_data_directory(tmp_path: Path) -> None:
    root = write_sites(tmp_path / "sites", server=False)
    x, y = digits()
    (root / "site3").mkdir()
    np.savez(root / "site3" / "a.npz", x=x[:50], y=y[:50])
    np.savez(root / "site3" / "b.npz", x=x[50:80], y=y[50:80])
    cfg = StamenConfig.from_mapping({"site-data": str(root)})
    node_config = with_site_data({"partition-id": 3, "num-partitions": 4}, cfg)
    view = site_view(node_config, cfg, 1, SiteStore(str(tmp_path / "state"), "site-3"), (1, 8, 8), 10, ingest=True)
    assert len(view.shard_names) == 2, "each file of the sub-directory is one ingested shard"
    assert len(view.y_train) + len(view.y_holdout) == 80
    assert load_server_data(cfg).num_classes == 10


def test_lr_find_runs_on_a_site_data_site(tmp_path: Path, one_torch_thread: None) -> None:
    root = write_sites(tmp_path / "sites")
    cfg = StamenConfig.from_mapping({"site-data": str(root), "momentum": 0.0})
    result = lr_range_test(cfg, site=2, clients=3, steps=30, start=1e-4, end=10.0)
    assert result.lrs[0] <= result.suggested_lr < result.lrs[-1]
