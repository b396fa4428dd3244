"""Simulation scenarios: how each simulated site's data changes over the rounds.

A scenario is a small declarative YAML file (bundled ones live in
``simulations/scenarios/``; run config ``scenario`` names one or gives a path). The
server reads its tasks (per-task evaluation and forgetting), every site reads all of
it to build its data for a round (:mod:`client.stream`), and ``stamen simulate`` checks
it before any engine starts. Every field is checked here, once, and a bad file fails
with its path and the field's name::

    name: split-mnist
    description: five tasks of two digits each, in sequence
    run-config: {dataset: mnist5k, partition: iid, num-server-rounds: 20}
    tasks: {rounds-per-task: 4, classes: [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]}
    events:
      - {kind: rotate, sites: [0, 1], from-round: 5, degrees-per-round: 15, max-degrees: 90}

Sites are simulation partition ids (``site-0003`` is 3) or ``all``. Rounds count from 1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from stamen.common.config import KEY_BY_NAME, StamenConfig
from stamen.common.errors import ConfigError

#: The scenarios shipped with stamen (package data of ``stamen.simulations``).
BUNDLED_DIR = Path(str(files("stamen.simulations").joinpath("scenarios")))

#: Fields each event kind takes besides ``kind``, ``sites`` and ``from-round``.
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "rotate": ("degrees-per-round", "max-degrees"),  # covariate shift: images rotate more each round
    "noise": ("std-per-round", "max-std"),  # covariate shift: Gaussian feature noise grows each round
    "label-swap": ("pairs",),  # concept drift: the same inputs now carry swapped labels
    "label-shift": ("keep-classes",),  # prior shift: the site now only sees some classes
    "quiet": ("until-round",),  # the site has no new data to train on (from-round..until-round)
    "join": (),  # the site has no data at all before from-round
}
_TOP_FIELDS = ("name", "description", "run-config", "tasks", "events")


@dataclass(frozen=True)
class Event:
    """One change to some sites' data from a round on (see :data:`EVENT_FIELDS`)."""

    kind: str
    sites: tuple[int, ...] | None  # None = every site
    from_round: int
    params: Mapping[str, Any] = field(default_factory=dict)

    def applies(self, site: int, server_round: int) -> bool:
        """Whether this event changes ``site``'s data in ``server_round``."""
        if self.sites is not None and site not in self.sites:
            return False
        until = self.params.get("until-round")
        return server_round >= self.from_round and (until is None or server_round <= until)

    def strength(self, server_round: int) -> float:
        """Rotation in degrees or noise std in ``server_round``: grows linearly, capped."""
        per_round, cap = ("degrees-per-round", "max-degrees") if self.kind == "rotate" else ("std-per-round", "max-std")
        return min(float(self.params[cap]), float(self.params[per_round]) * (server_round - self.from_round + 1))


@dataclass(frozen=True)
class Scenario:
    """A validated scenario file."""

    name: str
    source: str
    description: str = ""
    run_config: Mapping[str, Any] = field(default_factory=dict)
    tasks: tuple[tuple[int, ...], ...] = ()
    rounds_per_task: int = 0
    events: tuple[Event, ...] = ()

    def task_index(self, server_round: int) -> int:
        """0-based task active in ``server_round`` (the last task stays active once all have run)."""
        return min((max(server_round, 1) - 1) // self.rounds_per_task, len(self.tasks) - 1)

    def task_end(self, index: int) -> int:
        """The last round of task ``index``."""
        return (index + 1) * self.rounds_per_task

    def classes(self) -> set[int]:
        """Every class the scenario names (tasks, swaps, label shifts)."""
        named = {c for task in self.tasks for c in task}
        for ev in self.events:
            named |= {c for pair in ev.params.get("pairs", ()) for c in pair}
            named |= set(ev.params.get("keep-classes", ()))
        return named

    def check_against(self, num_classes: int, input_shape: tuple[int, ...], sites: int | None = None) -> None:
        """Fail if the scenario names classes the data lacks, rotates non-images, or names absent sites."""
        bad = sorted(c for c in self.classes() if c >= num_classes)
        if bad:
            raise ConfigError(f"scenario {self.source}: classes {bad} do not exist (the data has {num_classes})")
        for i, ev in enumerate(self.events):
            if ev.kind == "rotate" and len(input_shape) != 3:
                raise ConfigError(
                    f"scenario {self.source}: events[{i}] rotates images, but inputs have shape {input_shape}"
                )
            if sites is not None and ev.sites is not None and max(ev.sites) >= sites:
                raise ConfigError(
                    f"scenario {self.source}: events[{i}].sites names site {max(ev.sites)}, "
                    f"but the simulation has {sites} sites (0..{sites - 1})"
                )


def resolve_path(spec: str) -> Path:
    """The file a ``scenario`` value names: a bundled scenario's name, or a path."""
    spec = spec.strip()
    bundled = BUNDLED_DIR / f"{spec}.yaml"
    if "/" not in spec and not spec.endswith((".yaml", ".yml")) and bundled.exists():
        return bundled
    path = Path(spec).expanduser()
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml")))
        raise ConfigError(f"scenario {spec!r} is neither a bundled scenario ({names}) nor a readable file")
    return path.resolve()


def load_scenario(spec: str) -> Scenario:
    """Read and check the scenario ``spec`` names; cached per file version."""
    path = resolve_path(spec)
    st = path.stat()
    return _load(str(path), st.st_mtime_ns, st.st_size)


def scenario_of(cfg: StamenConfig) -> Scenario | None:
    """The run's scenario, or None when run config names none."""
    return load_scenario(str(cfg["scenario"])) if cfg["scenario"] else None


@functools.lru_cache(maxsize=16)
def _load(path: str, mtime_ns: int, size: int) -> Scenario:
    """Parse one file version (``mtime_ns`` and ``size`` only key the cache)."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"scenario {path}: not readable YAML ({exc})") from exc
    return parse_scenario(doc, path)


def parse_scenario(doc: Any, source: str) -> Scenario:
    """Check a parsed scenario document field by field."""
    where = f"scenario {source}"
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: must be a mapping of {', '.join(_TOP_FIELDS)}")
    _no_extra(where, doc, _TOP_FIELDS)
    name = doc.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: name must be a non-empty string, got {name!r}")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{where}: description must be a string")
    run_config = _run_config(where, doc.get("run-config", {}))
    tasks, per_task = _tasks(where, doc.get("tasks"))
    raw_events = doc.get("events", [])
    if not isinstance(raw_events, list):
        raise ConfigError(f"{where}: events must be a list")
    events = tuple(_event(f"{where}: events[{i}]", raw) for i, raw in enumerate(raw_events))
    if not tasks and not events:
        raise ConfigError(f"{where}: defines neither tasks nor events, so it changes nothing")
    return Scenario(name, source, description, run_config, tasks, per_task, events)


def _no_extra(where: str, doc: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    extra = sorted(str(k) for k in doc if k not in allowed)
    if extra:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(extra)} (known: {', '.join(allowed)})")


def _run_config(where: str, raw: Any) -> dict[str, Any]:
    """Run-config defaults the scenario needs; every key and value checked like ``--set``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: run-config must be a mapping of run-config keys")
    unknown = sorted(str(k) for k in raw if k not in KEY_BY_NAME)
    if unknown or "scenario" in raw:
        raise ConfigError(f"{where}: run-config has unknown or forbidden key(s) {', '.join(unknown) or 'scenario'}")
    try:
        StamenConfig.from_mapping(raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: run-config: {exc}") from None
    return dict(raw)


def _int(where: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where} must be an integer >= {low}, got {value!r}")
    return value


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where} must be a number > 0, got {value!r}")
    return float(value)


def _classes(where: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of class labels, got {value!r}")
    out = tuple(_int(f"{where}[{i}]", c, 0) for i, c in enumerate(value))
    if len(set(out)) != len(out):
        raise ConfigError(f"{where} lists a class twice: {list(out)}")
    return out


def _tasks(where: str, raw: Any) -> tuple[tuple[tuple[int, ...], ...], int]:
    if raw is None:
        return (), 0
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: tasks must be a mapping with rounds-per-task and classes")
    _no_extra(f"{where}: tasks", raw, ("rounds-per-task", "classes"))
    per_task = _int(f"{where}: tasks.rounds-per-task", raw.get("rounds-per-task"), 1)
    classes = raw.get("classes")
    if not isinstance(classes, list) or not classes:
        raise ConfigError(f"{where}: tasks.classes must be a non-empty list of class lists, got {classes!r}")
    tasks = tuple(_classes(f"{where}: tasks.classes[{i}]", t) for i, t in enumerate(classes))
    flat = [c for t in tasks for c in t]
    if len(set(flat)) != len(flat):
        raise ConfigError(f"{where}: tasks.classes puts a class in more than one task")
    return tasks, per_task


def _event(where: str, raw: Any) -> Event:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping with kind, sites and from-round")
    kind = raw.get("kind")
    if kind not in EVENT_FIELDS:
        raise ConfigError(f"{where}.kind must be one of {', '.join(EVENT_FIELDS)}, got {kind!r}")
    _no_extra(where, raw, ("kind", "sites", "from-round", *EVENT_FIELDS[kind]))
    sites_raw = raw.get("sites", "all")
    if sites_raw == "all":
        sites = None
    elif isinstance(sites_raw, list) and sites_raw:
        sites = tuple(sorted({_int(f"{where}.sites[{i}]", s, 0) for i, s in enumerate(sites_raw)}))
    else:
        raise ConfigError(f"{where}.sites must be 'all' or a non-empty list of site numbers, got {sites_raw!r}")
    from_round = _int(f"{where}.from-round", raw.get("from-round"), 1)
    params: dict[str, Any] = {}
    if kind in ("rotate", "noise"):
        for name in EVENT_FIELDS[kind]:
            params[name] = _number(f"{where}.{name}", raw.get(name))
    elif kind == "label-swap":
        pairs = raw.get("pairs")
        if not isinstance(pairs, list) or not pairs:
            raise ConfigError(f"{where}.pairs must be a non-empty list of [a, b] class pairs, got {pairs!r}")
        checked = [_classes(f"{where}.pairs[{i}]", p) for i, p in enumerate(pairs)]
        if any(len(p) != 2 for p in checked) or len({c for p in checked for c in p}) != 2 * len(checked):
            raise ConfigError(f"{where}.pairs must be disjoint pairs of two distinct classes, got {pairs!r}")
        params["pairs"] = tuple(checked)
    elif kind == "label-shift":
        params["keep-classes"] = _classes(f"{where}.keep-classes", raw.get("keep-classes"))
    elif kind == "quiet" and raw.get("until-round") is not None:
        params["until-round"] = _int(f"{where}.until-round", raw["until-round"], from_round)
    return Event(kind, sites, from_round, params)
