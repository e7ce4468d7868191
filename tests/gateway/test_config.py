from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import SECTIONS, ConfigError, load, parse

SEED = {
    "server": {"port": 8080},
    "logging": {"level": "INFO"},
    "providers": {
        "openai": {
            "api_key": "${OPENAI_API_KEY}",
            "api_url": "https://api.openai.com/v1",
            "is_openai_compatible": True,
        },
        "gemini": {
            "api_key": "${GEMINI_API_KEY}",
            "api_url": "https://generativelanguage.googleapis.com",
            "is_openai_compatible": True,
        },
        "ollama": {"api_url": "http://localhost:11434", "is_openai_compatible": True},
    },
    "models": {"gpt-4o": "openai", "gemini-1.5-flash": "gemini", "llama3": "ollama", "dummy": "dummy"},
}


def test_seed_format_works_as_written() -> None:
    config = parse(SEED, {"OPENAI_API_KEY": "sk-1", "GEMINI_API_KEY": "g-2"})
    assert config.server.port == 8080 and config.server.grpc_port == 50051
    assert config.log_level == "INFO"
    assert config.providers["openai"].api_key == "sk-1"
    assert config.providers["gemini"].type == "gemini"
    assert config.providers["ollama"].api_key == ""
    assert config.models["gpt-4o"].provider == "openai"
    assert config.models["gpt-4o"].upstream_model == "gpt-4o"


def test_built_in_default_has_dummy_and_needs_no_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load(None, {})
    assert list(config.models) == ["dummy"]
    assert config.source == "<built-in default>"


def test_repo_config_works_without_keys() -> None:
    config = load(Path(__file__).resolve().parents[2] / "config.yml", {})
    assert "dummy" in config.models
    assert config.providers["openai"].api_key == ""


def test_environment_overrides_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text("server: {port: 1234, grpc_port: 2345}\nlogging: {level: INFO}\n")
    config = load(path, {"SERVER_PORT": "9000", "GRPC_PORT": "9001", "LOG_LEVEL": "debug"})
    assert (config.server.port, config.server.grpc_port, config.log_level) == (9000, 9001, "DEBUG")


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text("models: {mine: {provider: dummy, model: other}}\n")
    config = load(None, {"CONFIG_PATH": str(path)})
    assert config.models["mine"].upstream_model == "other"
    assert config.source == str(path)


def test_variables_and_defaults_expand() -> None:
    data = {"providers": {"p": {"type": "openai", "api_url": "${URL:-http://127.0.0.1:1}/v1", "api_key": "${K}"}}}
    assert parse(data, {}).providers["p"].api_url == "http://127.0.0.1:1/v1"
    assert parse(data, {"URL": "https://x.example", "K": "key"}).providers["p"].api_url == "https://x.example/v1"


def test_extended_forms() -> None:
    config = parse(
        {
            "providers": {"groq": {"type": "openai", "api_url": "https://api.groq.com/openai/v1"}},
            "models": {"fast": {"provider": "groq", "model": "llama-3.1-8b-instant"}},
        },
        {},
    )
    assert config.providers["groq"].type == "openai"
    assert config.models["fast"].upstream_model == "llama-3.1-8b-instant"


@pytest.mark.parametrize(
    ("data", "env", "message"),
    [
        ({"models": {"m": "nope"}}, {}, "models.m: unknown provider 'nope'"),
        ({"providers": {"p": {"type": "openai", "api_url": "not a url"}}}, {}, "providers.p.api_url"),
        ({"providers": {"p": {"type": "openai", "api_url": "http://h:99999"}}}, {}, "providers.p.api_url"),
        ({"providers": {"p": {"type": "mystery"}}}, {}, "providers.p.type"),
        ({"providers": {"p": {"api_url": "http://h"}}}, {}, "providers.p: set type"),
        (
            {"providers": {"p": {"type": "openai", "api_url": "http://h", "headers": {"x-team": "a\r\nhost: evil"}}}},
            {},
            "providers.p.headers.x-team",
        ),
        ({"logging": {"level": "LOUD"}}, {}, "logging.level"),
        ({"server": {"port": 70000}}, {}, "server.port"),
        ({"server": {"port": "http"}}, {}, "server.port"),
        ({}, {"GRPC_PORT": "0"}, "server.grpc_port"),
        ({"server": {"prot": 1}}, {}, "server.prot: unknown key"),
        ({"server": {"grpc_target": "nohost"}}, {}, "server.grpc_target"),
        ([], {}, "top level"),
    ],
)
def test_bad_config_names_the_key(data: object, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(data, env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key", ["modles", "authentication", "Server"])
def test_unknown_top_level_key_is_refused_naming_it_and_the_known_ones(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse({**SEED, key: {"gpt-4o": "openai"}}, {})
    assert str(info.value) == f"{key}: unknown top-level key (known: {', '.join(SECTIONS)})"


def test_invalid_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("server:\n  port: [8080\n")
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert str(path) in str(info.value) and "invalid YAML" in str(info.value) and "line" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load(tmp_path / "absent.yml", {})
