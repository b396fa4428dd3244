"""Which Ray node each simulated site ran on: a simulation-only channel, reported in ``summary.json``.

On a Ray cluster a site's ClientApp runs in whichever of Flower's actors is free, on any
node. The production ClientApp knows nothing of Ray, so the engine's ClientApp carries a
Flower mod (:func:`record_placement`) that asks Ray, inside the actor, which node it is on
and leaves an empty marker file ``<site-id>@<node-id>`` in the run's placement directory
(the run directory, which on a cluster is shared storage every node writes to). After
the run the engine folds the markers into ``summary.json``'s ``ray_nodes``
(:func:`add_to_summary`): for every node, how many sites ran at least one message there.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

from stamen.common.identity import site_id_from_node_config
from stamen.common.state import atomic_write_json

#: The run directory's folder of placement markers.
PLACEMENT_DIR = "ray-placement"


def record_placement(
    directory: str, msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """A Flower mod (bound to ``directory`` with :func:`functools.partial`): mark this site's Ray node."""
    import ray

    if ray.is_initialized():
        site = site_id_from_node_config(context.node_config)
        node = ray.get_runtime_context().get_node_id()
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{site}@{node}").touch()
    return call_next(msg, context)


def ray_nodes(directory: Path) -> dict[str, int]:
    """``{node-id: sites}``: how many sites ran at least one message on each Ray node."""
    if not directory.is_dir():
        return {}
    pairs = {marker.name.rpartition("@")[::2] for marker in directory.iterdir() if "@" in marker.name}
    return dict(sorted(Counter(node for _site, node in pairs).items()))


def add_to_summary(summary_path: Path, directory: Path, address: str | None) -> dict[str, Any]:
    """Add ``ray_nodes`` and ``ray_address`` (None: a Ray started for this run) to ``summary.json``."""
    summary = json.loads(summary_path.read_text())
    summary["ray_nodes"] = ray_nodes(directory)
    summary["ray_address"] = address
    atomic_write_json(summary_path, summary, mode=0o644)
    return summary
