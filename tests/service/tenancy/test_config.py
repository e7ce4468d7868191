"""auth, limits and state in the config: what parses, and one ConfigError line naming the key for what does not."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import ConfigError, KeyLimits, ModelLimits, parse

README = (Path(__file__).resolve().parents[3] / "README.md").read_text()


def config(**sections: Any) -> Any:
    return parse({"models": {"gpt-4o": "dummy"}, **sections}, {"TEAM_KEY": "sk-team-secret-1"})


def test_the_readme_example_parses() -> None:
    block = README.split("### Keys and rate limits", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    data = yaml.safe_load(block)
    data["models"] = {"gpt-4o": "dummy"}
    parsed = parse(data, {"SEARCH_TEAM_KEY": "sk-search-0123456789", "REDIS_URL": "redis://127.0.0.1:1/0"})
    (key,) = parsed.auth.keys
    assert key.name == "search-team" and key.models == ("gpt-4o", "dummy") and key.metadata == {"team": "search"}
    assert key.limits == KeyLimits(rpm=600, tpm=200000, max_parallel=20)
    assert key.sha256 == hashlib.sha256(b"sk-search-0123456789").digest()
    assert parsed.limits.models == {"gpt-4o": ModelLimits(rpm=5000, tpm=2000000)}
    assert parsed.state.redis_url == "redis://127.0.0.1:1/0"


def test_the_secret_is_held_only_as_its_digest() -> None:
    parsed = config(auth={"keys": [{"name": "team", "key": "${TEAM_KEY}"}]})
    assert "sk-team-secret-1" not in repr(parsed)
    assert parsed.auth.keys[0].sha256 == hashlib.sha256(b"sk-team-secret-1").digest()
    by_digest = config(auth={"keys": [{"name": "team", "key_sha256": hashlib.sha256(b"x" * 9).hexdigest().upper()}]})
    assert by_digest.auth.keys[0].sha256 == hashlib.sha256(b"x" * 9).digest()


def test_defaults_are_off() -> None:
    parsed = config()
    assert parsed.auth.keys == () and parsed.limits.models == {} and parsed.state.redis_url == ""
    assert parsed.limits.default_max_tokens == 4096 and parsed.state.timeout == 0.05


def test_redis_url_comes_from_the_environment() -> None:
    parsed = parse({}, {"REDIS_URL": "redis://cache:6379/0"})
    assert parsed.state.redis_url == "redis://cache:6379/0"
    assert "cache" not in repr(parsed.state)  # a URL may hold a password


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"auth": {"keys": {"name": "x"}}}, "auth.keys: must be a list"),
        ({"auth": {"users": []}}, "auth.users: unknown key"),
        ({"auth": {"keys": [{"key": "sk-12345678"}]}}, "auth.keys[0].name: required"),
        ({"auth": {"keys": [{"name": "a b", "key": "sk-12345678"}]}}, "auth.keys[0].name: required"),
        ({"auth": {"keys": [{"name": "a"}]}}, "auth.keys.a: set exactly one of key and key_sha256"),
        ({"auth": {"keys": [{"name": "a", "key": "${UNSET}"}]}}, "auth.keys.a.key: must be at least 8 characters"),
        ({"auth": {"keys": [{"name": "a", "key_sha256": "abc"}]}}, "auth.keys.a.key_sha256: must be 64 hexadecimal"),
        ({"auth": {"keys": [{"name": "a", "key": "sk-12345678", "models": ["gpt-5"]}]}}, "auth.keys.a.models: 'gpt-5'"),
        ({"auth": {"keys": [{"name": "a", "key": "sk-12345678", "limits": {"rpd": 1}}]}}, "auth.keys.a.limits.rpd"),
        ({"auth": {"keys": [{"name": "a", "key": "sk-12345678", "limits": {"rpm": 0}}]}}, "auth.keys.a.limits.rpm"),
        ({"auth": {"keys": [{"name": "a", "key": "sk-12345678", "limits": {"tpm": 1.5}}]}}, "auth.keys.a.limits.tpm"),
        ({"auth": {"keys": [{"name": "a", "key": "sk-12345678", "owner": "me"}]}}, "auth.keys[0].owner: unknown key"),
        (
            {"auth": {"keys": [{"name": "a", "key": "sk-12345678"}, {"name": "a", "key": "sk-87654321"}]}},
            "auth.keys: names must be unique",
        ),
        (
            {"auth": {"keys": [{"name": "a", "key": "sk-12345678"}, {"name": "b", "key": "sk-12345678"}]}},
            "auth.keys: keys must be unique",
        ),
        ({"limits": {"gpt-5": {"rpm": 1}}}, "limits.gpt-5: not a configured model"),
        ({"limits": {"gpt-4o": {"rpm": -1}}}, "limits.gpt-4o.rpm"),
        ({"limits": {"gpt-4o": {"max_parallel": 1}}}, "limits.gpt-4o.max_parallel: unknown key"),
        ({"limits": {"gpt-4o": 5}}, "limits.gpt-4o: must be a mapping"),
        ({"limits": {"default_max_tokens": 0}}, "limits.default_max_tokens"),
        ({"state": {"redis_url": "http://x"}}, "state.redis_url: must be a redis://"),
        ({"state": {"timeout": 0}}, "state.timeout"),
        ({"state": {"url": "redis://x"}}, "state.url: unknown key"),
    ],
)
def test_config_errors_name_the_key(sections: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(**sections)
    text = str(caught.value)
    assert text.startswith(message), text
    assert "\n" not in text and not re.search(r"sk-\d{8}", text)  # one line, never the secret
