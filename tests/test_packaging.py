"""The distribution is one ``stamen`` namespace: the wheel holds only ``stamen/``, and a user's
own ``server.py`` or ``common/`` in the working directory cannot shadow stamen's code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_shipped_under_stamen() -> None:
    setup = PYPROJECT["tool"]["setuptools"]
    listed = set(setup["packages"])
    found = set()
    for name, folder in setup["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found == listed, f"not listed: {sorted(found - listed)}, listed but no package: {sorted(listed - found)}"
    assert all(p == "stamen" or p.startswith("stamen.") for p in listed)
    assert PYPROJECT["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "stamen.server.app:app",
        "clientapp": "stamen.client.app:app",
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (found,) = out.glob("stamen-*.whl")
    return found


def test_the_wheel_holds_only_the_stamen_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"stamen", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for expected in (
        "stamen/__init__.py",
        "stamen/server/app.py",
        "stamen/client/app.py",
        "stamen/common/config.py",
        "stamen/simulations/engine.py",
        "stamen/simulations/scenarios/label-shift.yaml",
        "stamen/simulations/bench/quickstart/quickstart_app.py",
        "stamen/cli/main.py",
    ):
        assert expected in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "stamen = stamen.cli.main:main" in entry_points


@pytest.mark.slow
def test_a_user_server_py_and_common_folder_do_not_shadow_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    work = tmp_path / "work"
    (work / "common").mkdir(parents=True)
    (work / "server.py").write_text("raise SystemExit('the user server.py was imported')\n")
    (work / "common" / "__init__.py").write_text("raise SystemExit('the user common/ was imported')\n")
    env = {**os.environ, "PYTHONPATH": str(site), "FLWR_TELEMETRY_ENABLED": "0"}
    where = subprocess.run(
        [sys.executable, "-c", "import stamen, stamen.server.app; print(stamen.__file__); print(stamen.simulate)"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    assert where.stdout.splitlines()[0].startswith(str(site))
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "stamen", "simulate", "--dataset", "digits", "--clients", "2", "--rounds", "1",
         "--out", str(out), "--no-progress", "--timeout", "300"],
        cwd=work, env=env, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 1
    assert summary["final"]["accuracy"] > 0.2
