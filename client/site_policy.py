"""The site's own privacy policy: what a run config may ask of this site, and no less.

Threat model: an honest-but-curious server sees everything a site sends and may send any
run config it likes. So the privacy a site gets is fixed by the site, never by the run:
the node config's ``site-*`` keys (set with ``stamen node --set site-dp=true ...``, or for
every simulated site with ``stamen simulate --site-policy FILE``) and the site's ledger.
A run config may only ask for something stricter; an instruction asking for less is
refused with a :data:`~stamen.client.ledger.RefusalCode` (``policy-*``), before anything
is read from the data, trained or charged.

Keys (node config): ``site-dp`` (DP required; also makes the policy the site's own, so the
other keys default as below instead of to the run's values), ``site-delta`` (largest delta,
default 1e-5), ``site-accountant`` (default ``rdp``), ``site-privacy-policy`` (default
``refuse``), ``site-min-noise`` (smallest noise multiplier, default 0 = any),
``site-max-sample-rate`` (largest sample rate, default 1), plus the existing
``epsilon-budget`` (required with ``site-dp = true``) and ``dp-public-stats`` (default false).

A real node (``stamen node``, or any SuperNode running this ClientApp: its node config has
no ``partition-id``, which only Flower's simulation engine sets) without ``site-dp`` gets
the strict default: DP required at delta 1e-5, ``rdp``, ``refuse``, its ``epsilon-budget``.
With no ``epsilon-budget`` either it refuses every DP round (``policy-no-budget``) rather
than spend under a budget nobody chose; accepting non-DP runs takes an explicit
``site-dp = false``. Only a simulated site without ``site-dp`` (``stamen simulate`` without
``--site-policy``) takes the run's values as its policy, and the run says so
(``summary.json`` ``privacy.site_policy = "run-config"``). Either way the ledger pins what
it recorded: its accountant, its policy and its delta.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flwr.app import Context, Message

from stamen.client.ledger import PrivacyRefusal
from stamen.common.config import StamenConfig
from stamen.common.errors import ConfigError
from stamen.common.identity import simulated

#: Node-config keys of a site policy (besides ``epsilon-budget`` and ``dp-public-stats``).
POLICY_KEYS = (
    "site-dp",
    "site-delta",
    "site-accountant",
    "site-privacy-policy",
    "site-min-noise",
    "site-max-sample-rate",
)


#: Where a site's policy comes from: its own ``site-*`` keys, a real node's strict default,
#: or (simulated sites only) the run config.
PolicySource = Literal["site", "default", "run"]
#: The strict default's delta (also ``site-delta``'s default).
DEFAULT_DELTA = 1e-5


#: Every node-config key a site policy file (``stamen simulate --site-policy``) may set.
POLICY_FILE_KEYS = (*POLICY_KEYS, "epsilon-budget", "dp-public-stats")


def load_policy_file(path: Path) -> dict[str, Any]:
    """The node-config keys of a site policy file (TOML, or JSON by its ``.json`` suffix), checked.

    ``stamen simulate --site-policy FILE`` gives every simulated site this policy: Flower's
    ``run_simulation`` takes no per-node config, so the simulation's ClientApp adds these
    keys to each site's node config (:func:`with_site_policy`).
    """
    try:
        text = path.read_text()
        keys = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"site policy file {path}: {exc}") from exc
    unknown = sorted(set(keys) - set(POLICY_FILE_KEYS))
    if unknown:
        raise ConfigError(
            f"site policy file {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(POLICY_FILE_KEYS)}"
        )
    if "site-dp" not in keys:
        raise ConfigError(f"site policy file {path} must set site-dp (true: DP required)")
    SitePolicy.of(keys, StamenConfig.from_mapping({}))  # ConfigError on a bad value
    return dict(keys)


def with_site_policy(
    policy: Mapping[str, Any], msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """A Flower mod (bind ``policy`` with functools.partial): the site's node config gets the policy's keys."""
    context.node_config.update(policy)
    return call_next(msg, context)


def _flag(value: Any) -> bool:
    """A node-config boolean: Flower passes TOML booleans, ``--set`` may pass strings."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


@dataclass(frozen=True)
class SitePolicy:
    """The least privacy this site accepts, and where that policy comes from (``source``)."""

    source: PolicySource
    dp_required: bool
    budget: float
    delta: float
    accountant: str
    privacy_policy: str
    min_noise: float
    max_sample_rate: float
    public_stats: bool

    @property
    def own(self) -> bool:
        """Whether the site fixed this policy itself (its keys, or a real node's strict default)."""
        return self.source != "run"

    @classmethod
    def of(cls, node_config: Mapping[str, Any], cfg: StamenConfig) -> SitePolicy:
        """The site's policy from its node config: its ``site-*`` keys; without ``site-dp`` a real
        node's strict default, a simulated site's run values (:meth:`of_run`)."""
        if "site-dp" not in node_config:
            unknown = sorted(k for k in POLICY_KEYS if k in node_config)
            if unknown:
                raise ConfigError(f"node config sets {', '.join(unknown)} but not site-dp: set site-dp too")
            if simulated(node_config):
                return cls.of_run(cfg, node_config)
        try:
            policy = cls(
                source="site" if "site-dp" in node_config else "default",
                dp_required=_flag(node_config.get("site-dp", True)),
                budget=float(node_config.get("epsilon-budget", 0.0)),
                delta=float(node_config.get("site-delta", DEFAULT_DELTA)),
                accountant=str(node_config.get("site-accountant", "rdp")),
                privacy_policy=str(node_config.get("site-privacy-policy", "refuse")),
                min_noise=float(node_config.get("site-min-noise", 0.0)),
                max_sample_rate=float(node_config.get("site-max-sample-rate", 1.0)),
                public_stats=_flag(node_config.get("dp-public-stats", False)),
            )
        except ValueError as exc:
            raise ConfigError(f"node config site policy: {exc}") from exc
        policy.validate()
        return policy

    @classmethod
    def of_run(cls, cfg: StamenConfig, node_config: Mapping[str, Any] | None = None) -> SitePolicy:
        """The run's values as the policy: a simulated site's without ``--site-policy``."""
        node_config = node_config or {}
        return cls(
            source="run",
            dp_required=False,
            budget=float(node_config.get("epsilon-budget", cfg.epsilon_budget)),
            delta=float(cfg["delta"]),
            accountant=str(cfg["accountant"]),
            privacy_policy=str(cfg["privacy-policy"]),
            min_noise=0.0,
            max_sample_rate=1.0,
            public_stats=_flag(node_config.get("dp-public-stats", cfg["dp-public-stats"])),
        )

    def describe(self) -> str:
        """One line for a node's log: what this site accepts."""
        if not self.dp_required:
            dp = "DP not required (site-dp = false)" if self.source == "site" else "the run's values"
        else:
            budget = f"epsilon budget {self.budget:g}" if self.budget > 0 else "NO epsilon-budget: refuses DP rounds"
            dp = f"DP required, {budget}"
        origin = {"site": "its own site-* keys", "default": "the strict default (no site-dp set)", "run": "run config"}
        return (
            f"{dp}; delta <= {self.delta:g}, accountant {self.accountant}, privacy-policy {self.privacy_policy}, "
            f"noise >= {self.min_noise:g}, sample rate <= {self.max_sample_rate:g}, public stats "
            f"{str(self.public_stats).lower()} (from {origin[self.source]})"
        )

    def validate(self) -> None:
        """ConfigError naming the first bad value of a site's own policy."""
        if self.source == "site" and self.dp_required and not self.budget > 0:
            raise ConfigError("node config site-dp = true needs epsilon-budget > 0 (the site's own budget)")
        if not 0 < self.delta < 1:
            raise ConfigError(f"node config site-delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ("rdp", "prv"):
            raise ConfigError(f"node config site-accountant must be rdp or prv, got {self.accountant!r}")
        if self.privacy_policy not in ("refuse", "per-shard"):
            raise ConfigError(
                f"node config site-privacy-policy must be refuse or per-shard, got {self.privacy_policy!r}"
            )
        if self.min_noise < 0 or not 0 < self.max_sample_rate <= 1:
            raise ConfigError("node config site-min-noise must be >= 0 and site-max-sample-rate in (0, 1]")

    def check_dp(self, cfg: StamenConfig) -> None:
        """``policy-dp-off`` if the run turns DP off on a site that requires it; ``policy-no-budget``
        if the site requires DP but set no budget (a real node with no privacy configuration)."""
        if self.dp_required and not cfg["dp"]:
            raise PrivacyRefusal("policy-dp-off", "this site requires DP and the run config turns dp off")
        if self.dp_required and not self.budget > 0:
            raise PrivacyRefusal(
                "policy-no-budget",
                "this node set no epsilon-budget of its own (set --epsilon-budget, or site-dp = false for non-DP runs)",
            )

    def check_run(self, cfg: StamenConfig, num_records: int) -> None:
        """The run's privacy settings against the policy, before any ledger is read."""
        delta = float(cfg["delta"])
        if delta > self.delta:
            raise PrivacyRefusal("policy-delta", f"the run's delta {delta:g} is larger than this site's {self.delta:g}")
        if num_records and delta >= 1 / num_records:
            raise PrivacyRefusal("policy-delta-vs-n", "the run's delta is not below 1/n for this site's records")
        if str(cfg["accountant"]) != self.accountant:
            raise PrivacyRefusal("policy-accountant", f"this site accounts with {self.accountant!r}")
        if str(cfg["privacy-policy"]) != self.privacy_policy:
            raise PrivacyRefusal("policy-switch", f"this site's privacy policy is {self.privacy_policy!r}")
        sigma = float(cfg["noise-multiplier"])
        if sigma and sigma < self.min_noise:
            raise PrivacyRefusal("policy-noise", f"noise multiplier {sigma:g} is below this site's {self.min_noise:g}")

    def check_plan(self, noise_multiplier: float, sample_rate: float) -> None:
        """The planned round's noise and rate (a calibrated noise is known only here)."""
        if noise_multiplier < self.min_noise:
            raise PrivacyRefusal(
                "policy-noise", f"noise multiplier {noise_multiplier:.4g} is below this site's {self.min_noise:g}"
            )
        if sample_rate > self.max_sample_rate:
            raise PrivacyRefusal(
                "policy-sample-rate", f"sample rate {sample_rate:.4g} is above this site's {self.max_sample_rate:g}"
            )


def check_ledgers(cfg: StamenConfig, docs: Iterable[dict[str, Any] | None], spent_otherwise: bool) -> None:
    """The run's settings against the stored ledgers of its policy (raw documents, None: never written).

    ``spent_otherwise``: the site holds ledgers of the other policy. No run may read a spend
    at a larger delta than it was recorded at, with another accountant, or start fresh
    ledgers of one policy while the site has spent under the other.
    """
    if spent_otherwise:
        other = "refuse (its site ledger)" if cfg["privacy-policy"] == "per-shard" else "per-shard (shard ledgers)"
        raise PrivacyRefusal("policy-switch", f"this site has spent under privacy-policy {other}")
    delta, accountant = float(cfg["delta"]), str(cfg["accountant"])
    for doc in docs:
        if doc is None or "delta" not in doc:
            continue  # a schema-1 or damaged ledger is refused when it is read (StateError)
        if str(doc.get("accountant")) != accountant:
            raise PrivacyRefusal("policy-accountant", f"this site's ledger is kept with {doc.get('accountant')!r}")
        if delta > float(doc["delta"]):
            raise PrivacyRefusal(
                "policy-delta", f"the run's delta {delta:g} is larger than the ledger's {float(doc['delta']):g}"
            )
