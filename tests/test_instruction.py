"""Servers and sites check each other's schema versions and refuse a mismatch by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from stamen.client.app import query
from stamen.common.instruction import INSTRUCTION_SCHEMA_VERSION, schema_header
from stamen.common.reply import REPLY_SCHEMA_VERSION, RejectedReply, screen_reply


def _handshake(instruction: Callable[..., Message], header: dict[str, Any]) -> Message:
    msg = instruction(message_type=MessageType.QUERY)
    msg.content = RecordDict({"config": ConfigRecord({"dataset": "digits", "min-partition-size": 10, **header})})
    context = Context(1, 11, {"partition-id": 0, "num-partitions": 3}, RecordDict(), {})
    return query(msg, context)


def test_a_site_answers_a_server_of_its_own_schema(instruction: Callable[..., Message]) -> None:
    reply = screen_reply(_handshake(instruction, schema_header()), "query", expected_site=None)
    assert reply.site_id == "site-0000" and reply.metrics["num-examples"] > 0


@pytest.mark.parametrize(
    "header",
    [
        {},
        {**schema_header(), "instruction-schema": INSTRUCTION_SCHEMA_VERSION + 1},
        {**schema_header(), "reply-schema": REPLY_SCHEMA_VERSION + 1},
    ],
    ids=["no-schema", "newer-instructions", "newer-replies"],
)
def test_a_site_refuses_another_schema_and_the_server_sees_why(
    instruction: Callable[..., Message], header: dict[str, Any]
) -> None:
    with pytest.raises(RejectedReply) as err:
        screen_reply(_handshake(instruction, header), "query", expected_site=None)
    assert err.value.reason == "client_error"
    assert "schema mismatch" in err.value.detail
    assert f"this site speaks instruction schema {INSTRUCTION_SCHEMA_VERSION}" in err.value.detail
