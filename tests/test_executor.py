"""The warm executor runs only the ClientApp installed on the site, and turns a raising
ClientApp into an error reply instead of dying (the e2e deployment test runs it for real)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib.metadata import version

import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from stamen.client.executor import FAB_ID, WarmExecutor
from stamen.common.flwr_internal import ErrorCode


@pytest.fixture
def executor() -> Iterator[WarmExecutor]:
    ex = WarmExecutor("127.0.0.1:1", secret=b"x" * 32)  # no call reaches the address in these tests
    yield ex
    ex.close()


def _context() -> Context:
    return Context(run_id=1, node_id=11, node_config={"site-id": "site-a"}, state=RecordDict(), run_config={})


def test_a_foreign_app_is_refused(executor: WarmExecutor, instruction: Callable[..., Message]) -> None:
    msg = instruction(11, MessageType.TRAIN)
    reply, why = executor._execute(msg, _context(), "someone/else", "9.9.9")
    assert reply.has_error() and reply.error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION
    assert "someone/else" in why and version("stamen") in why
    reply, _ = executor._execute(msg, _context(), FAB_ID, "0.0.0-other")
    assert reply.has_error()


def test_a_raising_client_app_becomes_an_error_reply(
    executor: WarmExecutor, instruction: Callable[..., Message]
) -> None:
    def broken(message: Message, context: Context) -> Message:
        raise RuntimeError("disk full")

    executor._app = broken  # the installed app, stood in for
    reply, why = executor._execute(instruction(11, MessageType.TRAIN), _context(), FAB_ID, version("stamen"))
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "disk full" in why
