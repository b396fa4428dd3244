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

Tamper evidence: every write seals the ledger — a monotonic ``seq``, the previous write's
MAC (``prev``) and an HMAC-SHA256 (``mac``) over the whole document, keyed by a key
derived from the site's noise secret (:mod:`client.noise`; it never leaves the site) —
and copies the sealed document into the site's ``ledger-head`` entry. A ledger that fails
its MAC was edited; one whose ``seq`` is below its head's is a restored older copy; one
the head names but that is gone was deleted; and the participation record counts the DP
rounds the ledgers must show. :func:`check_integrity` refuses each (:class:`LedgerTampered`)
until an operator acknowledges it (:func:`acknowledge`, ``stamen node ack-ledger``). A
schema-2 ledger written before sealing existed (no ``mac``, no head) is sealed as it stands
on its first check.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import json
import math
import os
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

from opacus.accountants import create_accountant

from stamen.client.noise import site_secret
from stamen.common.errors import ConfigError, StamenError, StateError
from stamen.common.reply import RefusalCode
from stamen.common.state import SiteLock, SiteStore

LEDGER_ENTRY = "privacy_ledger"
ACCOUNTANTS = ("rdp", "prv")
#: Version 2 records the delta the spend is reported at and the privacy policy; a version-1
#: ledger (no delta) is refused, never reinterpreted at another run's delta (:func:`migrate_ledger`).
LEDGER_SCHEMA = 2
#: The latest sealed copy of every ledger the site keeps, by ledger name.
HEAD_ENTRY = "ledger-head"
#: Append-only record of every operator acknowledgement of a tampered ledger.
EVENTS_ENTRY = "ledger-events"
#: Records that prove the site spent privacy before (besides the ledgers and their head).
PARTICIPATION_ENTRY = "participation"
RELEASES_ENTRY = "releases"

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
    doc = {k: v for k, v in doc.items() if k not in ("seq", "prev", "mac")}
    PrivacyLedger.from_doc(store, doc, str(doc.get("accountant")), name, delta)  # validates it all
    _seal(store, name, doc)


def _parse_release(raw: Any) -> float:
    sigma = float(raw)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"release noise multiplier {raw!r} is not > 0")
    return sigma


class LedgerTampered(StateError):
    """A ledger that is missing, emptied, truncated, edited or older than the site's other records.

    The site refuses to train (refusal code ``ledger-tampered``) until an operator runs
    ``stamen node ack-ledger``: training on it could spend budget the site already spent.
    """


def _mac_key(store: SiteStore) -> bytes:
    """The ledger MAC key: derived from the site's secret, so only the site can seal a ledger."""
    return hmac.new(site_secret(store), b"stamen-ledger-mac/1", hashlib.sha256).digest()


def _mac(key: bytes, name: str, body: dict[str, Any]) -> str:
    """HMAC of ledger ``name``'s document (all of it but ``mac``), over canonical JSON."""
    payload = json.dumps({"name": name, **{k: v for k, v in body.items() if k != "mac"}}, sort_keys=True)
    return hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()


def _seal(store: SiteStore, name: str, body: dict[str, Any], key: bytes | None = None) -> dict[str, Any]:
    """Write ``body`` as ledger ``name``, sealed one ``seq`` after its head, then the head; the sealed doc.

    The ledger is written first: a crash between the two leaves it one write ahead of its
    head, which :func:`verify_ledger` accepts (an older copy is what it refuses).
    """
    heads = store.read_json(HEAD_ENTRY, default={})
    last = heads.get(name) or {}
    sealed = {**body, "seq": int(last.get("seq", 0)) + 1, "prev": str(last.get("mac", ""))}
    sealed["mac"] = _mac(key or _mac_key(store), name, sealed)
    store.write_json(name, sealed)
    store.write_json(HEAD_ENTRY, {**heads, name: sealed})
    return sealed


def verify_ledger(store: SiteStore, name: str, doc: dict[str, Any] | None) -> None:
    """LedgerTampered if ledger ``name`` as stored (``doc``; None: absent or ``data: null``) is not
    the one the site last sealed: missing, emptied, edited (MAC), or an older copy (``seq``)."""
    where = store.dir / f"{name}.json"
    head = store.read_json(HEAD_ENTRY, default={}).get(name)
    if doc is not None and doc.get("ledger-schema", 1) != LEDGER_SCHEMA:
        return  # refused by its schema (PrivacyLedger.from_doc) until migrate_ledger seals it
    if doc is None:
        if head is not None:
            raise LedgerTampered(
                f"privacy ledger {where} is missing or empty, but its head records write {head['seq']}"
            )
        return
    if not doc.get("acknowledged") and int(doc.get("rounds", 0)) > 0 and not doc.get("history"):
        raise LedgerTampered(f"privacy ledger {where} is truncated: {doc.get('rounds')} rounds but no history")
    if "mac" not in doc:
        if head is not None:
            raise LedgerTampered(f"privacy ledger {where} has lost its seal (no mac), but its head records one")
        return  # a ledger from before sealing: check_integrity seals it
    if not hmac.compare_digest(str(doc["mac"]), _mac(_mac_key(store), name, doc)):
        raise LedgerTampered(f"privacy ledger {where} fails its MAC: it was changed outside stamen")
    if head is not None and int(doc["seq"]) < int(head["seq"]):
        raise LedgerTampered(
            f"privacy ledger {where} is an older copy (write {doc['seq']}; the site's head records write {head['seq']})"
        )
    if head is not None and int(doc["seq"]) == int(head["seq"]) and doc["mac"] != head["mac"]:
        raise LedgerTampered(f"privacy ledger {where} is not the copy its head sealed (write {doc['seq']})")


def ledger_names(store: SiteStore) -> list[str]:
    """Every ledger the site keeps or its head says it kept: the site's and each shard's."""
    on_disk = {p.name.removesuffix(".json") for p in store.dir.glob(f"{LEDGER_ENTRY}*.json")}
    return sorted(on_disk | set(store.read_json(HEAD_ENTRY, default={})))


def _dp_rounds(store: SiteStore) -> int:
    """DP rounds the site's participation record counts (the ledgers must show at least these)."""
    return int(store.read_json(PARTICIPATION_ENTRY, default={}).get("dp_rounds", 0))


def check_integrity(store: SiteStore, read: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """LedgerTampered unless every ledger of the site is the one it last sealed and no other record
    shows more spending than they do; seals a ledger written before sealing existed.

    Called before a DP round is admitted: a site that never spent (no ledger, head,
    counted DP round nor charged release) passes, so a fresh site starts. ``read`` reads a
    ledger's document (default: from the store); returns every ledger's document as it now stands.
    """
    read = read or store.read_json
    docs = {name: read(name) for name in ledger_names(store)}
    for name, doc in docs.items():
        verify_ledger(store, name, doc)
    rounds = sum(int(doc["rounds"]) for doc in docs.values() if doc)
    if (counted := _dp_rounds(store)) > rounds:
        raise LedgerTampered(
            f"site {store.site_id}'s ledgers record {rounds} DP rounds, its participation record {counted}: "
            "a ledger was truncated or replaced"
        )
    if not any(docs.values()) and store.read_json(RELEASES_ENTRY, default={}):
        raise LedgerTampered(
            f"site {store.site_id} has no privacy ledger in {store.dir}, but charged releases of statistics: "
            "its ledger was deleted"
        )
    for name, doc in docs.items():
        if doc is not None and "mac" not in doc and doc.get("ledger-schema") == LEDGER_SCHEMA:
            docs[name] = _seal(store, name, doc)
    return docs


def _proven(name: str, doc: Any) -> tuple[float, dict[str, Any]] | None:
    """(epsilon, document) of a ledger document that still parses, whatever its seal; None if none."""
    if not isinstance(doc, dict):
        return None
    try:
        history = tuple(_parse_entry(e) for e in doc["history"])
        releases = tuple(_parse_release(r) for r in doc.get("releases", []))
        eps = _epsilon(check_accountant(str(doc["accountant"])), history, _parse_delta(doc["delta"]), releases)
        body = {k: doc[k] for k in ("ledger-schema", "accountant", "delta", "policy", "history", "rounds")}
        return eps, {**body, "rounds": int(body["rounds"]), "releases": list(releases)}
    except (KeyError, TypeError, ValueError, StamenError):
        return None


def acknowledge(store: SiteStore, reason: str) -> dict[str, Any]:
    """An operator's acknowledgement of a tampered ledger: record it, then re-seal every ledger.

    Each ledger is re-sealed from the highest spend any surviving copy proves — the ledger
    file as it stands (even one that fails its MAC: what it shows was spent) or the head's
    copy, whichever has the larger epsilon at its delta. Rounds the participation record
    counts beyond every copy are added to the site ledger as rounds whose noise is lost
    (they cannot be composed, so the server's last reported spend is the check on them).
    Returns the event, also appended durably to ``ledger-events`` before any ledger changes.
    Holds the site's lock: refused while a node runs on the dir.
    """
    if not reason.strip():
        raise ConfigError("ack-ledger needs a --reason saying what happened to the ledger")
    with SiteLock.held(store.dir):
        heads = store.read_json(HEAD_ENTRY, default={})
        bodies: dict[str, dict[str, Any]] = {}
        event: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "user": getpass.getuser(),
            "pid": os.getpid(),
            "reason": reason.strip(),
            "ledgers": {},
        }
        for name in ledger_names(store):
            try:
                on_disk = store.read_json(name)
            except StateError:
                on_disk = None
            try:
                verify_ledger(store, name, on_disk)
                problem = ""
            except LedgerTampered as exc:
                problem = str(exc)
            found = [(p[0], source, p[1]) for source, d in (("ledger", on_disk), ("head", heads.get(name)))
                     if (p := _proven(name, d)) is not None]  # fmt: skip
            if not found:
                event["ledgers"][name] = {"problem": problem, "source": "none"}
                continue
            eps, source, body = max(found, key=lambda f: (f[0], f[2]["rounds"]))
            bodies[name] = body
            event["ledgers"][name] = {"problem": problem, "source": source, "epsilon": eps, "rounds": body["rounds"]}
        lost = _dp_rounds(store) - sum(b["rounds"] for b in bodies.values())
        if lost > 0:
            site = bodies.setdefault(LEDGER_ENTRY, _fresh_body(heads, LEDGER_ENTRY))
            site["rounds"] += lost
            event["lost_rounds"] = lost
        events = store.read_json(EVENTS_ENTRY, default=[])
        store.write_json(EVENTS_ENTRY, [*events, event])
        key = _mac_key(store)
        for name, body in bodies.items():
            _seal(store, name, {**body, "acknowledged": len(events) + 1}, key)
    return event


def _fresh_body(heads: dict[str, Any], name: str) -> dict[str, Any]:
    """An empty ledger body for ``name`` (accountant and delta from its head, if any, else the defaults)."""
    head = heads.get(name) or {}
    return {
        "ledger-schema": LEDGER_SCHEMA,
        "accountant": str(head.get("accountant", "rdp")),
        "delta": float(head.get("delta", 1e-5)),
        "policy": ledger_policy(name),
        "history": [],
        "rounds": 0,
        "releases": [],
    }


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
        self._acknowledged = 0  # operator acknowledgements this ledger was re-sealed by (ledger-events)

    @classmethod
    def load(
        cls, store: SiteStore, accountant: str = "rdp", name: str = LEDGER_ENTRY, delta: float = 1e-5
    ) -> PrivacyLedger:
        """The site's ledger (or, with ``name``, another one it keeps, e.g. a data shard's); empty
        only if it never recorded a DP round. ``delta`` is recorded by a fresh ledger's first write.
        LedgerTampered if it is not the copy the site last sealed (:func:`verify_ledger`)."""
        doc = store.read_json(name)
        verify_ledger(store, name, doc)
        return cls.from_doc(store, doc, accountant, name, delta)

    @classmethod
    def from_doc(
        cls, store: SiteStore, doc: dict[str, Any] | None, accountant: str, name: str, delta: float
    ) -> PrivacyLedger:
        """The ledger stored as ``doc`` (None: never written), kept with ``accountant``; ``doc`` is
        trusted as the site's (:meth:`load` and :func:`check_integrity` verify its seal)."""
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
        ledger = cls(store, accountant, history, rounds, releases, name, min(recorded, delta))
        ledger._acknowledged = int(doc.get("acknowledged", 0))
        return ledger

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
        body: dict[str, Any] = {
            "ledger-schema": LEDGER_SCHEMA,
            "accountant": self._accountant,
            "delta": self._delta,
            "policy": self.policy,
            "history": [list(e) for e in history],
            "rounds": rounds,
            "releases": list(releases),
        }
        if self._acknowledged:
            body["acknowledged"] = self._acknowledged
        _seal(self._store, self._name, body)
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
