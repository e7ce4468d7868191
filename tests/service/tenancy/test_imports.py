"""redis-py (and hiredis) load only in a worker whose config puts the state in Redis: limits, budgets and
cooldowns held in the process need neither (about 5 MB of RSS in every worker)."""

from __future__ import annotations

from pathlib import Path

from tests.gateway.test_memory import _check, _config

KEY = "sk-gw-imports-5b0c1d9e"


def test_keys_and_limits_in_memory_import_no_redis_client(tmp_path: Path) -> None:
    keys = {"keys": [{"name": "alpha", "key": KEY, "limits": {"rpm": 100, "tpm": 10_000, "max_parallel": 4}}]}
    modules = _check(_config(auth=keys, limits={"dummy": {"rpm": 1000}}), tmp_path)
    assert "service.tenancy" in modules and "service.tenancy.memory" in modules  # tenancy is on
    assert not {m for m in modules if m == "redis" or m.startswith(("redis.", "hiredis"))}
    assert "service.tenancy.redis" not in modules and "service.tenancy.cooldown" not in modules
