"""Centralized evaluation on the server's own test split, when it has one.

An enterprise server may hold no data at all; then the model's shape comes from run
config and only federated evaluation runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stamen.common.config import StamenConfig
from stamen.common.datasets import load_dataset
from stamen.common.errors import ConfigError, DataError
from stamen.common.models import evaluate_model


@dataclass(frozen=True)
class ServerData:
    """What the server knows about the data: model shape, and maybe a test split."""

    input_shape: tuple[int, ...]
    num_classes: int
    x_test: torch.Tensor | None
    y_test: torch.Tensor | None


def load_server_data(cfg: StamenConfig) -> ServerData:
    """Model shape from run config or the run's dataset; the test split if present."""
    shape, classes = cfg.input_shape, int(cfg["num-classes"])
    try:
        data = load_dataset(str(cfg["dataset"]))
    except DataError:
        if shape is None or classes < 1:
            raise
        return ServerData(shape, classes, None, None)
    shape = shape or data.input_shape
    classes = classes or data.num_classes
    if shape != data.input_shape:
        raise ConfigError(f"input-shape {shape} does not match dataset {cfg['dataset']} ({data.input_shape})")
    if not cfg["server-eval"] or data.x_test is None or data.y_test is None:
        return ServerData(shape, classes, None, None)
    x = torch.from_numpy(np.array(data.x_test, dtype=np.float32))
    y = torch.from_numpy(np.array(data.y_test, dtype=np.int64))
    return ServerData(shape, classes, x, y)


def evaluate_centrally(model: torch.nn.Module, data: ServerData) -> tuple[float, float] | None:
    """(loss, accuracy) on the server's test split, or None without one."""
    if data.x_test is None or data.y_test is None:
        return None
    return evaluate_model(model, data.x_test, data.y_test, torch.device("cpu"))


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
        _, acc = evaluate_model(model, data.x_test[mask], data.y_test[mask], torch.device("cpu"))
        out.append(acc)
    return out
