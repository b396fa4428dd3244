"""deploy/ holds files Docker, Kubernetes and systemd would accept: checked with their linters.

Docker cannot run on these machines, so nothing here builds an image or starts a
container. What is checked: the Dockerfiles with hadolint, compose.yaml against the
Compose Specification's JSON schema (check-jsonschema's vendored copy) and against what
stamen needs from it, the Kubernetes manifests with kubernetes-validate (strict, offline
schemas), and the systemd unit with ``systemd-analyze verify``. A missing linter skips its
test locally and fails it in CI (``CI=true``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import get_type_hints

import pytest
import yaml
from conftest import required_tool

from stamen.cli import deploy as deploy_cli

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    return required_tool(name, "pip install -e '.[dev]' or the Debian package", path=str(BIN))


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("dockerfile", ["Dockerfile.server", "Dockerfile.client"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    res = _run([_tool("hadolint"), "--failure-threshold", "info", str(DEPLOY / "docker" / dockerfile)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_file_follows_the_compose_specification() -> None:
    res = _run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml")])
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_brings_up_a_secure_federation_with_monitoring() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    sites = sorted(s for s in services if s.startswith("site-"))
    assert {"superlink", "serverapp", "register", "prometheus", "grafana"} <= set(services)
    assert len(sites) >= 3
    assert "--insecure" not in yaml.safe_dump(services)
    superlink = services["superlink"]["command"]
    for flag in ("--database=", "--certificates="):
        assert any(a.startswith(flag) for a in superlink), flag
    for name, service in services.items():
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), name
    ids, states = set(), set()
    for name in sites:
        env, volumes = services[name]["environment"], services[name]["volumes"]
        ids.add(env["STAMEN_SITE_ID"])
        states.add(next(v.split(":")[0] for v in volumes if v.endswith(":/var/lib/stamen/state")))
        assert env["STAMEN_SUPERLINK"] == "superlink:9093" and env["STAMEN_AUTH_KEY"]
    assert len(ids) == len(states) == len(sites), "every site needs its own id and state directory"
    # Prometheus and Grafana use the observability files from deploy/ as they are.
    for name, target in (("prometheus", "/etc/prometheus"), ("grafana", "/etc/grafana/provisioning")):
        mounts = [v.split(":")[0] for v in services[name]["volumes"] if v.split(":")[1] == target]
        assert mounts, name
        assert (DEPLOY / mounts[0]).is_dir(), f"{mounts[0]} is missing (deploy/prometheus and deploy/grafana)"


def test_kubernetes_manifests_validate_strictly() -> None:
    for manifest in sorted((DEPLOY / "k8s").glob("*.yaml")):
        res = _run([_tool("kubernetes-validate"), "--strict", str(manifest)])
        assert res.returncode == 0 and "passed" in res.stdout + res.stderr, res.stdout + res.stderr


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    tool = _tool("systemd-analyze")
    unit = (DEPLOY / "systemd" / "stamen-node.service").read_text()
    assert "ExecStart=/opt/stamen/venv/bin/stamen node" in unit
    # The unit names its binary where a site installs it; point it at ours for the check.
    copy = tmp_path / "stamen-node.service"
    copy.write_text(
        unit.replace("/opt/stamen/venv/bin/stamen", str(BIN / "stamen")).replace(
            "EnvironmentFile=/etc/stamen/node.env", f"EnvironmentFile={DEPLOY / 'systemd' / 'stamen-node.env'}"
        )
    )
    res = _run([tool, "verify", str(copy)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_setting_of_the_environment_file_is_an_option_of_stamen_node() -> None:
    envvars = set()
    for hint in get_type_hints(deploy_cli.node, include_extras=True).values():
        for meta in getattr(hint, "__metadata__", ()):
            if getattr(meta, "envvar", None):
                envvars.add(meta.envvar)
    lines = (DEPLOY / "systemd" / "stamen-node.env").read_text().splitlines()
    settings = [ln.split("=", 1)[0] for ln in lines if ln.strip() and not ln.startswith("#")]
    stamen = [s for s in settings if s.startswith("STAMEN_")]
    assert stamen and set(stamen) <= envvars, set(stamen) - envvars
    assert {"STAMEN_SITE_ID", "STAMEN_SUPERLINK", "STAMEN_ROOT_CERTIFICATES", "STAMEN_AUTH_KEY"} <= set(stamen)
