"""Round overhead of a deployed federation on loopback: ``python -m stamen.simulations.bench.round_overhead``.

Three sites on this machine (``simulations.loopback``: TLS, node authentication), MNIST-5k
split IID, DP off, no federated evaluation, a few rounds. For every round after the first
(which pays process starts and imports) it takes the round's wall time from the server's
``progress.jsonl`` and the slowest site's compute time from the sites' logs, and reports

    overhead = round wall time - the slowest site's compute time.

Three set-ups, same machine, same data split:
- ``--app stamen`` (default) with the warm executor: the executor logs, per task, when it
  claimed the task relative to the server creating the instruction (the server's upload,
  the SuperLink queue, the SuperNode's fixed 3 s idle poll and its download) and the time
  spent pulling the input, in the ClientApp and pushing the reply;
- ``--app stamen --executor flower --reply-poll 3``: Flower's defaults (a new
  ``flwr-clientapp`` process per message, the server looking for replies every 3 s); stamen's
  ClientApp does not log its compute there, so pass the warm run's figure with ``--compute``;
- ``--app quickstart``: a plain Flower app in the pattern of Flower's PyTorch quickstart
  (simulations/bench/quickstart), Flower's executor and round loop; its ClientApp prints its
  training time.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from stamen.common.datasets import load_dataset
from stamen.simulations.bench.loopback import ROOT, Loopback, read_progress
from stamen.simulations.bench.runs import BenchError

QUICKSTART = Path(__file__).resolve().parent / "quickstart"
TASK = re.compile(
    r"train task \(round (\d+)\) done in ([0-9.]+)s: claimed ([0-9.]+)s after the server created it; "
    r"input pulled in ([0-9.]+)s, ClientApp ([0-9.]+)s, reply pushed in ([0-9.]+)s"
)
QUICK_TASK = re.compile(r"quickstart train \(round \d*\) took ([0-9.]+)s")  # FedAvg leaves group_id empty
CREATED = re.compile(r"train task \(round (\d+)\): created by the server at (\S+), claimed ([0-9.]+)s later")
STAMPED = re.compile(
    r"^(\d{4}-\d\d-\d\dT[0-9:.]+)Z .*?(\[RUN \d+, ROUND (\d+)\]|Receiving: (\w+) message|Received successfully)"
)


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.removesuffix("Z")).replace(tzinfo=UTC).timestamp()


def _delivery(text: str) -> list[tuple[float, float, float]]:
    """Per train task after round 1: (server create -> SuperNode starts receiving it, its download,
    SuperNode holds it -> executor claims it), from the stamped SuperNode lines and the executor's."""
    received: dict[int, tuple[float, float]] = {}
    rnd, kind, start = 0, "", 0.0
    for line in text.splitlines():
        if not (m := STAMPED.match(line)):
            continue
        t = _epoch(m.group(1))
        if m.group(3):
            rnd = int(m.group(3))
        elif m.group(4):
            kind, start = m.group(4), t
        elif kind == "train" and rnd > 1:
            received[rnd] = (start, t)
    out = []
    for r, created, waited in CREATED.findall(text):
        if int(r) in received:
            a, b = received[int(r)]
            d = _epoch(created)
            out.append((a - d, b - a, d + float(waited) - b))
    return out


def _shards(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    data = load_dataset("mnist5k")
    order = np.random.default_rng(0).permutation(len(data.y_train))
    return [(np.asarray(data.x_train[i], np.float32), np.asarray(data.y_train[i], np.int64))
            for i in np.array_split(order, n)]  # fmt: skip


def _compute(logs: list[str], pattern: re.Pattern[str], column: int) -> list[float]:
    """Per round after the first: the slowest site's compute seconds (``column`` of the match)."""
    per_round: dict[int, float] = {}
    for text in logs:
        for m in pattern.findall(text):
            rnd = int(m[0])
            if rnd > 1:
                per_round[rnd] = max(per_round.get(rnd, 0.0), float(m[column]))
    return [per_round[r] for r in sorted(per_round)]


def run(args: argparse.Namespace) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="stamen-deploy-bench-"))
    out = root / "run"
    # the quickstart app reads the npz file its node config names; stamen sites watch their data directory
    with Loopback(root / "fed", executor=args.executor, watched=args.app != "quickstart") as fed:
        fed.start_superlink()
        for i, (x, y) in enumerate(_shards(args.sites)):
            fed.add_site(f"site-{i}", x, y)
        nodes = [fed.start_node(f"site-{i}") for i in range(args.sites)]
        if args.app == "quickstart":
            test = load_dataset("mnist5k")
            np.savez(root / "test.npz", x=np.asarray(test.x_test, np.float32), y=np.asarray(test.y_test, np.int64))
            config: dict[str, object] = {"num-server-rounds": args.rounds, "out-dir": str(out),
                                         "test-data": str(root / "test.npz")}  # fmt: skip
        else:
            config = {"num-server-rounds": args.rounds, "dataset": "mnist5k", "out-dir": str(out), "eval-every": 0,
                      "holdout-fraction": 0.0, "round-timeout": 600.0, "reply-poll-interval": args.reply_poll,
                      "min-available-sites": args.sites, "lr-schedule": "constant"}  # fmt: skip
        t0 = time.monotonic()
        proc = fed.flwr_run(config, app=QUICKSTART if args.app == "quickstart" else ROOT)
        code = proc.popen.wait(timeout=args.timeout)
        wall = time.monotonic() - t0
        logs = [n.log.read_text(errors="replace") for n in nodes]
    rows = read_progress(out)
    if code != 0 or len(rows) != args.rounds:
        raise BenchError(f"deployed run failed (exit {code}, {len(rows)} rounds); see {root}")
    seconds = [float(r["seconds"]) for r in rows[1:]]
    result: dict[str, object] = {
        "app": args.app, "executor": args.executor, "reply_poll": args.reply_poll, "sites": args.sites,
        "rounds": args.rounds, "wall": wall, "final_accuracy": rows[-1].get("central_accuracy"),
        "round_seconds": seconds,
    }  # fmt: skip
    if args.app == "quickstart":  # a site's n-th training is round n
        per_site = [[float(v) for v in QUICK_TASK.findall(text)][1:] for text in logs]
        compute = [max(vals) for vals in zip(*per_site, strict=True)]
    elif args.executor == "warm":
        compute = _compute(logs, TASK, 4)
        later = [m for text in logs for m in TASK.findall(text) if int(m[0]) > 1]
        steps = [d for text in logs for d in _delivery(text)]
        result.update(
            claimed_mean=statistics.mean(float(m[2]) for m in later),
            executor_transfer_mean=statistics.mean(float(m[3]) + float(m[5]) for m in later),
            to_supernode_mean=statistics.mean(s[0] for s in steps),
            supernode_download_mean=statistics.mean(s[1] for s in steps),
            supernode_to_executor_mean=statistics.mean(s[2] for s in steps),
        )
    else:
        compute = [args.compute] * len(seconds)
    overhead = [s - c for s, c in zip(seconds, compute, strict=True)]
    result.update(compute=compute, round_mean=statistics.mean(seconds), compute_mean=statistics.mean(compute),
                  overhead_mean=statistics.mean(overhead), overhead=overhead, log_dir=str(root))  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", choices=["stamen", "quickstart"], default="stamen")
    parser.add_argument("--executor", choices=["warm", "flower"], default="warm")
    parser.add_argument("--reply-poll", type=float, default=0.2)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compute", type=float, default=0.0, help="sites' compute seconds (stamen, --executor flower)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    if args.app == "quickstart" and args.executor != "flower":
        parser.error("--app quickstart is plain Flower: use --executor flower")
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
