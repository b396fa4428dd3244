"""A background sampler: ``sample()`` now and every ``interval`` seconds while a ``with`` block runs."""

from __future__ import annotations

import threading
from typing import Self


class Periodic:
    """Subclasses set ``interval`` and implement :meth:`sample`; samples stop when the block ends."""

    interval: float = 1.0

    def __enter__(self) -> Self:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        raise NotImplementedError
