"""The Dockerfile, checked without a Docker engine.

Static checks cover what the image must be: multi-stage on a slim Python, non-root, the `llm-gateway` entry point,
a HEALTHCHECK on /healthz without curl, both ports exposed. Then the builder stage is replayed on the host: the
files it copies are copied into a scratch context, the wheel is built from them the way the image builds it, and
the gateway is run from that wheel alone and probed with the image's own HEALTHCHECK command.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gateway.config import ServerConfig
from tests.harness import ROOT, GatewayProcess
from tests.observability.stack import DOCKERFILE, DOCKERIGNORE

PACKAGE_DIRS = {
    "gateway": "gateway",
    "service": "service",
    "rest_facade": "rest_facade",
    "gen/llm_gateway": "llm_gateway",
}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form instruction (CMD, ENTRYPOINT, HEALTHCHECK ... CMD)."""
        start = self.args.index("[")
        value: list[str] = json.loads(self.args[start:])
        return value


@dataclass(frozen=True)
class Stage:
    base: str
    name: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        instruction = Instruction(keyword.upper(), rest.strip())
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            base = words[0]
            for name, value in args.items():
                base = base.replace(f"${{{name}}}", value).replace(f"${name}", value)
            stages.append(Stage(base, words[2] if len(words) > 2 and words[1].upper() == "AS" else "", []))
        elif not stages:
            if instruction.keyword == "ARG" and "=" in instruction.args:
                name, value = instruction.args.split("=", 1)
                args[name] = value
        else:
            stages[-1].instructions.append(instruction)
    return args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))[1]


def copy_sources(stage: Stage) -> list[str]:
    """What a stage copies from the build context (not from other stages)."""
    sources: list[str] = []
    for copy in stage.all("COPY"):
        words = [w for w in shlex.split(copy.args) if not w.startswith("--")]
        if any(w.startswith("--from") for w in shlex.split(copy.args)):
            continue
        sources += words[:-1]
    return sources


def test_multi_stage_build_on_slim_python(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "the Dockerfile must be multi-stage"
    for stage in stages:
        assert stage.base == "python:3.11-slim", f"stage {stage.name} is based on {stage.base}"
    builder, runtime = stages[0], stages[-1]
    assert builder.name, "the builder stage needs a name to copy from"
    copied = [c for c in runtime.all("COPY") if f"--from={builder.name}" in c.args]
    assert copied, "the runtime stage must copy the built environment from the builder"
    assert not any("pip" in run.args for run in runtime.all("RUN")), "the runtime stage must not install packages"


def test_runs_as_a_non_root_user_with_the_llm_gateway_entry_point(stages: list[Stage]) -> None:
    runtime = stages[-1]
    user = runtime.last("USER").args.split(":")[0]
    assert user not in ("root", "0", ""), f"the image runs as {user!r}"
    assert any(user in run.args and ("useradd" in run.args or "adduser" in run.args) for run in runtime.all("RUN"))
    position = {i.keyword: n for n, i in enumerate(runtime.instructions)}
    assert position["USER"] < position["ENTRYPOINT"]

    assert runtime.last("ENTRYPOINT").exec_form() == ["llm-gateway"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "llm-gateway" in scripts


def test_exposes_the_rest_and_grpc_ports(stages: list[Stage]) -> None:
    exposed = {port for expose in stages[-1].all("EXPOSE") for port in expose.args.split()}
    defaults = ServerConfig()
    assert exposed == {str(defaults.port), str(defaults.grpc_port)} == {"8080", "50051"}


def test_healthcheck_asks_healthz_with_python_not_curl(stages: list[Stage]) -> None:
    healthcheck = stages[-1].last("HEALTHCHECK")
    command = healthcheck.exec_form()
    assert command[0] == "python", command
    assert "/healthz" in " ".join(command)
    assert not {"curl", "wget"} & set(" ".join(command).split())


def test_dockerignore_keeps_the_build_context_small_but_complete(stages: list[Stage]) -> None:
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)

    for stage in stages:
        for source in copy_sources(stage):
            assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
            assert not ignored(source), f".dockerignore excludes {source}, which the Dockerfile copies"
    for heavy in (".git", ".venv", "tests"):
        assert ignored(heavy), f".dockerignore should exclude {heavy}"


def imported_modules(package_dir: Path) -> set[str]:
    """Absolute imports of third-party modules anywhere in a package's source (`from a import b` gives a and a.b)."""
    first_party = {package.split("/")[0] for package in PACKAGE_DIRS.values()}
    found: set[str] = set()
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] not in sys.stdlib_module_names | first_party | {"__future__"}}


@functools.cache
def _packages_distributions() -> Mapping[str, list[str]]:
    return metadata.packages_distributions()


def owner(module: str) -> str | None:
    """The installed distribution a module's file belongs to."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    origin = Path(spec.origin).resolve()
    for name in _packages_distributions().get(module.split(".")[0], []):
        dist = metadata.distribution(name)
        if any(Path(str(dist.locate_file(file))).resolve() == origin for file in dist.files or []):
            return canonicalize_name(name)
    return None


def dependency_closure(requirements: list[str]) -> set[str]:
    """The distributions pip installs for `requirements` (as installed here), by normalized name."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        todo += [Requirement(r) for r in metadata.requires(requirement.name) or []]
    return seen


def test_the_image_installs_every_library_the_code_imports() -> None:
    """The image gets only pyproject.toml's dependencies: each imported module must come from one of them."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    installed = dependency_closure(dependencies)
    for source_dir in PACKAGE_DIRS:
        for module in sorted(imported_modules(ROOT / source_dir)):
            try:
                spec = importlib.util.find_spec(module)
            except ModuleNotFoundError:
                spec = None
            if spec is None and "." in module and importlib.util.find_spec(module.rsplit(".", 1)[0]):
                continue  # `from a import b` where b is not a module
            assert spec is not None, f"{source_dir} imports {module}, which is not installed"
            if spec.origin is None:
                continue  # a namespace package: its modules are checked one by one
            assert owner(module) in installed, f"{source_dir} imports {module}, not from a pyproject.toml dependency"


def run_pip_wheel(context: Path, out: Path) -> Path:
    if importlib.util.find_spec("setuptools") is None:
        pytest.fail("setuptools is missing from the venv; `make setup` (python3 -m venv) provides it", pytrace=False)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("llm_gateway-*.whl")
    return wheel


def test_the_image_built_from_what_the_builder_copies_serves_and_is_healthy(
    stages: list[Stage], tmp_path: Path
) -> None:
    builder, runtime = stages[0], stages[-1]
    context = tmp_path / "context"
    context.mkdir()
    for source in copy_sources(builder):
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / source, context / source)
    wheel = run_pip_wheel(context, tmp_path / "wheels")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        site = tmp_path / "site"
        archive.extractall(site)
    for source_dir, package in PACKAGE_DIRS.items():
        for path in (ROOT / source_dir).rglob("*.py"):
            if "__pycache__" not in path.parts:
                name = f"{package}/{path.relative_to(ROOT / source_dir).as_posix()}"
                assert name in names, f"the image would lack {name}: is its package listed in pyproject.toml?"
    assert "llm-gateway = gateway.cli:main" in entry_points

    # The runtime stage's WORKDIR holds the config it copies; the gateway finds ./config.yml there.
    app = tmp_path / "app"
    app.mkdir()
    for source in copy_sources(runtime):
        shutil.copy2(ROOT / source, app / Path(source).name)
    # As in the container: no port variables, the gateway and its HEALTHCHECK both read ./config.yml.
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("CONFIG_PATH", "SERVER_PORT", "GRPC_PORT")},
        "PYTHONPATH": str(site),
    }
    probe = subprocess.run(
        [sys.executable, "-c", "import gateway, rest_facade; print(gateway.__file__, rest_facade.__file__)"],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.stdout.split() and all(Path(p).is_relative_to(site) for p in probe.stdout.split()), probe

    gateway = GatewayProcess(None, app)
    config = yaml.safe_load((app / "config.yml").read_text())
    config["server"].update(port=gateway.port, grpc_port=gateway.grpc_port)
    (app / "config.yml").write_text(yaml.safe_dump(config))
    gateway.env = {**env, "SERVER_HOST": "127.0.0.1"}
    gateway.start()
    healthcheck = [sys.executable, *stages[-1].last("HEALTHCHECK").exec_form()[1:]]
    try:
        healthy = subprocess.run(healthcheck, cwd=app, env=env, capture_output=True, text=True, timeout=10)
        assert healthy.returncode == 0, healthy.stderr + gateway.log_text()
        request = urllib.request.Request(
            f"{gateway.base_url}/v1/chat/completions",
            data=json.dumps({"model": "dummy", "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
            assert json.loads(response.read())["object"] == "chat.completion"
    finally:
        assert gateway.stop() == 0, gateway.log_text()
    unhealthy = subprocess.run(healthcheck, cwd=app, env=env, capture_output=True, timeout=10)
    assert unhealthy.returncode != 0
