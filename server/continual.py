"""The continual part of a federated run: model versions, rollback, checkpoints, resume.

:class:`ContinualRun` is mixed into :class:`server.loop.Federation`; it owns the state a
run needs to go on for weeks: each aggregated model's version number (:mod:`server.versions`),
the divergence rule and the rollbacks it caused (:mod:`server.rollback`), and the
checkpoint that captures everything the loop holds (:mod:`server.checkpoint`), so that
``resume-from`` continues a run exactly as if it had never stopped.
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
from stamen.server.optimizers.base import ServerOptimizer
from stamen.server.outputs import RunOutputs
from stamen.server.rollback import DivergenceRule
from stamen.server.sites import SiteDirectory
from stamen.server.versions import ModelInfo, VersionRegistry

log = logging.getLogger("stamen.server")


@dataclass
class Best:
    """The best global model so far (the seeds' early stopping, kept for a continual run)."""

    round: int = 0
    accuracy: float = -math.inf
    loss: float = math.inf
    arrays: dict[str, np.ndarray] | None = None
    version: int = 0


class ContinualRun:
    """Versions, rollback and checkpoints of a :class:`~stamen.server.loop.Federation` (a mixin).

    The attributes declared here are the loop's; this class reads and replaces them.
    """

    cfg: StamenConfig
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
        self.start_round, self.empty, self.elapsed_before = 1, 0, 0.0
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

    def _save_checkpoint(self, server_round: int, elapsed: float) -> None:
        arrays: dict[str, dict[str, np.ndarray]] = {"model": self.arrays}
        arrays.update({f"optimizer:{g}": a for g, a in self.optimizer.state_dict().items()})
        if self.best.arrays is not None:
            arrays["best"] = self.best.arrays
        state = {
            "config": self.cfg.as_dict(),
            "model": {"name": self.model_name, "keys": {k: list(v.shape) for k, v in self.arrays.items()}},
            "sampler": self.sampler.state_dict(),
            "best": {"round": self.best.round, "accuracy": self.best.accuracy, "loss": self.best.loss},
            "best_version": self.best.version,
            "highest_version": self.registry.highest,
            "totals": dict(self.totals),
            "handshake_rejected": dict(self.directory.rejected),
            "privacy": self.privacy,
            "server_dp": None if self.server_dp is None else self.server_dp.state_dict(),
            "history": self.outputs.history,
            "rule": self.rule.state_dict(),
            "rollbacks": self.rollbacks,
            "resumes": self.resumes,
            "empty_rounds": self.empty,
            "elapsed": elapsed,
        }
        path = self.checkpoints.save(
            Checkpoint(server_round, self.version, arrays, state), int(self.cfg["checkpoint-keep"])
        )
        log.info("round %d: checkpoint %s", server_round, path.name)

    def _restore(self, ckpt: Checkpoint) -> None:
        """Continue from ``ckpt``: every piece of state the uninterrupted run would hold now."""
        state = ckpt.state
        changed = config_changes(state["config"], self.cfg.as_dict())
        expected = {k: list(v.shape) for k, v in self.arrays.items()}
        if state["model"]["name"] != self.model_name or state["model"]["keys"] != expected:
            raise StateError(
                f"checkpoint {ckpt.path} holds a {state['model']['name']} model of another layout than this run's "
                f"{self.model_name}"
            )
        # The model's own key order: safetensors stores keys sorted, and replies are screened in order.
        order = list(self.arrays)
        self.arrays = {k: ckpt.arrays["model"][k] for k in order}
        best = ckpt.arrays.get("best")
        self.optimizer.load_state_dict(
            {g.removeprefix("optimizer:"): a for g, a in ckpt.arrays.items() if g.startswith("optimizer:")}
        )
        self.sampler.load_state_dict(state["sampler"])
        self.best = Best(
            **state["best"],
            arrays=None if best is None else {k: best[k] for k in order},
            version=int(state["best_version"]),
        )
        self.totals = Counter(state["totals"])
        self.directory.rejected = Counter(state["handshake_rejected"])
        self.privacy = state["privacy"]
        if self.server_dp is not None:
            self.server_dp.load_state_dict(state["server_dp"])
        self.outputs.restore(state["history"])
        self.rule.load_state_dict(state["rule"])
        self.rollbacks, self.resumes = list(state["rollbacks"]), list(state["resumes"])
        self.start_round, self.empty, self.elapsed_before = ckpt.round + 1, int(state["empty_rounds"]), state["elapsed"]
        self.version = ckpt.version
        abandoned = self.registry.abandon_after(int(state["highest_version"]))
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
