"""Operational hygiene: the metrics endpoint stays on loopback unless told otherwise, a
TLS private key's content never reaches logs or run files (only its path does), and only
stamen.common.flwr_internal imports Flower's non-public modules."""

from __future__ import annotations

import ast
import importlib
import socket
from pathlib import Path

import pytest
from conftest import run_stamen_simulate
from test_exporter import _free_port, _self_signed

from stamen.common.config import StamenConfig
from stamen.server.exporter import Exporter


def test_metrics_endpoint_is_loopback_only_by_default() -> None:
    cfg = StamenConfig.from_mapping({"metrics-port": _free_port()})
    assert cfg["metrics-host"] == "127.0.0.1"
    ex = Exporter(cfg)
    try:
        host, port = ex._server.server_address[:2]
        assert host == "127.0.0.1"
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        others = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
        for addr in others:
            if addr.startswith("127."):
                continue  # still loopback (e.g. 127.0.1.1)
            with pytest.raises(OSError):
                socket.create_connection((addr, port), timeout=2).close()
    finally:
        ex.close()


@pytest.mark.slow
def test_tls_key_content_never_reaches_the_run_directory_or_logs(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    secret_lines = [line for line in key.read_text().splitlines() if line and not line.startswith("-----")]
    out = tmp_path / "run"
    result = run_stamen_simulate(
        out,
        "--clients", "2", "--rounds", "1", "--dataset", "digits", "--metrics-port", str(_free_port()),
        "--set", f"metrics-certfile={cert}", "--set", f"metrics-keyfile={key}",
    )  # fmt: skip
    texts = {"stdout/stderr": result.stdout + result.stderr}
    texts.update({str(p): p.read_bytes().decode("utf-8", "replace") for p in out.rglob("*") if p.is_file()})
    assert (out / "summary.json").is_file() and str(key) in texts[str(out / "config.json")]  # the path is recorded
    leaks = [name for name, text in texts.items() for line in secret_lines if line in text]
    assert not leaks, f"private key material found in {sorted(set(leaks))}"


ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("server", "client", "common", "simulations", "stamen")
INTERNAL = ROOT / "common" / "flwr_internal.py"
#: Flower's public API: these modules, and from them only the names in their ``__all__``.
PUBLIC_FLWR = frozenset(
    {"flwr.app", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.clientapp", "flwr.clientapp.mod", "flwr.simulation"}
)


def _flwr_imports(tree: ast.AST) -> list[tuple[int, str, str | None]]:
    """(line, module, name) of every flwr import in ``tree``; name is None for ``import flwr.x``."""
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "flwr"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "flwr":
            found += [(node.lineno, node.module, a.name) for a in node.names]
    return found


def non_public_flwr_imports(source: str) -> list[str]:
    """The imports in ``source`` that reach past Flower's public API, as ``line: module.name``."""
    bad = []
    for line, module, name in _flwr_imports(ast.parse(source)):
        if module == "flwr" and name is not None:
            module, name = f"flwr.{name}", None  # ``from flwr import app`` imports the module flwr.app
        if module not in PUBLIC_FLWR or (name is not None and name not in importlib.import_module(module).__all__):
            bad.append(f"{line}: {module}{'.' + name if name else ''}")
    return bad


def test_the_hygiene_check_tells_public_from_non_public_flwr_imports() -> None:
    source = (
        "from flwr.app import Message, RecordDict\nfrom flwr.serverapp.strategy import FedAvg\nimport flwr.simulation\n"
        "from flwr.common.constant import ErrorCode\nfrom flwr.serverapp.strategy.multikrum import select_multikrum\n"
        "from flwr.app import remove_content_from_message\nimport flwr.supercore.run\nfrom flwr import proto\n"
        "def f():\n    from flwr.supercore.constant import TaskType\n"
    )
    assert non_public_flwr_imports(source) == [
        "4: flwr.common.constant.ErrorCode",
        "5: flwr.serverapp.strategy.multikrum.select_multikrum",
        "6: flwr.app.remove_content_from_message",
        "7: flwr.supercore.run",
        "8: flwr.proto",
        "10: flwr.supercore.constant.TaskType",
    ]


def test_only_flwr_internal_imports_non_public_flwr_modules() -> None:
    files = [p for d in PACKAGE_DIRS for p in sorted((ROOT / d).rglob("*.py")) if p != INTERNAL]
    assert len(files) > 50 and ROOT / "client" / "executor.py" in files
    bad = {str(p.relative_to(ROOT)): found for p in files if (found := non_public_flwr_imports(p.read_text()))}
    assert not bad, f"import these through stamen.common.flwr_internal (with the reason): {bad}"


def test_every_flwr_internal_import_is_non_public_and_says_why() -> None:
    """The module is the list of Flower internals to check on an upgrade: nothing public, nothing unexplained."""
    source = INTERNAL.read_text()
    lines = source.splitlines()
    imports = [i for i in _flwr_imports(ast.parse(source)) if i[1] != "flwr.app"]  # Message: a type hint
    assert len(imports) == len(non_public_flwr_imports(source)) > 0
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module != "flwr.app" and node.module.startswith("flwr."):
            for alias in node.names:
                assert "#" in lines[node.lineno - 1] + lines[alias.lineno - 1], f"{node.module}.{alias.name}: why?"
    exported = set(importlib.import_module("stamen.common.flwr_internal").__all__)
    assert {name for _, _, name in imports} <= exported
