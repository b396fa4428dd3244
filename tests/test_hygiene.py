"""Operational hygiene: the metrics endpoint stays on loopback unless told otherwise, and a
TLS private key's content never reaches logs or run files (only its path does)."""

from __future__ import annotations

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
