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
from stamen.common.errors import ConfigError
from stamen.server.superlink import SuperLinkSettings, superlink_command

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


def _flag(args: list[str], name: str) -> str | None:
    """The value of ``--name=value`` in ``args`` (None if absent)."""
    return next((a.split("=", 1)[1].split()[0] for a in args if a.startswith(f"{name}=")), None)


def test_compose_exposes_only_the_fleet_api() -> None:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    superlink = services["superlink"]["command"]
    assert _flag(superlink, "--port") == "9093" and _flag(superlink, "--control-port") == "9091"
    assert _flag(superlink, "--control-host") is None, "Control must stay on loopback"
    published = [str(p) for p in services["superlink"]["ports"]]
    assert "9093:9093" in published and all(p.startswith("127.0.0.1:") for p in published if p != "9093:9093")
    assert not any("9091" in p for s in services.values() for p in map(str, s.get("ports", []))), "Control published"
    # Who talks to Control or ServerAppIo shares the superlink's network namespace and dials 127.0.0.1.
    for name in ("serverapp", "register", "prometheus", "grafana"):
        assert services[name]["network_mode"] == "service:superlink", name
    serverapp = services["serverapp"]["command"]
    assert _flag(serverapp, "--runtime-api-address") == "127.0.0.1:9091"
    assert 'address = "127.0.0.1:9091"' in services["register"]["command"][0]
    assert "superlink:9093" not in yaml.safe_dump({k: services[k] for k in ("serverapp", "register")})
    # Process isolation: the SuperExec proves itself with the secret the SuperLink holds.
    assert _flag(superlink, "--serverapp-isolation") == "process"
    secret = _flag(superlink, "--superexec-auth-secret-file")
    assert secret and _flag(serverapp, "--superexec-auth-secret-file") == secret
    assert any(v.endswith(f":{secret}:ro") for v in services["serverapp"]["volumes"])


def test_kubernetes_exposes_only_the_fleet_api_and_authenticates_the_superexec() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "stamen-server.yaml").read_text()))
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    containers = {c["name"]: c for pod in pods for c in pod["containers"]}
    superlink, superexec = containers["superlink"]["args"], containers["serverapp"]["args"]
    pod_of = {c["name"]: i for i, pod in enumerate(pods) for c in pod["containers"]}
    assert pod_of["superlink"] == pod_of["serverapp"], "the SuperExec must share the SuperLink's loopback"
    assert _flag(superlink, "--control-host") is None and _flag(superlink, "--control-port") == "9091"
    assert _flag(superexec, "--runtime-api-address") == "127.0.0.1:9091"
    assert _flag(superlink, "--serverapp-isolation") == "process"
    secret = _flag(superlink, "--superexec-auth-secret-file")
    assert secret and _flag(superexec, "--superexec-auth-secret-file") == secret
    for container in (containers["superlink"], containers["serverapp"]):
        assert any(secret.startswith(m["mountPath"]) for m in container["volumeMounts"]), container["name"]
    exposed = [p for d in docs if d["kind"] == "Service" for p in d["spec"]["ports"]]
    assert {p["name"] for p in exposed} == {"fleet", "metrics"}
    assert [c["containerPort"] for c in containers["superlink"]["ports"]] == [9093]


def test_stamen_superlink_binds_flower_to_loopback_and_refuses_an_open_control_api(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(DEPLOY / "tls" / "make-dev-ca.sh"), str(certs)], check=True, capture_output=True)
    settings = SuperLinkSettings(tmp_path / "link.db", certs, host="0.0.0.0", port=9093, control_port=9091)
    cmd = superlink_command(settings)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "9091"
    assert "0.0.0.0" not in cmd
    for bad, match in (
        ({"control_host": "0.0.0.0"}, "no authentication"),
        ({"control_port": 9093}, "own port"),
        ({"isolation": "process"}, "--superexec-auth-secret-file"),
    ):
        with pytest.raises(ConfigError, match=match):
            superlink_command(SuperLinkSettings(tmp_path / "link.db", certs, **bad))  # type: ignore[arg-type]
    secret = tmp_path / "superexec.secret"
    secret.write_bytes(b"s" * 32)
    secret.chmod(0o644)
    process = SuperLinkSettings(tmp_path / "link.db", certs, isolation="process", superexec_secret=secret)
    with pytest.raises(ConfigError, match="SuperExec secret"):
        superlink_command(process)
    secret.chmod(0o600)
    cmd = superlink_command(process)
    assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == str(secret)


def test_the_fleet_proxy_forwards_only_the_fleet_api() -> None:
    from starlette.testclient import TestClient

    from stamen.server.fleet_proxy import create_proxy
    from stamen.simulations.bench.loopback import free_port

    closed = free_port()  # nobody listens: a forwarded call answers 503, a refused one never tries
    with TestClient(create_proxy(f"http://127.0.0.1:{closed}", False)) as proxy:
        sneaky = ("/v1/fleet/%2e%2e/control/start-run", "/v1/fleet/..%2fcontrol/start-run")  # dot segments, encoded
        for path in (
            "/v1/control/register-node",
            "/v1/control/start-run",
            "/v1/runtime/pull-task-input",
            "/docs",
            *sneaky,
        ):
            res = proxy.post(path, content=b"x")
            assert res.status_code == 404 and "only the Fleet API" in res.text, path
        assert proxy.get("/v1/fleet/pull-messages").status_code == 404, "Fleet calls are POSTs"
        res = proxy.post("/v1/fleet/pull-messages", content=b"x")
        assert res.status_code == 503 and "SuperLink unavailable" in res.text


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_kubernetes_sites_keep_their_state_on_a_volume_each_and_are_probed() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "stamen-sites.yaml").read_text()))
    server = list(yaml.safe_load_all((DEPLOY / "k8s" / "stamen-server.yaml").read_text()))
    (sites,) = [d for d in docs if d["kind"] == "StatefulSet"]
    pod = sites["spec"]["template"]["spec"]
    (node,) = pod["containers"]
    env = _env(node)
    # Every STAMEN_ setting is an option of `stamen node`; the site id is the pod's stable name.
    options = {m.envvar for h in get_type_hints(deploy_cli.node, include_extras=True).values()
               for m in getattr(h, "__metadata__", ()) if getattr(m, "envvar", None)}  # fmt: skip
    assert {k for k in env if k.startswith("STAMEN_")} <= options
    assert env["STAMEN_SITE_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert float(env["STAMEN_EPSILON_BUDGET"]) > 0, "a site's own budget: a real node requires DP"
    # It dials the SuperLink's Service on the Fleet port, with the federation CA (TLS).
    link = next(d for d in server if d["kind"] == "Service" and d["metadata"]["name"] == "superlink")
    fleet = next(p["port"] for p in link["spec"]["ports"] if p["name"] == "fleet")
    assert env["STAMEN_SUPERLINK"] == f"superlink:{fleet}" and "STAMEN_INSECURE" not in env
    mounts = {m["mountPath"]: m for c in [node, *pod.get("initContainers", [])] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    def volume_of(path: str) -> str:
        root = max((m for m in mounts if path.startswith(m + "/")), key=len)
        return mounts[root]["name"]

    assert "secret" in volumes[volume_of(env["STAMEN_ROOT_CERTIFICATES"])]
    # The state store is on the pod's own persistent volume (a claim template), not in the pod.
    claims = {t["metadata"]["name"] for t in sites["spec"]["volumeClaimTemplates"]}
    assert volume_of(env["STAMEN_STATE_DIR"]) in claims and volume_of(env["FLWR_HOME"]) in claims
    # The node key comes from a Secret: copied, mode 600, into memory by the init container.
    (init,) = pod["initContainers"]
    key_volume = volumes[volume_of(env["STAMEN_AUTH_KEY"])]
    assert key_volume["emptyDir"]["medium"] == "Memory"
    script = " ".join(init["args"])
    assert "install -m 600 " in script and env["STAMEN_AUTH_KEY"] in script
    assert f"install -d -m 700 {env['STAMEN_STATE_DIR']}" in script
    assert any("secret" in volumes[m["name"]] for m in init["volumeMounts"])
    # Probes ask Flower's gRPC health service on the port stamen node opens for it.
    health = int(env["STAMEN_HEALTH_PORT"])
    assert env["STAMEN_HEALTH_HOST"] == "0.0.0.0", "a kubelet reaches the pod's address, not its loopback"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert node[probe]["grpc"]["port"] == health, probe
    assert node["resources"]["requests"]["cpu"] and node["resources"]["requests"]["memory"]
    assert all(c["resources"]["requests"] for c in pod["initContainers"])


def test_kubernetes_metrics_service_carries_prometheus_scrape_annotations() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "stamen-server.yaml").read_text()))
    (metrics,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "serverapp-metrics"]
    notes = metrics["metadata"]["annotations"]
    port = next(p for p in metrics["spec"]["ports"] if p["name"] == "metrics")
    assert notes["prometheus.io/scrape"] == "true" and int(notes["prometheus.io/port"]) == port["port"]
    assert notes["prometheus.io/path"] == "/metrics"
    (superlink,) = [d for d in docs if d["kind"] == "StatefulSet"]
    link = next(c for c in superlink["spec"]["template"]["spec"]["containers"] if c["name"] == "superlink")
    assert link["readinessProbe"]["tcpSocket"]["port"] == link["livenessProbe"]["tcpSocket"]["port"] == "fleet"
