"""Site identity and sampling: stable ids, and a sampler a resumed run can continue exactly."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Context, Message, RecordDict
from typer.testing import CliRunner

from stamen.cli.main import app as cli_app
from stamen.client import app as client_app
from stamen.common.config import StamenConfig
from stamen.common.errors import ConfigError
from stamen.common.flwr_internal import set_message_id
from stamen.common.identity import (
    IDENTITY_KEY,
    SiteSampler,
    prove_identity,
    site_id_from_node_config,
    validate_site_id,
    verify_identity,
)
from stamen.common.instruction import schema_header
from stamen.server.observe import RoundObserver
from stamen.server.sites import SiteDirectory

SITES = [f"site-{i:04d}" for i in range(20)]


# --- site-id ---------------------------------------------------------------------------


def test_configured_site_id_is_used() -> None:
    assert site_id_from_node_config({"site-id": "hospital-7"}) == "hospital-7"


def test_configured_site_id_wins_over_partition_id() -> None:
    assert site_id_from_node_config({"site-id": "hospital-7", "partition-id": 3}) == "hospital-7"


def test_partition_id_gives_padded_site_id() -> None:
    assert site_id_from_node_config({"partition-id": 3, "num-partitions": 10}) == "site-0003"
    assert site_id_from_node_config({"partition-id": 12345}) == "site-12345"


def test_neither_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="site-id"):
        site_id_from_node_config({"num-partitions": 10})


@pytest.mark.parametrize(
    "bad",
    ["../x", "", "a b", "x" * 65, "a/b", ".hidden", "-leading-dash", "site\n", "site\x00", "sité"],
    ids=["traversal", "empty", "space", "65-chars", "slash", "dot-first", "dash-first", "newline", "nul", "non-ascii"],
)
def test_invalid_site_ids_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match="site-id"):
        validate_site_id(bad)
    with pytest.raises(ConfigError, match="site-id"):
        site_id_from_node_config({"site-id": bad})


@pytest.mark.parametrize("good", ["x" * 64, "A.b_c-1", "0", "site-0003"])
def test_valid_site_ids_pass_unchanged(good: str) -> None:
    assert validate_site_id(good) == good


def test_non_string_site_id_is_rejected() -> None:
    with pytest.raises(ConfigError):
        validate_site_id(7)  # type: ignore[arg-type]


# --- sampling ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "fraction", "minimum", "expected"),
    [
        (10, 1.0, 1, 10),
        (10, 0.3, 1, 3),
        (10, 0.25, 1, 3),  # ceil(2.5)
        (10, 0.01, 1, 1),  # ceil(0.1)
        (10, 0.1, 5, 5),  # the minimum wins
        (3, 0.1, 5, 3),  # ... capped at the pool
        (25, 0.28, 1, 7),  # 0.28 * 25 is 7.000000000000001 in floating point
        (100, 0.07, 1, 7),  # 0.07 * 100 is 7.000000000000001 too
        (1, 0.5, 1, 1),
    ],
)
def test_sample_size(n: int, fraction: float, minimum: int, expected: int) -> None:
    chosen = SiteSampler(0).sample([f"s{i:03d}" for i in range(n)], fraction, minimum)
    assert len(chosen) == expected


def test_sample_is_sorted_distinct_and_from_the_pool() -> None:
    sampler = SiteSampler(3)
    for _ in range(20):
        chosen = sampler.sample(SITES, 0.4)
        assert chosen == sorted(chosen)
        assert len(set(chosen)) == len(chosen) == 8
        assert set(chosen) <= set(SITES)


def test_empty_pool_gives_no_sites() -> None:
    assert SiteSampler(0).sample([], 0.5) == []


def _sequence(sampler: SiteSampler, rounds: int, pool: list[str] = SITES) -> list[list[str]]:
    """The sites picked over ``rounds`` rounds."""
    return [sampler.sample(pool, 0.3) for _ in range(rounds)]


def test_same_seed_same_sequence_other_seed_another() -> None:
    first = _sequence(SiteSampler(42), 10)
    assert _sequence(SiteSampler(42), 10) == first
    assert _sequence(SiteSampler(43), 10) != first
    assert len({tuple(s) for s in first}) > 1  # the sample changes from round to round


def test_input_order_and_duplicates_do_not_matter() -> None:
    shuffled = list(reversed(SITES)) + SITES[:5]
    assert _sequence(SiteSampler(7), 10, shuffled) == _sequence(SiteSampler(7), 10)


def test_state_dict_through_json_continues_the_same_sequence() -> None:
    uninterrupted = _sequence(SiteSampler(5), 12)

    before = SiteSampler(5)
    head = _sequence(before, 4)
    saved = json.loads(json.dumps(before.state_dict()))
    resumed = SiteSampler(999)  # the seed must not matter once the state is loaded
    resumed.load_state_dict(saved)

    assert head + _sequence(resumed, 8) == uninterrupted
    assert _sequence(before, 8) == uninterrupted[4:]  # saving does not disturb the running sampler


# --- site-id bound to the node key (server/sites.py) ------------------------------------


class _Nodes:
    """A grid whose nodes run the real ClientApp handshake (client/app.py ``query``) in-process."""

    def __init__(self, nodes: dict[int, Context]) -> None:
        self.nodes = nodes
        self.pushed: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return sorted(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            mid = f"m{len(self.pushed)}"
            self.pushed[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        out = []
        for mid in message_ids:
            msg = self.pushed[mid]
            set_message_id(msg, mid)
            out.append(client_app.query(msg, self.nodes[msg.metadata.dst_node_id]))
        return out


def _key(path: Path) -> Path:
    """A node key as deploy/tls/make-node-key.sh makes it: OpenSSH, ECDSA P-384, mode 600."""
    private = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)
    return path


@pytest.fixture
def federation(tmp_path: Path, serverapp_identity: None) -> Callable[..., Context]:
    """Make a node's Context: a site-id, a data file, a state dir and (optionally) a key."""
    data = tmp_path / "shard.npz"
    np.savez(data, x=np.zeros((8, 1, 8, 8), np.float32), y=np.arange(8) % 2)

    def node(node_id: int, site_id: str, key: Path | None) -> Context:
        config: dict[str, Any] = {"site-id": site_id, "data": f"npz:{data}", "state-dir": str(tmp_path / "state")}
        if key is not None:
            config[IDENTITY_KEY] = str(key)
        return Context(1, node_id, config, RecordDict(), {})

    return node


def _content() -> RecordDict:
    cfg = StamenConfig.from_mapping({"dataset": "digits", "dp": False})
    config = {**schema_header(), **cfg.as_dict(), "server-round": 0, "model-name": "mlp"}
    return RecordDict({"config": ConfigRecord({**config, "model-input-shape": [1, 8, 8], "model-num-classes": 2})})


def _directory(grid: _Nodes, tmp_path: Path, *, require_proof: bool = True) -> SiteDirectory:
    return SiteDirectory(grid, _content, 5.0, 0.01, require_proof=require_proof, rebind_dir=tmp_path / "rebind")  # type: ignore[arg-type]


def test_the_first_key_binds_a_site_and_the_same_key_comes_back_after_a_resume(tmp_path: Path, federation: Any) -> None:
    key_a, key_b = _key(tmp_path / "a.key"), _key(tmp_path / "b.key")
    grid = _Nodes({1: federation(1, "site-a", key_a), 2: federation(2, "site-b", key_b)})
    directory = _directory(grid, tmp_path)
    assert directory.refresh() == {"site-a": 1, "site-b": 2}
    assert [e["event"] for e in directory.keys.events] == ["bind", "bind"]
    fingerprint = directory.keys.bound["site-a"]
    assert fingerprint.startswith("sha256:") and fingerprint != directory.keys.bound["site-b"]
    # The ServerApp resumes from its checkpoint; site-a's SuperNode restarted with a new node id, same key.
    saved = json.loads(json.dumps(directory.keys.state_dict()))
    grid = _Nodes({7: federation(7, "site-a", key_a), 2: federation(2, "site-b", key_b)})
    resumed = _directory(grid, tmp_path)
    resumed.keys.load_state_dict(saved)
    assert resumed.refresh() == {"site-a": 7, "site-b": 2}
    assert resumed.keys.bound["site-a"] == fingerprint and not resumed.take_refused()


def test_another_key_claiming_a_bound_site_is_refused_counted_and_logged(
    tmp_path: Path, federation: Any, caplog: pytest.LogCaptureFixture
) -> None:
    key_a, rogue = _key(tmp_path / "a.key"), _key(tmp_path / "rogue.key")
    grid = _Nodes({1: federation(1, "site-a", key_a)})
    directory = _directory(grid, tmp_path)
    assert directory.refresh() == {"site-a": 1}
    grid.nodes[9] = federation(9, "site-a", rogue)  # a registered node of another site, claiming site-a
    grid.nodes[10] = federation(10, "site-a", None)  # ... or claiming it with no proof at all
    with caplog.at_level("WARNING", logger="stamen.server"):
        assert directory.refresh() == {"site-a": 1}, "site-a keeps its own node"
        assert directory.refresh() == {"site-a": 1}
    assert "bound to key" in caplog.text and "without a key proof" in caplog.text
    refused = directory.take_refused()
    assert refused == {"identity": 2}, "each refused node is counted once"
    assert [e["event"] for e in directory.keys.events] == ["bind", "refused"]
    observer = RoundObserver(StamenConfig.from_mapping({"dataset": "digits"}))
    value = observer.exporter.registry.get_sample_value
    assert value("stamen_sites_refused_total", {"reason": "identity"}) == 0
    observer.count_refusals(refused)
    assert value("stamen_sites_refused_total", {"reason": "identity"}) == 2


def test_a_proof_for_another_nonce_does_not_verify(tmp_path: Path, federation: Any) -> None:
    key = _key(tmp_path / "a.key")
    proof = prove_identity(str(key), "site-a", 1, "nonce-1")
    assert verify_identity(proof, "site-a", 1, "nonce-1").startswith("sha256:")
    for site, run, nonce in (("site-a", 1, "nonce-2"), ("site-b", 1, "nonce-1"), ("site-a", 2, "nonce-1")):
        with pytest.raises(ValueError, match="does not verify"):
            verify_identity(proof, site, run, nonce)


def test_simulation_keeps_the_unsigned_handshake(tmp_path: Path, federation: Any) -> None:
    grid = _Nodes({1: federation(1, "site-0000", None), 2: federation(2, "site-0001", None)})
    directory = _directory(grid, tmp_path, require_proof=False)
    assert directory.refresh() == {"site-0000": 1, "site-0001": 2}
    assert directory.keys.bound == {} and not directory.take_refused()
    deployed = _directory(_Nodes({1: federation(1, "site-0000", None)}), tmp_path)
    assert deployed.refresh() == {} and deployed.take_refused() == {"identity": 1}


def test_the_rebind_command_lets_a_new_key_bind_and_is_recorded(tmp_path: Path, federation: Any) -> None:
    old, new = _key(tmp_path / "old.key"), _key(tmp_path / "new.key")
    grid = _Nodes({1: federation(1, "site-a", old)})
    directory = _directory(grid, tmp_path)
    directory.refresh()
    before = directory.keys.bound["site-a"]
    del grid.nodes[1]
    grid.nodes[2] = federation(2, "site-a", new)  # site-a rotated its key
    assert directory.refresh() == {} and directory.take_refused() == {"identity": 1}
    runner = CliRunner()
    res = runner.invoke(cli_app, ["rebind", "site-a", "--out-dir", str(tmp_path), "--reason", "key rotated"])
    assert res.exit_code == 0 and "rebind of site-a requested" in res.output, res.output
    assert directory.refresh() == {"site-a": 2}
    assert directory.keys.bound["site-a"] not in (None, before)
    events = directory.keys.events
    assert [e["event"] for e in events] == ["bind", "refused", "rebind", "bind"]
    assert events[2]["key"] == before and events[2]["request"]["reason"] == "key rotated"
    assert not list((tmp_path / "rebind").iterdir()), "the request is consumed"
    missing = runner.invoke(cli_app, ["rebind", "site-a", "--out-dir", str(tmp_path / "nope"), "--reason", "x"])
    assert missing.exit_code == 2 and "is not a directory" in " ".join(missing.output.split()), missing.output
    unexplained = runner.invoke(cli_app, ["rebind", "site-a", "--out-dir", str(tmp_path), "--reason", " "])
    assert unexplained.exit_code == 2 and "needs a --reason" in " ".join(unexplained.output.split()), unexplained.output
    assert not list((tmp_path / "rebind").iterdir()), "a refused request leaves nothing behind"
