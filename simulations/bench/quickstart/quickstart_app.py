"""Flower's PyTorch quickstart pattern, reading a deployed node's npz data.

ClientApp ``train``: build the CNN, load the global weights, one epoch of SGD over the
node's ``data`` (npz with x, y; node config), reply with the weights and ``num-examples``.
ServerApp: FedAvg (``strategy.start``: Flower's own round loop and ``send_and_receive``),
no federated evaluation; its ``evaluate_fn`` is the round clock, appending one line per
round to ``<out-dir>/progress.jsonl`` (the same file stamen writes) and measuring accuracy
on ``test-data`` after the last round.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """Two conv layers and two fully connected ones, as in the quickstart."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@lru_cache(maxsize=2)
def _tensors(path: str) -> TensorDataset:
    with np.load(path) as npz:
        return TensorDataset(torch.from_numpy(npz["x"].astype(np.float32)), torch.from_numpy(npz["y"].astype(np.int64)))


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    net = Net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    data = _tensors(str(context.node_config["data"]).removeprefix("npz:"))
    loader = DataLoader(data, batch_size=int(context.run_config["batch-size"]), shuffle=True)
    opt = torch.optim.SGD(net.parameters(), lr=float(context.run_config["lr"]), momentum=0.9)
    net.train()
    start = time.monotonic()
    for xb, yb in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(net(xb), yb).backward()
        opt.step()
    print(f"quickstart train (round {msg.metadata.group_id}) took {time.monotonic() - start:.2f}s", flush=True)
    metrics = MetricRecord({"num-examples": len(data)})
    content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    out = Path(str(context.run_config["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    clock = {"t": time.monotonic()}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        now = time.monotonic()
        row: dict[str, float] = {"round": server_round, "seconds": now - clock["t"]}
        clock["t"] = now
        if server_round == rounds:
            net = Net()
            net.load_state_dict(arrays.to_torch_state_dict())
            x, y = _tensors(str(context.run_config["test-data"])).tensors
            with torch.no_grad():
                row["central_accuracy"] = float((net(x).argmax(1) == y).float().mean())
        if server_round > 0:
            with open(out / "progress.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
        return MetricRecord({k: v for k, v in row.items() if k != "round"})

    FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3).start(
        grid=grid, initial_arrays=ArrayRecord(Net().state_dict()), num_rounds=rounds, evaluate_fn=evaluate
    )
