"""The Prometheus exporter: names, the per-site cap and aggregate-only mode, and the endpoint
itself (plain and TLS, on loopback)."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from stamen.cli.main import app
from stamen.common.config import StamenConfig
from stamen.common.errors import ConfigError
from stamen.server.exporter import OTHER, Exporter, metrics_url


def _exporter(**changes: object) -> Exporter:
    return Exporter(StamenConfig.from_mapping({"dp": True, "noise-multiplier": 1.0, **changes}))


def _value(ex: Exporter, name: str, **labels: str) -> float | None:
    return ex.registry.get_sample_value(name, labels or None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_every_series_follows_prometheus_naming() -> None:
    ex = _exporter()
    ex.set_sites("stamen_site_label_psi", {"site-0000": 0.1})
    ex.count_site_detections({"site-0000": False})
    for family in ex.registry.collect():
        assert family.name.startswith("stamen_"), family.name
        for sample in family.samples:
            if family.type == "counter" and not sample.name.endswith("_created"):
                assert sample.name.endswith("_total"), sample.name
            if family.type == "histogram":
                assert family.name.endswith("_seconds"), family.name


def test_sites_past_the_cap_fold_into_other_with_their_worst_value() -> None:
    ex = _exporter(**{"metrics-max-sites": 2})
    ex.set_sites("stamen_site_label_psi", {"site-a": 0.1, "site-b": 0.2, "site-c": 0.7, "site-d": 0.4})
    ex.set_sites("stamen_site_epsilon_budget_remaining", {"site-a": 5.0, "site-c": 3.0, "site-d": 1.0})
    ex.count_site_detections({"site-a": True, "site-c": True, "site-d": True})
    assert _value(ex, "stamen_site_label_psi", site="site-a") == 0.1
    assert _value(ex, "stamen_site_label_psi", site=OTHER) == 0.7  # max of c and d
    assert _value(ex, "stamen_site_epsilon_budget_remaining", site=OTHER) == 1.0  # min of c and d
    assert _value(ex, "stamen_site_concept_drift_detections_total", site=OTHER) == 2.0  # counters add up
    assert _value(ex, "stamen_site_label_psi", site="site-c") is None
    assert _value(ex, "stamen_metrics_sites_folded") == 2.0
    # the first sites seen keep their own series for the whole run
    ex.set_sites("stamen_site_label_psi", {"site-b": 0.05, "site-e": 0.3})
    assert _value(ex, "stamen_site_label_psi", site="site-b") == 0.05
    assert _value(ex, "stamen_metrics_sites_folded") == 3.0


def test_aggregate_only_mode_exports_no_site_label_at_all() -> None:
    ex = _exporter(**{"metrics-per-site": False})
    ex.set_sites("stamen_site_label_psi", {"site-a": 0.5})
    ex.set_sites("stamen_site_epsilon", {"site-a": 1.5})
    ex.count_site_detections({"site-a": True})
    ex.set_gauge("stamen_label_psi_max", 0.5)
    samples = [s for family in ex.registry.collect() for s in family.samples]
    assert not [s for s in samples if "site" in s.labels]
    assert _value(ex, "stamen_label_psi_max") == 0.5


def test_gauges_without_a_value_are_not_exported_as_zero() -> None:
    ex = Exporter(StamenConfig.from_mapping({}))
    names = {family.name for family in ex.registry.collect()}
    assert "stamen_train_loss" not in names and "stamen_epsilon_max" not in names
    assert "stamen_epsilon_budget" not in names, "no privacy series without DP"
    ex.set_gauge("stamen_train_loss", float("nan"))
    assert _value(ex, "stamen_train_loss") is None
    ex.set_gauge("stamen_train_loss", 0.3)
    assert _value(ex, "stamen_train_loss") == 0.3
    assert _value(ex, "stamen_sites_rejected_total", reason="schema") == 0.0  # counters start at 0


def test_endpoint_serves_the_registry_on_loopback() -> None:
    port = _free_port()
    ex = _exporter(**{"metrics-port": port})
    try:
        ex.set_gauge("stamen_label_psi_max", 0.25)
        url = metrics_url(ex_cfg := StamenConfig.from_mapping({"metrics-port": port}))
        assert url == f"http://127.0.0.1:{port}/metrics" and not ex_cfg["metrics-certfile"]
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(body)}
        assert families["stamen_label_psi_max"].samples[0].value == 0.25
        assert "stamen_round_duration_seconds" in families
    finally:
        ex.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_a_taken_port_is_a_clear_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            _exporter(**{"metrics-port": port})


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_endpoint_serves_tls_when_given_a_certificate(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    port = _free_port()
    cfg = {"metrics-port": port, "metrics-certfile": str(cert), "metrics-keyfile": str(key)}
    ex = _exporter(**cfg)
    try:
        url = metrics_url(StamenConfig.from_mapping(cfg))
        assert url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        body = urllib.request.urlopen(url, timeout=10, context=context).read().decode()
        assert "stamen_rounds_completed_total" in body
        with pytest.raises(OSError):  # a plain-HTTP client gets no metrics
            urllib.request.urlopen(url.replace("https", "http"), timeout=5)
    finally:
        ex.close()


def test_tls_needs_both_files_and_they_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="set together"):
        StamenConfig.from_mapping({"metrics-certfile": "cert.pem"})
    with pytest.raises(ConfigError, match="does not exist"):
        _exporter(
            **{
                "metrics-port": _free_port(),
                "metrics-certfile": str(tmp_path / "no.pem"),
                "metrics-keyfile": str(tmp_path / "no.key"),
            }
        )


def test_simulate_refuses_a_taken_metrics_port_before_starting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            app,
            [
                "simulate",
                "--out",
                str(tmp_path / "run"),
                "--no-progress",
                "--dataset",
                "digits",
                "--metrics-port",
                str(port),
            ],
        )
    assert result.exit_code == 2, result.output
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
