"""Server optimizers: turn a round's aggregate into the next global model.

Flower's ``FedAvgM``/``FedAdam``/``FedYogi`` strategies keep their buffers and current
model in private attributes that a checkpoint cannot capture cleanly, offer no
Nesterov, and are fused to plain weighted averaging. stamen needs to apply momentum
on top of robust aggregates (median, trimmed mean, Krum) and to reset it on rollback,
so these optimizers take any aggregate and expose their state explicitly
(``state_dict``/``load_state_dict``/``reset``). Their updates match Flower 1.41's.
"""

from stamen.server.optimizers.base import Arrays, ServerOptimizer
from stamen.server.optimizers.factory import OPTIMIZER_NAMES, make_server_optimizer, server_optimizer_of
from stamen.server.optimizers.fedadam import FedAdam
from stamen.server.optimizers.fedavg import FedAvg
from stamen.server.optimizers.fedavgm import FedAvgM
from stamen.server.optimizers.fedopt import FedOpt
from stamen.server.optimizers.fedyogi import FedYogi

__all__ = [
    "OPTIMIZER_NAMES",
    "Arrays",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedOpt",
    "FedYogi",
    "ServerOptimizer",
    "make_server_optimizer",
    "server_optimizer_of",
]
