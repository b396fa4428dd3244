"""The robustness scenario: final accuracy with 0..k of N sites attacking, per aggregation rule.

Each cell is one ``stamen simulate`` run of the same federation with ``attack``,
``attack-sites`` (the first k partitions) and ``aggregation`` set. The runner is passed in
(``simulate(out_dir, args) -> summary``), so ``stamen bench`` can register this scenario with
its own process runner and the tests can use theirs; this module only says what to run and
collects the table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RULES = ("mean", "median", "trimmed-mean", "krum", "multikrum")
ATTACKERS = (0, 1, 2, 3)

Simulate = Callable[[Path, list[str]], dict[str, Any]]


def scenario_args(
    rule: str,
    attackers: int,
    attack: str,
    *,
    clients: int = 10,
    rounds: int = 20,
    dataset: str = "mnist5k",
    scale: float = 10.0,
    extra: Sequence[str] = (),
) -> list[str]:
    """``stamen simulate`` arguments of one cell (every site trains every round); ``extra``
    is passed on unchanged (e.g. a partition or local epochs)."""
    args = [*extra, "--clients", str(clients), "--rounds", str(rounds), "--dataset", dataset, "--fraction", "1.0"]
    args += ["--set", f"aggregation={rule}", "--set", f"byzantine-sites={max(attackers, 1)}"]
    if attackers:
        args += ["--set", f"attack={attack}", "--set", f"attack-sites={attackers}", "--set", f"attack-scale={scale}"]
    return args


def robustness_table(
    simulate: Simulate,
    out: Path,
    *,
    attacks: Sequence[str] = ("scale", "sign-flip"),
    rules: Sequence[str] = RULES,
    attackers: Sequence[int] = ATTACKERS,
    **size: Any,
) -> list[dict[str, Any]]:
    """One row per (attack, rule, attackers): final accuracy and the rejections counted.

    The clean run (0 attackers) of a rule is shared by every attack.
    """
    rows: list[dict[str, Any]] = []
    clean: dict[str, dict[str, Any]] = {}
    for attack in attacks:
        for rule in rules:
            for k in attackers:
                if k == 0 and rule in clean:
                    summary = clean[rule]
                else:
                    name = f"{rule}-clean" if k == 0 else f"{attack}-{rule}-{k}"
                    summary = simulate(out / name, scenario_args(rule, k, attack, **size))
                    if k == 0:
                        clean[rule] = summary
                rows.append(
                    {
                        "attack": attack,
                        "rule": rule,
                        "attackers": k,
                        "final_accuracy": summary["final"]["accuracy"],
                        "rejected": {
                            key: n for key, n in summary["participation"].items() if key.startswith("rejected_") and n
                        },
                    }
                )
    return rows
