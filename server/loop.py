"""The round loop: sample sites, send the model, screen replies, aggregate, step, evaluate.

Each round: the site directory is refreshed (identity handshake with new nodes); stamen's
own sampler picks sites over sorted site-ids; each picked site gets the global model and
the run config; replies are screened against the reply schema (:mod:`common.reply`)
before Flower's weighted averaging sees them; the server optimizer turns the average into
the next global model; then federated and centralized evaluation, the best model so far,
and the run directory are updated.

Continual runs: each aggregated model is a numbered version (:mod:`server.versions`); a
diverging run rolls back to the best version (:mod:`server.rollback`); the whole server
state is checkpointed (:mod:`server.checkpoint`) so ``resume-from`` continues a run as if
it had never stopped; ``num-server-rounds = 0`` runs until a stop is requested
(:mod:`server.stop`), and the round in progress is finished and checkpointed first.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from stamen.common.config import StamenConfig
from stamen.common.convert import arrays_to_record, load_arrays, model_to_arrays, record_to_arrays
from stamen.common.errors import StamenError
from stamen.common.flwr_internal import ErrorCode, aggregate_arrayrecords
from stamen.common.identity import SiteSampler
from stamen.common.instruction import schema_header
from stamen.common.models import build_model, resolve_model_name
from stamen.common.reply import REJECT_REASONS, RejectedReply, SiteReply, Status, screen_reply
from stamen.common.runrecord import build_run_record, derive_seeds, write_run_record
from stamen.common.scenario import scenario_of
from stamen.server.continual import Best, ContinualRun
from stamen.server.dp_fedavg import DPFedAvg, seeded_noise_seed
from stamen.server.evaluate import evaluate_centrally, load_server_data, why_no_accuracy
from stamen.server.grid_rounds import Receipts, exchange, wait_for_nodes
from stamen.server.observe import RoundObserver
from stamen.server.optimizers.base import ServerOptimizer
from stamen.server.optimizers.factory import server_optimizer_of
from stamen.server.outputs import RunOutputs
from stamen.server.sites import REBIND_DIR, SiteDirectory
from stamen.server.spend import SpendFloor
from stamen.server.stop import stop_reason, stop_requested
from stamen.server.tasks import TaskTracker
from stamen.server.trust import TrustPolicy

log = logging.getLogger("stamen.server")


#: Error replies the SuperLink writes itself for a site that did not answer (heartbeat lost, instruction expired).
UNAVAILABLE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE)


class RunFailed(StamenError):
    """The federation could not go on (e.g. no usable replies for several rounds)."""


@dataclass
class Screened:
    """One round's replies after screening."""

    good: list[SiteReply] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    refusals: Counter[str] = field(default_factory=Counter)  # refused sites by reason code
    idle: list[str] = field(default_factory=list)  # sites with no data for this message
    rejected: Counter[str] = field(default_factory=Counter)
    missing: int = 0


def screen_round(
    replies: list[Message],
    addressed: dict[int, str],
    kind: str,
    reference: dict[str, np.ndarray] | None,
) -> Screened:
    """Screen every reply of a round; count each rejection by reason.

    ``addressed`` maps the node ids messaged this round to the site-ids they stand for;
    a reply from a node not addressed, or a second reply from one site, is rejected.
    """
    out = Screened()
    seen: set[str] = set()
    for msg in replies:
        if msg.has_error() and msg.error.code in UNAVAILABLE:
            continue  # the SuperLink's word that the node or its reply never came: a failed site, counted missing
        expected = addressed.get(msg.metadata.src_node_id)
        try:
            if expected is None or expected in seen:
                raise RejectedReply("site", f"unexpected reply from node {msg.metadata.src_node_id}")
            seen.add(expected)
            reply = screen_reply(msg, kind, expected_site=expected, reference=reference)
        except RejectedReply as exc:
            out.rejected[exc.reason] += 1
            log.warning("round reply from %s rejected (%s): %s", expected, exc.reason, exc.detail)
            continue
        if reply.status is Status.REFUSED_BUDGET:
            out.refused.append(reply.site_id)
            out.refusals[reply.code] += 1
        elif reply.status is Status.NO_DATA:
            out.idle.append(reply.site_id)
        else:
            out.good.append(reply)
    out.missing = len(addressed) - len(seen)
    # Site-id order, not arrival order: every figure summed over replies (weighted means,
    # update statistics, detections) then comes out the same in a resumed run.
    out.good.sort(key=lambda r: r.site_id)
    return out


def weighted_mean(replies: list[SiteReply]) -> dict[str, np.ndarray]:
    """Example-weighted average of screened updates (Flower's own aggregation helper)."""
    record = aggregate_arrayrecords([r.content for r in replies if r.content is not None], "num-examples")
    return record_to_arrays(record)


def server_update(
    optimizer: ServerOptimizer,
    current: dict[str, np.ndarray],
    replies: list[SiteReply],
    server_round: int,
    dp: DPFedAvg | None = None,
    expected_sites: float = 0.0,
    trust: TrustPolicy | None = None,
) -> dict[str, np.ndarray]:
    """The next global model: the round's aggregate (with client-level DP: clipped, summed and
    noised first), then the server optimizer's step — noise before momentum.

    Replies are summed in site-id order, not arrival order: float sums depend on order, and a
    resumed run must reproduce the uninterrupted one exactly. ``trust`` picks the aggregation
    rule and the site weights (:mod:`server.trust`); without it, the example-weighted mean.
    """
    replies = sorted(replies, key=lambda r: r.site_id)
    if dp is None:
        aggregate = weighted_mean(replies) if trust is None else trust.aggregate(replies)
    else:
        models = [record_to_arrays(r.content["arrays"]) for r in replies if r.content is not None]
        aggregate = dp.aggregate(current, models, expected_sites, server_round)
    return optimizer.step(current, aggregate, server_round)


def scores_text(row: dict[str, Any]) -> str:
    """A round's log text for its scores: NaN means "not measured", so say that instead."""
    acc, loss = row.get("accuracy", math.nan), row.get("loss", math.nan)
    if not (math.isfinite(acc) or math.isfinite(loss)):
        return "not evaluated"
    return f"accuracy {acc:.4f} loss {loss:.4f}"


def _weighted(replies: list[SiteReply], key: str) -> float:
    """Example-weighted mean of an optional metric over the replies that sent it (NaN if none did)."""
    sent = [r for r in replies if key in r.metrics]
    total = sum(r.metrics["num-examples"] for r in sent)
    return sum(r.metrics[key] * r.metrics["num-examples"] for r in sent) / total if total else math.nan


class Federation(ContinualRun):
    """One federated run, from the initial model to the summary.

    Every attribute is either run state, registered in ``self.state`` (:meth:`_register_state`),
    or named in :attr:`TRANSIENT` with the reason it need not be saved (tests/test_run_state.py).
    """

    TRANSIENT: ClassVar[dict[str, str]] = {
        "grid": "the engine's connection, new in every process",
        "cfg": "saved as the checkpoint's config, compared on resume",
        "seeds": "derived from the config's seed",
        "on_round": "a callback",
        "data": "loaded from the config",
        "model_name": "from the config; the model part checks it",
        "model": "scratch module, loaded from the global model's arrays before each evaluation",
        "poisson": "from the config",
        "trust": "a frozen policy built from the config",
        "state_dir": "from the config",
        "scenario": "from the config",
        "tasks": "rebuilt from the restored history rows",
        "pending": "set and consumed within one round",
        "checkpoints": "the checkpoint store itself",
        "start_round": "the checkpoint's round + 1",
        "elapsed_before": "the saved elapsed time",
        "state": "the run-state registry itself",
        "receipts": "vouches only for rounds this process ran (sites settle nothing older)",
    }

    def __init__(
        self, grid: Grid, cfg: StamenConfig, out_dir: Path, on_round: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.grid = grid
        self.cfg = cfg
        self.seeds = derive_seeds(int(cfg["seed"]))
        self.outputs = RunOutputs(out_dir)
        self.on_round = on_round
        self.data = load_server_data(cfg)
        self.model_name = resolve_model_name(str(cfg["model"]), self.data.input_shape)
        self.model = build_model(
            self.model_name,
            self.data.input_shape,
            self.data.num_classes,
            seed=self.seeds["model_init"],
            dp=bool(cfg["dp"]),
            fix=bool(cfg["dp-fix-model"]),
        )
        self.arrays = model_to_arrays(self.model)
        self.optimizer = server_optimizer_of(cfg)
        self.sampler = SiteSampler(self.seeds["sampling"])
        self.poisson = cfg["site-sampling"] == "poisson"
        self.trust = TrustPolicy.from_config(cfg)
        self.server_dp = (
            DPFedAvg(
                float(cfg["server-dp-clip"]),
                float(cfg["server-dp-noise"]),
                seeded_noise_seed(int(cfg["seed"])) if cfg["dp-noise"] == "seeded" else None,
                str(cfg["accountant"]),
            )
            if float(cfg["server-dp-clip"]) > 0
            else None
        )
        self.state_dir = str(Path(cfg["state-dir"] or Path(out_dir) / "sites").resolve())
        self.directory = SiteDirectory(
            grid,
            lambda: self._content(0, with_model=False),
            timeout=float(cfg["round-timeout"]),
            poll=float(cfg["reply-poll-interval"]),
            rebind_dir=Path(out_dir) / REBIND_DIR,
        )
        self.best = Best()
        self.receipts = Receipts()
        self.scenario = scenario_of(cfg)
        if self.scenario is not None:
            self.scenario.check_against(self.data.num_classes, self.data.input_shape)
        self.tasks = TaskTracker(self.scenario, self.data) if self.scenario and self.scenario.tasks else None
        self.totals: Counter[str] = Counter()
        self.privacy: dict[str, dict[str, float]] = {}
        self.spend = SpendFloor()
        self.observer = RoundObserver(cfg)
        self._init_continual()
        if self.tasks is not None:
            self.tasks.resume(self.outputs.history)

    def _content(self, server_round: int, *, with_model: bool = True) -> RecordDict:
        config = {
            **self.cfg.site_dict(),  # only the sections a site needs: server-only keys stay here
            "state-dir": self.state_dir,
            "server-round": server_round,
            "model-name": self.model_name,
            "model-input-shape": list(self.data.input_shape),
            "model-num-classes": self.data.num_classes,
            **schema_header(),
        }
        content = RecordDict({"config": ConfigRecord(config)})
        if with_model:
            content["arrays"] = arrays_to_record(self.arrays)
        return content

    def _send(self, sites: list[str], nodes: dict[str, int], kind: str, server_round: int) -> list[Message]:
        message_type = MessageType.TRAIN if kind == "train" else MessageType.EVALUATE
        deadline = float(self.cfg["round-timeout"])
        messages = []
        for s in sites:
            content = self._content(server_round)
            if kind == "train":
                self.receipts.stamp(content.config_records["config"], s, server_round)
            messages.append(
                Message(
                    content, dst_node_id=nodes[s], message_type=message_type, group_id=str(server_round), ttl=deadline
                )
            )
        replies = exchange(self.grid, messages, timeout=deadline, poll=float(self.cfg["reply-poll-interval"])).replies
        if kind == "train":
            self.receipts.record(server_round, replies, {nodes[s]: s for s in sites})
        self.observer.traffic(messages, replies)
        return replies

    def _federated_eval(self, server_round: int, nodes: dict[str, int]) -> dict[str, float]:
        every = int(self.cfg["eval-every"])
        last = server_round == int(self.cfg["num-server-rounds"]) or stop_requested()
        if float(self.cfg["holdout-fraction"]) == 0 or not (last or (every and server_round % every == 0)):
            return {}
        if self.cfg["dp"] and not self.cfg["dp-public-stats"]:
            return {}  # a DP site's evaluation statistics are not noised (common/boundary.py)
        sites = self.sampler.sample(nodes, float(self.cfg["fraction-evaluate"]))
        screened = screen_round(
            self._send(sites, nodes, "evaluate", server_round), {nodes[s]: s for s in sites}, "evaluate", None
        )
        if not screened.good:
            return {}
        return {
            "fed_loss": _weighted(screened.good, "eval-loss"),
            "fed_accuracy": _weighted(screened.good, "eval-accuracy"),
            "fed_sites": len(screened.good),
        }

    def _train_round(self, server_round: int, nodes: dict[str, int]) -> dict[str, Any]:
        fraction = float(self.cfg["fraction-train"])
        if self.poisson:
            sites = self.sampler.sample_poisson(nodes, fraction)
        else:
            sites = self.sampler.sample(nodes, fraction, int(self.cfg["min-train-sites"]))
        screened = screen_round(
            self._send(sites, nodes, "train", server_round), {nodes[s]: s for s in sites}, "train", self.arrays
        )
        self.spend.screen(screened)  # a site's epsilon never decreases (server/spend.py)
        screened.good = self.trust.screen(self.arrays, screened.good, screened.rejected)
        row: dict[str, Any] = {
            "sampled_sites": " ".join(sites),
            "sampled": len(sites),
            "replied": len(screened.good),
            "refused": len(screened.refused),
            "idle": len(screened.idle),
            "failed": screened.missing,
            "rejected": sum(screened.rejected.values()),
        }
        for reason in REJECT_REASONS:
            self.totals[f"rejected_{reason}"] += screened.rejected[reason]
        self.totals.update({k: row[k] for k in ("sampled", "replied", "refused", "idle", "failed")})
        self.observer.count_refusals(screened.refusals)
        row.update(self.observer.replies(server_round, screened.good, screened.rejected))
        for reply in screened.good:
            if "epsilon" in reply.metrics:
                m = reply.metrics
                seen = self.privacy.get(reply.site_id, {}).get("history", [])
                self.privacy[reply.site_id] = {
                    "epsilon": m["epsilon"],
                    "noise_multiplier": m["noise-multiplier"],
                    "sample_rate": m["sample-rate"],
                    "steps": int(m["ledger-steps"]),
                    "rounds": int(m["ledger-rounds"]),
                    "releases": int(m["ledger-releases"]),
                    "release_noise_multiplier": float(self.cfg["dp-stats-noise"]),
                    # what the site ran: the configured mode, or hooks where ghost cannot clip (bf16)
                    "grad_sample_mode": {0.0: "hooks", 1.0: "ghost"}.get(m.get("ghost-clipping"), "unreported"),
                    # [noise multiplier, sample rate, steps] of every round this run saw the site train
                    "history": [*seen, [m["noise-multiplier"], m["sample-rate"], int(m["steps"])]],
                }
        if self.cfg["dp"]:
            row["epsilon_max"] = max((p["epsilon"] for p in self.privacy.values()), default=0.0)
        if self.server_dp is None and len(screened.good) < int(self.cfg["min-train-sites"]):
            row["updated"] = False
            return row
        # With client-level DP every round releases a noisy model, however many sites replied:
        # skipping on a count would make the release depend on who took part.
        expected = fraction * len(nodes) if self.poisson else len(sites)
        before = self.arrays
        self.arrays = server_update(
            self.optimizer, self.arrays, screened.good, server_round, self.server_dp, max(expected, 1e-12), self.trust
        )
        row.update(self.observer.updates(before, screened.good, self.arrays))
        self._new_version([r.site_id for r in screened.good])
        if self.server_dp is not None:
            row["server_epsilon"] = self.server_dp.epsilon(float(self.cfg["delta"]))
        row["updated"] = True
        if screened.good:
            row["lr"] = max(r.metrics["lr"] for r in screened.good)
        for column, key in (("train_loss", "train-loss"), ("grad_norm", "grad-norm")):
            value = _weighted(screened.good, key)
            if not math.isnan(value):
                row[column] = value
        row["server_buffer_norm"] = self.optimizer.buffer_norm()
        return row

    def run(self) -> dict[str, Any]:
        """Run rounds until the last one (or a stop request) and write the run directory; return the summary."""
        if not self.resumes:
            write_run_record(self.outputs.dir, build_run_record(self.cfg, extra={"model": self.model_name}))
        start = time.monotonic()
        rounds = int(self.cfg["num-server-rounds"])
        server_round = self.start_round
        completed = server_round - 1
        while rounds == 0 or server_round <= rounds:
            t0 = time.monotonic()
            wait_for_nodes(self.grid, int(self.cfg["min-available-sites"]), float(self.cfg["wait-for-sites"]))
            nodes = self.directory.refresh()
            self.observer.count_refusals(self.directory.take_refused())
            self.observer.start_round(server_round, len(nodes))
            if len(nodes) >= int(self.cfg["min-train-sites"]):
                row = {"round": server_round, **self._train_round(server_round, nodes)}
            else:
                row = {"round": server_round, "sampled": 0, "replied": 0, "refused": 0, "failed": 0, "rejected": 0}
                row.update(updated=False, skipped=1)
                log.warning(
                    "round %d skipped: %d site(s) answered the identity handshake, min-train-sites is %s",
                    server_round,
                    len(nodes),
                    self.cfg["min-train-sites"],
                )
            if row["replied"] >= int(self.cfg["min-train-sites"]):
                self.empty = 0
            elif row["rejected"] + row["failed"] + row.get("skipped", 0) > 0:
                self.empty += 1
            else:
                log.warning("round %d: every sampled site refused for its privacy budget or had no data", server_round)
            if self.empty >= int(self.cfg["max-empty-rounds"]):
                raise RunFailed(
                    f"{self.empty} rounds in a row without {self.cfg['min-train-sites']} usable replies "
                    f"(round {server_round}: {row['rejected']} rejected, {row['failed']} missing, "
                    f"{row['refused']} refused, {len(nodes)} sites connected); see the log for reasons"
                )
            row.update(self._federated_eval(server_round, nodes))
            load_arrays(self.model, self.arrays)
            central = evaluate_centrally(self.model, self.data)
            if central is not None:
                row["central_loss"], row["central_accuracy"] = central
            if self.tasks is not None:
                row.update(self.tasks.observe(server_round, self.model))
            row["loss"] = row.get("central_loss", row.get("fed_loss", math.nan))
            row["accuracy"] = row.get("central_accuracy", row.get("fed_accuracy", math.nan))
            row["seconds"] = time.monotonic() - t0
            row["elapsed"] = self.elapsed_before + time.monotonic() - start
            if row["accuracy"] > self.best.accuracy:
                self.best.improve(server_round, row["accuracy"], row["loss"], self.arrays, self.version)
            if row["updated"]:
                self._register_version(server_round, row)
            self._check_divergence(server_round, row)
            row.update(version=self.version, rollbacks=len(self.rollbacks))
            self.observer.end_round(row)
            self.outputs.add_round(row)
            completed = server_round
            stopping = stop_requested()  # read once: a stop must never skip this round's checkpoint
            if server_round % int(self.cfg["checkpoint-every"]) == 0 or server_round == rounds or stopping:
                self._save_checkpoint(server_round, row["elapsed"])
            if self.on_round:
                self.on_round(row)
            log.info(
                "round %d: %s, model version %d (%.1fs)", server_round, scores_text(row), self.version, row["seconds"]
            )
            if stopping:
                log.warning("stopped after round %d (%s); continue with resume-from", server_round, stop_reason())
                break
            server_round += 1
        status = "completed" if completed == rounds else "stopped"
        return self._finish(completed, self.elapsed_before + time.monotonic() - start, status)

    def _finish(self, completed: int, seconds: float, status: str = "completed") -> dict[str, Any]:
        last = self.outputs.history[-1] if self.outputs.history else {}
        meta = {"round": str(completed), "model": self.model_name, "version": str(self.version)}
        self.outputs.save_model("model.safetensors", self.arrays, meta)
        if self.best.arrays is not None:
            self.outputs.save_model(
                "best.safetensors",
                self.best.arrays,
                {"round": str(self.best.round), "model": self.model_name, "version": str(self.best.version)},
            )
        summary = {
            "status": status,
            "rounds_completed": completed,
            "final": {
                "accuracy": last.get("accuracy", math.nan),
                "loss": last.get("loss", math.nan),
                "source": "centralized" if "central_accuracy" in last else "federated",
            },
            "best": {
                "round": self.best.round,
                "accuracy": self.best.accuracy,
                "loss": self.best.loss,
                "version": self.best.version,
            },
            "version": self.version,
            "rollbacks": self.rollbacks,
            "resumes": self.resumes,
            "stop_reason": stop_reason(),
            "participation": dict(self.totals),
            "handshake_rejected": dict(self.directory.rejected),
            "seconds": seconds,
            "model": self.model_name,
            "drift": self.observer.finish(),
        }
        if not math.isfinite(summary["final"]["accuracy"]):
            summary["final"].update(source="none", reason=why_no_accuracy(self.cfg, self.data))
            log.warning("%s", summary["final"]["reason"])
        if self.scenario is not None:
            summary["scenario"] = self.scenario.name
        if self.tasks is not None:
            summary["tasks"] = self.tasks.summary()
        if self.cfg["dp"]:
            eps = [p["epsilon"] for p in self.privacy.values()]
            summary["privacy"] = {
                "delta": float(self.cfg["delta"]),
                "epsilon_max": max(eps, default=0.0),
                "epsilon_mean": sum(eps) / len(eps) if eps else 0.0,
                "accountant": str(self.cfg["accountant"]),
                "budget": self.cfg.epsilon_budget,
                "refused": self.totals["refused"],
                "per_client": dict(sorted(self.privacy.items())),
                "noise": str(self.cfg["dp-noise"]),
                "grad_sample_mode": str(self.cfg["dp-grad-sample-mode"]),  # asked; per_client says what ran
            }
        if self.server_dp is not None:
            summary["server_privacy"] = {
                "level": "client",
                "delta": float(self.cfg["delta"]),
                "epsilon": self.server_dp.epsilon(float(self.cfg["delta"])),
                "accountant": str(self.cfg["accountant"]),
                "clip": self.server_dp.clip,
                "noise_multiplier": self.server_dp.noise_multiplier,
                "site_sampling": str(self.cfg["site-sampling"]),
                "sample_rate": self.server_dp.sample_rate,
                "rounds": self.server_dp.rounds,
                "noise": str(self.cfg["dp-noise"]),
            }
        self.outputs.write_summary(summary)
        return summary
