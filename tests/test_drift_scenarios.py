"""Drift that means something, on real simulations (DP off, every site sampled every round).

- A label shift injected into two of four sites at round k: their label PSI stays under the
  alert line (0.2) for every round before k and crosses it within 2 rounds after k; the
  sites without the shift never cross it.
- Client drift: the mean cosine between site updates and their aggregate, averaged over
  rounds 3..R, is lower by at least 0.1 under strong label skew (Dirichlet α = 0.1) than
  under near-IID data (α = 100), for each of three seeds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stamen.common.drift import PSI_ALERT

SHIFT_ROUND = 5
SHIFTED = ("site-0000", "site-0001")


@pytest.mark.slow
def test_label_shift_crosses_the_psi_alert_line_within_two_rounds_and_never_before(
    tmp_path: Path, stamen_simulate: Callable[..., Any]
) -> None:
    out = tmp_path / "run"
    stamen_simulate(
        out,
        "--clients", "4", "--rounds", "7", "--dataset", "digits", "--partition", "iid",
        "--set", f"label-shift-round={SHIFT_ROUND}", "--set", f"label-shift-sites={','.join(SHIFTED)}",
        "--set", "drift-reference-rounds=2",
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    per_site = summary["drift"]["per_site"]
    assert sorted(per_site) == ["site-0000", "site-0001", "site-0002", "site-0003"]
    false_alarms, delays = [], []
    for site, series in per_site.items():
        assert series["round"] == list(range(1, 8)), "every site trains every round"
        psi = dict(zip(series["round"], series["label_psi"], strict=True))
        alarms = [r for r, v in psi.items() if v >= PSI_ALERT]
        if site in SHIFTED:
            assert alarms, f"{site}: the shift at round {SHIFT_ROUND} was never seen ({psi})"
            delays.append(alarms[0] - SHIFT_ROUND)
            false_alarms += [(site, r) for r in alarms if r < SHIFT_ROUND]
        else:
            false_alarms += [(site, r) for r in alarms]
    print(f"label shift at round {SHIFT_ROUND}: detection delays {delays} rounds, false alarms {false_alarms}")
    assert not false_alarms
    assert all(0 <= d <= 2 for d in delays), delays
    rows = {row["round"]: row for row in summary["history"]}
    assert all(rows[r]["drift_label_psi_max"] < PSI_ALERT for r in range(1, SHIFT_ROUND))
    assert rows[SHIFT_ROUND + max(delays)]["drift_label_psi_max"] >= PSI_ALERT
    assert rows[SHIFT_ROUND + max(delays)]["drift_sites_over_threshold"] == len(SHIFTED)
    assert all("cosine_mean" in row and "bytes_received" in row for row in rows.values())
    assert (out / "drift.png").stat().st_size > 10_000


def _mean_cosine(summary: dict[str, Any]) -> float:
    values = [row["cosine_mean"] for row in summary["history"] if row["round"] >= 3]
    return sum(values) / len(values)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_label_skew_lowers_the_client_drift_cosine(
    tmp_path: Path, stamen_simulate: Callable[..., Any], seed: int
) -> None:
    cosine = {}
    for alpha in ("0.1", "100"):
        out = tmp_path / f"alpha-{alpha}"
        stamen_simulate(
            out,
            "--clients", "4", "--rounds", "6", "--dataset", "digits", "--alpha", alpha, "--seed", str(seed),
            "--set", "min-partition-size=10",
        )  # fmt: skip
        cosine[alpha] = _mean_cosine(json.loads((out / "summary.json").read_text()))
    print(f"seed {seed}: mean cosine over rounds 3..6: alpha=0.1 {cosine['0.1']:.3f}, alpha=100 {cosine['100']:.3f}")
    assert cosine["100"] - cosine["0.1"] >= 0.1, cosine
