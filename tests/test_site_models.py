"""Sites run only code they chose: a ``package.module:Class`` model is imported only when the
site's own node config lists it in ``site-models`` (registry models always).

One site is driven in-process (tests/clientdrive.py). The model module writes a marker file
when imported, so "nothing imported" is checked by the file, not by a mock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from clientdrive import OneSite, site_terms

from stamen.common.config import StamenConfig
from stamen.common.datasets import load_dataset
from stamen.common.reply import REFUSAL_CODES, Status
from stamen.simulations.engine import site_node_config

pytestmark = pytest.mark.usefixtures("serverapp_identity")

MODULE = """
from pathlib import Path
Path({marker!r}).write_text("imported")
from stamen.common.models import LogReg as Net
"""


@pytest.fixture
def user_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> tuple[str, Path]:
    """A model class in a module that leaves a marker when imported (a fresh module name per test)."""
    name = f"site_models_{request.node.name.split('[')[-1].strip(']').replace('-', '_')}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:Net", marker


def _site(tmp_path: Path, model: str, node: dict[str, Any]) -> OneSite:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    data = load_dataset("digits")
    np.savez(inbox / "a.npz", x=data.x_train[:200], y=data.y_train[:200])
    cfg = StamenConfig.from_mapping({"dataset": "digits", "lr-schedule": "constant"})
    config = {"site-id": "node-a", "data-dir": str(inbox), "state-dir": str(tmp_path / "state")}
    config |= {**site_terms(cfg), **node}
    site = OneSite(cfg, config, "logreg", (1, 8, 8), 10)  # the server's model: the same layout as Net
    site.model_name = model
    return site


@pytest.mark.parametrize("node", [{}, {"site-models": "other.mod:Net, logreg"}], ids=["no-list", "not-listed"])
def test_a_model_class_the_site_does_not_allow_is_refused_and_never_imported(
    tmp_path: Path, user_model: tuple[str, Path], node: dict[str, Any]
) -> None:
    model, marker = user_model
    site = _site(tmp_path, model, node)
    before = dict(site.arrays)
    reply = site.train(1)
    assert (reply["status"], reply["code"]) == (Status.REFUSED_BUDGET.value, "model-not-allowed")
    assert "site-models" in reply["reason"]
    assert not marker.exists(), "the module was imported"
    assert all(np.array_equal(before[k], site.arrays[k]) for k in before), "nothing was trained"
    assert not (tmp_path / "state" / "node-a" / "participation.json").exists()
    assert "model-not-allowed" in REFUSAL_CODES  # the server counts it under its own label


def test_a_model_class_the_site_lists_trains(tmp_path: Path, user_model: tuple[str, Path]) -> None:
    model, marker = user_model
    site = _site(tmp_path, model, {"site-models": f"other.mod:Net,{model}"})
    before = dict(site.arrays)
    reply = site.train(1)
    assert reply["status"] == "ok" and reply["num-examples"] > 0
    assert marker.read_text() == "imported"
    assert any(not np.array_equal(before[k], site.arrays[k]) for k in before), "the site trained"


def test_registry_models_need_no_list_and_a_simulation_allows_its_own_model(tmp_path: Path) -> None:
    assert _site(tmp_path, "logreg", {}).train(1)["status"] == "ok"
    spec = {"run_config": {"model": "pkg.mod:Net"}, "site_policy": {"site-dp": True}}
    assert site_node_config(spec) == {"site-dp": True, "site-models": "pkg.mod:Net"}
