"""The ``stamen`` command line: simulate (and resume), lr-find, plot, versions, bench.

Bad input ends with one clear line naming the problem and exit code 2, never a
traceback. A simulation runs in a child process in its own process group, under a
timeout; whatever happens, the group (Ray's processes included) is stopped before the
command returns. A SIGTERM or Ctrl-C (or the timeout) first asks the run to stop after its
current round, with a checkpoint; ``--resume`` continues it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from stamen.cli import deploy as deploy_cli
from stamen.cli.console import clean_errors, console, show_warnings
from stamen.cli.versions import versions_app
from stamen.common.config import KEY_BY_NAME, StamenConfig, parse_assignment
from stamen.common.errors import StamenError
from stamen.simulations.run import SimulationFailed, execute, plan_simulation

app = typer.Typer(add_completion=False, no_args_is_help=True, help="stamen: federated continual learning on Flower.")
app.add_typer(versions_app, name="versions")


#: ``simulate``'s options that set a run-config key (parameter -> key); their help texts and
#: defaults come from the key table, so the CLI can never drift from it.
KEY_OPTIONS = {
    "rounds": "num-server-rounds",
    "fraction": "fraction-train",
    "dataset": "dataset",
    "partition": "partition",
    "alpha": "alpha",
    "model": "model",
    "strategy": "strategy",
    "server_lr": "server-lr",
    "server_momentum": "server-momentum",
    "lr": "lr",
    "local_epochs": "local-epochs",
    "batch_size": "batch-size",
    "seed": "seed",
    "dp": "dp",
    "noise_multiplier": "noise-multiplier",
    "max_grad_norm": "max-grad-norm",
    "target_epsilon": "target-epsilon",
    "delta": "delta",
    "privacy_horizon_rounds": "privacy-horizon-rounds",
    "epsilon_budget": "epsilon-budget",
    "accountant": "accountant",
    "metrics_port": "metrics-port",
}


def _key_option(name: str, *declarations: str) -> Any:
    """A typer option documented by run-config key ``name``: its help text, range and default."""
    key = KEY_BY_NAME[name]
    detail = f"{key.expect}; " if key.expect else ""
    return typer.Option(*declarations, help=f"{key.help} ({detail}run config {name}, default: {key.default!r})")


def _progress_columns(rounds: int) -> list[Any]:
    counter = "[bold]round {task.completed}/{task.total}" if rounds else "[bold]round {task.completed} (until stopped)"
    return [TextColumn(counter), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]


def _notify(text: str) -> None:
    console.print(text, highlight=False)


@app.command()
@clean_errors
def simulate(
    clients: Annotated[
        int | None, typer.Option(help="simulated sites (Flower virtual SuperNodes) [default: 10]")
    ] = None,
    rounds: Annotated[int | None, _key_option("num-server-rounds")] = None,
    fraction: Annotated[float | None, _key_option("fraction-train")] = None,
    dataset: Annotated[str | None, _key_option("dataset")] = None,
    partition: Annotated[str | None, _key_option("partition")] = None,
    alpha: Annotated[float | None, _key_option("alpha")] = None,
    model: Annotated[str | None, _key_option("model")] = None,
    strategy: Annotated[str | None, _key_option("strategy")] = None,
    server_lr: Annotated[float | None, _key_option("server-lr")] = None,
    server_momentum: Annotated[float | None, _key_option("server-momentum")] = None,
    lr: Annotated[float | None, _key_option("lr")] = None,
    local_epochs: Annotated[int | None, _key_option("local-epochs")] = None,
    batch_size: Annotated[int | None, _key_option("batch-size")] = None,
    seed: Annotated[int | None, _key_option("seed")] = None,
    dp: Annotated[bool | None, _key_option("dp", "--dp/--no-dp")] = None,
    noise_multiplier: Annotated[float | None, _key_option("noise-multiplier")] = None,
    max_grad_norm: Annotated[float | None, _key_option("max-grad-norm")] = None,
    target_epsilon: Annotated[float | None, _key_option("target-epsilon")] = None,
    delta: Annotated[float | None, _key_option("delta")] = None,
    privacy_horizon_rounds: Annotated[int | None, _key_option("privacy-horizon-rounds")] = None,
    epsilon_budget: Annotated[float | None, _key_option("epsilon-budget")] = None,
    accountant: Annotated[str | None, _key_option("accountant")] = None,
    metrics_port: Annotated[int | None, _key_option("metrics-port")] = None,
    scenario: Annotated[
        str | None, typer.Option(help="scenario: a bundled name (simulations/scenarios/) or a YAML file")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<timestamp>)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="any run-config key=value; repeatable")] = None,
    timeout: Annotated[float, typer.Option(help="seconds before the simulation is stopped")] = 3600.0,
    cpus_per_client: Annotated[float, typer.Option(help="Ray CPUs per simulated client")] = 1.0,
    gpus_per_client: Annotated[float, typer.Option(help="Ray GPUs per simulated client")] = 0.0,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    resume: Annotated[
        Path | None, typer.Option(help="continue this run directory from its newest valid checkpoint")
    ] = None,
    stop_grace: Annotated[
        float, typer.Option(help="seconds a stopped run gets to finish its round before it is killed")
    ] = 120.0,
    site_policy: Annotated[
        Path | None, typer.Option(help="site privacy policy (TOML/JSON of site-* keys) every simulated site keeps")
    ] = None,
) -> None:
    """Run a federation of CLIENTS simulated sites on this machine (Flower + Ray).

    SIGTERM or Ctrl-C stops the run after the current round, with a checkpoint; --resume
    continues it. --rounds 0 runs until stopped.
    """
    given = locals()
    flags = {key: given[param] for param, key in KEY_OPTIONS.items()}
    raw: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    raw.update(parse_assignment(item) for item in set_ or [])
    if scenario is not None:
        raw["scenario"] = scenario
    if resume is not None:
        show_warnings()
    from stamen.client.site_policy import load_policy_file

    policy = load_policy_file(site_policy) if site_policy is not None else None
    plan = plan_simulation(raw, clients=clients, out=out, resume=resume)
    if plan.resumed:
        console.print(
            f"resuming {plan.out_dir} after round {plan.resumed_after_round} (model version {plan.resumed_version})",
            highlight=False,
        )
    if plan.cfg["metrics-port"]:
        from stamen.server.exporter import metrics_url

        typer.echo(f"stamen: metrics at {metrics_url(plan.cfg)} while the simulation runs")
    rounds = int(plan.cfg["num-server-rounds"])
    with Progress(*_progress_columns(rounds), console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("starting Flower simulation engine…", total=rounds or None)

        def on_progress(row: dict[str, Any]) -> None:
            description = f"accuracy {row['accuracy']:.4f}  loss {row['loss']:.4f}"
            bar.update(task, completed=row["round"], description=description)

        try:
            result = execute(
                plan, timeout=timeout, cpus_per_client=cpus_per_client, gpus_per_client=gpus_per_client,
                stop_grace=stop_grace, on_progress=on_progress, notify=_notify, site_policy=policy,
            )  # fmt: skip
        except SimulationFailed as exc:
            bar.stop()
            tail = exc.log_path.read_text(errors="replace").splitlines()[-25:]
            console.print("\n".join(tail), highlight=False, markup=False)
            console.print(f"[bold red]error:[/] {exc}; full log: {exc.log_path}")
            if (exc.out_dir / "checkpoints").is_dir():
                console.print(f"its checkpoints are kept; continue with: stamen simulate --resume {exc.out_dir}")
            raise typer.Exit(1) from None
    summary = result.summary
    privacy = summary.get("privacy")
    spent = f", epsilon max {privacy['epsilon_max']:.2f} (delta {privacy['delta']:g})" if privacy else ""
    if (privacy or summary.get("server_privacy")) and plan.cfg["dp-noise"] == "seeded":
        spent += ", DP noise SEEDED from the run seed (research only: not private against the server)"
    if summary.get("tasks"):
        spent += f", mean forgetting {summary['tasks']['forgetting_mean']:.3f}"
    final = summary["final"]
    typer.echo(
        f"stamen: {result.rounds_completed} rounds, final accuracy {final['accuracy']:.4f} "
        f"(loss {final['loss']:.4f}, {final['source']}){spent}, model version {result.version}, "
        f"wall {result.wall_seconds:.1f}s -> {result.out_dir}"
    )
    if result.status == "stopped":
        typer.echo(
            f"stamen: stopped after round {result.rounds_completed} ({summary['stop_reason']}); "
            f"continue with: stamen simulate --resume {result.out_dir}"
        )


@app.command("lr-find")
@clean_errors
def lr_find(
    dataset: Annotated[str, typer.Option(help="dataset spec")] = "mnist5k",
    clients: Annotated[int, typer.Option(help="partitions the dataset is split into")] = 10,
    site: Annotated[int, typer.Option(help="which partition to test on")] = 0,
    steps: Annotated[int, typer.Option(help="steps of the range test")] = 100,
    set_: Annotated[list[str] | None, typer.Option("--set", help="run-config key=value; repeatable")] = None,
) -> None:
    """Learning-rate range test on one site's data; prints a suggested --lr."""
    from stamen.simulations.lr_find import lr_range_test

    raw: dict[str, Any] = {"dataset": dataset}
    raw.update(parse_assignment(item) for item in set_ or [])
    cfg = StamenConfig.from_mapping(raw)
    if not 0 <= site < clients:
        raise StamenError(f"--site must be in [0, {clients}), got {site}")
    result = lr_range_test(cfg, site=site, clients=clients, steps=steps)
    typer.echo(
        f"suggested lr: {result.suggested_lr:.3g} (loss fell fastest there; range {result.lrs[0]:.1e}"
        f"..{result.lrs[-1]:.1e} over {len(result.lrs)} steps)"
    )


@app.command()
@clean_errors
def plot(run_dir: Annotated[Path, typer.Argument(help="a run directory with summary.json")]) -> None:
    """Redraw a run's PNG plots from its summary.json."""
    from stamen.simulations.plots import plot_run

    path = run_dir / "summary.json"
    if not path.exists():
        raise StamenError(f"{path} does not exist")
    for png in plot_run(json.loads(path.read_text()), run_dir):
        typer.echo(png)


@app.command()
@clean_errors
def bench(
    scenarios: Annotated[list[str] | None, typer.Argument(help="scenarios to run (default: all)")] = None,
    out: Annotated[Path | None, typer.Option(help="results directory (default runs/bench-<timestamp>)")] = None,
    quick: Annotated[bool, typer.Option(help="every scenario at reduced size, a few minutes in all")] = False,
) -> None:
    """Benchmarks: stamen against the compute floor, plain Flower and its goals (DIR/bench.json)."""
    from stamen.simulations.bench.runner import run_bench

    out_dir = out or Path("runs", "bench-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S"))
    results = run_bench(scenarios or [], out_dir, quick=quick, echo=typer.echo)
    typer.echo(f"stamen bench: {len(results)} scenario(s) -> {out_dir / 'bench.json'}")
    if any("error" in r for r in results):
        raise typer.Exit(1)


app.command("node")(clean_errors(deploy_cli.node))
app.command("superlink")(clean_errors(deploy_cli.superlink))


def main() -> None:
    """Console-script entry point."""
    app()
