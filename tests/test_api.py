"""The public Python API: ``import stamen``, ``stamen.simulate`` and ``stamen.StamenStrategy``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

import stamen
from stamen.common.convert import arrays_to_record, record_to_arrays

ROOT = Path(__file__).resolve().parents[1]


def test_import_stamen_is_cheap_and_lists_its_api() -> None:
    code = "import sys, stamen; print(sorted(m for m in ('torch', 'ray', 'flwr') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
    for name in ("simulate", "SimulationResult", "ConfigError", "KEYS", "RunConfig", "StamenStrategy"):
        assert name in stamen.__all__ and getattr(stamen, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        stamen.nosuch  # noqa: B018


def test_the_run_config_table_is_public() -> None:
    names = [k.name for k in stamen.KEYS]
    assert "num-server-rounds" in names and "server-momentum" in names
    cfg = stamen.RunConfig.from_mapping({"lr": "0.1"})
    assert cfg["lr"] == 0.1
    with pytest.raises(stamen.ConfigError, match="unknown run config key"):
        stamen.RunConfig.from_mapping({"learning-rate": 0.1})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"learning_rate": 0.1}, "unknown run config key"),
        ({"lr": -1}, "'lr' must be > 0"),
        ({"dataset": "nosuch"}, "nosuch"),
        ({"clients": 0}, "clients must be >= 1"),
    ],
)
def test_simulate_raises_config_error_on_bad_input_and_writes_nothing(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    out = tmp_path / "run"
    with pytest.raises(stamen.ConfigError, match=message):
        stamen.simulate(out=out, **kwargs)
    assert not out.exists()


def test_simulate_refuses_a_run_directory_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(stamen.ConfigError, match="is not empty"):
        stamen.simulate(dataset="digits", clients=2, out=tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_resume_of_a_missing_directory_says_it_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(stamen.ConfigError, match="does not exist"):
        stamen.simulate(resume=tmp_path / "nosuch")


@pytest.mark.slow
def test_simulate_returns_the_runs_summary(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = []
    result = stamen.simulate(
        {"num-server-rounds": 2}, dataset="digits", clients=2, out=tmp_path / "run", on_progress=rows.append
    )
    assert isinstance(result, stamen.SimulationResult)
    assert result.summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert result.status == "completed" and result.rounds_completed == 2
    assert result.accuracy is not None and result.accuracy > 0.2  # 10 classes: chance is 0.1
    assert result.source == "centralized"
    assert [r["round"] for r in rows] == [1, 2]
    assert (tmp_path / "run" / "convergence.png").exists()


# --- StamenStrategy ----------------------------------------------------------------------


class _Grid:
    """The part of Flower's Grid that FedAvg's sampling uses: the connected node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _reply(instruction: Callable[..., Message], node: int, arrays: dict[str, np.ndarray], n: int) -> Message:
    content = RecordDict(
        {"arrays": arrays_to_record(arrays), "metrics": MetricRecord({"num-examples": n, "loss": float(node)})}
    )
    return Message(content=content, reply_to=instruction(node_id=node))


def test_stamen_strategy_screens_then_steps_with_server_momentum(instruction: Callable[..., Message]) -> None:
    strategy = stamen.StamenStrategy(
        {"strategy": "fedavgm", "server-momentum": 0.5, "update-norm-bound": 1.0},
        min_available_nodes=1,
        min_train_nodes=1,
    )
    current = {"w": np.zeros(4, dtype=np.float32)}
    messages = list(strategy.configure_train(1, arrays_to_record(current), ConfigRecord(), _Grid([11, 12, 13, 14])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13, 14]
    replies = [
        _reply(instruction, 11, {"w": np.full(4, 0.25, dtype=np.float32)}, 10),  # norm 0.5: kept as sent
        _reply(instruction, 12, {"w": np.full(4, 3.0, dtype=np.float32)}, 30),  # norm 6: clipped to 1
        _reply(instruction, 13, {"w": np.full(4, np.nan, dtype=np.float32)}, 10),  # rejected: not finite
        _reply(instruction, 14, {"w": np.zeros(3, dtype=np.float32)}, 10),  # rejected: wrong shape
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert dict(strategy.rejected) == {"non_finite": 1, "wrong_shape": 1}
    mean = (10 * 0.25 + 30 * 0.5) / 40  # the second update clipped to norm 1: 0.5 per coordinate
    np.testing.assert_allclose(record_to_arrays(arrays)["w"], np.full(4, mean), rtol=1e-6)
    assert metrics["loss"] == pytest.approx((10 * 11 + 30 * 12) / 40)  # example-weighted over the kept replies
    # round 2 from the new model, the same update again: momentum 0.5 adds half the last step
    first = record_to_arrays(arrays)["w"]
    list(strategy.configure_train(2, arrays, ConfigRecord(), _Grid([11])))
    arrays2, _ = strategy.aggregate_train(2, [_reply(instruction, 11, {"w": first + 0.25}, 10)])
    assert arrays2 is not None
    np.testing.assert_allclose(record_to_arrays(arrays2)["w"], first + 0.25 + 0.5 * mean, rtol=1e-6)
    restored = stamen.StamenStrategy({"strategy": "fedavgm", "server-momentum": 0.5})
    restored.load_state_dict(strategy.state_dict())
    np.testing.assert_allclose(restored.optimizer.buffer_norm(), strategy.optimizer.buffer_norm())


def test_stamen_strategy_returns_nothing_when_every_update_is_rejected(instruction: Callable[..., Message]) -> None:
    strategy = stamen.StamenStrategy(min_available_nodes=1, min_train_nodes=1)
    current = {"w": np.zeros(2, dtype=np.float32)}
    list(strategy.configure_train(1, arrays_to_record(current), ConfigRecord(), _Grid([11])))
    bad = Message(
        content=RecordDict({"arrays": arrays_to_record(current), "metrics": MetricRecord({"loss": 1.0})}),
        reply_to=instruction(node_id=11),
    )
    assert strategy.aggregate_train(1, [bad]) == (None, None)
    assert dict(strategy.rejected) == {"bad_metrics": 1}


def test_stamen_strategy_takes_stamen_config_errors_under_the_keys_name() -> None:
    with pytest.raises(stamen.ConfigError, match="server-momentum"):
        stamen.StamenStrategy({"server-momentum": 1.5})


@pytest.mark.slow
def test_stamen_strategy_runs_a_users_own_flower_app(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "user_flower_app.py"), str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["rounds"] == 3
    assert result["loss"][-1] < result["loss"][0] * 0.8
