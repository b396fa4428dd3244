"""Server-optimizer interface: all optimizer state lives in one explicit dict.

Keeping the state in ``self._state`` (group name -> per-parameter arrays) rather than
in ad-hoc attributes is what lets a checkpoint capture it with ``state_dict`` and a
rollback drop it with ``reset``.
"""

import math
from abc import ABC, abstractmethod

import numpy as np

from stamen.common.errors import ConfigError, StateError

Arrays = dict[str, np.ndarray]


def check_positive(name: str, value: float) -> float:
    """Return ``value`` as float, or raise ConfigError naming ``name`` if not > 0."""
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_unit_interval(name: str, value: float) -> float:
    """Return ``value`` as float, or raise ConfigError naming ``name`` if not in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def _is_trainable(array: np.ndarray) -> bool:
    # Integer/bool arrays (step counters, BatchNorm's num_batches_tracked) are not
    # parameters to optimise; they take the aggregate as is.
    return bool(np.issubdtype(array.dtype, np.floating))


class ServerOptimizer(ABC):
    """Turn the round's aggregated client model into the next global model.

    ``aggregate`` may come from any aggregation rule (weighted mean, median, trimmed
    mean, Krum); the optimizer only sees the resulting arrays. Rounds are numbered as
    in Flower's ``Strategy.start``: pass ``server_round=1`` for the first round.
    """

    name: str
    # State groups a non-empty state holds; the first one is reported by buffer_norm.
    state_keys: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._state: dict[str, Arrays] = {}

    def step(self, current: Arrays, aggregate: Arrays, server_round: int) -> Arrays:
        """Return the new global model; neither input is mutated or aliased.

        Float arrays are updated by the optimizer; other arrays take the aggregate.
        """
        if server_round < 1:
            raise ValueError(f"server_round starts at 1, got {server_round}")
        _check_same_layout(current, aggregate)
        trainable = [k for k, v in current.items() if _is_trainable(v)]
        if self._state:
            self._check_state_matches(current, trainable)
        updated = self._update(
            {k: current[k] for k in trainable},
            {k: aggregate[k] for k in trainable},
            server_round,
        )
        return {
            k: updated[k].astype(v.dtype, copy=False) if k in updated else aggregate[k].copy()
            for k, v in current.items()
        }

    @abstractmethod
    def _update(self, current: Arrays, aggregate: Arrays, server_round: int) -> Arrays:
        """Compute new float arrays (fresh objects) and advance ``self._state``."""

    def state_dict(self) -> dict[str, Arrays]:
        """Return a copy of the optimizer state; empty before the first step."""
        return {g: {k: v.copy() for k, v in arrays.items()} for g, arrays in self._state.items()}

    def load_state_dict(self, state: dict[str, Arrays]) -> None:
        """Replace the state with a copy of ``state`` (empty means no state yet)."""
        if not state:
            self._state = {}
            return
        if set(state) != set(self.state_keys):
            expected = sorted(self.state_keys) or "no state groups"
            raise StateError(f"{self.name} state must hold {expected} (or be empty), got {sorted(state)}")
        reference: dict[str, tuple[int, ...]] | None = None
        for group in self.state_keys:
            arrays = state[group]
            if not isinstance(arrays, dict) or not all(
                isinstance(k, str) and isinstance(v, np.ndarray) for k, v in arrays.items()
            ):
                raise StateError(f"{self.name} state group '{group}' must map parameter names to arrays")
            shapes = {k: v.shape for k, v in arrays.items()}
            if reference is None:
                reference = shapes
            elif shapes != reference:
                raise StateError(
                    f"{self.name} state groups {list(self.state_keys)} disagree on parameter names or shapes"
                )
        self._state = {g: {k: np.array(v, copy=True) for k, v in state[g].items()} for g in self.state_keys}

    def reset(self) -> None:
        """Drop momentum/moments, e.g. after rolling back to an earlier model."""
        self._state = {}

    def buffer_norm(self) -> float:
        """Global L2 norm of the momentum (first-moment) buffer; 0.0 when there is none."""
        if not self._state:
            return 0.0
        buffer = self._state[self.state_keys[0]]
        return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in buffer.values()))

    def _check_state_matches(self, current: Arrays, trainable: list[str]) -> None:
        buffer = self._state[self.state_keys[0]]
        if set(buffer) != set(trainable):
            raise StateError(
                f"{self.name} state holds parameters {sorted(buffer)} but the model's "
                f"float parameters are {sorted(trainable)}; was it saved for another model?"
            )
        for k in trainable:
            if buffer[k].shape != current[k].shape:
                raise StateError(
                    f"{self.name} state for '{k}' has shape {buffer[k].shape}, the model has {current[k].shape}"
                )


def _check_same_layout(current: Arrays, aggregate: Arrays) -> None:
    if set(current) != set(aggregate):
        raise ValueError(f"aggregate keys {sorted(aggregate)} differ from model keys {sorted(current)}")
    for k, v in current.items():
        if aggregate[k].shape != v.shape:
            raise ValueError(f"aggregate '{k}' has shape {aggregate[k].shape}, the model has {v.shape}")
