"""Shared machinery of the adaptive server optimizers (Reddi et al., 2021)."""

from abc import abstractmethod

import numpy as np

from stamen.server.optimizers.base import Arrays, ServerOptimizer, check_positive, check_unit_interval


class FedOpt(ServerOptimizer):
    """Adam-style server update driven by the aggregate's offset from the model.

    With delta = aggregate - current: m = beta_1 * m + (1 - beta_1) * delta (m starts
    at zero), v is updated by the subclass's second-moment rule, and
    new = current + step_size * m / (sqrt(v) + tau). This follows Flower 1.41's
    ``FedOpt`` line by line. State: ``{"m": {...}, "v": {...}}``.

    Parameters
    ----------
    eta : float
        Server-side learning rate.
    beta_1 : float
        First-moment (momentum) decay, in [0, 1).
    beta_2 : float
        Second-moment decay, in [0, 1).
    tau : float
        Adaptivity floor added to sqrt(v); larger means less adaptive.
    """

    state_keys = ("m", "v")

    def __init__(self, eta: float, beta_1: float, beta_2: float, tau: float) -> None:
        super().__init__()
        self.eta = check_positive("eta", eta)
        self.beta_1 = check_unit_interval("beta_1", beta_1)
        self.beta_2 = check_unit_interval("beta_2", beta_2)
        self.tau = check_positive("tau", tau)

    def _update(self, current: Arrays, aggregate: Arrays, server_round: int) -> Arrays:
        delta = {k: a - current[k] for k, a in aggregate.items()}
        if self._state:
            m_prev, v_prev = self._state["m"], self._state["v"]
        else:
            m_prev = v_prev = {k: np.zeros_like(d) for k, d in delta.items()}
        m = {k: self.beta_1 * m_prev[k] + (1 - self.beta_1) * d for k, d in delta.items()}
        v = {k: self._second_moment(v_prev[k], d) for k, d in delta.items()}
        self._state = {"m": m, "v": v}
        lr = self._step_size(server_round)
        return {k: x + lr * m[k] / (np.sqrt(v[k]) + self.tau) for k, x in current.items()}

    @abstractmethod
    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Return the updated second-moment estimate for one parameter."""

    def _step_size(self, server_round: int) -> float:
        """Server step size for this round; plain ``eta`` unless bias-corrected."""
        return self.eta
