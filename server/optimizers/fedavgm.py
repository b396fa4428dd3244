"""Federated averaging with server momentum (FedAvgM), optionally Nesterov."""

from stamen.server.optimizers.base import Arrays, ServerOptimizer, check_positive, check_unit_interval


class FedAvgM(ServerOptimizer):
    """Server SGD with momentum on the pseudo-gradient, as in Hsu et al. (2019).

    With g = current - aggregate, the buffer is m = g on the first step and
    m = momentum * m + g afterwards (PyTorch SGD convention, as Flower's FedAvgM);
    new = current - server_lr * m, or with Nesterov
    new = current - server_lr * (g + momentum * m). With ``momentum=0`` no buffer is
    kept. State: ``{"momentum": {...}}``.

    Parameters
    ----------
    server_lr : float (default: 1.0)
        Server-side learning rate.
    momentum : float (default: 0.9)
        Server-side momentum factor, in [0, 1).
    nesterov : bool (default: False)
        Use Nesterov momentum (not offered by Flower's FedAvgM).
    """

    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9, nesterov: bool = False) -> None:
        super().__init__()
        self.server_lr = check_positive("server_lr", server_lr)
        self.momentum = check_unit_interval("momentum", momentum)
        self.nesterov = nesterov
        self.state_keys = ("momentum",) if self.momentum > 0.0 else ()

    def _update(self, current: Arrays, aggregate: Arrays, server_round: int) -> Arrays:
        grad = {k: x - aggregate[k] for k, x in current.items()}
        if not self.state_keys:
            direction = grad
        else:
            prev = self._state.get("momentum")
            buffer = grad if prev is None else {k: self.momentum * prev[k] + g for k, g in grad.items()}
            self._state = {"momentum": buffer}
            direction = {k: g + self.momentum * buffer[k] for k, g in grad.items()} if self.nesterov else buffer
        return {k: x - self.server_lr * direction[k] for k, x in current.items()}
