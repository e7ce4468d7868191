"""The `llm-gateway` command as a user runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import GatewayProcess, run_cli


@pytest.mark.parametrize(
    ("yaml_text", "env", "expected"),
    [
        ("models: {m: nowhere}\n", {}, "models.m: unknown provider 'nowhere'"),
        ("providers: {p: {type: openai, api_url: 'ftp//x'}}\n", {}, "providers.p.api_url"),
        ("logging: {level: CHATTY}\n", {}, "logging.level"),
        ("server: {port: -1}\n", {}, "server.port"),
        ("server: [\n", {}, "invalid YAML"),
        ("{}\n", {"LOG_LEVEL": "shout"}, "logging.level"),
        ("modles: {gpt-4o: openai}\n", {}, "modles: unknown top-level key (known: server, logging, providers"),
    ],
)
def test_bad_config_fails_at_start_with_one_line(
    tmp_path: Path, yaml_text: str, env: dict[str, str], expected: str
) -> None:
    path = tmp_path / "config.yml"
    path.write_text(yaml_text)
    result = run_cli(["--config", str(path)], env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("llm-gateway: config error: ") and expected in lines[0]
    assert result.stdout == ""


def test_check_config_refuses_an_unknown_top_level_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text("providers:\n  openai: {api_key: sk-x}\nmodles:\n  gpt-4o: openai\n")
    result = run_cli(["--config", str(path), "--check-config"])
    assert result.returncode == 2
    assert result.stderr.startswith("llm-gateway: config error: modles: unknown top-level key (known: ")
    assert len(result.stderr.strip().splitlines()) == 1 and "valid" not in result.stdout


def test_check_config_accepts_repo_config() -> None:
    result = run_cli(["--config", "config.yml", "--check-config"], cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr


def test_log_level_is_honoured(tmp_path: Path) -> None:
    quiet = GatewayProcess(None, tmp_path, env={"LOG_LEVEL": "WARNING"}, args=("--grpc-only",)).start()
    quiet.stop()
    assert not [line for line in quiet.log_lines() if line["level"] == "INFO"]
    loud = GatewayProcess(None, tmp_path, env={"LOG_LEVEL": "INFO"}, args=("--grpc-only",)).start()
    loud.stop()
    start = next(line for line in loud.log_lines() if line["msg"] == "llm-gateway starting")
    assert list(start)[:3] == ["time", "level", "msg"]
    assert start["grpc"] == f"127.0.0.1:{loud.grpc_port}"


def test_api_keys_never_logged_even_at_debug(tmp_path: Path) -> None:
    config = {"providers": {"openai": {"api_key": "${SECRET_KEY}"}}, "models": {"gpt": "openai"}}
    process = GatewayProcess(
        config, tmp_path, env={"SECRET_KEY": "sk-very-secret-value", "LOG_LEVEL": "DEBUG"}, args=("--grpc-only",)
    ).start()
    process.stop()
    assert "sk-very-secret-value" not in process.log_text()
    assert process.log_lines()
