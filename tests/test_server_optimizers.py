"""Server optimizers: hand-computed FedAvgM, equivalence with Flower, explicit state."""

import math
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam as FlwrFedAdam
from flwr.serverapp.strategy import FedAvg as FlwrFedAvg
from flwr.serverapp.strategy import FedAvgM as FlwrFedAvgM
from flwr.serverapp.strategy import FedYogi as FlwrFedYogi

from stamen.common.errors import ConfigError, StateError
from stamen.common.flwr_internal import SUPERLINK_NODE_ID, TaskIdentity, aggregate_arrayrecords
from stamen.server.optimizers import (
    Arrays,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
    make_server_optimizer,
)

FACTORY_DEFAULTS = dict(server_lr=0.1, momentum=0.9, nesterov=False, beta_1=0.9, beta_2=0.99, tau=1e-3)


OPTIMIZERS: list[Callable[[], ServerOptimizer]] = [
    lambda: FedAvg(server_lr=0.5),
    lambda: FedAvgM(server_lr=0.5, momentum=0.9),
    lambda: FedAvgM(server_lr=0.5, momentum=0.9, nesterov=True),
    lambda: FedAdam(),
    lambda: FedYogi(),
]
OPTIMIZER_IDS = ["fedavg", "fedavgm", "fedavgm-nesterov", "fedadam", "fedyogi"]


def _model(seed: int, dtype: type = np.float64) -> Arrays:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(size=(3, 2)).astype(dtype),
        "b": rng.normal(size=(2,)).astype(dtype),
    }


def _as_list(arrays: Arrays) -> dict[str, list]:
    return {k: v.tolist() for k, v in arrays.items()}


# --- FedAvgM by hand -------------------------------------------------------------


def test_fedavgm_matches_hand_computation() -> None:
    opt = FedAvgM(server_lr=1.0, momentum=0.5)
    x = {"p": np.array([1.0, 2.0])}
    # Round 1: g = x - a = [1, 2] - [0, 2.5] = [1, -0.5]; m = g (first round)
    #          x = x - m = [0, 2.5]
    x = opt.step(x, {"p": np.array([0.0, 2.5])}, 1)
    np.testing.assert_array_equal(x["p"], [0.0, 2.5])
    np.testing.assert_array_equal(opt.state_dict()["momentum"]["p"], [1.0, -0.5])
    # Round 2: g = [0, 2.5] - [-1, 2.5] = [1, 0]
    #          m = 0.5 * [1, -0.5] + [1, 0] = [1.5, -0.25]
    #          x = [0, 2.5] - [1.5, -0.25] = [-1.5, 2.75]
    x = opt.step(x, {"p": np.array([-1.0, 2.5])}, 2)
    np.testing.assert_array_equal(x["p"], [-1.5, 2.75])
    np.testing.assert_array_equal(opt.state_dict()["momentum"]["p"], [1.5, -0.25])
    # Round 3: g = [-1.5, 2.75] - [-1.5, 3.75] = [0, -1]
    #          m = 0.5 * [1.5, -0.25] + [0, -1] = [0.75, -1.125]
    #          x = [-1.5, 2.75] - [0.75, -1.125] = [-2.25, 3.875]
    x = opt.step(x, {"p": np.array([-1.5, 3.75])}, 3)
    np.testing.assert_array_equal(x["p"], [-2.25, 3.875])
    np.testing.assert_array_equal(opt.state_dict()["momentum"]["p"], [0.75, -1.125])
    assert opt.buffer_norm() == pytest.approx(math.sqrt(0.75**2 + 1.125**2))


def test_fedavgm_nesterov_matches_hand_computation() -> None:
    opt = FedAvgM(server_lr=1.0, momentum=0.5, nesterov=True)
    x = {"p": np.array([1.0, 2.0])}
    # Round 1: g = [1, 2] - [0, 2.5] = [1, -0.5]; m = g = [1, -0.5]
    #          step = g + 0.5 * m = [1.5, -0.75]; x = [1, 2] - step = [-0.5, 2.75]
    x = opt.step(x, {"p": np.array([0.0, 2.5])}, 1)
    np.testing.assert_array_equal(x["p"], [-0.5, 2.75])
    # Round 2: g = [-0.5, 2.75] - [-1.5, 2.75] = [1, 0]
    #          m = 0.5 * [1, -0.5] + [1, 0] = [1.5, -0.25]
    #          step = [1, 0] + 0.5 * [1.5, -0.25] = [1.75, -0.125]
    #          x = [-0.5, 2.75] - [1.75, -0.125] = [-2.25, 2.875]
    x = opt.step(x, {"p": np.array([-1.5, 2.75])}, 2)
    np.testing.assert_array_equal(x["p"], [-2.25, 2.875])
    # Round 3: g = [-2.25, 2.875] - [-2.25, 3.875] = [0, -1]
    #          m = 0.5 * [1.5, -0.25] + [0, -1] = [0.75, -1.125]
    #          step = [0, -1] + 0.5 * [0.75, -1.125] = [0.375, -1.5625]
    #          x = [-2.25, 2.875] - [0.375, -1.5625] = [-2.625, 4.4375]
    x = opt.step(x, {"p": np.array([-2.25, 3.875])}, 3)
    np.testing.assert_array_equal(x["p"], [-2.625, 4.4375])
    np.testing.assert_array_equal(opt.state_dict()["momentum"]["p"], [0.75, -1.125])


def test_fedavgm_without_momentum_keeps_no_state() -> None:
    opt = FedAvgM(server_lr=0.5, momentum=0.0)
    # x = [1, 2] - 0.5 * ([1, 2] - [3, 0]) = [2, 1]
    x = opt.step({"p": np.array([1.0, 2.0])}, {"p": np.array([3.0, 0.0])}, 1)
    np.testing.assert_array_equal(x["p"], [2.0, 1.0])
    assert opt.state_dict() == {}
    assert opt.buffer_norm() == 0.0


def test_fedavg_server_lr() -> None:
    current = {"p": np.array([1.0, 2.0])}
    aggregate = {"p": np.array([3.0, 0.0])}
    np.testing.assert_array_equal(FedAvg().step(current, aggregate, 1)["p"], [3.0, 0.0])
    # [1, 2] + 0.5 * ([3, 0] - [1, 2]) = [2, 1]
    np.testing.assert_array_equal(FedAvg(0.5).step(current, aggregate, 1)["p"], [2.0, 1.0])


# --- Equivalence with Flower's strategies ------------------------------------------


class _FakeGrid:
    """Just enough of Flower's Grid for ``configure_train``: the connected node ids."""

    def __init__(self, node_ids: list[int]) -> None:
        self._node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)


@pytest.fixture
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps instruction messages with the ServerApp's identity; fake one."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


FLOWER_PAIRS = [
    (lambda: FedAvg(), lambda: FlwrFedAvg()),
    (
        lambda: FedAvgM(server_lr=0.5, momentum=0.9),
        lambda: FlwrFedAvgM(server_learning_rate=0.5, server_momentum=0.9),
    ),
    (
        lambda: FedAvgM(server_lr=0.7, momentum=0.0),
        lambda: FlwrFedAvgM(server_learning_rate=0.7, server_momentum=0.0),
    ),
    (lambda: FedAdam(), lambda: FlwrFedAdam()),
    (
        lambda: FedAdam(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-2),
        lambda: FlwrFedAdam(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-2),
    ),
    (lambda: FedYogi(), lambda: FlwrFedYogi()),
    (
        lambda: FedYogi(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-2),
        lambda: FlwrFedYogi(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-2),
    ),
]
FLOWER_IDS = [
    "fedavg",
    "fedavgm",
    "fedavgm-no-momentum",
    "fedadam-default",
    "fedadam",
    "fedyogi-default",
    "fedyogi",
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("make_ours", "make_flower"), FLOWER_PAIRS, ids=FLOWER_IDS)
@pytest.mark.usefixtures("serverapp_identity")
def test_matches_flower_strategy_over_rounds(make_ours, make_flower, dtype) -> None:
    ours: ServerOptimizer = make_ours()
    flower = make_flower()
    grid = _FakeGrid([11, 22, 33])
    num_examples = {11: 10, 22: 30, 33: 60}
    rng = np.random.default_rng(0)
    initial = _model(1, dtype)
    current = {k: v.copy() for k, v in initial.items()}
    flower_arrays = ArrayRecord({k: Array(v.copy()) for k, v in initial.items()})

    for server_round in range(1, 5):  # Flower's Strategy.start counts from 1
        # Each node "trains" by adding its own update to the model it received.
        updates = {
            node: {k: rng.normal(scale=0.1, size=v.shape).astype(dtype) for k, v in initial.items()}
            for node in num_examples
        }

        instructions = flower.configure_train(server_round, flower_arrays, ConfigRecord(), grid)
        replies = []
        for msg in instructions:
            node = msg.metadata.dst_node_id
            received = {k: a.numpy() for k, a in msg.content["arrays"].items()}
            content = RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(received[k] + updates[node][k]) for k in received}),
                    "metrics": MetricRecord({"num-examples": num_examples[node]}),
                }
            )
            replies.append(Message(content, reply_to=msg))
        flower_arrays, _ = flower.aggregate_train(server_round, replies)

        # Our side gets the same weighted mean, computed by Flower's own helper.
        client_contents = [
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(current[k] + updates[node][k]) for k in current}),
                    "metrics": MetricRecord({"num-examples": n}),
                }
            )
            for node, n in num_examples.items()
        ]
        aggregate_record = aggregate_arrayrecords(client_contents, "num-examples")
        aggregate = {k: a.numpy() for k, a in aggregate_record.items()}
        current = ours.step(current, aggregate, server_round)

        for k, v in current.items():
            assert v.dtype == dtype
            flower_value = flower_arrays[k].numpy()
            assert np.max(np.abs(v - flower_value)) <= 1e-6, (server_round, k)
    # The models moved; this was not a comparison of two untouched copies.
    assert np.max(np.abs(current["w"] - initial["w"])) > 1e-3


# --- Explicit state ----------------------------------------------------------------


def _offset(current: Arrays, offset: Arrays) -> Arrays:
    """An aggregate near ``current``, as a robust or averaged client model would be."""
    return {k: current[k] + 0.1 * offset[k] for k in current}


@pytest.mark.parametrize("make", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_restored_optimizer_continues_like_uninterrupted(make: Callable[[], ServerOptimizer]) -> None:
    uninterrupted = make()
    interrupted = make()
    x_a = x_b = _model(0)
    for r in (1, 2):
        x_a = uninterrupted.step(x_a, _offset(x_a, _model(100 + r)), r)
        x_b = interrupted.step(x_b, _offset(x_b, _model(100 + r)), r)

    checkpoint = interrupted.state_dict()
    restored = make()
    restored.load_state_dict(checkpoint)
    # Changing the checkpoint afterwards must not reach the restored optimizer.
    for arrays in checkpoint.values():
        for v in arrays.values():
            v += 1.0
    for r in (3, 4, 5):
        x_a = uninterrupted.step(x_a, _offset(x_a, _model(100 + r)), r)
        x_b = restored.step(x_b, _offset(x_b, _model(100 + r)), r)
        assert _as_list(x_a) == _as_list(x_b)
    assert restored.buffer_norm() == uninterrupted.buffer_norm()


def test_state_dict_shapes_and_keys() -> None:
    current, aggregate = _model(0), _model(1)
    for opt, keys in [
        (FedAvg(0.5), set()),
        (FedAvgM(momentum=0.9), {"momentum"}),
        (FedAdam(), {"m", "v"}),
        (FedYogi(), {"m", "v"}),
    ]:
        assert opt.state_dict() == {}
        opt.step(current, aggregate, 1)
        state = opt.state_dict()
        assert set(state) == keys
        for arrays in state.values():
            assert {k: v.shape for k, v in arrays.items()} == {k: v.shape for k, v in current.items()}


@pytest.mark.parametrize(
    ("opt", "state", "match"),
    [
        (FedAdam(), {"momentum": {"w": np.zeros(2)}}, "must hold"),
        (FedYogi(), {"m": {"w": np.zeros(2)}}, "must hold"),
        (FedAvgM(momentum=0.9), {"m": {"w": np.zeros(2)}, "v": {"w": np.zeros(2)}}, "must hold"),
        (FedAvgM(momentum=0.0), {"momentum": {"w": np.zeros(2)}}, "must hold"),
        (FedAvg(), {"momentum": {"w": np.zeros(2)}}, "must hold"),
        (FedAdam(), {"m": {"w": np.zeros(2)}, "v": {"b": np.zeros(2)}}, "disagree"),
        (FedAdam(), {"m": {"w": np.zeros(2)}, "v": {"w": np.zeros(3)}}, "disagree"),
        (FedAvgM(), {"momentum": {"w": [0.0, 1.0]}}, "map parameter names to arrays"),
        (FedAvgM(), {"momentum": np.zeros(2)}, "map parameter names to arrays"),
    ],
)
def test_load_state_dict_rejects_mismatched_state(opt, state, match) -> None:
    with pytest.raises(StateError, match=match):
        opt.load_state_dict(state)


def test_state_for_another_model_is_rejected_at_step() -> None:
    opt = FedAdam()
    opt.load_state_dict({"m": {"other": np.zeros(2)}, "v": {"other": np.zeros(2)}})
    with pytest.raises(StateError, match="another model"):
        opt.step(_model(0), _model(1), 1)
    opt = FedAvgM()
    opt.load_state_dict({"momentum": {"w": np.zeros((2, 3)), "b": np.zeros(2)}})
    with pytest.raises(StateError, match="shape"):
        opt.step(_model(0), _model(1), 1)


@pytest.mark.parametrize("make", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_reset_clears_state(make: Callable[[], ServerOptimizer]) -> None:
    opt = make()
    fresh = make()
    x = _model(0)
    for r in (1, 2, 3):
        x = opt.step(x, _offset(x, _model(10 + r)), r)
    opt.reset()
    assert opt.state_dict() == {}
    assert opt.buffer_norm() == 0.0
    # After reset the next step is that of a fresh optimizer at the same round.
    aggregate = _offset(x, _model(20))
    assert _as_list(opt.step(x, aggregate, 4)) == _as_list(fresh.step(x, aggregate, 4))


def test_loading_empty_state_clears() -> None:
    opt = FedYogi()
    opt.step(_model(0), _model(1), 1)
    opt.load_state_dict({})
    assert opt.state_dict() == {}


def test_buffer_norm() -> None:
    current = {"p": np.array([0.0, 0.0]), "q": np.array([0.0])}
    aggregate = {"p": np.array([3.0, 0.0]), "q": np.array([4.0])}  # ||delta|| = 5
    fedavg = FedAvg(0.5)
    fedavg.step(current, aggregate, 1)
    assert fedavg.buffer_norm() == 0.0
    fedavgm = FedAvgM(momentum=0.9)
    assert fedavgm.buffer_norm() == 0.0
    fedavgm.step(current, aggregate, 1)  # m = g = current - aggregate
    assert fedavgm.buffer_norm() == pytest.approx(5.0)
    fedadam = FedAdam(beta_1=0.9)
    fedadam.step(current, aggregate, 1)  # m = (1 - 0.9) * delta
    assert fedadam.buffer_norm() == pytest.approx(0.5)


@pytest.mark.parametrize("make", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_inputs_not_mutated_or_aliased(make: Callable[[], ServerOptimizer]) -> None:
    opt = make()
    current = {**_model(0), "count": np.array([7, 8], dtype=np.int64)}
    aggregate = {**_model(1), "count": np.array([9, 10], dtype=np.int64)}
    current_copy = _as_list(current)
    aggregate_copy = _as_list(aggregate)
    for r in (1, 2):
        new = opt.step(current, aggregate, r)
    assert _as_list(current) == current_copy
    assert _as_list(aggregate) == aggregate_copy
    for k, v in new.items():
        assert not np.shares_memory(v, current[k])
        assert not np.shares_memory(v, aggregate[k])
        for arrays in opt._state.values():
            assert k not in arrays or not np.shares_memory(v, arrays[k])


@pytest.mark.parametrize("make", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_integer_arrays_take_the_aggregate(make: Callable[[], ServerOptimizer]) -> None:
    opt = make()
    current = {"w": np.ones(3, dtype=np.float32), "count": np.array([3], dtype=np.int64)}
    aggregate = {"w": np.zeros(3, dtype=np.float32), "count": np.array([5], dtype=np.int64)}
    new = opt.step(current, aggregate, 1)
    assert new["count"].dtype == np.int64
    assert new["count"].tolist() == [5]
    assert new["w"].dtype == np.float32
    assert list(new) == ["w", "count"]
    for arrays in opt.state_dict().values():
        assert set(arrays) == {"w"}


def test_layout_mismatch_and_round_zero_rejected() -> None:
    opt = FedAvgM()
    with pytest.raises(ValueError, match="keys"):
        opt.step({"w": np.zeros(2)}, {"v": np.zeros(2)}, 1)
    with pytest.raises(ValueError, match="shape"):
        opt.step({"w": np.zeros(2)}, {"w": np.zeros(3)}, 1)
    with pytest.raises(ValueError, match="server_round"):
        opt.step({"w": np.zeros(2)}, {"w": np.zeros(2)}, 0)


# --- Factory -----------------------------------------------------------------------


def test_factory_builds_each_optimizer() -> None:
    args = {**FACTORY_DEFAULTS, "server_lr": 0.3, "momentum": 0.5, "nesterov": True}
    fedavg = make_server_optimizer("fedavg", **args)
    assert isinstance(fedavg, FedAvg) and fedavg.server_lr == 0.3
    fedavgm = make_server_optimizer("fedavgm", **args)
    assert isinstance(fedavgm, FedAvgM)
    assert (fedavgm.server_lr, fedavgm.momentum, fedavgm.nesterov) == (0.3, 0.5, True)
    for name, cls in [("fedadam", FedAdam), ("fedyogi", FedYogi)]:
        opt = make_server_optimizer(name, **{**args, "beta_1": 0.8, "beta_2": 0.9, "tau": 0.01})
        assert type(opt) is cls and opt.name == name
        assert (opt.eta, opt.beta_1, opt.beta_2, opt.tau) == (0.3, 0.8, 0.9, 0.01)


def test_factory_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        make_server_optimizer("sgd", **FACTORY_DEFAULTS)
    for name in ("fedavg", "fedavgm", "fedadam", "fedyogi", "'sgd'"):
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("server_lr", 0.0),
        ("server_lr", -1.0),
        ("server_lr", float("nan")),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("beta_1", 1.0),
        ("beta_2", -0.5),
        ("beta_2", 1.5),
        ("tau", 0.0),
        ("tau", float("inf")),
    ],
)
def test_factory_rejects_out_of_range_values(param: str, value: float) -> None:
    with pytest.raises(ConfigError, match=param):
        make_server_optimizer("fedadam", **{**FACTORY_DEFAULTS, param: value})


@pytest.mark.parametrize(
    ("build", "param"),
    [
        (lambda: FedAvg(server_lr=0.0), "server_lr"),
        (lambda: FedAvgM(momentum=1.0), "momentum"),
        (lambda: FedAdam(eta=-1.0), "eta"),
        (lambda: FedYogi(beta_2=1.0), "beta_2"),
    ],
)
def test_constructors_validate(build, param: str) -> None:
    with pytest.raises(ConfigError, match=param):
        build()
