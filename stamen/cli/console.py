"""The CLI's console: one place for how commands print, fail and show stamen's warnings."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer
from rich.console import Console

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
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


class _ConsoleHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        console.print(f"[yellow]{record.levelname.lower()}:[/] {record.getMessage()}", highlight=False)


def show_warnings() -> None:
    """Print stamen's own warnings (e.g. a checkpoint fall-back) on the console, once."""
    logger = logging.getLogger("stamen")
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        handler = _ConsoleHandler(logging.WARNING)
        logger.addHandler(handler)
        logger.propagate = False
