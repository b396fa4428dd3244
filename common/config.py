"""The run configuration: every key, its type, default and allowed range, in one table.

Flower passes run config as a flat mapping of hyphenated keys (``[tool.flwr.app.config]``
in ``pyproject.toml``, ``--run-config`` on ``flwr run``, ``--set`` on ``stamen
simulate``). Everything a run needs is a key here, because in deployment the ServerApp
is a process the SuperLink starts and cannot take command-line flags. A test checks that
``pyproject.toml`` lists exactly these keys with these defaults.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, make_dataclass
from typing import Any

from stamen.common.errors import ConfigError

Scalar = bool | int | float | str


@dataclass(frozen=True)
class Key:
    """One run-config key: its type, default, help text and an optional range check."""

    name: str
    type: type
    default: Scalar
    help: str
    check: Callable[[Any], bool] | None = None
    expect: str = ""
    # A fault-injection key: only ``stamen simulate`` (simulations/faults) applies it; the
    # production ServerApp and ClientApp refuse a run that sets it to anything but its default.
    simulation_only: bool = False


def _choice(*options: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), "one of " + ", ".join(options)


def _nonneg(v: float) -> bool:
    return math.isfinite(v) and v >= 0


def _pos(v: float) -> bool:
    return math.isfinite(v) and v > 0


def _unit(v: float) -> bool:
    return 0 < v <= 1


def _unit_open(v: float) -> bool:
    return 0 <= v < 1


def _port(v: int) -> bool:
    return 0 <= v <= 65535


KEYS: tuple[Key, ...] = (
    # --- the federation ------------------------------------------------------------
    Key("num-server-rounds", int, 20, "rounds to run (0 = until stopped)", lambda v: v >= 0, ">= 0"),
    Key("fraction-train", float, 1.0, "fraction of sites sampled for training each round", _unit, "in (0, 1]"),
    Key("min-train-sites", int, 1, "fewest usable replies a round needs to update the model", lambda v: v >= 1, ">= 1"),
    Key("fraction-evaluate", float, 1.0, "fraction of sites asked for federated evaluation", _unit, "in (0, 1]"),
    Key(
        "eval-every",
        int,
        1,
        "federated evaluation every N rounds (0 = only after the last round)",
        lambda v: v >= 0,
        ">= 0",
    ),
    Key("round-timeout", float, 600.0, "seconds the server waits for a round's replies", _pos, "> 0"),
    Key("reply-poll-interval", float, 0.2, "seconds between the server's looks for replies", _pos, "> 0"),
    Key(
        "min-available-sites",
        int,
        1,
        "connected sites a round waits for before sampling",
        lambda v: v >= 1,
        ">= 1",
    ),
    Key(
        "wait-for-sites",
        float,
        60.0,
        "seconds a round waits for min-available-sites, then goes on with those connected",
        _nonneg,
        ">= 0",
    ),
    Key(
        "max-empty-rounds",
        int,
        3,
        "consecutive rounds without a usable reply before the run stops",
        lambda v: v >= 1,
        ">= 1",
    ),
    Key(
        "seed",
        int,
        42,
        "master seed: model init, sampling, partitioning and client shuffling derive from it",
        lambda v: v >= 0,
        ">= 0",
    ),
    Key("out-dir", str, "", "run directory ('' = runs/<timestamp>)"),
    Key("state-dir", str, "", "per-site state root in simulation ('' = <out-dir>/sites); real nodes set their own"),
    # --- continual runs: checkpoints, resume, rollback, versions -------------------------
    Key(
        "checkpoint-every", int, 1, "checkpoint every N rounds (and always at the last round)", lambda v: v >= 1, ">= 1"
    ),
    Key("checkpoint-keep", int, 3, "checkpoints kept (the newest K)", lambda v: v >= 1, ">= 1"),
    Key("resume-from", str, "", "run directory to continue from its newest valid checkpoint ('' = fresh run)"),
    Key(
        "rollback-patience",
        int,
        3,
        "evaluated rounds in a row with loss worse than the best by rollback-tolerance before a rollback (0 = off)",
        lambda v: v >= 0,
        ">= 0",
    ),
    Key(
        "rollback-tolerance",
        float,
        0.5,
        "relative eval-loss increase over the best version that counts as diverging",
        _nonneg,
        ">= 0",
    ),
    Key(
        "versions-keep",
        int,
        20,
        "model files kept for the newest N versions, besides the best and every released one (0 = all)",
        lambda v: v >= 0,
        ">= 0",
    ),
    Key(
        "server-lr-spike",
        str,
        "",
        "simulation only: rehearse a rollback, multiplying the server step by F in rounds A..B, as 'A-B:F' ('' = off)",
        simulation_only=True,
    ),
    # --- data ---------------------------------------------------------------------
    Key("dataset", str, "mnist5k", "digits | mnist5k | npz:PATH | csv:PATH | hf:NAME"),
    Key(
        "site-data",
        str,
        "",
        "simulation: a directory with one npz/csv file or sub-directory per site ('' = partitions of dataset)",
    ),
    Key(
        "data-loader",
        str,
        "",
        "simulation: package.module:fn, fn(partition_id, num_partitions) returns a site's arrays "
        "('' = partitions of dataset)",
    ),
    Key("partition", str, "dirichlet", "how simulation splits the data", *_choice("iid", "dirichlet", "shards")),
    Key("alpha", float, 0.5, "Dirichlet concentration (small = more label skew)", _pos, "> 0"),
    Key("shards-per-site", int, 2, "label shards per site with partition=shards", lambda v: v >= 1, ">= 1"),
    Key("min-partition-size", int, 32, "smallest site a partitioning may produce", lambda v: v >= 1, ">= 1"),
    Key(
        "holdout-fraction",
        float,
        0.05,
        "share of each site's data held out for federated evaluation",
        _unit_open,
        "in [0, 1)",
    ),
    Key(
        "scenario",
        str,
        "",
        "simulation scenario: a bundled name (simulations/scenarios/) or a YAML path ('' = data never changes)",
    ),
    Key(
        "replay-size",
        int,
        200,
        "records each site keeps in its replay buffer and mixes into training (0 = off)",
        lambda v: v >= 0,
        ">= 0",
    ),
    Key(
        "replay-horizon",
        int,
        2000,
        "records a site expects to offer its replay buffer: each is kept with probability replay-size / this",
        lambda v: v >= 1,
        ">= 1",
    ),
    Key("server-eval", bool, True, "evaluate centrally on the dataset's test split when the server has it"),
    Key("input-shape", str, "", "model input shape, e.g. '1,28,28' ('' = from the server's dataset)"),
    Key("num-classes", int, 0, "model output classes (0 = from the server's dataset)", lambda v: v >= 0, ">= 0"),
    # --- model --------------------------------------------------------------------
    Key("model", str, "auto", "auto | logreg | mlp | cnn28 | cnn28-tanh | cnn8 | scatnet28 | package.module:Class"),
    Key(
        "feature-cache-mb",
        int,
        512,
        "memory for a model's fixed features (e.g. scatnet28's scattering), computed once per record (0 = off)",
        lambda v: v >= 0,
        ">= 0",
    ),
    # --- local training (client) ------------------------------------------------------
    Key("optimizer", str, "sgd", "local optimizer", *_choice("sgd", "adamw")),
    Key("lr", float, 0.05, "peak local learning rate", _pos, "> 0"),
    Key("momentum", float, 0.9, "local SGD momentum", _unit_open, "in [0, 1)"),
    Key("nesterov", bool, False, "Nesterov momentum for local SGD"),
    Key("weight-decay", float, 0.0, "L2 weight decay (decoupled for adamw)", _nonneg, ">= 0"),
    Key("local-epochs", int, 1, "passes over the site's data per round", lambda v: v >= 1, ">= 1"),
    Key("batch-size", int, 32, "examples per micro-batch", lambda v: v >= 1, ">= 1"),
    Key("accum-steps", int, 1, "micro-batches accumulated per optimizer step", lambda v: v >= 1, ">= 1"),
    Key("clip-norm", float, 0.0, "clip gradients to this global L2 norm (0 = off)", _nonneg, ">= 0"),
    Key(
        "lr-schedule",
        str,
        "cosine",
        "LR decay after warmup, over global rounds",
        *_choice("constant", "cosine", "step"),
    ),
    Key("warmup-rounds", float, 1.0, "linear LR warmup length, in rounds", _nonneg, ">= 0"),
    Key("lr-horizon-rounds", int, 0, "rounds the cosine decays over (0 = num-server-rounds)", lambda v: v >= 0, ">= 0"),
    Key("lr-min-factor", float, 0.2, "cosine floor as a fraction of lr", lambda v: 0 <= v <= 1, "in [0, 1]"),
    Key("step-rounds", int, 10, "step schedule: rounds between decays", lambda v: v >= 1, ">= 1"),
    Key("step-gamma", float, 0.5, "step schedule: decay factor", _unit, "in (0, 1]"),
    Key(
        "precision", str, "auto", "auto = bf16 autocast on CUDA, fp32 on CPU", *_choice("auto", "fp32", "bf16", "fp16")
    ),
    Key("device", str, "auto", "client device", *_choice("auto", "cpu", "cuda")),
    # --- differential privacy (client-side DP-SGD through Opacus) ---------------------------
    Key("dp", bool, False, "train every site with DP-SGD (Opacus) and keep a privacy ledger per site"),
    Key(
        "noise-multiplier",
        float,
        0.0,
        "DP noise std / max-grad-norm (0 = calibrate from target-epsilon)",
        _nonneg,
        ">= 0",
    ),
    Key("max-grad-norm", float, 1.0, "per-sample gradient clipping bound", _pos, "> 0"),
    Key("target-epsilon", float, 8.0, "epsilon the noise is calibrated to over privacy-horizon-rounds", _pos, "> 0"),
    Key("delta", float, 1e-5, "DP delta of every reported epsilon", lambda v: 0 < v < 1, "in (0, 1)"),
    Key(
        "privacy-horizon-rounds",
        int,
        0,
        "rounds a site is planned to train (required to calibrate from target-epsilon)",
        lambda v: v >= 0,
        ">= 0",
    ),
    Key("epsilon-budget", float, 0.0, "per-site epsilon budget (0 = target-epsilon)", _nonneg, ">= 0"),
    Key("accountant", str, "rdp", "privacy accountant", *_choice("rdp", "prv")),
    Key(
        "dp-grad-sample-mode",
        str,
        "hooks",
        "per-sample clipping: hooks = Opacus's per-sample gradients; ghost = Opacus's ghost clipping "
        "(norms without per-sample gradients; fp32 only, else hooks)",
        *_choice("hooks", "ghost"),
    ),
    Key(
        "privacy-policy",
        str,
        "refuse",
        "refuse = one ledger per site, refuse once spent; per-shard = one ledger per data shard",
        *_choice("refuse", "per-shard"),
    ),
    Key(
        "dp-fix-model",
        bool,
        False,
        "with dp: let Opacus fix a model it cannot train (e.g. BatchNorm -> GroupNorm) on server and sites alike",
    ),
    Key(
        "dp-stats-noise",
        float,
        10.0,
        "noise multiplier of a DP site's charged releases of statistics (its example count)",
        _pos,
        "> 0",
    ),
    Key(
        "dp-public-stats",
        bool,
        False,
        "declare a DP site's raw-record statistics public: send train loss and take part in federated evaluation",
    ),
    Key(
        "dp-noise",
        str,
        "secret",
        "secret = DP noise from randomness only its holder has; seeded = from the run seed (research only)",
        *_choice("secret", "seeded"),
    ),
    # --- client-level DP on the server (DP-FedAvg) ---------------------------------------
    Key(
        "server-dp-clip",
        float,
        0.0,
        "clip each site's update to this L2 norm and add Gaussian noise to the sum (0 = off)",
        _nonneg,
        ">= 0",
    ),
    Key("server-dp-noise", float, 1.0, "server noise std / server-dp-clip", _pos, "> 0"),
    Key(
        "site-sampling",
        str,
        "fixed",
        "fixed: a fixed number of sites per round; poisson: each site independently "
        "(server DP still accounts at rate 1: the sampled sites are published)",
        *_choice("fixed", "poisson"),
    ),
    # --- bounded trust in site reports and robust aggregation (server/trust.py) ---------
    Key(
        "aggregation",
        str,
        "mean",
        "rule the server optimizer steps towards",
        *_choice("mean", "median", "trimmed-mean", "krum", "multikrum"),
    ),
    Key(
        "trim-fraction",
        float,
        0.2,
        "trimmed-mean: fraction cut at each end per coordinate",
        lambda v: 0 <= v < 0.5,
        "in [0, 0.5)",
    ),
    Key("byzantine-sites", int, 1, "krum/multikrum: malicious sites assumed per round", lambda v: v >= 0, ">= 0"),
    Key(
        "max-site-weight",
        float,
        0.0,
        "largest share of the total weight one site may have (0 or 1 = off)",
        lambda v: 0 <= v <= 1,
        "in [0, 1]",
    ),
    Key("equal-weights", bool, False, "weigh every site the same, whatever example count it reports"),
    Key("update-norm-bound", float, 0.0, "largest L2 norm of a site's update (0 = off)", _nonneg, ">= 0"),
    Key("update-norm-action", str, "clip", "what happens to an update over the bound", *_choice("clip", "reject")),
    Key(
        "outlier-mad-k",
        float,
        0.0,
        "reject updates with norm > median + k * MAD of the round (0 = off)",
        _nonneg,
        ">= 0",
    ),
    # --- poisoning scenarios, simulation only (simulations/faults/attack.py) ------------------------
    Key(
        "attack",
        str,
        "none",
        "simulation only: what the attacking sites do",
        *_choice("none", "sign-flip", "scale", "label-flip", "nan", "stale"),
        simulation_only=True,
    ),
    Key(
        "attack-sites",
        str,
        "",
        "simulation only: attacking partitions, a count N (partitions 0..N-1) or a list like '2,5'",
        simulation_only=True,
    ),
    Key(
        "attack-scale",
        float,
        10.0,
        "simulation only: factor of scale and sign-flip attacks",
        _pos,
        "> 0",
        simulation_only=True,
    ),
    # --- server optimizer ---------------------------------------------------------------
    Key("strategy", str, "fedavgm", "server optimizer", *_choice("fedavg", "fedavgm", "fedadam", "fedyogi")),
    Key("server-lr", float, 1.0, "server learning rate (eta for fedadam/fedyogi)", _pos, "> 0"),
    Key("server-momentum", float, 0.9, "server momentum beta for fedavgm", _unit_open, "in [0, 1)"),
    Key("server-nesterov", bool, False, "Nesterov server momentum"),
    Key("beta-1", float, 0.9, "fedadam/fedyogi first-moment decay", _unit_open, "in [0, 1)"),
    Key("beta-2", float, 0.99, "fedadam/fedyogi second-moment decay", _unit_open, "in [0, 1)"),
    Key("tau", float, 1e-3, "fedadam/fedyogi adaptivity floor", _pos, "> 0"),
    # --- observability: the server's Prometheus endpoint and drift monitoring -------------
    Key("metrics-port", int, 0, "port of the server's Prometheus endpoint (0 = off)", _port, "in [0, 65535]"),
    Key("metrics-host", str, "127.0.0.1", "address the metrics endpoint binds to"),
    Key("metrics-certfile", str, "", "TLS certificate (PEM) for the metrics endpoint ('' = plain HTTP)"),
    Key("metrics-keyfile", str, "", "TLS private key (PEM) for the metrics endpoint"),
    Key(
        "metrics-max-sites",
        int,
        100,
        "sites with their own metric series; later ones are folded into site='other'",
        lambda v: v >= 0,
        ">= 0",
    ),
    Key("metrics-per-site", bool, True, "export per-site series (false = aggregates only)"),
    Key(
        "metrics-linger-seconds",
        float,
        5.0,
        "seconds the endpoint keeps serving after the last round, so a scrape sees it (deploy/prometheus: 5 s)",
        _nonneg,
        ">= 0",
    ),
    Key(
        "drift-reference-rounds",
        int,
        2,
        "rounds a site trains before its drift reference is frozen",
        lambda v: v >= 1,
        ">= 1",
    ),
    Key("drift-ph-threshold", float, 0.5, "Page-Hinkley threshold on a loss, in nats", _pos, "> 0"),
    Key("drift-ph-delta", float, 0.005, "Page-Hinkley tolerated rise per round, in nats", _nonneg, ">= 0"),
    Key(
        "label-shift-round",
        int,
        0,
        "simulation only: inject a label shift from this round (0 = off)",
        lambda v: v >= 0,
        ">= 0",
        simulation_only=True,
    ),
    Key(
        "label-shift-sites",
        str,
        "",
        "simulation only: comma-separated site-ids that get the label shift",
        simulation_only=True,
    ),
)

KEY_BY_NAME: dict[str, Key] = {k.name: k for k in KEYS}
SIMULATION_ONLY: tuple[str, ...] = tuple(k.name for k in KEYS if k.simulation_only)

#: Where each section of the table begins (table order); a section runs to the next one's start.
_SECTION_STARTS = {
    "num-server-rounds": "federation",
    "checkpoint-every": "continual",
    "dataset": "data",
    "model": "model",
    "optimizer": "local",
    "dp": "privacy",
    "server-dp-clip": "server-dp",
    "aggregation": "trust",
    "attack": "faults",
    "strategy": "server-optimizer",
    "metrics-port": "observe",
    "label-shift-round": "faults",
}


def _sections() -> dict[str, str]:
    out: dict[str, str] = {}
    current = ""
    for key in KEYS:
        current = _SECTION_STARTS.get(key.name, current)
        out[key.name] = current
    return out


#: The section of every key: federation, continual, data, model, local, privacy, server-dp,
#: trust, faults (simulation only), server-optimizer, observe.
SECTION_OF: dict[str, str] = _sections()
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(SECTION_OF.values()))

#: The sections a site reads; only these keys travel in an instruction.
SITE_SECTIONS = ("data", "model", "local", "privacy", "faults")

#: Keys of other sections a site needs: the seed its shuffling and drift sketches derive
#: from, the run length its LR schedule spans, the simulated state root, its drift window.
SITE_EXTRA_KEYS = ("seed", "num-server-rounds", "state-dir", "drift-reference-rounds")

#: Every key a site is sent (and may read); server-only keys such as ``metrics-keyfile`` or
#: ``resume-from`` never leave the server.
SITE_KEYS: frozenset[str] = frozenset([n for n, s in SECTION_OF.items() if s in SITE_SECTIONS] + list(SITE_EXTRA_KEYS))


def _attribute(name: str) -> str:
    return name.replace("-", "_")


def _section_class(section: str) -> type:
    keys = [k for k in KEYS if SECTION_OF[k.name] == section]
    title = "".join(p.title() for p in section.split("-"))
    doc = f"The {section!r} section of a run config, typed (generated from the key table)."
    return make_dataclass(
        f"{title}Config", [(_attribute(k.name), k.type) for k in keys], frozen=True, namespace={"__doc__": doc}
    )


#: One frozen dataclass per section, generated from the table (``cfg.section("local").lr``).
SECTION_CLASSES: dict[str, type] = {s: _section_class(s) for s in SECTIONS}


def _coerce(key: Key, value: Any) -> Scalar:
    """Convert a raw value (TOML scalar or ``--set`` string) to the key's type."""
    if key.type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"run config '{key.name}' must be true or false, got {value!r}")
    if key.type is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"run config '{key.name}' must be an integer, got {value!r}")
    if key.type is float:
        if isinstance(value, bool):
            raise ConfigError(f"run config '{key.name}' must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"run config '{key.name}' must be a number, got {value!r}") from None
    return str(value)


@dataclass(frozen=True)
class StamenConfig:
    """A validated run configuration; build it with :meth:`from_mapping`."""

    values: Mapping[str, Scalar]
    #: The keys this config may be read by; None = all. A site's config holds only :data:`SITE_KEYS`.
    readable: frozenset[str] | None = field(default=None, compare=False)

    @classmethod
    def for_site(cls, raw: Mapping[str, Any]) -> StamenConfig:
        """A site's config from an instruction: the site keys it carries, checked like any run
        config, defaults for the rest; reading a server-only key raises (it was never sent)."""
        full = cls.from_mapping({k: v for k, v in raw.items() if k in SITE_KEYS})
        return cls(full.values, readable=SITE_KEYS)

    def site_dict(self) -> dict[str, Scalar]:
        """The keys an instruction carries to a site (:data:`SITE_KEYS`), in table order."""
        return {k.name: self.values[k.name] for k in KEYS if k.name in SITE_KEYS}

    def section(self, name: str) -> Any:
        """One section as a typed frozen dataclass, e.g. ``cfg.section("local").batch_size``."""
        if name not in SECTION_CLASSES:
            raise ConfigError(f"unknown config section {name!r}; sections: {', '.join(SECTIONS)}")
        keys = [k.name for k in KEYS if SECTION_OF[k.name] == name]
        return SECTION_CLASSES[name](**{_attribute(k): self[k] for k in keys})

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], *, strict: bool = True) -> StamenConfig:
        """Fill defaults, coerce types and check ranges.

        ``strict`` rejects unknown keys (typos in ``--set`` must not pass silently);
        Flower's own run config may carry keys of other apps, so the ServerApp uses it
        with the keys it was given by the pyproject, which are all known.
        """
        unknown = sorted(set(raw) - set(KEY_BY_NAME))
        if unknown and strict:
            raise ConfigError(f"unknown run config key(s): {'; '.join(did_you_mean(k) for k in unknown)}")
        values: dict[str, Scalar] = {}
        for key in KEYS:
            value = _coerce(key, raw[key.name]) if key.name in raw else key.default
            if key.check is not None and not key.check(value):
                raise ConfigError(f"run config '{key.name}' must be {key.expect}, got {value!r}")
            values[key.name] = value
        cfg = cls(values)
        cfg._check_combinations()
        return cfg

    def _check_combinations(self) -> None:
        v = self.values
        if v["lr-schedule"] == "cosine" and self.lr_horizon_rounds < 1:
            raise ConfigError("lr-schedule 'cosine' needs lr-horizon-rounds >= 1 when rounds are unbounded")
        if v["dp"] and v["noise-multiplier"] == 0 and v["privacy-horizon-rounds"] < 1:
            raise ConfigError(
                "dp with target-epsilon needs privacy-horizon-rounds >= 1 (rounds each site is planned to "
                "train), or set noise-multiplier explicitly"
            )
        robust = v["aggregation"] != "mean" or v["outlier-mad-k"] > 0
        if v["server-dp-clip"] > 0 and (robust or v["max-site-weight"] not in (0, 1) or v["equal-weights"]):
            raise ConfigError(
                "server-dp-clip (client-level DP) sums clipped updates with equal weight; aggregation other than "
                "'mean', outlier-mad-k and site weight caps make one site's update change how others are counted, "
                "which the DP guarantee does not cover: turn them off, or turn server-dp-clip off"
            )
        if bool(v["metrics-certfile"]) != bool(v["metrics-keyfile"]):
            raise ConfigError("metrics-certfile and metrics-keyfile must be set together (TLS needs both)")
        if v["site-data"] and v["data-loader"]:
            raise ConfigError("site-data and data-loader both give every site its own data: set one of them")
        if (v["site-data"] or v["data-loader"]) and v["scenario"]:
            raise ConfigError(
                "a scenario streams partitions of the run's dataset; site-data and data-loader give each site "
                "its own data: use one or the other"
            )
        if v["input-shape"]:
            self.input_shape  # noqa: B018 - parse now so a bad value fails at start
        if v["server-lr-spike"]:
            self.server_lr_spike  # noqa: B018 - parse now so a bad value fails at start

    def __getitem__(self, name: str) -> Any:
        if self.readable is not None and name not in self.readable:
            raise ConfigError(f"run config '{name}' is a server-side key ({SECTION_OF[name]}); sites are not sent it")
        return self.values[name]

    def simulation_only_set(self) -> list[str]:
        """The simulation-only (fault-injection) keys this run sets to anything but their default."""
        return [name for name in SIMULATION_ONLY if self[name] != KEY_BY_NAME[name].default]

    def replace(self, **changes: Scalar) -> StamenConfig:
        """A copy with some keys changed (keys use underscores here)."""
        raw = dict(self.values)
        raw.update({k.replace("_", "-"): v for k, v in changes.items()})
        new = StamenConfig.from_mapping(raw)
        return new if self.readable is None else StamenConfig(new.values, readable=self.readable)

    @property
    def lr_horizon_rounds(self) -> int:
        """Rounds the cosine schedule spans: explicit, else the run's length."""
        return int(self["lr-horizon-rounds"] or self["num-server-rounds"])

    @property
    def epsilon_budget(self) -> float:
        """The per-site budget: explicit, else the calibration target."""
        return float(self["epsilon-budget"] or self["target-epsilon"])

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """Parsed ``input-shape``, or None when it should come from the dataset."""
        text = str(self["input-shape"]).strip()
        if not text:
            return None
        try:
            shape = tuple(int(p) for p in text.split(","))
        except ValueError:
            raise ConfigError(f"run config 'input-shape' must be comma-separated integers, got {text!r}") from None
        if not shape or min(shape) < 1:
            raise ConfigError(f"run config 'input-shape' must be positive integers, got {text!r}")
        return shape

    @property
    def server_lr_spike(self) -> tuple[int, int, float] | None:
        """Parsed ``server-lr-spike`` as (first round, last round, factor), or None when off."""
        text = str(self["server-lr-spike"]).strip()
        if not text:
            return None
        try:
            rounds, factor = text.split(":")
            first, _, last = rounds.partition("-")
            spike = (int(first), int(last or first), float(factor))
        except ValueError:
            raise ConfigError(f"run config 'server-lr-spike' must look like 'A-B:F', got {text!r}") from None
        if not (1 <= spike[0] <= spike[1] and math.isfinite(spike[2]) and spike[2] > 0):
            raise ConfigError(f"run config 'server-lr-spike' needs 1 <= A <= B and F > 0, got {text!r}")
        return spike

    def as_dict(self) -> dict[str, Scalar]:
        """Plain dict, in table order, for ``config.json`` and messages."""
        return {k.name: self.values[k.name] for k in KEYS}


def did_you_mean(key: str) -> str:
    """``key`` quoted, with the known key(s) it is probably a typo of (``_`` for ``-`` first)."""
    hyphenated = key.strip().lower().replace("_", "-")
    if hyphenated != key and hyphenated in KEY_BY_NAME:
        return f"{key!r} (run config keys use '-', not '_': did you mean {hyphenated!r}?)"
    close = difflib.get_close_matches(hyphenated, KEY_BY_NAME, n=3, cutoff=0.6)
    return f"{key!r} (did you mean {' or '.join(map(repr, close))}?)" if close else repr(key)


def parse_assignment(text: str) -> tuple[str, str]:
    """Split one ``key=value`` from ``--set``; the value is coerced later by its key."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip()
    if key not in KEY_BY_NAME:
        raise ConfigError(f"unknown run config key {did_you_mean(key)} in --set")
    return key, value.strip()


#: The public name of a validated run configuration (``stamen.RunConfig``).
RunConfig = StamenConfig
