"""``stamen versions``: list a run's model versions, export one with its model card, release one."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from stamen.cli.console import clean_errors, console
from stamen.common.errors import StamenError
from stamen.server.promotion import export_version, list_versions, pin, promote

versions_app = typer.Typer(
    no_args_is_help=True, help="A run's model versions: list, export with a model card, pin or promote a release."
)

RunDir = Annotated[Path, typer.Argument(help="the run directory")]


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)


@versions_app.command("list")
@clean_errors
def list_(run_dir: RunDir) -> None:
    """Every model version of the run: round, parent, evaluation, epsilon, status, file."""
    table = Table(title=f"model versions of {run_dir}")
    for column in ("version", "round", "parent", "accuracy", "loss", "sites", "epsilon max", "status", "file"):
        table.add_column(column, justify="right" if column not in ("status", "file") else "left")
    for e in list_versions(run_dir):
        metrics = e.get("metrics", {})
        status = e["status"] + (", released" if e["released"] else "")
        table.add_row(
            str(e["version"]),
            str(e["round"]),
            str(e["parent"]),
            _fmt(metrics.get("accuracy")),
            _fmt(metrics.get("loss")),
            str(len(e.get("contributors", []))),
            _fmt(max(e.get("epsilon", {}).values(), default=None)),
            status,
            e["file"] or "pruned",
        )
    Console(width=max(console.width, 120)).print(table)


@versions_app.command()
@clean_errors
def export(
    run_dir: RunDir,
    version: Annotated[int | None, typer.Argument(help="the version to export")] = None,
    out: Annotated[Path, typer.Option(help="the .safetensors file to write (cards are written beside it)")] = Path(
        "model.safetensors"
    ),
    released: Annotated[bool, typer.Option("--released", help="export the released (pinned/promoted) version")] = False,
) -> None:
    """Export a version as safetensors plus a model card (.card.json and .card.md)."""
    if (version is None) == (not released):
        raise StamenError("give either a VERSION or --released")
    for path in export_version(run_dir, version, out):
        typer.echo(path)


@versions_app.command("pin")
@clean_errors
def pin_(run_dir: RunDir, version: Annotated[int, typer.Argument(help="the version to release")]) -> None:
    """Release exactly VERSION (no checks): export --released gives it."""
    done = pin(run_dir, version)
    typer.echo(f"released version {done['version']} (was {done['previous']})")


@versions_app.command("promote")
@clean_errors
def promote_(
    run_dir: RunDir,
    version: Annotated[int | None, typer.Argument(help="the version (default: the run's best)")] = None,
    force: Annotated[bool, typer.Option(help="release it even if it evaluated worse than the released one")] = False,
) -> None:
    """Release VERSION (default: the best) if it evaluated no worse than the released version."""
    done = promote(run_dir, version, force=force)
    typer.echo(f"released version {done['version']} (was {done['previous']})")
