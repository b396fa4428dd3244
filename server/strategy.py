"""stamen's aggregation as a Flower ``Strategy``, for a ServerApp of your own.

``StamenStrategy`` is Flower's ``FedAvg`` (same sampling, same messages, same
``start()`` loop) with stamen's server side in ``aggregate_train``: every update is
screened against the global model (keys, shapes, dtypes, finite values, a positive
integer example count), then the trust rules of :mod:`stamen.server.trust` (norm bound,
outlier test, weight cap, robust rule), optionally client-level DP
(:mod:`stamen.server.dp_fedavg`), and finally the server optimizer
(:mod:`stamen.server.optimizers`: FedAvg, FedAvgM, FedAdam, FedYogi). Settings are
stamen's run-config keys (``strategy``, ``server-momentum``, ``aggregation``,
``update-norm-bound``, ``server-dp-clip``, ...), so a run behaves as under
``stamen simulate``.

It works with any ClientApp that replies in Flower's usual shape: one ``ArrayRecord``
(the local model) and a ``MetricRecord`` holding ``num-examples`` (``weighted_by_key``).

Example::

    from flwr.serverapp import Grid, ServerApp
    from stamen import StamenStrategy

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = StamenStrategy({"strategy": "fedavgm", "server-momentum": 0.9}, fraction_train=0.5)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=10)
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from stamen.common.config import StamenConfig
from stamen.common.convert import arrays_to_record, record_to_arrays
from stamen.common.errors import StamenError
from stamen.common.reply import RejectedReply, SiteReply, Status, check_update_arrays
from stamen.server.dp_fedavg import DPFedAvg, seeded_noise_seed
from stamen.server.loop import server_update
from stamen.server.optimizers import Arrays, server_optimizer_of
from stamen.server.trust import TrustPolicy

log = logging.getLogger("stamen.server")


class StamenStrategy(FedAvg):
    """Flower's FedAvg sampling and messaging with stamen's screening, trust rules, DP and optimizer.

    Parameters
    ----------
    config : Mapping[str, Any] | StamenConfig | None (default: None)
        stamen run-config keys (hyphenated, as in ``pyproject.toml``); unknown keys or bad
        values raise :class:`~stamen.common.errors.ConfigError`. Defaults: FedAvgM with
        server momentum 0.9, plain weighted mean, no bounds, no server DP.
    **flower_options
        Passed to Flower's ``FedAvg`` (``fraction_train``, ``min_train_nodes``,
        ``min_available_nodes``, ``weighted_by_key``, ...).
    """

    def __init__(self, config: Mapping[str, Any] | StamenConfig | None = None, **flower_options: Any) -> None:
        super().__init__(**flower_options)
        cfg = config if isinstance(config, StamenConfig) else StamenConfig.from_mapping(dict(config or {}))
        self.cfg = cfg
        self.optimizer = server_optimizer_of(cfg)
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
        self.rejected: Counter[str] = Counter()
        self._current: Arrays | None = None
        self._sampled = 0

    def summary(self) -> None:
        super().summary()
        log.info("stamen: server optimizer %s, aggregation %s", self.cfg["strategy"], self.trust.rule)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's sampling and messages; the global model is kept as the screening reference."""
        self._current = record_to_arrays(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sampled = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen every reply, apply the trust rules (and server DP), then the optimizer's step.

        Returns the next global model (not the plain average: the optimizer's step is
        already applied) and the example-weighted training metrics, or ``(None, None)``
        when no update survived screening.
        """
        if self._current is None:
            raise StamenError("aggregate_train called before configure_train: no global model to screen against")
        current = self._current
        good = [reply for msg in replies if (reply := self._screen(msg, current)) is not None]
        good = self.trust.screen(current, good, self.rejected)
        if not good and self.server_dp is None:
            return None, None
        # Under client-level DP the divisor is the number sampled, not the number that replied:
        # dividing by a count of replies would make the release depend on who took part.
        expected = max(self._sampled, 1)
        nxt = server_update(self.optimizer, current, good, server_round, self.server_dp, expected, self.trust)
        metrics = self.train_metrics_aggr_fn([r.content for r in good if r.content is not None], self.weighted_by_key)
        if self.server_dp is not None:
            metrics["server-epsilon"] = self.server_dp.epsilon(float(self.cfg["delta"]))
        self._current = nxt
        return arrays_to_record(nxt), metrics

    def _screen(self, msg: Message, current: Arrays) -> SiteReply | None:
        """A reply as stamen's trust rules take it, or None (counted in ``rejected``) if it fails screening."""
        site = str(msg.metadata.src_node_id)
        try:
            if msg.has_error():
                raise RejectedReply("message_error", f"error reply: {msg.error.reason}", site)
            check_update_arrays(msg, current, site)
            records = list(msg.content.metric_records.values())
            if len(records) != 1 or self.weighted_by_key not in records[0]:
                raise RejectedReply("bad_metrics", f"needs one MetricRecord with {self.weighted_by_key!r}", site)
            count = float(records[0][self.weighted_by_key])  # type: ignore[arg-type]
            if not (count > 0 and count.is_integer()):
                raise RejectedReply("bad_metrics", f"{self.weighted_by_key} {count} is not a positive integer", site)
        except RejectedReply as exc:
            self.rejected[exc.reason] += 1
            log.warning("update from node %s rejected (%s): %s", site, exc.reason, exc.detail)
            return None
        return SiteReply(site, Status.OK, metrics={"num-examples": count}, content=msg.content)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed ServerApp needs to continue exactly (optimizer buffers, DP rounds)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "server_dp": self.server_dp.state_dict() if self.server_dp is not None else None,
            "rejected": dict(self.rejected),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.server_dp is not None and state.get("server_dp") is not None:
            self.server_dp.load_state_dict(state["server_dp"])
        self.rejected = Counter(state.get("rejected", {}))
