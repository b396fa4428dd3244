"""The fault-injection layer of ``stamen simulate`` / ``stamen bench``: simulation-only keys.

The production apps (``stamen.client.app:app``, ``stamen.server.app:app``) know nothing of
faults and refuse a run that sets one. The simulation engine builds its apps here instead:

- client: the same handlers through :func:`stamen.client.app.make_client_app`, with the
  label shift and data poisoning as its ``data_transform`` (before the round's replay
  buffer, training and drift scores see the data) and update poisoning as a Flower mod
  (after training, on the model the reply carries);
- server: :func:`stamen.server.app.make_server_app` with ``server-lr-spike`` wrapping the
  run's server optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from stamen.client.app import Instruction, make_client_app
from stamen.client.site_policy import with_site_policy
from stamen.client.view import SiteView
from stamen.common.convert import arrays_to_record, record_to_arrays
from stamen.common.errors import StamenError
from stamen.common.identity import site_id_from_node_config
from stamen.common.reply import Status, make_reply
from stamen.server.app import make_server_app
from stamen.simulations.faults.attack import attack_of, poison_data, poison_update
from stamen.simulations.faults.label_shift import apply_label_shift
from stamen.simulations.faults.lr_spike import with_lr_spike
from stamen.simulations.placement import record_placement


def faulty_data(view: SiteView, ins: Instruction) -> SiteView:
    """The site's data as this round trains on it: label-shifted and/or label-flipped."""
    view = apply_label_shift(view, ins.cfg, ins.site_id, ins.server_round, ins.num_classes)
    return poison_data(view, attack_of(ins.cfg, ins.node_config), ins.num_classes)


def poison_updates(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """A Flower mod: an attacking site's train reply carries its poisoned model, not the honest one."""
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or "arrays" not in reply.content.array_records:
        return reply
    try:
        ins = Instruction(msg, context)
        kind = attack_of(ins.cfg, ins.node_config)
        if kind is None or ins.arrays is None:
            return reply
        honest = record_to_arrays(reply.content.array_records["arrays"])
        sent = poison_update(kind, ins.arrays, honest, float(ins.cfg["attack-scale"]), ins.store())
    except StamenError as exc:
        return make_reply(msg, site_id_from_node_config(context.node_config), Status.ERROR, reason=str(exc))
    reply.content["arrays"] = arrays_to_record(sent)
    return reply


def client_app(site_policy: Mapping[str, Any] | None = None, placement_dir: str | None = None) -> ClientApp:
    """The simulation's ClientApp: stamen's, with the faults the run config asks for,
    ``site_policy`` (node-config keys, :func:`stamen.client.site_policy.load_policy_file`)
    in every site's node config, and, given ``placement_dir``, a marker of the Ray node each
    site ran on (:mod:`stamen.simulations.placement`)."""
    mods = [poison_updates, *([partial(with_site_policy, dict(site_policy))] if site_policy else [])]
    if placement_dir is not None:
        mods.insert(0, partial(record_placement, placement_dir))
    return make_client_app(data_transform=faulty_data, mods=mods)


def server_app(run_config: Mapping[str, Any]) -> ServerApp:
    """The simulation's ServerApp: stamen's, with ``run_config`` on top and the server-side faults."""
    return make_server_app(run_config, fault_layer=with_lr_spike)
