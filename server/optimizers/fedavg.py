"""Federated averaging with a server learning rate."""

from stamen.server.optimizers.base import Arrays, ServerOptimizer, check_positive


class FedAvg(ServerOptimizer):
    """Plain federated averaging, optionally damped or amplified by a server step.

    new = current + server_lr * (aggregate - current), so ``server_lr=1`` takes the
    aggregate as is. Stateless.

    Parameters
    ----------
    server_lr : float (default: 1.0)
        Server-side learning rate applied to the aggregate's offset from the model.
    """

    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        super().__init__()
        self.server_lr = check_positive("server_lr", server_lr)

    def _update(self, current: Arrays, aggregate: Arrays, server_round: int) -> Arrays:
        if self.server_lr == 1.0:
            # Exact copy, so plain averaging is bit-for-bit the aggregate.
            return {k: a.copy() for k, a in aggregate.items()}
        return {k: x + self.server_lr * (aggregate[k] - x) for k, x in current.items()}
