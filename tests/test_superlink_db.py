"""``stamen superlink`` gives SQLite a busy timeout that outlasts a busy host (issue 17, finding 4).

Flower 1.42 waits 5 s for SQLite's write lock and answers a longer wait with HTTP 500,
which its clients do not retry (tests/test_load.py has the 10-node run that lost replies).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stamen.common.errors import ConfigError
from stamen.server.superlink import BUSY_TIMEOUT_FLAG, DEFAULT_BUSY_TIMEOUT, SuperLinkSettings, superlink_command

PROBE = """
import sys
from sqlalchemy import text
from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
from flwr.supercore.object_store.sql_object_store import SqlObjectStore
from stamen.server.superlink import set_sqlite_busy_timeout
if sys.argv[2] == "set":
    set_sqlite_busy_timeout(42.5)
store = SqlObjectStore(sys.argv[1])
store.initialize()
with store.session() as session:
    print(session.execute(text("PRAGMA busy_timeout")).scalar(), session.execute(text("PRAGMA journal_mode")).scalar())
"""


def _pragmas(db: Path, mode: str) -> list[str]:
    res = subprocess.run([sys.executable, "-c", PROBE, str(db), mode], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_the_superlink_command_sets_the_database_busy_timeout(tmp_path: Path) -> None:
    cmd = superlink_command(SuperLinkSettings(tmp_path / "link.db", insecure=True, node_auth=False))
    assert cmd[:3] == [sys.executable, "-m", "stamen.server.superlink"]
    assert cmd[cmd.index(BUSY_TIMEOUT_FLAG) + 1] == str(DEFAULT_BUSY_TIMEOUT)
    assert cmd[cmd.index("--database") + 1] == str(tmp_path / "link.db")
    with pytest.raises(ConfigError, match=BUSY_TIMEOUT_FLAG):
        superlink_command(SuperLinkSettings(tmp_path / "link.db", insecure=True, node_auth=False, busy_timeout=0))


def test_flower_connections_get_the_longer_busy_timeout(tmp_path: Path) -> None:
    assert _pragmas(tmp_path / "plain.db", "keep") == ["5000", "wal"]  # Flower's own: what lost replies
    assert _pragmas(tmp_path / "set.db", "set") == ["42500", "wal"]
