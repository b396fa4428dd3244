"""Drive the real ClientApp functions in-process, round after round, as one site.

The "server" here is the simplest one: the site's reply becomes the next global model.
Used by tests that need many rounds against one site's state store and data directory
without starting Flower's engine; messages are built exactly as
:class:`server.loop.Federation` builds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from stamen.client import app as client_app
from stamen.common.config import StamenConfig
from stamen.common.convert import arrays_to_record, load_arrays, model_to_arrays, record_to_arrays
from stamen.common.instruction import schema_header
from stamen.common.models import build_model, evaluate_model
from stamen.common.reply import screen_reply

NODE_ID = 7


def site_terms(cfg: StamenConfig) -> dict[str, Any]:
    """Node-config keys of a real site whose own policy (client/site_policy.py) is the run's privacy settings.

    A real node (no ``partition-id``) never takes the run config as its policy: it requires DP
    by default, and accepting non-DP runs takes ``site-dp = false``. The tests that drive a
    deployed site through a run give it these terms, as an operator who agreed to them would.
    """
    if not cfg["dp"]:
        return {"site-dp": False}
    return {
        "site-dp": True,
        "epsilon-budget": cfg.epsilon_budget,
        "site-delta": float(cfg["delta"]),
        "site-accountant": str(cfg["accountant"]),
        "site-privacy-policy": str(cfg["privacy-policy"]),
        "dp-public-stats": bool(cfg["dp-public-stats"]),
    }


class OneSite:
    """A global model and one site (node config ``node_config``) it trains on."""

    def __init__(
        self, cfg: StamenConfig, node_config: Mapping[str, Any], model: str, shape: tuple[int, ...], classes: int
    ) -> None:
        self.cfg = cfg
        self.context = Context(1, NODE_ID, dict(node_config), RecordDict(), {})
        self.model_name, self.shape, self.classes = model, shape, classes
        self.model = build_model(model, shape, classes, seed=0)
        self.arrays: dict[str, np.ndarray] = model_to_arrays(self.model)

    def _message(self, kind: str, server_round: int) -> Message:
        config = {
            **schema_header(),
            **self.cfg.as_dict(),
            "server-round": server_round,
            "model-name": self.model_name,
            "model-input-shape": list(self.shape),
            "model-num-classes": self.classes,
        }
        content = RecordDict({"config": ConfigRecord(config), "arrays": arrays_to_record(self.arrays)})
        message_type = MessageType.TRAIN if kind == "train" else MessageType.EVALUATE
        return Message(content, dst_node_id=NODE_ID, message_type=message_type, group_id=str(server_round))

    def train(self, server_round: int) -> dict[str, Any]:
        """One training round; a screened ``ok`` reply's model becomes the global model."""
        reply = client_app.train(self._message("train", server_round), self.context)
        site_id = str(self.context.node_config["site-id"])
        screened = screen_reply(reply, "train", expected_site=site_id, reference=self.arrays)
        if screened.content is not None:
            self.arrays = record_to_arrays(screened.content["arrays"])
        return {"status": screened.status.value, "reason": screened.reason, "code": screened.code, **screened.metrics}

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The global model's accuracy on (x, y)."""
        load_arrays(self.model, self.arrays)
        return evaluate_model(self.model, x, y, torch.device("cpu"))[1]
