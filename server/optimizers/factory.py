"""Build a server optimizer from run-config values."""

from stamen.common.config import StamenConfig
from stamen.common.errors import ConfigError
from stamen.server.optimizers.base import ServerOptimizer, check_positive, check_unit_interval
from stamen.server.optimizers.fedadam import FedAdam
from stamen.server.optimizers.fedavg import FedAvg
from stamen.server.optimizers.fedavgm import FedAvgM
from stamen.server.optimizers.fedyogi import FedYogi

OPTIMIZER_NAMES = ("fedavg", "fedavgm", "fedadam", "fedyogi")


def make_server_optimizer(
    name: str,
    *,
    server_lr: float,
    momentum: float,
    nesterov: bool,
    beta_1: float,
    beta_2: float,
    tau: float,
) -> ServerOptimizer:
    """Return the optimizer called ``name``; ``server_lr`` is eta for fedadam/fedyogi.

    Every value is range-checked, used by ``name`` or not, so a bad run config fails
    at start-up under the config key's own name.
    """
    if name not in OPTIMIZER_NAMES:
        raise ConfigError(f"unknown server optimizer {name!r}; valid names: {', '.join(OPTIMIZER_NAMES)}")
    check_positive("server_lr", server_lr)
    check_unit_interval("momentum", momentum)
    check_unit_interval("beta_1", beta_1)
    check_unit_interval("beta_2", beta_2)
    check_positive("tau", tau)
    if name == "fedavg":
        return FedAvg(server_lr=server_lr)
    if name == "fedavgm":
        return FedAvgM(server_lr=server_lr, momentum=momentum, nesterov=nesterov)
    if name == "fedadam":
        return FedAdam(eta=server_lr, beta_1=beta_1, beta_2=beta_2, tau=tau)
    return FedYogi(eta=server_lr, beta_1=beta_1, beta_2=beta_2, tau=tau)


def server_optimizer_of(cfg: StamenConfig) -> ServerOptimizer:
    """The run's server optimizer, from its ``strategy`` and server-optimizer keys."""
    return make_server_optimizer(
        str(cfg["strategy"]),
        server_lr=float(cfg["server-lr"]),
        momentum=float(cfg["server-momentum"]),
        nesterov=bool(cfg["server-nesterov"]),
        beta_1=float(cfg["beta-1"]),
        beta_2=float(cfg["beta-2"]),
        tau=float(cfg["tau"]),
    )
