"""The ``stamen`` command line: simulate (and resume), lr-find, plot, versions, bench, audit.

Bad input ends with one clear line naming the problem and exit code 2, never a
traceback. A simulation runs in a child process in its own process group, under a
timeout; whatever happens, the group (Ray's processes included) is stopped before the
command returns. A SIGTERM or Ctrl-C (or the timeout) first asks the run to stop after its
current round, with a checkpoint; ``--resume`` continues it.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
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
    return typer.Option(*declarations, help=f"{key.help} ({detail}run config {name})", show_default=_shown(key.default))


def _shown(default: Any) -> str:
    """A run-config default as ``--help`` shows it: the option's value is None (unset), the key's is this."""
    if isinstance(default, bool):
        return str(default).lower()
    return repr(default) if default == "" else str(default)


def _progress_columns(rounds: int) -> list[Any]:
    counter = "[bold]round {task.completed}/{task.total}" if rounds else "[bold]round {task.completed} (until stopped)"
    return [TextColumn(counter), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]


def _figure(value: Any) -> str:
    """A summary figure for the console: ``n/a`` when unknown (``null`` in strict JSON)."""
    return f"{value:.4f}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"


def _notify(text: str) -> None:
    console.print(text, highlight=False)


@app.command()
@clean_errors
def simulate(
    clients: Annotated[
        int | None, typer.Option(help="simulated sites (Flower virtual SuperNodes)", show_default="10")
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
        str | None,
        typer.Option(help="scenario: a bundled name (simulations/scenarios/) or a YAML file", show_default="none"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="run directory", show_default="runs/<UTC timestamp>")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="any run-config key=value; repeatable", show_default="none")
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds before the simulation is stopped")] = 3600.0,
    cpus_per_client: Annotated[float, typer.Option(help="Ray CPUs per simulated client")] = 1.0,
    gpus_per_client: Annotated[float, typer.Option(help="Ray GPUs per simulated client (fractions share a GPU)")] = 0.0,
    ray_address: Annotated[
        str | None,
        typer.Option(
            envvar="RAY_ADDRESS",
            help="run on this Ray cluster (host:port, ray://host:port or auto); --out must be storage its nodes share",
            show_default="none: a private local Ray",
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    resume: Annotated[
        Path | None,
        typer.Option(help="continue this run directory from its newest valid checkpoint", show_default="none"),
    ] = None,
    stop_grace: Annotated[
        float, typer.Option(help="seconds a stopped run gets to finish its round before it is killed")
    ] = 120.0,
    site_policy: Annotated[
        Path | None,
        typer.Option(
            help="site privacy policy (TOML/JSON of site-* keys) every simulated site keeps",
            show_default="the run config's",
        ),
    ] = None,
    site_data: Annotated[
        Path | None,
        typer.Option(
            help="a directory with one npz/csv file or sub-directory per site (run config site-data)",
            show_default="none: partitions of --dataset",
        ),
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
    if site_data is not None:
        raw["site-data"] = str(site_data)
    if resume is not None:
        show_warnings()
    policy = None
    if site_policy is not None:  # imported only then: it loads opacus (seconds) for the ledger's accountant
        from stamen.client.site_policy import load_policy_file

        policy = load_policy_file(site_policy)
    plan = plan_simulation(raw, clients=clients, out=out, resume=resume, site_policy=policy)
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
            description = f"accuracy {_figure(row.get('accuracy'))}  loss {_figure(row.get('loss'))}"
            bar.update(task, completed=row["round"], description=description)

        try:
            result = execute(
                plan, timeout=timeout, cpus_per_client=cpus_per_client, gpus_per_client=gpus_per_client,
                stop_grace=stop_grace, on_progress=on_progress, notify=_notify, ray_address=ray_address,
            )  # fmt: skip
        except SimulationFailed as exc:
            bar.stop()
            console.print(exc.log_tail(), highlight=False, markup=False)
            console.print(f"[bold red]error:[/] {exc}; full log: {exc.log_path}")
            if (exc.out_dir / "checkpoints").is_dir():
                console.print(f"its checkpoints are kept; continue with: stamen simulate --resume {exc.out_dir}")
            raise typer.Exit(1) from None
    summary = result.summary
    privacy = summary.get("privacy")
    spent = f", epsilon max {privacy['epsilon_max']:.2f} (delta {privacy['delta']:g})" if privacy else ""
    if (privacy or summary.get("server_privacy")) and plan.cfg["dp-noise"] == "seeded":
        spent += ", DP noise SEEDED from the run seed (research only: not private against the server)"
    if privacy and plan.site_policy is None:
        spent += ", site policy: the run config's (no --site-policy: each site takes the run's privacy values)"
    if summary.get("tasks"):
        spent += f", mean forgetting {summary['tasks']['forgetting_mean']:.3f}"
    final = summary["final"]
    evaluated = f"final accuracy {_figure(final['accuracy'])} (loss {_figure(final['loss'])}, {final['source']})"
    typer.echo(
        f"stamen: {result.rounds_completed} rounds, {evaluated}{spent}, model version {result.version}, "
        f"wall {result.wall_seconds:.1f}s -> {result.out_dir}"
    )
    if final.get("reason"):
        typer.echo(f"stamen: {final['reason']}")
    if result.status == "stopped":
        typer.echo(
            f"stamen: stopped after round {result.rounds_completed} ({summary['stop_reason']}); "
            f"continue with: stamen simulate --resume {result.out_dir}"
        )


@app.command("lr-find")
@clean_errors
def lr_find(
    dataset: Annotated[str, typer.Option(help="dataset spec")] = "mnist5k",
    model: Annotated[str | None, _key_option("model")] = None,
    clients: Annotated[int, typer.Option(help="partitions the dataset is split into")] = 10,
    site: Annotated[int, typer.Option(help="which partition to test on")] = 0,
    steps: Annotated[int, typer.Option(help="steps of the range test")] = 100,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="run-config key=value; repeatable", show_default="none")
    ] = None,
) -> None:
    """Learning-rate range test on one site's data; prints a suggested --lr."""
    from stamen.simulations.lr_find import lr_range_test

    raw: dict[str, Any] = {"dataset": dataset} if model is None else {"dataset": dataset, "model": model}
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
    scenarios: Annotated[list[str] | None, typer.Argument(help="scenarios to run", show_default="all")] = None,
    out: Annotated[
        Path | None, typer.Option(help="results directory", show_default="runs/bench-<UTC timestamp>")
    ] = None,
    quick: Annotated[bool, typer.Option(help="every scenario at reduced size, a few minutes in all")] = False,
) -> None:
    """Benchmarks: stamen against the compute floor, plain Flower and its goals (DIR/bench.json)."""
    from stamen.simulations.bench.runner import run_bench

    out_dir = out or Path("runs", "bench-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S"))
    results = run_bench(scenarios or [], out_dir, quick=quick, echo=typer.echo)
    typer.echo(f"stamen bench: {len(results)} scenario(s) -> {out_dir / 'bench.json'}")
    if any("error" in r for r in results):
        raise typer.Exit(1)


@app.command("bench-table")
@clean_errors
def bench_table(
    readme: Annotated[Path, typer.Option(help="the README to write the table into")] = Path("README.md"),
    docs: Annotated[Path, typer.Option(help="where the committed bench-*/bench.json results lie")] = Path("docs"),
    check: Annotated[bool, typer.Option(help="write nothing; exit 1 if the README's table is not current")] = False,
) -> None:
    """The README's benchmark table, from the full runs committed under docs/ (latest per scenario)."""
    from stamen.simulations.bench.report import committed_runs, readme_table, with_table

    if not readme.is_file():
        raise StamenError(f"--readme {readme} does not exist")
    text = readme.read_text()
    new = with_table(text, readme_table(committed_runs(docs), readme.resolve().parent))
    if check:
        if new != text:
            typer.echo(f"{readme}: the benchmark table is not current; run `stamen bench-table`", err=True)
            raise typer.Exit(1)
        return
    readme.write_text(new)
    typer.echo(f"stamen bench-table: {readme} written from {docs}/bench-*/bench.json")


@app.command()
@clean_errors
def audit(
    seeds: Annotated[str, typer.Option(help="comma-separated seeds, one audit each")] = "0,1,2",
    noise: Annotated[str, typer.Option(help="secret, seeded (the auditor is given the seed) or both")] = "both",
    canaries: Annotated[int, typer.Option(help="gradient canaries m")] = 1000,
    rounds: Annotated[int, typer.Option(help="DP rounds of the audited site")] = 10,
    out: Annotated[Path | None, typer.Option(help="write the results here as JSON", show_default="none")] = None,
) -> None:
    """Empirical DP audit (one-run canaries, Steinke et al. 2023): eps_lb beside the ledger's epsilon."""
    from stamen.simulations.audit import NOISE_MODES, AuditSettings, table
    from stamen.simulations.audit import audit as run_audit

    try:
        seed_list = [int(s) for s in seeds.split(",")]
    except ValueError:
        raise StamenError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    if noise not in (*NOISE_MODES, "both"):
        raise StamenError(f"--noise must be secret, seeded or both, got {noise!r}")
    modes = list(NOISE_MODES) if noise == "both" else [noise]

    def on_row(row: Any) -> None:
        _notify(f"seed {row.seed} {row.noise}: eps_lb {row.epsilon_lb:.3f}, ledger eps {row.epsilon:.3f}")

    rows = run_audit(seed_list, modes, AuditSettings(canaries=canaries, rounds=rounds), out, on_row)
    Console().print(table(rows))
    if out is not None:
        typer.echo(f"stamen audit: {len(rows)} audit(s) -> {out}")


app.command("node")(clean_errors(deploy_cli.node))
app.command("superlink")(clean_errors(deploy_cli.superlink))
app.command("rebind")(clean_errors(deploy_cli.rebind))
app.command("dashboard")(clean_errors(deploy_cli.dashboard))


def main() -> None:
    """Console-script entry point."""
    app()
