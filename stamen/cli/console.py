"""The CLI's console: one place for how commands print, fail and show stamen's warnings."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from stamen.common.errors import StamenError

console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def clean_errors(func: F) -> F:
    """Turn a StamenError into one red line and exit code 2."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except StamenError as exc:
            # escaped, not wrapped: the message is the user's own words (``tuple[int, ...]``) on one line
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


class _ConsoleHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        console.print(f"[yellow]{record.levelname.lower()}:[/] {record.getMessage()}", highlight=False, soft_wrap=True)


def show_warnings() -> None:
    """Print stamen's own warnings (e.g. a checkpoint fall-back) on the console, once."""
    logger = logging.getLogger("stamen")
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        handler = _ConsoleHandler(logging.WARNING)
        logger.addHandler(handler)
        logger.propagate = False
