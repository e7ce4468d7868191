"""The README cannot rot: its curl and Python snippets run against a live gateway, and its config
reference matches the code."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from gateway.config import ENV_OVERRIDES, ProviderConfig, RoutingConfig, ServerConfig, Timeouts
from tests.harness import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)
CURL = [code for lang, code in BLOCKS if lang == "sh" and code.startswith("curl")]
PYTHON = [code for lang, code in BLOCKS if lang == "python"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = GatewayProcess(None, tmp_path_factory.mktemp("readme")).start()
    yield process
    process.stop()


def _localize(code: str, gateway: GatewayProcess) -> str:
    return code.replace("localhost:8080", f"127.0.0.1:{gateway.port}").replace("localhost:50051", gateway.grpc_address)


def test_quick_start_is_make_run_and_make_test() -> None:
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    assert re.findall(r"```sh\n(.*?)```", quick, flags=re.S) == ["make run\nmake test\n"]
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"`make (\w+)`", README):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"README names `make {target}`, the Makefile lacks it"


def test_there_are_snippets_to_run() -> None:
    assert len(CURL) >= 2 and len(PYTHON) >= 2


@pytest.mark.parametrize("code", CURL, ids=[f"curl-{i}" for i in range(len(CURL))])
def test_curl_snippets(gateway: GatewayProcess, code: str) -> None:
    result = subprocess.run(["bash", "-c", _localize(code, gateway)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    if '"stream": true' in code:
        events = [line[len("data: ") :] for line in result.stdout.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert all("choices" in orjson.loads(event) for event in events[:-1])
    elif "/v1/embeddings" in code:
        assert all(len(item["embedding"]) == 8 for item in orjson.loads(result.stdout)["data"])
    else:
        assert orjson.loads(result.stdout)["choices"][0]["message"]["content"]


@pytest.mark.parametrize("code", PYTHON, ids=[f"python-{i}" for i in range(len(PYTHON))])
def test_python_snippets(gateway: GatewayProcess, code: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _localize(code, gateway)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "Hello from the dummy provider." in result.stdout


def _reference_rows() -> dict[str, tuple[str, str]]:
    section = README.split("### Reference", 1)[1].split("\n\n", 2)[1]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0]:
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def _default(value: object) -> str:
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`" if value != "" else "empty"


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(ServerConfig)])
def test_every_server_key_is_documented_with_its_default(field: str) -> None:
    rows = _reference_rows()
    key = f"server.{field}"
    assert key in rows, f"README's reference lacks {key}"
    default = getattr(ServerConfig(), field)
    assert rows[key][1] == _default(default), f"{key}: README says {rows[key][1]}, the code {default!r}"


@pytest.mark.parametrize("variable", sorted(ENV_OVERRIDES))
def test_every_environment_variable_is_documented_against_its_key(variable: str) -> None:
    section, key = ENV_OVERRIDES[variable]
    assert _reference_rows()[f"{section}.{key}"][0] == f"`{variable}`"


def test_provider_and_routing_keys_are_documented() -> None:
    rows = _reference_rows()
    for field in dataclasses.fields(ProviderConfig):
        if field.name != "name":
            assert f"providers.<name>.{field.name}" in rows, field.name
    for field in dataclasses.fields(RoutingConfig):
        assert re.search(rf"^  {field.name}: {getattr(RoutingConfig(), field.name):g}\b", README, flags=re.M), (
            f"README's routing example lacks {field.name} with its default"
        )
    for field in dataclasses.fields(Timeouts):
        assert f"{field.name}:" in README.split("### Deployments", 1)[1], field.name


def test_documented_metrics_exist() -> None:
    from gateway import metrics

    names = {
        collector._name  # type: ignore[attr-defined]
        for collector in vars(metrics).values()
        if hasattr(collector, "_name") and hasattr(collector, "_type")
    }
    documented = set(re.findall(r"`(llm_gateway_\w+)`", README))
    for name in documented:
        base = re.sub(r"_total$", "", name)
        assert base in names, f"README documents {name}, gateway/metrics.py has no such metric"
