"""The site's privacy ledger: every DP-SGD step the site ever took, composed by Opacus.

The ledger is an Opacus accountant's history — ``(noise_multiplier, sample_rate,
steps)`` entries of DP-SGD — plus the noise multipliers of the site's Gaussian releases
of statistics (:mod:`client.release`; each is one step at sample rate 1), persisted in
the site's state store, so epsilon composes across every round, run and restart of the
site. RDP and PRV composition do not depend on order, so the two lists are kept apart.
A fresh accountant per round would report one round's epsilon as the total; so the
ledger is loaded from the store every time and is never re-created empty for a site
that has one (an unreadable or foreign ledger is a :class:`~stamen.common.errors.StateError`,
not a reset).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

from opacus.accountants import create_accountant

from stamen.common.errors import ConfigError, StamenError, StateError
from stamen.common.reply import RefusalCode
from stamen.common.state import SiteStore

LEDGER_ENTRY = "privacy_ledger"
ACCOUNTANTS = ("rdp", "prv")
#: Version 2 records the delta the spend is reported at and the privacy policy; a version-1
#: ledger (no delta) is refused, never reinterpreted at another run's delta (:func:`migrate_ledger`).
LEDGER_SCHEMA = 2

Entry = tuple[float, float, int]


def check_accountant(name: str) -> str:
    """``name`` if the ledger can keep it (Opacus's RDP or PRV accountant), else ConfigError."""
    if name not in ACCOUNTANTS:
        raise ConfigError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {name!r}")
    return name


def _merged(history: tuple[Entry, ...], entry: Entry) -> tuple[Entry, ...]:
    """Append ``entry``, merging it into the last one as Opacus's accountants do on ``step``."""
    if history and history[-1][:2] == entry[:2]:
        sigma, rate, steps = history[-1]
        return (*history[:-1], (sigma, rate, steps + entry[2]))
    return (*history, entry)


def _epsilon(accountant: str, history: tuple[Entry, ...], delta: float, releases: tuple[float, ...] = ()) -> float:
    """Epsilon of ``history`` and ``releases`` at ``delta``, computed by a fresh Opacus accountant."""
    entries = list(history)
    for sigma in sorted(set(releases)):
        entries.append((sigma, 1.0, releases.count(sigma)))
    if not entries:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = entries
    return float(acc.get_epsilon(delta=delta))


def _parse_entry(raw: Any) -> Entry:
    if not (isinstance(raw, list) and len(raw) == 3):
        raise ValueError(f"entry {raw!r} is not [noise_multiplier, sample_rate, steps]")
    sigma, rate, steps = float(raw[0]), float(raw[1]), raw[2]
    if not (isinstance(steps, int) and steps > 0 and sigma > 0 and 0 < rate <= 1):
        raise ValueError(f"entry {raw!r} is out of range")
    return sigma, rate, steps


def _parse_delta(raw: Any) -> float:
    delta = float(raw)
    if not 0 < delta < 1:
        raise ValueError(f"delta {raw!r} is not in (0, 1)")
    return delta


def ledger_policy(name: str) -> str:
    """The privacy policy of the ledger stored as ``name``: the site's (``refuse``) or a shard's."""
    return "refuse" if name == LEDGER_ENTRY else "per-shard"


def migrate_ledger(store: SiteStore, name: str, delta: float) -> None:
    """Rewrite a schema-1 ledger as schema 2, recording the ``delta`` the site accounted at.

    The one way an old ledger is read again: the operator names the delta, stamen never
    guesses it (a larger one would read the same history as a smaller epsilon).
    """
    doc = store.read_json(name)
    if doc is None or doc.get("ledger-schema", 1) != 1:
        raise StateError(f"privacy ledger {store.dir / f'{name}.json'} is not a schema-1 ledger")
    try:
        doc = {**doc, "ledger-schema": LEDGER_SCHEMA, "delta": _parse_delta(delta), "policy": ledger_policy(name)}
    except ValueError as exc:
        raise ConfigError(f"cannot migrate {name}: {exc}") from exc
    PrivacyLedger.from_doc(store, doc, str(doc.get("accountant")), name, delta)  # validates it all
    store.write_json(name, doc)


def _parse_release(raw: Any) -> float:
    sigma = float(raw)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"release noise multiplier {raw!r} is not > 0")
    return sigma


class PrivacyRefusal(StamenError):
    """A release or round refused because it would take the site past its budget; spends nothing.

    The one refusal type of the privacy path: the ClientApp turns it into the
    ``refused_budget`` reply, with the message as the reason.
    """

    def __init__(self, code: RefusalCode, message: str) -> None:
        super().__init__(message)
        self.code: RefusalCode = code


@runtime_checkable
class Ledger(Protocol):
    """What a DP round charges: one site (or shard) ledger, or several charged together.

    Queries answer with a reason (``str``) or None and spend nothing; ``record*`` persist
    atomically before returning, so a crash after them can only over-count.
    """

    @property
    def releases(self) -> tuple[float, ...]:
        """Noise multipliers of the charged releases of statistics (the worst-off ledger's)."""
        ...

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far (the worst-off ledger's)."""
        ...

    def refusal(
        self, noise_multiplier: float, sample_rate: float, steps: int, delta: float, budget: float
    ) -> str | None:
        """Why a DP-SGD round of ``steps`` noisy steps would pass ``budget``, or None."""
        ...

    def release_refusal(self, noise_multiplier: float, delta: float, budget: float) -> str | None:
        """Why one more release of statistics would pass ``budget``, or None."""
        ...

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Charge one executed DP-SGD round."""
        ...

    def record_release(self, noise_multiplier: float) -> None:
        """Charge one Gaussian release of statistics."""
        ...


class PrivacyLedger(Ledger):
    """One site's cumulative DP-SGD history, read from and written to its :class:`SiteStore`."""

    def __init__(
        self,
        store: SiteStore,
        accountant: str,
        history: tuple[Entry, ...],
        rounds: int,
        releases: tuple[float, ...] = (),
        name: str = LEDGER_ENTRY,
        delta: float = 1e-5,
    ) -> None:
        self._store = store
        self._accountant = accountant
        self._history = history
        self._rounds = rounds
        self._releases = releases
        self._name = name
        self._delta = _parse_delta(delta)

    @classmethod
    def load(
        cls, store: SiteStore, accountant: str = "rdp", name: str = LEDGER_ENTRY, delta: float = 1e-5
    ) -> PrivacyLedger:
        """The site's ledger (or, with ``name``, another one it keeps, e.g. a data shard's); empty
        only if it never recorded a DP round. ``delta`` is recorded by a fresh ledger's first write."""
        return cls.from_doc(store, store.read_json(name), accountant, name, delta)

    @classmethod
    def from_doc(
        cls, store: SiteStore, doc: dict[str, Any] | None, accountant: str, name: str, delta: float
    ) -> PrivacyLedger:
        """The ledger stored as ``doc`` (None: never written), kept with ``accountant``."""
        check_accountant(accountant)
        if doc is None:
            return cls(store, accountant, (), 0, (), name, delta)
        where = store.dir / f"{name}.json"
        try:
            stored = str(doc["accountant"])
            history = tuple(_parse_entry(e) for e in doc["history"])
            rounds = int(doc["rounds"])
            releases = tuple(_parse_release(r) for r in doc.get("releases", []))
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"privacy ledger {where} is malformed: {exc}") from exc
        schema = doc.get("ledger-schema", 1)
        if schema != LEDGER_SCHEMA:
            raise StateError(
                f"privacy ledger {where} has schema {schema!r}, this stamen keeps schema {LEDGER_SCHEMA}: "
                "a schema-1 ledger does not record the delta its spend is reported at, so it is not read "
                "at whatever delta a run asks for; migrate it explicitly, naming the delta the site "
                "accounted at, with stamen.client.ledger.migrate_ledger"
            )
        try:
            recorded = _parse_delta(doc["delta"])
            policy = str(doc["policy"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"privacy ledger {where} is malformed: {exc}") from exc
        if policy != ledger_policy(name):
            raise StateError(f"privacy ledger {where} records policy {policy!r}, its name says {ledger_policy(name)!r}")
        if stored != accountant:
            raise StateError(
                f"privacy ledger {where} was kept with the {stored!r} accountant, this run asks for "
                f"{accountant!r}; the spent budget cannot be carried over, so set accountant={stored!r}"
            )
        return cls(store, accountant, history, rounds, releases, name, min(recorded, delta))

    @property
    def delta(self) -> float:
        """The smallest delta this ledger was ever charged at (its spend is never read at a larger one)."""
        return self._delta

    @property
    def policy(self) -> str:
        """The privacy policy this ledger belongs to: ``refuse`` (the site's) or ``per-shard``."""
        return ledger_policy(self._name)

    @property
    def accountant(self) -> str:
        return self._accountant

    @property
    def history(self) -> tuple[Entry, ...]:
        return self._history

    @property
    def rounds(self) -> int:
        return self._rounds

    @property
    def releases(self) -> tuple[float, ...]:
        """Noise multipliers of the site's Gaussian releases of statistics, one per release."""
        return self._releases

    @property
    def steps(self) -> int:
        """DP-SGD noisy steps (releases not counted)."""
        return sum(e[2] for e in self._history)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far by this site, over its whole history."""
        return _epsilon(self._accountant, self._history, delta, self._releases)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """Epsilon the site would have spent after a further round of ``steps`` noisy steps."""
        history = _merged(self._history, (noise_multiplier, sample_rate, steps))
        return _epsilon(self._accountant, history, delta, self._releases)

    def refusal(
        self, noise_multiplier: float, sample_rate: float, steps: int, delta: float, budget: float
    ) -> str | None:
        """Why the planned round must be refused (it would end above ``budget``), or None if it fits."""
        after = self.epsilon_after(noise_multiplier, sample_rate, steps, delta)
        if after <= budget:
            return None
        return (
            f"privacy budget: this round would bring epsilon from {self.epsilon(delta):.4g} to {after:.4g} "
            f"(delta {delta:g}), above the budget {budget:g}"
        )

    def release_refusal(self, noise_multiplier: float, delta: float, budget: float) -> str | None:
        """Why one more release of statistics must not be made (it would end above ``budget``), or None."""
        after = _epsilon(self._accountant, self._history, delta, (*self._releases, noise_multiplier))
        if after <= budget:
            return None
        return (
            f"privacy budget: releasing this site's statistics would bring epsilon from {self.epsilon(delta):.4g} "
            f"to {after:.4g} (delta {delta:g}), above the budget {budget:g}"
        )

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add one round's executed steps and persist atomically, before the update may leave the site."""
        try:
            entry = _parse_entry([noise_multiplier, sample_rate, steps])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"cannot record a DP round: {exc}") from exc
        self._write(_merged(self._history, entry), self._rounds + 1, self._releases)

    def record_release(self, noise_multiplier: float) -> None:
        """Charge one Gaussian release of statistics (sensitivity-scaled noise) and persist atomically."""
        try:
            sigma = _parse_release(noise_multiplier)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"cannot record a release: {exc}") from exc
        self._write(self._history, self._rounds, (*self._releases, sigma))

    def _write(self, history: tuple[Entry, ...], rounds: int, releases: tuple[float, ...]) -> None:
        self._store.write_json(
            self._name,
            {
                "ledger-schema": LEDGER_SCHEMA,
                "accountant": self._accountant,
                "delta": self._delta,
                "policy": self.policy,
                "history": [list(e) for e in history],
                "rounds": rounds,
                "releases": list(releases),
            },
        )
        self._history, self._rounds, self._releases = history, rounds, releases


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    horizon_rounds: int,
    accountant: str = "rdp",
    releases: tuple[float, ...] = (),
) -> float:
    """The DP-SGD noise multiplier that spends ``target_epsilon`` over ``horizon_rounds`` rounds of this site.

    The site's ``releases`` (statistics it has released, charged to the same ledger) are
    part of the spend. Opacus's ``get_noise_multiplier`` calibrates one homogeneous
    mechanism only, so this bisects over Opacus's own accountant on the full history.
    """
    check_accountant(accountant)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0 and 0 < delta < 1):
        raise ConfigError(f"target-epsilon must be > 0 and delta in (0, 1), got {target_epsilon!r}, {delta!r}")
    steps = steps_per_round * horizon_rounds
    return _bisect_sigma(target_epsilon, delta, sample_rate, steps, accountant, tuple(sorted(releases)))


@lru_cache(maxsize=256)
def _bisect_sigma(
    target: float, delta: float, sample_rate: float, steps: int, accountant: str, releases: tuple[float, ...]
) -> float:
    """Smallest noise (within 0.5% of the target epsilon, from below, as Opacus's own
    calibration) whose spend is at most ``target``. Each step asks the accountant (~0.1 s),
    and every site asks every round, so results are cached per process."""

    def spent(sigma: float) -> float:
        return _epsilon(accountant, ((sigma, sample_rate, steps),), delta, releases)

    low, high = 0.01, 10.0
    while spent(high) > target:
        low, high = high, high * 2
        if high > 1e4:
            raise ConfigError(
                f"cannot reach epsilon {target} at delta {delta} over {steps} steps"
                + (f" with {len(releases)} statistics releases already charged" if releases else "")
            )
    while high - low > 1e-4 * high:
        mid = (low + high) / 2
        eps = spent(mid)
        if eps > target:
            low = mid
            continue
        high = mid
        if eps >= target * 0.995:
            break
    return high
