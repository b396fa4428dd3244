"""The site daemon's task executor: every ClientApp task of the node runs in one warm process.

A SuperNode started with ``--isolation process`` queues each instruction from the server as
a task on its Runtime API (loopback only) and waits for an executor to claim it. Flower's
own executor (``flower-superexec``, what ``--isolation subprocess`` starts) polls for tasks
every second and starts a new ``flwr-clientapp`` process per message: Python start, flwr
and torch imports, FAB install, data load — every round, on every site. This executor
claims the tasks itself with a short poll and runs stamen's ClientApp in this process, so
torch, the model object and the site's data stay loaded between rounds. It speaks the
Runtime API with Flower's own client and the same helpers ``flwr-clientapp`` uses
(``pull_task_input``, ``push_message``, ``push_task_output``): to the SuperNode it is just
another executor.

It runs the ClientApp *installed on the site* (``client.app:app``), never code shipped in
the run's FAB: a task whose FAB is not this stamen's (id and version) is answered with an
error. Reloading Python modules in a live process is not reliable, and a site that keeps
its data private should not execute whatever code a server sends it.

Nothing that must survive lives only here: the privacy ledger and every other piece of
site state are in the site's state store, written atomically before a reply leaves. If
this process dies, the SuperNode sees the task's heartbeat stop and answers the server
with an error; what is lost are warm caches.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version

import httpx
from flwr.app import Context, Error, Message

from stamen.common.flwr_internal import (
    AcquireTaskRequest,
    ErrorCode,
    HeartbeatSender,
    Node,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    Run,
    RuntimeHttpClient,
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SubStatus,
    SuperExecAuthHttpInterceptor,
    TaskIdentity,
    TaskType,
    context_from_proto,
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
    make_simple_http_retry_invoker,
    make_task_heartbeat_fn_http,
    pull_and_inflate_object_from_tree,
    push_message,
    push_task_output,
    run_from_proto,
    set_message_id,
)

log = logging.getLogger("stamen.node")

#: The FAB id (``publisher/name`` in pyproject.toml) whose tasks this executor runs.
FAB_ID = "stamen/stamen"
#: Runtime API call that claims a task; the SuperNode checks its HMAC with the node's secret.
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
#: How long one task keeps retrying its calls to the SuperNode: a dead SuperNode ends the task, not the daemon.
TASK_RETRY_SECONDS = 20.0
#: First and longest wait before asking again for an object the SuperNode is still downloading.
OBJECT_RETRY_SECONDS = (0.02, 0.5)


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run]:
    """The task's message, context and run, as Flower's ``pull_task_input`` fetches them.

    Written here for one reason: the SuperNode offers the task before it has downloaded
    the message's objects from the SuperLink, and Flower's helper waits a full second
    (its initial back-off) after the first object that is not there yet, on every round.
    This one asks again after 20 ms, doubling to at most 0.5 s.
    """
    res = client.PullTaskInput(PullTaskInputRequest())
    # as Flower 1.42's helper: a Message the ClientApp creates (not a reply) is stamped with this task's identity
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run = context_from_proto(res.context), run_from_proto(res.run)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode offered a task without a message")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=OBJECT_RETRY_SECONDS[0],
        backoff_cap=OBJECT_RETRY_SECONDS[1],
    )
    set_message_id(message, tree.object_id)  # the deflated message does not carry its own id
    return message, context, run


@dataclass
class TaskResult:
    """What happened to one claimed task (for the log and the tests)."""

    message_type: str
    seconds: float
    ok: bool
    detail: str = ""


def _client(
    address: str, *interceptors: object, tries: int | None = None, seconds: float | None = None
) -> RuntimeHttpClient:
    retry = make_simple_http_retry_invoker()
    retry.max_tries = tries
    retry.max_time = seconds
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the Runtime API listens on loopback only (see client/node.py)
        root_certificates=None,
        interceptors=list(interceptors),
        retry_invoker=retry,
    )


class WarmExecutor:
    """Claims this node's ClientApp tasks from its SuperNode and runs them in-process."""

    def __init__(self, runtime_address: str, secret: bytes | None, torch_threads: int = 0) -> None:
        self.address = runtime_address
        self._threads = torch_threads
        interceptors: list[object] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if secret:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_METHOD}))
        self._control = _client(runtime_address, *interceptors, tries=1)  # a dead SuperNode must not stall us
        self._app = None
        self._version = version("stamen")

    def close(self) -> None:
        self._control.close()

    def poll_once(self) -> TaskResult | None:
        """Claim one pending task and run it; None if there was none."""
        try:
            res = self._control.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
        except httpx.TransportError:
            return None  # the SuperNode's Runtime API is not up (yet, or any more): the supervisor decides
        if not (res.HasField("task") and res.token):
            return None
        return self.run_task(res.token)

    def run_task(self, token: str) -> TaskResult:
        """Run one task as ``flwr-clientapp`` would, but in this process."""
        claimed = time.time()
        client = _client(
            self.address,
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
            seconds=TASK_RETRY_SECONDS,
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        marks = [time.monotonic()]
        context: Context | None = None
        status, detail, kind, waited, group = SubStatus.FAILED, "task failed before its message was read", "?", 0.0, "-"
        try:
            message, context, run = pull_task_input(client)
            marks.append(time.monotonic())
            kind, group = message.metadata.message_type, message.metadata.group_id or "-"
            # Server creates the instruction -> this executor claims it: the server's upload, the SuperLink
            # queue, the SuperNode's idle poll (a fixed 3 s sleep in Flower) and its download, our poll.
            waited = claimed - message.metadata.created_at
            created = datetime.fromtimestamp(message.metadata.created_at, UTC).isoformat(timespec="milliseconds")
            log.info("%s task (round %s): created by the server at %s, claimed %.3fs later", kind, group, created,
                     waited)  # fmt: skip
            reply, detail = self._execute(message, context, run.fab_id, run.fab_version)
            marks.append(time.monotonic())
            push_message(client, reply, context)
            marks.append(time.monotonic())
            if not reply.has_error():
                status, detail = SubStatus.COMPLETED, ""
        except Exception as exc:  # any failure of one task must not end the daemon
            detail = f"{type(exc).__name__}: {exc}"
            log.exception("task failed")
        finally:
            push_task_output(client=client, context=context, sub_status=status, details=detail)
            heartbeat.stop()
            client.close()
        seconds = time.monotonic() - marks[0]
        steps = [b - a for a, b in itertools.pairwise(marks)] + [0.0] * (4 - len(marks))
        log.info(
            "%s task (round %s) %s in %.2fs: claimed %.2fs after the server created it; input pulled in %.2fs, "
            "ClientApp %.2fs, reply pushed in %.2fs%s",
            kind, group, "done" if status == SubStatus.COMPLETED else "FAILED", seconds, waited, *steps,
            f"; {detail}" if detail else "",
        )  # fmt: skip
        return TaskResult(kind, seconds, status == SubStatus.COMPLETED, detail)

    def _execute(self, message: Message, context: Context, fab_id: str, fab_version: str) -> tuple[Message, str]:
        """The reply to ``message``: the ClientApp's, or an error reply saying why not."""
        if fab_id != FAB_ID or fab_version != self._version:
            why = (
                f"this site runs the installed stamen {self._version} ClientApp; the run's app is "
                f"{fab_id} {fab_version} (start the run from the same stamen version)"
            )
            return Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=why), reply_to=message), why
        if self._app is None:
            import torch

            from stamen.client.app import app  # torch and the model code: imported once, on the first task

            if self._threads:
                torch.set_num_threads(self._threads)
            self._app = app
        try:
            return self._app(message=message, context=context), ""
        except Exception as exc:  # as flwr-clientapp: the server gets an error reply
            why = f"{type(exc).__name__}: {exc}"
            log.exception("ClientApp raised")
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=why), reply_to=message), why
