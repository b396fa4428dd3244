"""Centralized evaluation on the server's own test split, when it has one.

An enterprise server may hold no data at all; then the model's shape comes from run
config and only federated evaluation runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from stamen.common.config import KEY_BY_NAME, StamenConfig
from stamen.common.datasets import Dataset, load_dataset
from stamen.common.errors import ConfigError, DataError
from stamen.common.features import on_features
from stamen.common.models import evaluate_model
from stamen.common.sitedata import server_dataset


@dataclass(frozen=True)
class ServerData:
    """What the server knows about the data: model shape, and maybe a test split."""

    input_shape: tuple[int, ...]
    num_classes: int
    x_test: torch.Tensor | None
    y_test: torch.Tensor | None
    feature_cache_mb: int = 0


def load_server_data(cfg: StamenConfig) -> ServerData:
    """Model shape from run config or the run's dataset; the test split if present.

    With ``input-shape`` and ``num-classes`` both set and ``dataset`` left at its default, the
    server holds no data of its own (a deployed ServerApp): no dataset is loaded, and only
    federated evaluation runs. A dataset named explicitly is loaded and must match the shape.
    """
    shape, classes = cfg.input_shape, int(cfg["num-classes"])
    if classes == 1:
        raise ConfigError("run config 'num-classes' is 1: a classifier needs at least 2 classes")
    own = server_dataset(cfg)
    if own is not None:
        return _own_server_data(cfg, shape or own[0], classes or own[1], own[2])
    if shape is not None and _holds_no_data(cfg):
        return ServerData(shape, classes, None, None)
    try:
        data = load_dataset(str(cfg["dataset"]))
    except DataError:
        if shape is None or classes < 1:
            raise
        return ServerData(shape, classes, None, None)
    _check_classes(data)
    shape = shape or data.input_shape
    classes = classes or data.num_classes
    if shape != data.input_shape:
        raise ConfigError(f"input-shape {shape} does not match dataset {cfg['dataset']} ({data.input_shape})")
    if not cfg["server-eval"] or data.x_test is None or data.y_test is None:
        return ServerData(shape, classes, None, None)
    x = torch.from_numpy(np.array(data.x_test, dtype=np.float32))
    y = torch.from_numpy(np.array(data.y_test, dtype=np.int64))
    return ServerData(shape, classes, x, y, int(cfg["feature-cache-mb"]))


def _holds_no_data(cfg: StamenConfig) -> bool:
    """The model's shape is given and no dataset is named: the server has no data of its own."""
    given = cfg.input_shape is not None and int(cfg["num-classes"]) > 0
    return given and cfg["dataset"] == KEY_BY_NAME["dataset"].default


def _check_classes(data: Dataset) -> None:
    """Refuse a dataset with a single label: every model would score 1.0 on it, learning nothing."""
    labels = np.unique(data.y_train if data.y_test is None else np.concatenate([data.y_train, data.y_test]))
    if len(labels) < 2:
        raise DataError(
            f"dataset {data.name} has one class only (every label is {int(labels[0])}): "
            "a classifier needs examples of at least 2 classes"
        )


def why_no_accuracy(cfg: StamenConfig, data: ServerData) -> str:
    """Why a run has no accuracy figure, and how to get one (for the summary and the console).

    Central evaluation needs a test split on the server; federated evaluation needs sites that
    hold data out and may report on it.
    """
    if _holds_no_data(cfg):
        central = "the server holds no data (input-shape and num-classes set, no dataset)"
    elif not cfg["server-eval"]:
        central = "server-eval is off"
    elif data.x_test is None and (cfg["site-data"] or cfg["data-loader"]):
        central = (
            "the sites' own data gives the server no test split (site-data: add a server.npz; "
            "data-loader: return x_test and y_test)"
        )
    elif data.x_test is None:
        central = f"the server's dataset ({cfg['dataset']}) has no test split"
    else:
        central = "the server did not evaluate"
    if float(cfg["holdout-fraction"]) == 0:
        federated = "sites hold no data out (holdout-fraction 0)"
    elif cfg["dp"] and not cfg["dp-public-stats"]:
        federated = "DP sites send no evaluation statistics (dp-public-stats is off)"
    else:
        federated = "no site answered the federated evaluation"
    return (
        f"no evaluation data: {central} and {federated}; to measure accuracy give the dataset a test split "
        "(npz arrays x_test and y_test) or, with DP, let sites publish evaluation statistics "
        "(--set dp-public-stats=true)"
    )


def _own_server_data(cfg: StamenConfig, shape: tuple[int, ...], classes: int, test: Dataset | None) -> ServerData:
    """The server's data when the sites have their own (``site-data`` / ``data-loader``)."""
    if not cfg["server-eval"] or test is None:
        return ServerData(shape, classes, None, None)
    if math.prod(test.input_shape) != math.prod(shape):
        raise DataError(f"the server's test split {test.name} has examples of shape {test.input_shape}, not {shape}")
    x = torch.from_numpy(np.array(test.x_train, dtype=np.float32)).reshape(-1, *shape)
    return ServerData(shape, classes, x, torch.from_numpy(np.array(test.y_train, dtype=np.int64)))


def evaluate_centrally(model: torch.nn.Module, data: ServerData) -> tuple[float, float] | None:
    """(loss, accuracy) on the server's test split, or None without one."""
    if data.x_test is None or data.y_test is None:
        return None
    return _evaluate(model, data.x_test, data.y_test, data)


def evaluate_tasks(model: torch.nn.Module, data: ServerData, tasks: tuple[tuple[int, ...], ...]) -> list[float] | None:
    """Accuracy on each task's classes of the server's test split (None without one).

    The model predicts over every class (class-incremental): a task's accuracy is the share
    of its test examples whose argmax over all outputs is right.
    """
    if data.x_test is None or data.y_test is None:
        return None
    out = []
    for classes in tasks:
        mask = torch.isin(data.y_test, torch.tensor(classes, dtype=data.y_test.dtype))
        if not bool(mask.any()):
            raise ConfigError(f"the server's test split has no example of task classes {list(classes)}")
        _, acc = _evaluate(model, data.x_test[mask], data.y_test[mask], data)
        out.append(acc)
    return out


def _evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, data: ServerData) -> tuple[float, float]:
    """Loss and accuracy on CPU; a model's fixed features of the test split are computed once per run."""
    cpu = torch.device("cpu")
    net, inputs = on_features(model, x, cache_mb=data.feature_cache_mb, scope="server", device=cpu)
    return evaluate_model(net, inputs, y, cpu)
