"""Adaptive federated optimization with Yogi on the server (FedYogi)."""

import numpy as np

from stamen.server.optimizers.fedopt import FedOpt


class FedYogi(FedOpt):
    """FedYogi as in Flower 1.41: Yogi's additive second moment, no bias correction.

    v = v - (1 - beta_2) * delta**2 * sign(v - delta**2), and the step size is
    ``eta`` in every round.

    Parameters
    ----------
    eta : float (default: 0.01)
        Server-side learning rate.
    beta_1 : float (default: 0.9)
        First-moment (momentum) decay, in [0, 1).
    beta_2 : float (default: 0.99)
        Second-moment decay, in [0, 1).
    tau : float (default: 1e-3)
        Adaptivity floor added to sqrt(v).
    """

    name = "fedyogi"

    def __init__(
        self,
        eta: float = 1e-2,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta_2) * (delta**2) * np.sign(v - delta**2)
