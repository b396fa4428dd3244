"""Stop requests: SIGTERM or SIGINT ends a run after the current round, with a checkpoint.

The round loop polls :func:`stop_requested` after each round. Signals reach only a
process's main thread, and the ServerApp does not always run there: in the simulation
engine it runs in a thread Flower starts, so the engine installs the handler in its main
thread (after Ray's ``ray.init``, which replaces the SIGTERM handler with one that exits at
once); a deployed ServerApp process runs ``main`` in its main thread and installs it there.
The first signal asks for a stop; a second one runs the handler that was there before
(Flower's or Ray's immediate exit, or the default), for an operator who cannot wait.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("stamen.server")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_stop = threading.Event()
_reason: list[str] = []


def request_stop(reason: str) -> None:
    """Ask the run to stop after the round in progress."""
    if not _stop.is_set():
        _reason.append(reason)
        _stop.set()


def stop_requested() -> bool:
    """Whether a stop was asked for."""
    return _stop.is_set()


def stop_reason() -> str:
    """Why the run was asked to stop ('' if it was not)."""
    return _reason[0] if _reason else ""


def clear_stop() -> None:
    """Forget a stop request (a new run in the same process starts clean)."""
    _stop.clear()
    _reason.clear()


def _chain(previous: Any, signum: int, frame: FrameType | None) -> None:
    """Run the handler that was installed before ours, as if ours had never been there."""
    if callable(previous):
        previous(signum, frame)
        return
    if previous == signal.SIG_IGN:
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def install_stop_handlers() -> Callable[[], None]:
    """Make SIGTERM/SIGINT request a stop; return a function that restores the old handlers.

    Does nothing (and restores nothing) outside the main thread, where Python cannot set
    signal handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop_requested():
            log.warning("%s again: stopping now, without finishing the round", name)
            _chain(previous[signum], signum, frame)
            return
        log.warning("%s: stopping after the current round, with a checkpoint (send it again to stop now)", name)
        request_stop(name)

    for sig in STOP_SIGNALS:
        previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
