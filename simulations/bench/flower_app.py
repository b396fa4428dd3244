"""A minimal plain-Flower app, the reference stamen is compared with in ``overhead``.

It follows Flower's PyTorch quickstart (``flwr new``, Message API): a ClientApp whose
``train`` builds the model, loads the global weights, trains on its partition through a
DataLoader and replies with its weights and ``num-examples``; a ServerApp that hands a
``FedAvg`` strategy the initial weights and calls ``strategy.start``. No extras: no
evaluation during the run (``fraction_evaluate=0``), no checkpoints, no screening. It
trains the same workload as stamen (same model, sites, batch size, optimizer) on the same
simulation engine; its ``evaluate_fn`` is used as the round clock, writing
``progress.jsonl`` like stamen, and measures test accuracy once, after the last round.

Run: ``python -m stamen.simulations.bench.flower_app SPEC.json`` (SPEC: workload, out, engine).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch.utils.data import DataLoader, TensorDataset

from stamen.common.datasets import load_dataset
from stamen.common.models import build_model, evaluate_model
from stamen.simulations.bench.workload import Workload

client_app = ClientApp()


@lru_cache(maxsize=64)
def _loader(workload_json: str, partition_id: int) -> DataLoader:
    """This site's DataLoader, cached per process as the quickstart caches its dataset."""
    x, y = Workload.from_dict(json.loads(workload_json)).site(partition_id)
    batch_size = json.loads(workload_json)["batch_size"]
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)


def _train(net: torch.nn.Module, loader: DataLoader, epochs: int, lr: float, momentum: float) -> float:
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    criterion = torch.nn.CrossEntropyLoss()
    running = 0.0
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss = criterion(net(xb), yb)
            loss.backward()
            opt.step()
            running += loss.item()
    return running / max(1, epochs * len(loader))


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this site's partition; reply with weights and metrics."""
    config = msg.content["config"]
    w = Workload.from_dict(json.loads(str(config["workload"])))
    net = build_model(w.model, w.input_shape(), w.num_classes())
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loader = _loader(str(config["workload"]), int(context.node_config["partition-id"]))
    loss = _train(net, loader, w.local_epochs, w.lr, w.momentum)
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(loader.dataset)})
    return Message(content=RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics}), reply_to=msg)


class CountingFedAvg(FedAvg):
    """Flower's FedAvg, counting the error-free replies of each round (the bench checks them)."""

    replied = 0

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        replies = list(replies)
        self.replied = sum(not m.has_error() for m in replies)
        return super().aggregate_train(server_round, replies)


class RoundClock:
    """``evaluate_fn`` that records when each round ends, and evaluates once at the end."""

    def __init__(self, out: Path, w: Workload, strategy: CountingFedAvg) -> None:
        self.out, self.w, self.strategy = out, w, strategy
        self.start = self.last = time.monotonic()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        now = time.monotonic()
        if server_round == 0:
            self.start = self.last = now
            return None
        row = {
            "round": server_round,
            "replied": self.strategy.replied,
            "seconds": now - self.last,
            "elapsed": now - self.start,
        }
        with open(self.out / "progress.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.last = now
        if server_round < self.w.rounds:
            return None
        data = load_dataset(self.w.dataset)
        net = build_model(self.w.model, self.w.input_shape(), self.w.num_classes())
        net.load_state_dict(arrays.to_torch_state_dict())
        x = torch.from_numpy(np.array(data.x_test, dtype=np.float32))
        y = torch.from_numpy(np.array(data.y_test, dtype=np.int64))
        loss, acc = evaluate_model(net, x, y, torch.device("cpu"))
        (self.out / "summary.json").write_text(json.dumps({"final": {"accuracy": acc, "loss": loss}}))
        self.last = time.monotonic()
        return MetricRecord({"accuracy": acc, "loss": loss})


def make_server_app(w: Workload, out: Path) -> ServerApp:
    """The quickstart's ServerApp: FedAvg over every site, ``w.rounds`` rounds."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        net = build_model(w.model, w.input_shape(), w.num_classes(), seed=w.seed)
        strategy = CountingFedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=w.clients,
            min_available_nodes=w.clients,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(net.state_dict()),
            num_rounds=w.rounds,
            train_config=ConfigRecord({"workload": json.dumps(w.as_dict())}),
            evaluate_fn=RoundClock(out, w, strategy),
        )

    return app


def main(spec: dict[str, Any]) -> int:
    """Run the app on Flower's simulation engine with the same backend settings as stamen."""
    from flwr.simulation import run_simulation

    w = Workload.from_dict(spec["workload"])
    out = Path(spec["out"])
    run_simulation(
        server_app=make_server_app(w, out),
        client_app=client_app,
        num_supernodes=w.clients,
        backend_config={
            "client_resources": {"num_cpus": spec["cpus_per_client"], "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "num_cpus": spec["num_cpus"]},
        },
    )
    return 0 if (out / "summary.json").exists() else 1


if __name__ == "__main__":
    # Ray pickles the ClientApp by reference: it must come from the importable module, not __main__.
    from stamen.simulations.bench import flower_app

    sys.exit(flower_app.main(json.loads(Path(sys.argv[1]).read_text())))
