"""A server learning-rate spike, for simulation only: rehearse a rollback (``server-lr-spike``).

``server-lr-spike = "A-B:F"`` multiplies the server step by F in rounds A..B. For every
server optimizer here the step is linear in the server learning rate, so a spiked round is
exactly that round with ``server-lr * F``; the optimizer state is the unspiked one's. The
simulation engine applies it by wrapping the run's server optimizer (``make_server_app``'s
``fault_layer``); the production ServerApp refuses the key.
"""

from __future__ import annotations

import logging

import numpy as np

from stamen.common.config import StamenConfig
from stamen.server.optimizers.base import ServerOptimizer

log = logging.getLogger("stamen.server")
Arrays = dict[str, np.ndarray]


def spiked_step(current: Arrays, new: Arrays, factor: float) -> Arrays:
    """The server step scaled by ``factor``: ``current + factor * (new - current)``."""
    return {
        k: (x + factor * (new[k] - x)).astype(x.dtype) if np.issubdtype(x.dtype, np.floating) else new[k]
        for k, x in current.items()
    }


class SpikedOptimizer(ServerOptimizer):
    """``inner``, whose step is multiplied by ``factor`` in rounds ``first..last``.

    Everything but the step's size is ``inner``'s: its state (checkpointed, restored, reset
    on a rollback) and its buffer norm.
    """

    def __init__(self, inner: ServerOptimizer, first: int, last: int, factor: float) -> None:
        super().__init__()
        self.inner = inner
        self.name, self.state_keys = inner.name, inner.state_keys
        self.first, self.last, self.factor = first, last, factor

    def step(self, current: Arrays, aggregate: Arrays, server_round: int) -> Arrays:
        new = self.inner.step(current, aggregate, server_round)
        if not self.first <= server_round <= self.last:
            return new
        log.warning("round %d: server step multiplied by %g (server-lr-spike rehearsal)", server_round, self.factor)
        return spiked_step(current, new, self.factor)

    def _update(self, current: Arrays, aggregate: Arrays, server_round: int) -> Arrays:
        return self.inner._update(current, aggregate, server_round)

    def state_dict(self) -> dict[str, Arrays]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Arrays]) -> None:
        self.inner.load_state_dict(state)

    def reset(self) -> None:
        self.inner.reset()

    def buffer_norm(self) -> float:
        return self.inner.buffer_norm()


def with_lr_spike(cfg: StamenConfig, optimizer: ServerOptimizer) -> ServerOptimizer:
    """The run's server optimizer, spiked as ``server-lr-spike`` says (unchanged when it is off)."""
    spike = cfg.server_lr_spike
    return optimizer if spike is None else SpikedOptimizer(optimizer, *spike)
