"""The stamen ClientApp: local training and evaluation on a site's private data.

Each instruction carries the global model (``arrays``) and the run configuration plus
the round (``config``); the reply follows :mod:`common.reply`. Anything a site must keep
between rounds or across restarts goes to its state store (:mod:`common.state`), never
to process memory alone. The per-process caches here (data, model object) only save
work; losing them loses nothing.

``app`` is the production ClientApp: it knows nothing of fault injection and refuses any
instruction that sets a simulation-only key (:func:`refuse_simulation_only`). The
simulation engine builds its own app with :func:`make_client_app`, whose two seams are a
``data_transform`` (the site's training data as the round trains on it) and Flower mods
around every message (see ``simulations/faults/layer.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from stamen.client.dp import train_private
from stamen.client.drift import site_drift
from stamen.client.ledger import Ledger, PrivacyRefusal
from stamen.client.noise import attempt_seeds, check_noise_mode
from stamen.client.pool import TrainingPool
from stamen.client.privacy import SitePrivacy
from stamen.client.receipts import reconcile, record_sent
from stamen.client.replay import ReplayBuffer, membership_key
from stamen.client.site_policy import SitePolicy
from stamen.client.sources import site_view
from stamen.client.train import pick_device, round_seed, train_local
from stamen.client.view import SiteView
from stamen.common.config import SIMULATION_ONLY, StamenConfig
from stamen.common.convert import arrays_to_record, load_arrays, model_to_arrays, record_to_arrays
from stamen.common.errors import ConfigError, StamenError
from stamen.common.features import on_features
from stamen.common.identity import IDENTITY_KEY, IDENTITY_RECORD, prove_identity, site_id_from_node_config
from stamen.common.instruction import check_schema_header
from stamen.common.models import SITE_MODELS, ModelNotAllowed, build_model, check_site_model, evaluate_model
from stamen.common.reply import DP_ERROR_REASON, NoDataCode, Status, make_reply
from stamen.common.runrecord import derive_seeds
from stamen.common.sitedata import with_site_data
from stamen.common.state import SiteLock, SiteStore

log = logging.getLogger("stamen.client")

#: A Flower ClientApp mod, ``(message, context, call_next) -> reply``: Flower's own alias
#: (``flwr.clientapp.typing.Mod``) is not exported, so it is spelt out here.
Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


@lru_cache(maxsize=4)
def _model(name: str, input_shape: tuple[int, ...], num_classes: int, dp: bool, fix: bool) -> torch.nn.Module:
    """One model object per architecture and process; weights are loaded every call."""
    return build_model(name, input_shape, num_classes, dp=dp, fix=fix)


class Instruction:
    """The parsed content of a server message."""

    def __init__(self, msg: Message, context: Context) -> None:
        record: ConfigRecord | None = msg.content.config_records.get("config")
        if record is None:
            raise ConfigError("instruction has no 'config' record")
        raw: dict[str, Any] = dict(record)
        check_schema_header(raw)
        self.server_round = int(raw.pop("server-round", 0))
        self.model_name = str(raw.pop("model-name", "auto"))
        self.input_shape = tuple(int(v) for v in raw.pop("model-input-shape", []))
        self.num_classes = int(raw.pop("model-num-classes", 0))
        from_round = raw.pop("receipts-from-round", None)  # which sent updates arrived (client/receipts.py)
        self.receipts_from = None if from_round is None else int(from_round)
        self.received_updates = [int(v) for v in raw.pop("received-updates", [])]
        self.cfg = StamenConfig.for_site(raw)
        self.site_id = site_id_from_node_config(context.node_config)
        self.node_config = with_site_data(context.node_config, self.cfg)  # a simulated site's own entry
        self.arrays = (
            record_to_arrays(msg.content.array_records["arrays"]) if "arrays" in msg.content.array_records else None
        )

    @property
    def cache_mb(self) -> int:
        """Memory for fixed features computed once (:mod:`common.features`); 0 computes them every pass."""
        return int(self.cfg["feature-cache-mb"])

    @property
    def policy(self) -> SitePolicy:
        """The site's own privacy policy (:mod:`client.site_policy`); the run may only ask for stricter."""
        return SitePolicy.of(self.node_config, self.cfg)

    @property
    def public_stats(self) -> bool:
        """Whether raw-record statistics may leave this DP site: the site's policy decides."""
        return self.policy.public_stats

    @property
    def private(self) -> bool:
        """Whether this site's records are DP-protected: the run asks for DP or the site requires it."""
        return bool(self.cfg["dp"]) or self.policy.dp_required

    def view(self, *, ingest: bool = False) -> SiteView:
        """This site's data in this round (:mod:`client.sources`); ``ingest`` takes in new shards."""
        server_round = max(self.server_round, 1)  # the handshake (round 0) sees the first round's data
        store = self.store() if "data-dir" in self.node_config else None  # the manifest lives there
        return site_view(
            self.node_config, self.cfg, server_round, store, self.input_shape, self.num_classes, ingest=ingest
        )

    def replay(self, store: SiteStore) -> ReplayBuffer | None:
        """The site's replay buffer, or None when ``replay-size`` is 0."""
        size = int(self.cfg["replay-size"])
        if not size:
            return None
        key = membership_key(
            store,
            node_config=self.node_config,
            private=self.private,
            noise_mode=str(self.cfg["dp-noise"]),
            public_seed=derive_seeds(int(self.cfg["seed"]))["client"],
        )
        return ReplayBuffer(store, size, int(self.cfg["replay-horizon"]), key)

    def store(self) -> SiteStore:
        """This site's state store: node config's ``state-dir``, else the run's (simulation)."""
        root = self.node_config.get("state-dir") or self.cfg["state-dir"]
        if not root:
            raise ConfigError("no state directory: set state-dir in this node's config")
        return SiteStore(str(root), self.site_id)

    def check_model(self) -> None:
        """ModelNotAllowed unless this site's node config allows the instruction's model."""
        check_site_model(self.model_name, self.node_config.get(SITE_MODELS))

    def model(self) -> torch.nn.Module:
        self.check_model()
        if self.arrays is None:
            raise ConfigError("instruction carries no model arrays")
        model = _model(
            self.model_name, self.input_shape, self.num_classes, bool(self.cfg["dp"]), bool(self.cfg["dp-fix-model"])
        )
        load_arrays(model, self.arrays)
        return model


def _site_id_or_unknown(context: Context) -> str:
    try:
        return site_id_from_node_config(context.node_config)
    except StamenError:
        return "unknown"


def _error_reply(msg: Message, context: Context, exc: StamenError) -> Message:
    if isinstance(exc, ModelNotAllowed):  # a refusal by this site's own rule, counted by code
        log.warning("site %s refused (%s): %s", _site_id_or_unknown(context), exc.code, exc)
        return make_reply(msg, _site_id_or_unknown(context), Status.REFUSED_BUDGET, reason=str(exc), code=exc.code)
    log.error("site %s: %s", _site_id_or_unknown(context), exc)
    return make_reply(msg, _site_id_or_unknown(context), Status.ERROR, reason=str(exc))


def _no_data(msg: Message, site_id: str, code: NoDataCode, proof: dict[str, str] | None = None) -> Message:
    """The ``no_data`` reply: its fixed code is all it says (whether a site has records is public, SECURITY.md)."""
    return make_reply(msg, site_id, Status.NO_DATA, reason=code, code=code, proof=proof)


def _refused(msg: Message, ins: Instruction, exc: PrivacyRefusal) -> Message:
    """The ``refused_budget`` reply: the refusal's code only; the text (epsilon figures, shard names) is logged."""
    log.info("site %s round %d refused (%s): %s", ins.site_id, ins.server_round, exc.code, exc)
    return make_reply(msg, ins.site_id, Status.REFUSED_BUDGET, reason=exc.code, code=exc.code)


def _private_error(msg: Message, ins: Instruction, exc: StamenError) -> Message:
    """An error reply from a DP site reading its records: the exception's type only, its text to the log."""
    log.error("site %s round %d: %s", ins.site_id, ins.server_round, exc)
    return make_reply(msg, ins.site_id, Status.ERROR, reason=DP_ERROR_REASON.format(kind=type(exc).__name__))


def _identity_proof(msg: Message, context: Context, site_id: str) -> dict[str, str] | None:
    """Sign the server's nonce with this node's key (deployment); None in simulation, which has no keys."""
    challenge = msg.content.config_records.get(IDENTITY_RECORD)
    key_path = context.node_config.get(IDENTITY_KEY)
    if challenge is None or key_path is None:
        return None
    return prove_identity(str(key_path), site_id, msg.metadata.run_id, str(challenge["nonce"]))


def query(msg: Message, context: Context) -> Message:
    """Identity handshake: who this site is, proven with its node key, and (with DP off) how much data it holds."""
    try:
        site_id = site_id_from_node_config(context.node_config)
        proof = _identity_proof(msg, context, site_id)
        ins = Instruction(msg, context)
        try:  # reading the records, as in train()
            num_train = ins.view().num_train
        except StamenError as exc:
            if ins.private:
                return _private_error(msg, ins, exc)
            raise
        if num_train == 0:
            return _no_data(msg, site_id, "no-training-data", proof=proof)
        metrics = {"num-examples": num_train} if not ins.private or ins.public_stats else {}
        return make_reply(msg, site_id, Status.OK, metrics=metrics, proof=proof)
    except StamenError as exc:
        return _error_reply(msg, context, exc)


DataTransform = Callable[[SiteView, Instruction], SiteView]
"""What a round trains on, given the site's current data and the instruction (a simulation seam)."""


def train(msg: Message, context: Context, data_transform: DataTransform | None = None) -> Message:
    """One round of local SGD from the global model; reply with the local model.

    ``data_transform`` (simulation only, see :func:`make_client_app`) replaces the site's
    current data before anything uses it: the replay buffer, training and drift scores.
    """
    try:
        ins = Instruction(msg, context)
        ins.check_model()
        check_noise_mode(str(ins.cfg["dp-noise"]), ins.node_config)
        store = ins.store()
        with SiteLock.held(store.dir):  # one process per site state dir (common.state.SiteLock)
            return _train(msg, ins, store, data_transform)
    except StamenError as exc:
        return _error_reply(msg, context, exc)


def _train(msg: Message, ins: Instruction, store: SiteStore, data_transform: DataTransform | None) -> Message:
    """:func:`train`'s round, run while this process holds the site's lock."""
    reconcile(store, ins.server_round, ins.receipts_from, ins.received_updates)
    try:  # reading the records: a DP site's error text (counts, shapes, files) stays in its log
        view = ins.view(ingest=True)
        if data_transform is not None:
            view = data_transform(view, ins)
        replay = ins.replay(store)
        pool = TrainingPool.build(view, replay.replay(view) if replay else None)
    except StamenError as exc:
        if ins.private:
            return _private_error(msg, ins, exc)
        raise
    if len(pool) == 0:
        return _no_data(msg, ins.site_id, "no-training-data")
    model = ins.model()
    seed = round_seed(derive_seeds(int(ins.cfg["seed"]))["client"], ins.site_id, ins.server_round)
    device = pick_device(str(ins.cfg["device"]))
    if ins.private:
        try:
            ins.policy.check_dp(ins.cfg)
            reply = _train_private(msg, ins, view, pool, model, store, seed, device)
        except PrivacyRefusal as exc:
            reply = _refused(msg, ins, exc)
    else:
        net, x = on_features(model, pool.x, cache_mb=ins.cache_mb, scope=ins.site_id, device=device)
        result = train_local(net, x, pool.y, ins.cfg, server_round=ins.server_round, seed=seed, device=device)
        _record_participation(store, ins, result.num_examples)
        metrics = {**result.metrics(), **_drift(ins, view, store, seed, None)}
        metrics.update(record_sent(store, ins.server_round, charged=False))
        reply = make_reply(msg, ins.site_id, Status.OK, arrays=_sent_arrays(ins, model, store), metrics=metrics)
    if replay is not None and _trained(reply):
        replay.offer(view)
        replay.save()
    return reply


def _trained(reply: Message) -> bool:
    """Whether a train reply carries an update (the site trained this round)."""
    return "arrays" in reply.content.array_records


def _drift(ins: Instruction, data: SiteView, store: SiteStore, seed: int, ledger: Ledger | None) -> dict[str, float]:
    """This round's data-drift scores of the site's current data (a DP site's histograms are
    charged releases); none when the site has no current data (it trains on replayed records only)."""
    if data.num_train == 0:
        return {}
    cfg = ins.cfg
    return site_drift(
        store,
        data.x_train,
        data.y_train,
        num_classes=ins.num_classes,
        reference_rounds=int(cfg["drift-reference-rounds"]),
        projection_seed=derive_seeds(int(cfg["seed"]))["drift"],
        ledger=ledger,
        noise_multiplier=float(cfg["dp-stats-noise"]),
        seed=seed,
        budget=_budget(ins),
        delta=float(cfg["delta"]),
    )


def _sent_arrays(ins: Instruction, model: torch.nn.Module, store: SiteStore) -> ArrayRecord:
    """The trained model as sent (a simulation's poisoning, if any, is a mod around the app)."""
    return arrays_to_record(model_to_arrays(model))


def _record_participation(store: SiteStore, ins: Instruction, num_examples: int) -> None:
    record = store.read_json("participation", default={"rounds": 0, "examples": 0, "last_round": 0})
    record.update(
        rounds=record["rounds"] + 1,
        examples=record["examples"] + num_examples * int(ins.cfg["local-epochs"]),
        last_round=ins.server_round,
        dp_rounds=record.get("dp_rounds", 0) + int(ins.private),  # the ledger must show at least these
    )
    store.write_json("participation", record, durable=False)  # a count for operators, written every round


def _train_private(
    msg: Message,
    ins: Instruction,
    view: SiteView,
    pool: TrainingPool,
    model: torch.nn.Module,
    store: SiteStore,
    seed: int,
    device: torch.device,
) -> Message:
    """A DP-SGD round through the site's privacy front door (:class:`client.privacy.SitePrivacy`).

    Statistics are released (and charged) before the round is planned, so the plan sees
    everything already spent; the executed steps are charged before the reply is built.
    A round the budget cannot pay for raises :class:`PrivacyRefusal`. Every draw here is
    seeded by :func:`client.noise.attempt_seeds`: secret and fresh per attempt unless the
    run chose ``dp-noise = seeded`` (then from the public round ``seed``).
    """
    cfg = ins.cfg
    privacy = SitePrivacy(store, cfg, _budget(ins), ins.policy)
    privacy.admit(len(pool))
    seeds = attempt_seeds(str(cfg["dp-noise"]), store, seed, ins.server_round)
    drift = privacy.release_statistics(
        view.shard_names, lambda ledger: _drift(ins, view, store, seeds.releases, ledger)
    )
    plan = privacy.plan(pool, seeds.releases)
    net, x = on_features(model, plan.pool.x, cache_mb=ins.cache_mb, scope=ins.site_id, device=device)
    result = train_private(
        net,
        x,
        plan.pool.y,
        cfg,
        server_round=ins.server_round,
        seed=seeds.sampling,
        noise_seed=seeds.noise,
        device=device,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=float(cfg["max-grad-norm"]),
        planned_examples=plan.count,
        accountant_name=str(cfg["accountant"]),
    )
    privacy.charge(plan, result)
    _record_participation(store, ins, result.num_examples)
    metrics = {**result.metrics(), **drift, **privacy.report(plan, result)}
    metrics["ghost-clipping"] = float(result.grad_sample_mode == "ghost")  # the run record says which mode ran
    if not ins.public_stats:
        del metrics["train-loss"]
    metrics.update(record_sent(store, ins.server_round, charged=True))
    return make_reply(msg, ins.site_id, Status.OK, arrays=_sent_arrays(ins, model, store), metrics=metrics)


def _budget(ins: Instruction) -> float:
    """The site's epsilon budget: its policy's (a node's own ``epsilon-budget`` overrides the run's)."""
    return ins.policy.budget


def evaluate(msg: Message, context: Context) -> Message:
    """Loss and accuracy of the global model on this site's held-out data."""
    try:
        ins = Instruction(msg, context)
        ins.check_model()
        if ins.private and not ins.public_stats:
            raise ConfigError(
                "evaluation statistics of a DP site are not noised: it takes part in federated evaluation "
                "only with dp-public-stats = true"
            )
        if float(ins.cfg["holdout-fraction"]) == 0:
            raise ConfigError("this site holds out no data for evaluation (holdout-fraction is 0)")
        data = ins.view()
        if data.num_holdout == 0:
            return _no_data(msg, ins.site_id, "no-holdout-data")
        device = pick_device(str(ins.cfg["device"]))
        net, x = on_features(ins.model(), data.x_holdout, cache_mb=ins.cache_mb, scope=ins.site_id, device=device)
        loss, acc = evaluate_model(net, x, data.y_holdout, device)
        return make_reply(
            msg,
            ins.site_id,
            Status.OK,
            metrics={"num-examples": data.num_holdout, "eval-loss": loss, "eval-accuracy": acc},
        )
    except StamenError as exc:
        return _error_reply(msg, context, exc)


def refuse_simulation_only(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """The production app's guard (a Flower mod): a run that sets a fault-injection key gets an
    error reply naming it, and nothing is trained, evaluated or counted.

    Only ``stamen simulate`` applies these keys (simulations/faults); a node running this app
    would otherwise ignore them silently, or, were they ever applied here, let a run config
    poison a deployment.
    """
    record = msg.content.config_records.get("config")
    raw = {k: v for k, v in (record or {}).items() if k in SIMULATION_ONLY}
    try:
        refused = StamenConfig.from_mapping(raw).simulation_only_set()
    except StamenError as exc:
        return _error_reply(msg, context, exc)
    if refused:
        names = ", ".join(f"'{k}'" for k in refused)
        return _error_reply(
            msg,
            context,
            ConfigError(
                f"run config {names} is simulation-only (fault injection, applied by stamen simulate): "
                "this node refuses the instruction"
            ),
        )
    return call_next(msg, context)


def make_client_app(data_transform: DataTransform | None = None, mods: Sequence[Mod] | None = None) -> ClientApp:
    """A stamen ClientApp; the production ``app`` is ``make_client_app()``.

    ``mods`` wrap every message (Flower's ClientApp mods); without them the app refuses
    simulation-only keys. A simulation layer that applies those keys passes its own mods and
    ``data_transform`` instead (``simulations/faults/layer.py``).
    """
    client_app = ClientApp(mods=list(mods) if mods is not None else [refuse_simulation_only])
    client_app.query()(query)
    client_app.train()(train if data_transform is None else partial(train, data_transform=data_transform))
    client_app.evaluate()(evaluate)
    return client_app


app = make_client_app()
