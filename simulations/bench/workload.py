"""One federated training workload, described once for every side of a comparison.

The overhead benchmark runs the same local SGD steps three ways (plain PyTorch, stamen,
plain Flower). This is what they share: the data, the IID split into sites (the same
flwr-datasets partition stamen's simulated sites get), the model, and the optimizer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from stamen.client.data import load_site_data
from stamen.common.config import StamenConfig
from stamen.common.datasets import load_dataset


@dataclass(frozen=True)
class Workload:
    """``clients`` sites x ``rounds`` rounds of ``local_epochs`` of mini-batch SGD each."""

    clients: int
    rounds: int
    dataset: str = "mnist5k"
    model: str = "cnn28"
    batch_size: int = 32
    local_epochs: int = 1
    lr: float = 0.05
    momentum: float = 0.9
    seed: int = 42
    min_partition_size: int = 32

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Workload:
        return cls(**raw)

    def stamen_args(self) -> list[str]:
        """``stamen simulate`` flags for this workload with every extra switched off.

        Off: federated evaluation (no holdout), centralized evaluation, the LR schedule
        (constant), server momentum (plain FedAvg) and DP. Participation records stay:
        they cannot be switched off.
        """
        return [
            "--clients", str(self.clients),
            "--rounds", str(self.rounds),
            "--dataset", self.dataset,
            "--model", self.model,
            "--partition", "iid",
            "--strategy", "fedavg",
            "--batch-size", str(self.batch_size),
            "--local-epochs", str(self.local_epochs),
            "--lr", str(self.lr),
            "--seed", str(self.seed),
            "--no-dp",
            "--set", f"momentum={self.momentum}",
            "--set", "holdout-fraction=0",
            "--set", "server-eval=false",
            "--set", "lr-schedule=constant",
            "--set", "warmup-rounds=0",
            "--set", f"min-partition-size={self.min_partition_size}",
        ]  # fmt: skip

    def site(self, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Site ``partition_id``'s training tensors, exactly as stamen's simulated site loads them."""
        cfg = StamenConfig.from_mapping(
            {
                "dataset": self.dataset,
                "partition": "iid",
                "holdout-fraction": 0.0,
                "seed": self.seed,
                "min-partition-size": self.min_partition_size,
            }
        )
        data = load_site_data({"partition-id": partition_id, "num-partitions": self.clients}, cfg)
        return data.x_train, data.y_train

    def input_shape(self) -> tuple[int, ...]:
        return tuple(load_dataset(self.dataset).input_shape)

    def num_classes(self) -> int:
        return load_dataset(self.dataset).num_classes
