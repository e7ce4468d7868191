"""docker-compose.yml and the files it mounts, checked without a Docker engine (there is none here).

Debian's `docker-compose config` must accept the file without warnings; every bind mount must exist; Grafana's
provisioning must sit where Grafana looks for it and point at the mounted dashboards; Prometheus must scrape the
gateway's service name and port; and the mounted gateway config must load and route a model to the Ollama service.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import load
from tests.harness import ROOT
from tests.observability.stack import (
    COMPOSE_FILE,
    DASHBOARD_FILES,
    GRAFANA_DASHBOARDS,
    GRAFANA_PROVISIONING,
    PROMETHEUS_CONFIG,
    load_dashboard,
    panels,
    require_tool,
)

GRAFANA_PROVISIONING_DIR = "/etc/grafana/provisioning"  # where the grafana/grafana image reads provisioning
PROMETHEUS_PORT = 9090  # what prom/prometheus listens on unless --web.listen-address says otherwise
OLLAMA_PORT = 11434


def compose_env() -> dict[str, str]:
    """The caller's environment without the variables the compose file reads, as on a fresh machine."""
    return {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "OLLAMA_URL"}


def docker_compose(*args: str) -> subprocess.CompletedProcess[str]:
    binary = require_tool("docker-compose", "docker-compose")
    return subprocess.run(
        [binary, "--file", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=compose_env(),
    )


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The compose file as docker-compose resolves it, with the optional `ollama` profile enabled."""
    result = docker_compose("--profile", "ollama", "config")
    assert result.returncode == 0, f"docker-compose config rejected the file:\n{result.stderr}"
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def service(resolved: dict[str, Any], name: str) -> dict[str, Any]:
    assert name in resolved["services"], f"no `{name}` service in docker-compose.yml"
    spec: dict[str, Any] = resolved["services"][name]
    return spec


def mounts(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, container path) of a service's volumes; sources of bind mounts are absolute host paths."""
    found = []
    for volume in spec.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        found.append((source, target))
    return found


def bind_target(spec: dict[str, Any], host_path: Path) -> str:
    """Where a service mounts `host_path`."""
    for source, target in mounts(spec):
        if Path(source) == host_path:
            return target
    raise AssertionError(f"{host_path.relative_to(ROOT)} is not mounted; mounts: {mounts(spec)}")


def bind_target_source(spec: dict[str, Any], container_path: str) -> Path:
    """The host file a service mounts at `container_path`."""
    for source, target in mounts(spec):
        if target == container_path:
            return Path(source)
    raise AssertionError(f"nothing is mounted at {container_path}; mounts: {mounts(spec)}")


def environment(spec: dict[str, Any]) -> dict[str, str]:
    env = spec.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def command_flags(spec: dict[str, Any]) -> dict[str, str]:
    command = spec.get("command") or []
    if isinstance(command, str):
        command = command.split()
    return dict(arg.split("=", 1) for arg in command if arg.startswith("--") and "=" in arg)


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_docker_compose_config_accepts_the_file_without_warnings() -> None:
    result = docker_compose("config", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", f"docker-compose config warned:\n{result.stderr}"

    # docker-compose v1 lists profiled services here too; test_ollama_is_optional checks the profile itself.
    with_ollama = docker_compose("--profile", "ollama", "config", "--services")
    assert sorted(with_ollama.stdout.split()) == ["gateway", "grafana", "ollama", "prometheus"]


def test_every_mounted_file_and_folder_exists(resolved: dict[str, Any]) -> None:
    named = set(resolved.get("volumes") or {})
    for name, spec in resolved["services"].items():
        for source, target in mounts(spec):
            assert PurePosixPath(target).is_absolute(), f"{name}: container path {target!r} is not absolute"
            if os.path.isabs(source):
                assert Path(source).exists(), f"{name} mounts {source}, which does not exist"
                assert Path(source).is_relative_to(ROOT), f"{name} mounts {source} from outside the repository"
            else:
                assert source in named, f"{name} uses volume {source!r}, not declared under volumes:"
    build = service(resolved, "gateway")["build"]
    context = Path(build["context"] if isinstance(build, dict) else build)
    assert (context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")).is_file()


def test_ollama_is_optional(resolved: dict[str, Any]) -> None:
    assert service(resolved, "ollama")["profiles"] == ["ollama"]
    for name in ("gateway", "prometheus", "grafana"):
        assert not service(resolved, name).get("profiles"), f"{name} must run without a profile"
        depends = service(resolved, name).get("depends_on") or {}
        assert "ollama" not in depends, f"{name} depends on the optional ollama service"


def test_grafana_provisioning_matches_grafanas_layout(resolved: dict[str, Any]) -> None:
    grafana = service(resolved, "grafana")
    env = environment(grafana)
    assert (env.get("GF_SECURITY_ADMIN_USER"), env.get("GF_SECURITY_ADMIN_PASSWORD")) == ("admin", "admin")
    assert bind_target(grafana, GRAFANA_PROVISIONING) == GRAFANA_PROVISIONING_DIR
    provisioning_dir = env.get("GF_PATHS_PROVISIONING", GRAFANA_PROVISIONING_DIR)
    assert provisioning_dir == GRAFANA_PROVISIONING_DIR
    # The mount hides the image's own folders, so keep every one Grafana reads (it logs errors for missing ones).
    for kind in ("datasources", "dashboards", "plugins", "alerting"):
        assert (GRAFANA_PROVISIONING / kind).is_dir(), f"grafana/provisioning/{kind} is missing"

    # Datasources: one Prometheus, at the compose service's name and port, with the uid the dashboards use.
    datasource_files = sorted((GRAFANA_PROVISIONING / "datasources").glob("*.y*ml"))
    assert datasource_files, "no grafana/provisioning/datasources/*.yml"
    datasources = [ds for path in datasource_files for ds in read_yaml(path)["datasources"]]
    prometheus = [ds for ds in datasources if ds["type"] == "prometheus"]
    assert len(prometheus) == 1, datasources
    url = urlsplit(prometheus[0]["url"])
    assert url.hostname in resolved["services"], f"datasource host {url.hostname} is not a compose service"
    assert url.hostname == "prometheus"
    listen = command_flags(service(resolved, "prometheus")).get("--web.listen-address", f":{PROMETHEUS_PORT}")
    assert url.port == int(listen.rsplit(":", 1)[1])
    scrape_interval = read_yaml(PROMETHEUS_CONFIG)["global"]["scrape_interval"]
    assert prometheus[0]["jsonData"]["timeInterval"] == scrape_interval, "$__rate_interval derives from it"
    uid = prometheus[0]["uid"]
    for path in DASHBOARD_FILES:
        for panel in panels(load_dashboard(path)):
            refs = [panel.get("datasource"), *(t.get("datasource") for t in panel.get("targets", []))]
            for ref in refs:
                if ref is not None:
                    assert ref == {"type": "prometheus", "uid": uid}, f"{path.name}: {panel['title']}: {ref}"

    # Dashboards: a file provider whose path is where compose mounts grafana/dashboards.
    provider_files = sorted((GRAFANA_PROVISIONING / "dashboards").glob("*.y*ml"))
    assert provider_files, "no grafana/provisioning/dashboards/*.yml"
    providers = [p for path in provider_files for p in read_yaml(path)["providers"]]
    assert [p["type"] for p in providers] == ["file"]
    dashboards_mount = bind_target(grafana, GRAFANA_DASHBOARDS)
    assert providers[0]["options"]["path"] == dashboards_mount
    assert not PurePosixPath(dashboards_mount).is_relative_to(GRAFANA_PROVISIONING_DIR)
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert PurePosixPath(home).parent == PurePosixPath(dashboards_mount)
        assert (GRAFANA_DASHBOARDS / PurePosixPath(home).name).is_file()
    for path in DASHBOARD_FILES:
        assert path.parent == GRAFANA_DASHBOARDS and path.is_file()


def test_prometheus_scrapes_the_gateway_service(resolved: dict[str, Any]) -> None:
    prometheus = service(resolved, "prometheus")
    config_path = command_flags(prometheus).get("--config.file", "/etc/prometheus/prometheus.yml")
    assert bind_target(prometheus, PROMETHEUS_CONFIG) == config_path

    gateway = service(resolved, "gateway")
    config = load(bind_target_source(gateway, environment(gateway)["CONFIG_PATH"]), environ=environment(gateway))
    scrape = read_yaml(PROMETHEUS_CONFIG)
    jobs = [job for job in scrape["scrape_configs"] if job.get("metrics_path", "/metrics") == "/metrics"]
    targets = [t for job in jobs for group in job.get("static_configs", []) for t in group["targets"]]
    assert f"gateway:{config.server.port}" in targets, targets
    assert "gateway" in resolved["services"]
    assert config.server.port == 8080

    promtool = require_tool("promtool", "prometheus")
    check = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_gateway_config_routes_a_model_to_ollama(resolved: dict[str, Any]) -> None:
    gateway = service(resolved, "gateway")
    env = environment(gateway)
    assert "CONFIG_PATH" in env, "the gateway service must point CONFIG_PATH at its mounted config"
    host_config = bind_target_source(gateway, env["CONFIG_PATH"])
    config = load(host_config, environ=env)

    ollama_routes = [
        route
        for route in config.models.values()
        if config.providers[route.provider].api_url == f"http://ollama:{OLLAMA_PORT}"
    ]
    assert ollama_routes, f"no model of {host_config.name} routes to http://ollama:{OLLAMA_PORT}"
    assert all(config.providers[route.provider].type == "ollama" for route in ollama_routes)
    assert "ollama" in resolved["services"]
    assert config.models["dummy"].provider == "dummy"

    # The published ports are the ones the config listens on.
    published = {int(port["target"]) for port in gateway.get("ports", [])}
    assert published == {config.server.port, config.server.grpc_port}
