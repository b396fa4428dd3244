"""Every non-public Flower name stamen uses, in one place (Flower 1.42).

Flower's public API is ``flwr.app``, ``flwr.serverapp`` (with ``flwr.serverapp.strategy``),
``flwr.clientapp`` and ``flwr.simulation``: the names in their ``__all__``. Anything else may
change in a minor release, so no other stamen module imports it; ``tests/test_hygiene.py``
enforces that. When Flower is upgraded, this module is the list to check. Each import
says why stamen needs it and which public alternative is missing.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Message
from flwr.common.constant import (
    SUPERLINK_NODE_ID,  # node id the SuperLink stamps on instructions (tests fake a ServerApp): not exported
    ErrorCode,  # codes of error replies: flwr.app.Error takes a bare int, Flower has no public enum of them
    SubStatus,  # a task's final status the warm executor reports: no public Runtime API client
)
from flwr.common.serde import (  # the Runtime API's context and run, decoded (warm executor): serde is not public
    context_from_proto,
    run_from_proto,
)
from flwr.proto.node_pb2 import Node  # Runtime API request field: no public executor API
from flwr.proto.runtime_pb2 import (  # Runtime API requests: no public executor API
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean  # FedTrimmedAvg's kernel (trust.py): not exported
from flwr.serverapp.strategy.multikrum import select_multikrum  # MultiKrum's kernel (trust.py): not exported
from flwr.serverapp.strategy.strategy_utils import (  # FedAvg's weighted mean of ArrayRecords: not exported
    aggregate_arrayrecords,
)
from flwr.supercore.constant import (
    DEFAULT_SIMULATION_CONFIG,  # Ray init defaults of Flower's simulation backend (engine.py): no public constant
    TaskType,  # the task type a warm executor claims (ClientApp): not exported
)
from flwr.supercore.differential_privacy import (  # Flower's clipping (dp_fedavg.py): public DP strategies hide it
    clip_inputs_inplace,
    get_norm,
)
from flwr.supercore.heartbeat import (  # the task heartbeat the SuperNode watches (warm executor): no public API
    HeartbeatSender,
    make_task_heartbeat_fn_http,
)
from flwr.supercore.inflatable.inflatable_protobuf_utils import (  # pull a task's objects: no public client
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (  # inflate with a short back-off: no public client
    pull_and_inflate_object_from_tree,
)
from flwr.supercore.interceptors import (  # Runtime API auth, version and token headers: no public executor API
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker  # Runtime API retry policy: no public executor API
from flwr.supercore.run import Run  # the run's FAB id and version the warm executor checks: no public Run type
from flwr.supercore.runtime import RuntimeHttpClient  # the SuperNode's Runtime API client: no public executor API
from flwr.supercore.task_identity import TaskIdentity  # the identity Message() stamps on instructions: no setter
from flwr.supernode.runtime.run_clientapp import (  # reply and final status, as flwr-clientapp: no public API
    push_message,
    push_task_output,
)


def set_message_id(message: Message, message_id: str) -> None:
    """Give a pulled message its id, as flwr-clientapp does.

    The deflated message does not carry its own id (its object id in the tree), and
    ``Metadata.message_id`` is a read-only property in Flower 1.42: no public setter.
    """
    message.metadata.__dict__["_message_id"] = message_id


__all__ = [
    "DEFAULT_SIMULATION_CONFIG",
    "SUPERLINK_NODE_ID",
    "AcquireTaskRequest",
    "ErrorCode",
    "HeartbeatSender",
    "HttpGrid",  # noqa: F822 (module __getattr__)
    "Node",
    "PullAppMessagesRequest",
    "PullTaskInputRequest",
    "Run",
    "RuntimeHttpClient",
    "RuntimeTokenHttpInterceptor",
    "RuntimeVersionHttpInterceptor",
    "SubStatus",
    "SuperExecAuthHttpInterceptor",
    "TaskIdentity",
    "TaskType",
    "aggregate_arrayrecords",
    "clip_inputs_inplace",
    "context_from_proto",
    "flower_superlink",  # noqa: F822 (module __getattr__)
    "get_norm",
    "make_confirm_message_received_fn_protobuf",
    "make_pull_object_fn_protobuf",
    "make_simple_http_retry_invoker",
    "make_task_heartbeat_fn_http",
    "pull_and_inflate_object_from_tree",
    "push_message",
    "push_task_output",
    "run_from_proto",
    "select_multikrum",
    "set_message_id",
    "sql_mixin",  # noqa: F822 (module __getattr__)
    "trim_mean",
]


def __getattr__(name: str) -> Any:
    """``sql_mixin``, ``flower_superlink`` and ``HttpGrid``, imported on first use: SQLAlchemy's import
    costs seconds on a busy host, and only ``python -m stamen.server.superlink`` needs them; only a
    deployed ServerApp's handshake needs ``HttpGrid``."""
    if name == "HttpGrid":
        from flwr.superlink.grid.http_grid import HttpGrid  # which grid reaches real SuperNodes (sites.py): not public

        return HttpGrid
    if name == "sql_mixin":
        from flwr.supercore import sql_mixin  # SQLite pragmas of Flower's state (superlink.py): no option for them

        return sql_mixin
    if name == "flower_superlink":
        from flwr.superlink.cli import flower_superlink  # flower-superlink run in-process after that: no public API

        return flower_superlink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
