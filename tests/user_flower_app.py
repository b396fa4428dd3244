"""A Flower user's own app with stamen's aggregation: their ServerApp, their ClientApp, Flower's
simulation engine; only the strategy is stamen's. Run by tests/test_api.py as
``python tests/user_flower_app.py RESULT.json``; writes the per-round training loss."""

from __future__ import annotations

import json
import sys

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from stamen import StamenStrategy

TRUE_W = np.array([1.0, -2.0, 0.5], dtype=np.float32)
client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Least squares on this node's own synthetic data, a few gradient steps."""
    rng = np.random.default_rng(int(context.node_config["partition-id"]))
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = x @ TRUE_W
    w = msg.content["arrays"].to_numpy_ndarrays()[0].copy()
    loss = float(np.mean((x @ w - y) ** 2))
    for _ in range(5):
        w -= 0.1 * 2 * x.T @ (x @ w - y) / len(x)
    content = RecordDict({"arrays": ArrayRecord([w]), "metrics": MetricRecord({"num-examples": 64, "loss": loss})})
    return Message(content=content, reply_to=msg)


server_app = ServerApp()
OUT: dict[str, object] = {}


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = StamenStrategy(
        {"strategy": "fedavgm", "server-momentum": 0.5, "update-norm-bound": 10.0},
        fraction_evaluate=0.0,
        min_available_nodes=3,
        min_train_nodes=3,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros(3, dtype=np.float32)]),
        num_rounds=3,
        train_config=ConfigRecord({}),
    )
    losses = [float(result.train_metrics_clientapp[r]["loss"]) for r in sorted(result.train_metrics_clientapp)]
    OUT.update(rounds=len(losses), loss=losses, w=result.arrays.to_numpy_ndarrays()[0].tolist())


if __name__ == "__main__":
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    with open(sys.argv[1], "w") as fh:
        json.dump(OUT, fh)
