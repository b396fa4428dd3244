"""The run-state registry: every stateful part of a run, saved and restored as one.

A run registers each part that holds state across rounds (:class:`common.stateful.Stateful`)
under a unique name; the checkpoint iterates the registry instead of listing attributes by
hand, and a resume refuses a checkpoint that lacks a registered part or holds one this run
does not know, rather than silently starting that part from zero.

In the checkpoint files (:mod:`server.checkpoint`) a part's array groups (top-level values
that are ``dict[str, np.ndarray]``) go to safetensors as the group ``<part>:<key>``; the
rest of its state goes to JSON under ``parts.<part>``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from stamen.common.errors import StateError
from stamen.common.stateful import Stateful

log = logging.getLogger("stamen.server")

Arrays = dict[str, np.ndarray]
_GROUP = ":"


def is_array_group(value: Any) -> bool:
    """A non-empty ``dict[str, np.ndarray]``: stored in safetensors, not JSON."""
    return isinstance(value, dict) and bool(value) and all(isinstance(v, np.ndarray) for v in value.values())


class Attributes:
    """Named plain attributes of an owner as one part (counters, lists, numbers).

    ``loaders`` maps each attribute to the function that rebuilds its value from JSON
    (``Counter``, ``int``, ``list`` ...). The value is deep-copied both ways, so the
    checkpoint never aliases live state.
    """

    def __init__(self, owner: object, **loaders: Callable[[Any], Any]) -> None:
        self.owner = owner
        self.loaders = loaders

    def state_dict(self) -> dict[str, Any]:
        return {name: copy.deepcopy(getattr(self.owner, name)) for name in self.loaders}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.loaders) - set(state))
        if missing:
            raise StateError(f"saved state of {type(self.owner).__name__} lacks {', '.join(missing)}")
        for name, load in self.loaders.items():
            setattr(self.owner, name, load(copy.deepcopy(state[name])))


class RunState:
    """Named stateful parts of one run, in registration order."""

    def __init__(self) -> None:
        self._parts: dict[str, Stateful] = {}
        self._added_later: set[str] = set()

    def register(self, name: str, part: Stateful, *, added_later: bool = False) -> None:
        """Add ``part`` under ``name`` (unique, and no ``:`` or ``|``: they separate array keys).

        ``added_later``: a part that checkpoints of an older stamen lack; such a checkpoint
        still resumes, the part starting as it is (empty), with a warning.
        """
        if not isinstance(part, Stateful):
            raise TypeError(f"run-state part {name!r} ({type(part).__name__}) has no state_dict/load_state_dict")
        if not name or _GROUP in name or "|" in name:
            raise ValueError(f"run-state part name {name!r} must be non-empty without ':' or '|'")
        if name in self._parts:
            raise ValueError(f"run-state part {name!r} is registered twice")
        self._parts[name] = part
        if added_later:
            self._added_later.add(name)

    def __iter__(self) -> Iterator[tuple[str, Stateful]]:
        return iter(self._parts.items())

    def __contains__(self, part: object) -> bool:
        """Whether ``part`` itself (by identity) is registered."""
        return any(p is part for p in self._parts.values())

    @property
    def names(self) -> list[str]:
        return list(self._parts)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Every part's state, by name."""
        return {name: part.state_dict() for name, part in self}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        """Restore every part; StateError, before any part changes, if the parts do not match."""
        missing = [n for n in self._parts if n not in state and n not in self._added_later]
        unknown = sorted(set(state) - set(self._parts))
        if missing or unknown:
            problems = [f"lacks {', '.join(missing)}"] if missing else []
            problems += [f"has unknown part(s) {', '.join(unknown)}"] if unknown else []
            raise StateError(
                f"the checkpoint's run state {' and '.join(problems)}: it was written by another stamen "
                "or a run with other settings"
            )
        for name, part in self:
            if name not in state:
                log.warning("the checkpoint has no %r run-state part (an older stamen wrote it): it starts empty", name)
                continue
            part.load_state_dict(state[name])


def split_arrays(state: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, Arrays]]:
    """Parts' states -> (JSON part states, array groups ``<part>:<key>``)."""
    plain: dict[str, dict[str, Any]] = {}
    groups: dict[str, Arrays] = {}
    for name, part in state.items():
        plain[name] = {}
        for key, value in part.items():
            if is_array_group(value):
                groups[f"{name}{_GROUP}{key}"] = value
            else:
                plain[name][key] = value
    return plain, groups


def join_arrays(plain: dict[str, dict[str, Any]], groups: dict[str, Arrays]) -> dict[str, dict[str, Any]]:
    """The inverse of :func:`split_arrays`; StateError for an array group of no saved part."""
    state = {name: dict(part) for name, part in plain.items()}
    for group, arrays in groups.items():
        name, sep, key = group.partition(_GROUP)
        if not sep or name not in state:
            raise StateError(f"checkpoint array group {group!r} belongs to no saved run-state part")
        state[name][key] = arrays
    return state
