"""The instruction schema: which version of the server-to-site message a server speaks.

Every instruction's ``config`` record carries the server's instruction schema version
and the reply schema version it will accept. A site compares both with its own before it
does anything, and refuses a mismatch with a message naming both versions (the server
then logs the site's error reply; a reply in another reply schema is rejected by
:func:`common.reply.screen_reply` with reason ``schema``). So a server and a site of
incompatible stamen versions fail loudly at the identity handshake, never by silently
misreading each other's fields.
"""

from __future__ import annotations

from typing import Any

from stamen.common.errors import ConfigError
from stamen.common.reply import REPLY_SCHEMA_VERSION

INSTRUCTION_SCHEMA_VERSION = 1
INSTRUCTION_SCHEMA_KEY = "instruction-schema"
REPLY_SCHEMA_KEY = "reply-schema"


def schema_header() -> dict[str, int]:
    """The keys a server adds to every instruction's config record."""
    return {INSTRUCTION_SCHEMA_KEY: INSTRUCTION_SCHEMA_VERSION, REPLY_SCHEMA_KEY: REPLY_SCHEMA_VERSION}


def check_schema_header(raw: dict[str, Any]) -> None:
    """Pop the schema keys from an instruction's config; ConfigError if this site cannot serve it."""
    instruction = raw.pop(INSTRUCTION_SCHEMA_KEY, None)
    reply = raw.pop(REPLY_SCHEMA_KEY, None)
    if instruction != INSTRUCTION_SCHEMA_VERSION or reply != REPLY_SCHEMA_VERSION:
        raise ConfigError(
            f"schema mismatch: the server speaks instruction schema {instruction!r} and accepts reply schema "
            f"{reply!r}; this site speaks instruction schema {INSTRUCTION_SCHEMA_VERSION} and reply schema "
            f"{REPLY_SCHEMA_VERSION}: run matching stamen versions on the server and the sites"
        )
