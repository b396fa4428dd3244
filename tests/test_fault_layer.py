"""Fault injection is a simulation layer: the production apps neither load nor apply it.

The production ClientApp (``stamen.client.app:app``) and ServerApp refuse every
simulation-only key; ``stamen simulate`` builds its apps from :mod:`simulations.faults.layer`,
which applies them. Messages here are real Flower messages handled by the apps as Flower
calls them (``app(message, context)``, mods included), with real data and state stores.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from stamen.client.app import app as production_app
from stamen.common.config import KEY_BY_NAME, SIMULATION_ONLY, StamenConfig
from stamen.common.convert import arrays_to_record, model_to_arrays, record_to_arrays
from stamen.common.errors import ConfigError
from stamen.common.instruction import schema_header
from stamen.common.models import build_model
from stamen.common.reply import Status
from stamen.common.state import SiteStore
from stamen.server.app import make_server_app
from stamen.server.optimizers.factory import make_server_optimizer
from stamen.simulations.faults import layer
from stamen.simulations.faults.lr_spike import SpikedOptimizer, spiked_step, with_lr_spike

MakeInstruction = Callable[..., Message]
FAULTY: dict[str, Any] = {
    "attack": "scale",
    "attack-sites": "1",
    "attack-scale": 3.0,
    "label-shift-round": 1,
    "label-shift-sites": "hospital-a",
    "server-lr-spike": "2-2:5",
}
X = np.random.default_rng(0).random((120, 4)).astype(np.float32)
Y = np.arange(120) % 4


def _config(state_dir: Path, **changes: Any) -> dict[str, Any]:
    return {
        **StamenConfig.from_mapping({"dataset": "digits", "min-partition-size": 10, **changes}).as_dict(),
        "state-dir": str(state_dir),
        "replay-size": 0,
        "server-round": 1,
        "model-name": "logreg",
        "model-input-shape": [4],
        "model-num-classes": 4,
        **schema_header(),
    }


def _message(instruction: MakeInstruction, kind: str, config: dict[str, Any]) -> Message:
    msg = instruction(message_type=kind)
    content = RecordDict({"config": ConfigRecord(config)})
    if kind != MessageType.QUERY:
        content["arrays"] = arrays_to_record(model_to_arrays(build_model("logreg", (4,), 4, seed=0)))
    msg.content = content
    return msg


def _meta(reply: Message) -> dict[str, Any]:
    return dict(reply.content.config_records["meta"])


@pytest.fixture
def real_node(tmp_path: Path) -> dict[str, Any]:
    """A deployed site: its own site-id, data file and state directory, no partition-id; it accepts
    non-DP runs (``site-dp = false``: a real node requires DP otherwise)."""
    np.savez(tmp_path / "site.npz", x=X, y=Y)
    state = str(tmp_path / "state")
    return {"site-id": "hospital-a", "data": f"npz:{tmp_path / 'site.npz'}", "state-dir": state, "site-dp": False}


def _context(node: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=11, node_config=dict(node), state=RecordDict(), run_config={})


def test_every_simulation_only_key_has_a_faulty_value_here() -> None:
    assert set(FAULTY) == set(SIMULATION_ONLY)
    assert all(FAULTY[k] != KEY_BY_NAME[k].default for k in SIMULATION_ONLY)


def test_importing_the_production_apps_loads_no_fault_module() -> None:
    code = (
        "import json, sys\n"
        "import stamen.client.app, stamen.server.app\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('stamen.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "stamen.client.app" in loaded and "stamen.server.app" in loaded
    assert [m for m in loaded if m.startswith("stamen.simulations.faults")] == []
    # the package itself is loaded for its bundled scenario files (common/scenario.py), nothing under it
    assert [m for m in loaded if m.startswith("stamen.simulations")] in ([], ["stamen.simulations"])


@pytest.mark.parametrize("module", ["stamen.client.app", "stamen.server.app"])
def test_the_production_apps_source_imports_nothing_from_simulations(module: str) -> None:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert "stamen.common.config" in imported  # the walk sees the module's imports
    assert [m for m in imported if m.startswith("stamen.simulations")] == []


def test_a_real_node_trains_when_no_fault_key_is_set(
    tmp_path: Path, instruction: MakeInstruction, real_node: dict[str, Any]
) -> None:
    reply = production_app(_message(instruction, MessageType.TRAIN, _config(tmp_path / "run")), _context(real_node))
    assert _meta(reply)["status"] == Status.OK.value
    assert "arrays" in reply.content.array_records
    assert SiteStore(str(tmp_path / "state"), "hospital-a").read_json("participation")["rounds"] == 1


@pytest.mark.parametrize("key", sorted(FAULTY))
@pytest.mark.parametrize("kind", [MessageType.TRAIN, MessageType.QUERY, MessageType.EVALUATE])
def test_a_real_node_refuses_each_fault_key_and_trains_nothing(
    tmp_path: Path, instruction: MakeInstruction, real_node: dict[str, Any], key: str, kind: str
) -> None:
    config = _config(tmp_path / "run", **{key: FAULTY[key]})
    reply = production_app(_message(instruction, kind, config), _context(real_node))
    meta = _meta(reply)
    assert meta["status"] == Status.ERROR.value
    assert f"'{key}'" in meta["reason"] and "simulation-only" in meta["reason"]
    assert meta["site-id"] == "hospital-a"
    assert "arrays" not in reply.content.array_records
    assert dict(reply.content.metric_records["metrics"]) == {}
    assert not (tmp_path / "state").exists(), "the refused instruction wrote to the site's state"


def test_the_refusal_names_every_fault_key_set(
    tmp_path: Path, instruction: MakeInstruction, real_node: dict[str, Any]
) -> None:
    config = _config(tmp_path / "run", attack="nan", **{"label-shift-round": 2})
    reason = _meta(production_app(_message(instruction, MessageType.TRAIN, config), _context(real_node)))["reason"]
    assert "'attack'" in reason and "'label-shift-round'" in reason


def test_the_production_server_app_refuses_a_fault_key() -> None:
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match=r"'server-lr-spike'.*simulation-only"):
        make_server_app({"server-lr-spike": "2-2:5"})(None, context)  # type: ignore[arg-type]


def _simulated_train(instruction: MakeInstruction, state_dir: Path, node: dict[str, Any], **changes: Any) -> Message:
    config = _config(state_dir, **changes)
    config.update({"model-name": "cnn8", "model-input-shape": [1, 8, 8], "model-num-classes": 10})
    msg = _message(instruction, MessageType.TRAIN, config)
    msg.content["arrays"] = arrays_to_record(model_to_arrays(build_model("cnn8", (1, 8, 8), 10, seed=0)))
    return layer.client_app()(msg, _context(node))


def test_the_simulation_layer_scales_the_update_of_attacking_partitions_only(
    tmp_path: Path, instruction: MakeInstruction
) -> None:
    node = {"partition-id": 0, "num-partitions": 3}
    start = model_to_arrays(build_model("cnn8", (1, 8, 8), 10, seed=0))
    honest = _simulated_train(instruction, tmp_path / "honest", node)
    attacked = _simulated_train(instruction, tmp_path / "attacked", node, attack="scale", **{"attack-sites": "1"})
    spared = _simulated_train(instruction, tmp_path / "spared", node, attack="scale", **{"attack-sites": "1,"})
    h, a, s = (record_to_arrays(r.content.array_records["arrays"]) for r in (honest, attacked, spared))
    assert _meta(attacked)["status"] == Status.OK.value
    for k, v in start.items():
        if np.issubdtype(v.dtype, np.floating):
            np.testing.assert_allclose(a[k] - v, 10.0 * (h[k] - v), rtol=1e-4, atol=1e-6)
            np.testing.assert_array_equal(s[k], h[k])  # partition 0 is not in '1,'


def test_the_simulation_layer_label_shift_trains_on_the_lower_classes_only(
    tmp_path: Path, instruction: MakeInstruction
) -> None:
    node = {"partition-id": 2, "num-partitions": 3}
    honest = _simulated_train(instruction, tmp_path / "honest", node)
    shifted = _simulated_train(
        instruction, tmp_path / "shifted", node, **{"label-shift-round": 1, "label-shift-sites": "site-0002"}
    )
    n_honest = dict(honest.content.metric_records["metrics"])["num-examples"]
    n_shifted = dict(shifted.content.metric_records["metrics"])["num-examples"]
    assert 0 < n_shifted < n_honest


def test_the_simulation_layer_refuses_an_attack_on_a_real_node(
    tmp_path: Path, instruction: MakeInstruction, real_node: dict[str, Any]
) -> None:
    config = _config(tmp_path / "run", attack="scale", **{"attack-sites": "1"})
    reply = layer.client_app()(_message(instruction, MessageType.TRAIN, config), _context(real_node))
    assert _meta(reply)["status"] == Status.ERROR.value and "simulation-only" in _meta(reply)["reason"]
    assert "arrays" not in reply.content.array_records


def test_the_spike_multiplies_the_step_in_its_rounds_and_shares_the_optimizers_state() -> None:
    rng = np.random.default_rng(0)
    current = {"w": rng.random((3, 4), dtype=np.float32), "n": np.array([5])}
    aggregates = [{"w": rng.random((3, 4), dtype=np.float32), "n": np.array([6 + i])} for i in range(3)]
    kwargs = {"server_lr": 1.0, "momentum": 0.9, "nesterov": False, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    plain, inner = make_server_optimizer("fedavgm", **kwargs), make_server_optimizer("fedavgm", **kwargs)
    spiked = with_lr_spike(StamenConfig.from_mapping({"server-lr-spike": "2-2:5"}), inner)
    assert isinstance(spiked, SpikedOptimizer)
    for server_round, aggregate in enumerate(aggregates, start=1):
        expected = plain.step(current, aggregate, server_round)
        if server_round == 2:
            expected = spiked_step(current, expected, 5.0)
        got = spiked.step(current, aggregate, server_round)
        np.testing.assert_allclose(got["w"], expected["w"], rtol=1e-6)
        np.testing.assert_array_equal(spiked.state_dict()["momentum"]["w"], plain.state_dict()["momentum"]["w"])
    assert spiked.buffer_norm() == inner.buffer_norm() > 0
    spiked.reset()
    assert inner.state_dict() == {}
    assert with_lr_spike(StamenConfig.from_mapping({}), inner) is inner
