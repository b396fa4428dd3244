"""The continual part of a federated run: model versions, rollback, checkpoints, resume.

:class:`ContinualRun` is mixed into :class:`server.loop.Federation`; it owns the state a
run needs to go on for weeks: each aggregated model's version number (:mod:`server.versions`),
the divergence rule and the rollbacks it caused (:mod:`server.rollback`), and the
checkpoint (:mod:`server.checkpoint`) of every part registered in the run state
(:mod:`server.run_state`), so that ``resume-from`` continues a run exactly as if it had
never stopped.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from stamen.common.config import StamenConfig
from stamen.common.errors import ConfigError, StateError
from stamen.common.identity import SiteSampler
from stamen.server.checkpoint import Checkpoint, CheckpointStore, config_changes
from stamen.server.dp_fedavg import DPFedAvg
from stamen.server.evaluate import ServerData
from stamen.server.observe import RoundObserver
from stamen.server.optimizers.base import ServerOptimizer
from stamen.server.outputs import RunOutputs
from stamen.server.rollback import DivergenceRule
from stamen.server.run_state import Arrays, Attributes, RunState, join_arrays, split_arrays
from stamen.server.sites import SiteDirectory
from stamen.server.spend import SpendFloor
from stamen.server.versions import ModelInfo, VersionRegistry

log = logging.getLogger("stamen.server")


@dataclass
class Best:
    """The best global model so far (the seeds' early stopping, kept for a continual run).

    Updated in place (:meth:`improve`), so the run-state registry always holds the live one.
    """

    round: int = 0
    accuracy: float = -math.inf
    loss: float = math.inf
    arrays: dict[str, np.ndarray] | None = None
    version: int = 0

    def improve(self, server_round: int, accuracy: float, loss: float, arrays: Arrays, version: int) -> None:
        """A better model: keep a copy of it as the best."""
        self.round, self.accuracy, self.loss, self.version = server_round, accuracy, loss, version
        self.arrays = dict(arrays)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"round": self.round, "accuracy": self.accuracy, "loss": self.loss}
        state["version"] = self.version
        if self.arrays is not None:
            # safetensors stores keys sorted; the saved order is the model's own
            state.update(keys=list(self.arrays), arrays=dict(self.arrays))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round, self.version = int(state["round"]), int(state["version"])
        self.accuracy, self.loss = float(state["accuracy"]), float(state["loss"])
        self.arrays = {k: state["arrays"][k] for k in state["keys"]} if "arrays" in state else None


class ModelArrays:
    """The run's global model as a run-state part, checked against this run's model layout."""

    attributes = ("arrays",)

    def __init__(self, owner: ContinualRun) -> None:
        self.owner = owner

    def state_dict(self) -> dict[str, Any]:
        arrays = self.owner.arrays
        return {"name": self.owner.model_name, "keys": {k: list(v.shape) for k, v in arrays.items()}, "arrays": arrays}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {k: list(v.shape) for k, v in self.owner.arrays.items()}
        if state["name"] != self.owner.model_name or state["keys"] != expected:
            raise StateError(
                f"the checkpoint holds a {state['name']} model of another layout than this run's "
                f"{self.owner.model_name}"
            )
        # The model's own key order: safetensors stores keys sorted, and replies are screened in order.
        self.owner.arrays = {k: state["arrays"][k] for k in expected}


class ContinualRun:
    """Versions, rollback and checkpoints of a :class:`~stamen.server.loop.Federation` (a mixin).

    The attributes declared here are the loop's; this class reads and replaces them.
    """

    cfg: StamenConfig
    state: RunState
    outputs: RunOutputs
    model_name: str
    data: ServerData
    arrays: dict[str, np.ndarray]
    optimizer: ServerOptimizer
    sampler: SiteSampler
    directory: SiteDirectory
    best: Best
    totals: Counter[str]
    privacy: dict[str, dict[str, Any]]
    server_dp: DPFedAvg | None
    observer: RoundObserver
    spend: SpendFloor

    def _init_continual(self) -> None:
        """Versions, rollback rule and checkpoints; the saved state when resuming."""
        cfg = self.cfg
        self.version = 0
        self.pending: dict[str, Any] = {}
        self.rule = DivergenceRule(int(cfg["rollback-patience"]), float(cfg["rollback-tolerance"]))
        self.rollbacks: list[dict[str, Any]] = []
        self.resumes: list[dict[str, Any]] = []
        self.checkpoints = CheckpointStore(self.outputs.dir)
        self.registry = VersionRegistry(
            self.outputs.dir,
            ModelInfo(self.model_name, self.data.input_shape, self.data.num_classes),
            int(cfg["versions-keep"]),
        )
        self.start_round, self.empty, self.elapsed_before, self.elapsed = 1, 0, 0.0, 0.0
        self._register_state()
        if cfg["resume-from"]:
            self._restore(self.checkpoints.load_latest())
        elif self.checkpoints.rounds() or self.registry.entries:
            raise ConfigError(
                f"{self.outputs.dir} already holds a run's checkpoints or versions: continue it with "
                "resume-from, or give this run another out-dir"
            )

    def _new_version(self, contributors: list[str]) -> None:
        """The round aggregated a new model: number it."""
        self.pending = {"parent": self.version, "contributors": sorted(contributors)}
        self.version = max(self.version, self.registry.highest) + 1

    def _register_version(self, server_round: int, row: dict[str, Any]) -> None:
        """Record the version this round aggregated, with its evaluation and the sites' epsilon."""
        metrics = {
            k: row[k]
            for k in ("loss", "accuracy", "central_loss", "central_accuracy", "fed_loss", "fed_accuracy")
            if k in row
        }
        metrics["source"] = "centralized" if "central_loss" in row else "federated" if "fed_loss" in row else "none"
        entry = {
            "round": server_round,
            "parent": self.pending["parent"],
            "status": "ok",
            "metrics": metrics,
            "contributors": self.pending["contributors"],
            "epsilon": {site: p["epsilon"] for site, p in sorted(self.privacy.items())},
        }
        self.registry.add(self.version, self.arrays, entry, best=self.best.version)

    def _check_divergence(self, server_round: int, row: dict[str, Any]) -> None:
        """Apply the divergence rule to an evaluated round; roll back when it fires."""
        if "central_loss" not in row and "fed_loss" not in row:
            return
        reason = self.rule.observe(row["loss"], self.best.loss)
        if reason is None:
            return
        if self.best.arrays is None or self.best.version == self.version:
            log.error(
                "round %d: training diverged (%s) but there is no better version to roll back to", server_round, reason
            )
            return
        event = {
            "round": server_round,
            "from_version": self.version,
            "to_version": self.best.version,
            "to_round": self.best.round,
            "reason": reason,
            "loss": row["loss"],
            "best_loss": self.best.loss,
        }
        log.warning(
            "round %d: rolling back from model version %d to the best version %d (round %d): %s",
            server_round,
            self.version,
            self.best.version,
            self.best.round,
            reason,
        )
        event["versions_rolled_back"] = self.registry.roll_back(self.version, self.best.version)
        self.arrays = dict(self.best.arrays)
        self.optimizer.reset()
        self.version = self.best.version
        self.rollbacks.append(event)
        row["rolled_back_to"] = self.best.version

    def _register_state(self) -> None:
        """Every part of the run that a resumed run must get back, under one name each."""
        state = self.state = RunState()
        state.register("model", ModelArrays(self))
        state.register("optimizer", self.optimizer)
        state.register("sampler", self.sampler)
        state.register("best", self.best)
        state.register("versions", self.registry)
        state.register("rule", self.rule)
        if self.server_dp is not None:
            state.register("server_dp", self.server_dp)
        state.register("history", self.outputs)
        state.register("drift", self.observer.drift)
        state.register("exporter", self.observer.exporter)
        state.register("observer", Attributes(self.observer, epsilon=dict, rollbacks_seen=int))
        state.register("handshake", Attributes(self.directory, rejected=Counter))
        state.register("spend", self.spend, added_later=True)
        state.register("site_keys", self.directory.keys, added_later=True)
        state.register(
            "run",
            Attributes(
                self, version=int, empty=int, elapsed=float, totals=Counter, privacy=dict, rollbacks=list, resumes=list
            ),
        )

    def _save_checkpoint(self, server_round: int, elapsed: float) -> None:
        self.elapsed = elapsed
        parts, arrays = split_arrays(self.state.state_dict())
        state = {"config": self.cfg.as_dict(), "parts": parts}
        path = self.checkpoints.save(
            Checkpoint(server_round, self.version, arrays, state), int(self.cfg["checkpoint-keep"])
        )
        log.info("round %d: checkpoint %s", server_round, path.name)

    def _restore(self, ckpt: Checkpoint) -> None:
        """Continue from ``ckpt``: every piece of state the uninterrupted run would hold now."""
        changed = config_changes(ckpt.state["config"], self.cfg.as_dict())
        if not isinstance(ckpt.state.get("parts"), dict):
            raise StateError(f"checkpoint {ckpt.path} holds no run-state parts")
        self.state.load_state_dict(join_arrays(ckpt.state["parts"], ckpt.arrays))
        self.start_round, self.elapsed_before = ckpt.round + 1, self.elapsed
        abandoned = self.registry.abandoned
        self.resumes.append(
            {
                "after_round": ckpt.round,
                "checkpoint": ckpt.path.name if ckpt.path else None,
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "abandoned_versions": abandoned,
                "changed": changed,
            }
        )
        log.info(
            "resuming after round %d from %s (model version %d)%s",
            ckpt.round,
            ckpt.path,
            ckpt.version,
            f"; versions {abandoned} were made after it and are abandoned" if abandoned else "",
        )
