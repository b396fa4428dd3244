"""Round overhead of a deployed stamen federation on loopback: ``python -m simulations.deploy_bench``.

Three sites on this machine (``simulations.loopback``: TLS, node authentication), MNIST-5k
split IID, the default CNN, DP off, federated evaluation off, a few rounds. For every
round after the first (which includes process start and imports) it reads the round's
wall time from the server's progress.jsonl and each site's training time and instruction
delivery delay from the warm executor's log, and prints

    overhead = round wall time - the slowest site's training time

with the delivery delay (server creates the instruction -> the site's executor holds it:
mostly the SuperNode's fixed 3 s idle poll) shown apart. ``--executor flower
--reply-poll 3`` runs Flower's defaults instead (a new ``flwr-clientapp`` process per
message, the server looking for replies every 3 s) for the before/after comparison; there
the sites' training time is not logged, so the overhead is reported against the training
time of a warm run given with ``--compute``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

from common.datasets import load_dataset
from simulations.loopback import Loopback, read_progress

TASK = re.compile(r"train task done in ([0-9.]+)s")
DELIVERY = re.compile(r"train task for round (\d+) delivered ([0-9.]+)s")


def _shards(n: int) -> list[tuple[object, object]]:
    import numpy as np

    data = load_dataset("mnist5k")
    order = np.random.default_rng(0).permutation(len(data.y_train))
    return [(np.asarray(data.x_train[i], np.float32), np.asarray(data.y_train[i], np.int64))
            for i in np.array_split(order, n)]  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="stamen-deploy-bench-"))
    out = root / "run"
    with Loopback(root / "fed", executor=args.executor) as fed:
        fed.start_superlink()
        for i, (x, y) in enumerate(_shards(args.sites)):
            fed.add_site(f"site-{i}", x, y)
        nodes = [fed.start_node(f"site-{i}") for i in range(args.sites)]
        t0 = time.monotonic()
        proc = fed.flwr_run({
            "num-server-rounds": args.rounds, "dataset": "mnist5k", "out-dir": str(out), "eval-every": 0,
            "holdout-fraction": 0.0, "round-timeout": 600.0, "reply-poll-interval": args.reply_poll,
            "min-available-sites": args.sites, "lr-schedule": "constant",
        })  # fmt: skip
        code = proc.popen.wait(timeout=args.timeout)
        wall = time.monotonic() - t0
        logs = [n.log.read_text(errors="replace") for n in nodes]
    rows = read_progress(out)
    if code != 0 or len(rows) != args.rounds:
        raise SystemExit(f"run failed ({code}); see {root}")
    seconds = [float(r["seconds"]) for r in rows[1:]]
    result: dict[str, object] = {"executor": args.executor, "reply_poll": args.reply_poll, "sites": args.sites,
                                 "rounds": args.rounds, "wall": wall, "round_seconds": seconds}  # fmt: skip
    if args.executor == "warm":
        per_site = [[float(v) for v in TASK.findall(text)][1:] for text in logs]  # round 1 pays the imports
        compute = [max(vals) for vals in zip(*per_site, strict=False)]
        delivery = [float(d) for text in logs for r, d in DELIVERY.findall(text) if int(r) > 1]
        result.update(compute=compute, delivery=delivery, delivery_mean=statistics.mean(delivery))
    else:
        compute = [args.compute] * len(seconds)
    overhead = [s - c for s, c in zip(seconds, compute, strict=False)]
    result.update(round_mean=statistics.mean(seconds), compute_mean=statistics.mean(compute),
                  overhead_mean=statistics.mean(overhead), overhead=overhead)  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executor", choices=["warm", "flower"], default="warm")
    parser.add_argument("--reply-poll", type=float, default=0.2)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compute", type=float, default=0.0, help="sites' training seconds (for --executor flower)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    print(json.dumps(run(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
