"""The site's privacy ledger: every DP-SGD step the site ever took, composed by Opacus.

The ledger is an Opacus accountant's history — ``(noise_multiplier, sample_rate,
steps)`` entries — persisted in the site's state store, so epsilon composes across
every round, run and restart of the site. A fresh accountant per round would report one
round's epsilon as the total; so the ledger is loaded from the store every time and is
never re-created empty for a site that has one (an unreadable or foreign ledger is a
:class:`~common.errors.StateError`, not a reset).
"""

from __future__ import annotations

import math
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common.errors import ConfigError, StateError
from common.state import SiteStore

LEDGER_ENTRY = "privacy_ledger"
ACCOUNTANTS = ("rdp", "prv")

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


def _epsilon(accountant: str, history: tuple[Entry, ...], delta: float) -> float:
    """Epsilon of ``history`` at ``delta``, computed by a fresh Opacus accountant."""
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def _parse_entry(raw: Any) -> Entry:
    if not (isinstance(raw, list) and len(raw) == 3):
        raise ValueError(f"entry {raw!r} is not [noise_multiplier, sample_rate, steps]")
    sigma, rate, steps = float(raw[0]), float(raw[1]), raw[2]
    if not (isinstance(steps, int) and steps > 0 and sigma > 0 and 0 < rate <= 1):
        raise ValueError(f"entry {raw!r} is out of range")
    return sigma, rate, steps


class PrivacyLedger:
    """One site's cumulative DP-SGD history, read from and written to its :class:`SiteStore`."""

    def __init__(
        self, store: SiteStore, accountant: str, history: tuple[Entry, ...], rounds: int, name: str = LEDGER_ENTRY
    ) -> None:
        self._store = store
        self._accountant = accountant
        self._history = history
        self._rounds = rounds
        self._name = name

    @classmethod
    def load(cls, store: SiteStore, accountant: str = "rdp", name: str = LEDGER_ENTRY) -> PrivacyLedger:
        """The site's ledger (or, with ``name``, another one it keeps, e.g. a data shard's); empty
        only if it never recorded a DP round."""
        check_accountant(accountant)
        doc = store.read_json(name)
        if doc is None:
            return cls(store, accountant, (), 0, name)
        where = store.dir / f"{name}.json"
        try:
            stored = str(doc["accountant"])
            history = tuple(_parse_entry(e) for e in doc["history"])
            rounds = int(doc["rounds"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"privacy ledger {where} is malformed: {exc}") from exc
        if stored != accountant:
            raise StateError(
                f"privacy ledger {where} was kept with the {stored!r} accountant, this run asks for "
                f"{accountant!r}; the spent budget cannot be carried over, so set accountant={stored!r}"
            )
        return cls(store, accountant, history, rounds, name)

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
    def steps(self) -> int:
        return sum(e[2] for e in self._history)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far by this site, over its whole history."""
        return _epsilon(self._accountant, self._history, delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """Epsilon the site would have spent after a further round of ``steps`` noisy steps."""
        return _epsilon(self._accountant, _merged(self._history, (noise_multiplier, sample_rate, steps)), delta)

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

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add one round's executed steps and persist atomically, before the update may leave the site."""
        try:
            entry = _parse_entry([noise_multiplier, sample_rate, steps])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"cannot record a DP round: {exc}") from exc
        history = _merged(self._history, entry)
        rounds = self._rounds + 1
        self._store.write_json(
            self._name,
            {"accountant": self._accountant, "history": [list(e) for e in history], "rounds": rounds},
        )
        self._history, self._rounds = history, rounds


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    horizon_rounds: int,
    accountant: str = "rdp",
) -> float:
    """The noise multiplier that spends ``target_epsilon`` over ``horizon_rounds`` rounds of this site."""
    check_accountant(accountant)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0 and 0 < delta < 1):
        raise ConfigError(f"target-epsilon must be > 0 and delta in (0, 1), got {target_epsilon!r}, {delta!r}")
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps_per_round * horizon_rounds,
                accountant=accountant,
                epsilon_tolerance=0.005 * target_epsilon,
            )
        )
    except ValueError as exc:
        raise ConfigError(
            f"cannot reach epsilon {target_epsilon} at delta {delta} over {horizon_rounds} rounds: {exc}"
        ) from exc
