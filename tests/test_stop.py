"""Stop handlers: the first SIGTERM/SIGINT asks for a stop, a second one runs the old handler."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

from stamen.server.stop import clear_stop, install_stop_handlers, stop_reason, stop_requested


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    clear_stop()
    yield
    clear_stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_requests_a_stop_and_a_second_runs_the_previous_handler(sig: signal.Signals) -> None:
    seen: list[int] = []
    original = signal.signal(sig, lambda signum, frame: seen.append(signum))
    try:
        restore = install_stop_handlers()
        os.kill(os.getpid(), sig)
        assert stop_requested() and stop_reason() == sig.name
        assert seen == [], "the first signal only asks for a stop"
        os.kill(os.getpid(), sig)
        assert seen == [sig], "a second signal runs the handler that was there before"
        restore()
        assert signal.getsignal(sig) is not None and signal.getsignal(sig) != signal.SIG_DFL
        os.kill(os.getpid(), sig)
        assert seen == [sig, sig], "after restore the previous handler is back"
    finally:
        signal.signal(sig, original)


def test_outside_the_main_thread_nothing_is_installed() -> None:
    before = signal.getsignal(signal.SIGTERM)
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(install_stop_handlers()))
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGTERM) is before
    assert callable(results[0])
