"""Adaptive federated optimization with Adam on the server (FedAdam)."""

import numpy as np

from stamen.server.optimizers.fedopt import FedOpt


class FedAdam(FedOpt):
    """FedAdam as in Flower 1.41, including its bias-corrected step size.

    v = beta_2 * v + (1 - beta_2) * delta**2 and the step size is
    eta * sqrt(1 - beta_2**(r + 1)) / (1 - beta_1**(r + 1)) with r the 1-based
    ``server_round`` (Flower's exponent, so round 1 is corrected as t = 2). The
    correction follows ``server_round``, not steps since ``reset``.

    Parameters
    ----------
    eta : float (default: 0.1)
        Server-side learning rate.
    beta_1 : float (default: 0.9)
        First-moment (momentum) decay, in [0, 1).
    beta_2 : float (default: 0.99)
        Second-moment decay, in [0, 1).
    tau : float (default: 1e-3)
        Adaptivity floor added to sqrt(v).
    """

    name = "fedadam"

    def __init__(
        self,
        eta: float = 1e-1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return self.beta_2 * v + (1 - self.beta_2) * (delta**2)

    def _step_size(self, server_round: int) -> float:
        # Same numpy expression as Flower so the float result is identical.
        return float(
            self.eta
            * np.sqrt(1 - np.power(self.beta_2, server_round + 1.0))
            / (1 - np.power(self.beta_1, server_round + 1.0))
        )
