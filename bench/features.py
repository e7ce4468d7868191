"""Gateway configs for the feature scenarios: keys and limits (in memory or in Redis), prices and the
SQLite ledger, an Anthropic deployment, embeddings. Each is the plain bench config plus one feature, so
its cost is the difference to `rest-inproc` in the same run.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson

from .procs import free_port, pin, wait_port
from .upstream import EMBEDDING_INPUTS

# A fixed, public bench key: it guards nothing.
BENCH_KEY = "sk-bench-0123456789abcdef0123456789abcdef"
# Limits the load never reaches: every request pays for the checks, none is refused.
_LIMITS = {"rpm": 1_000_000_000, "tpm": 1_000_000_000_000}
_PRICE = {"input": 2.5, "cached_input": 1.25, "output": 10.0}

FEATURES = ("rest-keys", "rest-keys-redis", "rest-full", "rest-full-redis", "rest-anthropic", "rest-embeddings")
REDIS_FEATURES = ("rest-keys-redis", "rest-full-redis")
EMBEDDING_KINDS = ("float", "base64")


def kinds_of(feature: str, kinds: tuple[str, ...]) -> tuple[str, ...]:
    return EMBEDDING_KINDS if feature == "rest-embeddings" else kinds


def authorization(feature: str) -> str:
    return f"Bearer {BENCH_KEY}" if feature in ("rest-keys", "rest-keys-redis", "rest-full", "rest-full-redis") else ""


def config(feature: str, base: dict[str, Any], upstream_base: str, workdir: Path, redis_url: str) -> dict[str, Any]:
    """`base` is systems.gateway_config(...); `upstream_base` the nginx upstream's http://host:port."""
    cfg = copy.deepcopy(base)
    if feature in ("rest-keys", "rest-keys-redis", "rest-full", "rest-full-redis"):
        cfg["auth"] = {"keys": [{"name": "bench", "key": BENCH_KEY, "limits": dict(_LIMITS)}]}
    if feature.endswith("-redis"):
        cfg["state"] = {"redis_url": redis_url}
    if feature.startswith("rest-full"):
        # Not beside the config file: its directory is watched for reloads, and each write would wake the watcher.
        cfg["usage"] = {"database": f"sqlite:///{workdir / 'ledger' / f'usage-{feature}.db'}"}
        cfg["models"] = {
            name: {"provider": provider, "price": dict(_PRICE)} for name, provider in cfg["models"].items()
        }
    if feature == "rest-anthropic":
        # The same model names, served by Anthropic-shaped bodies: the requests stay the same.
        cfg["providers"] = {
            f"bench-{kind}": {
                "type": "anthropic",
                "api_url": f"{upstream_base}/anthropic-{kind}",
                "api_key": "sk-bench-upstream-unused",
            }
            for kind in ("unary", "stream")
        }
    if feature == "rest-embeddings":
        cfg["providers"] = {
            f"bench-{kind}": {
                "type": "openai",
                "api_url": f"{upstream_base}/embed-{kind}/v1",
                "api_key": "sk-bench-upstream-unused",
            }
            for kind in EMBEDDING_KINDS
        }
        cfg["models"] = {f"bench-{kind}": f"bench-{kind}" for kind in EMBEDDING_KINDS}
    return cfg


def path_of(feature: str) -> str:
    return "/v1/embeddings" if feature == "rest-embeddings" else "/v1/chat/completions"


def embedding_body(kind: str) -> bytes:
    inputs = [f"The quick brown fox jumps over the lazy dog, number {i}." for i in range(EMBEDDING_INPUTS)]
    return orjson.dumps({"model": f"bench-{kind}", "input": inputs, "encoding_format": kind})


def check_embeddings(data: bytes, kind: str) -> None:
    reply = orjson.loads(data)
    items = reply.get("data") or []
    if len(items) != EMBEDDING_INPUTS or not isinstance(items[0]["embedding"], str if kind == "base64" else list):
        raise RuntimeError(f"unexpected embeddings reply ({kind}): {data[:200]!r}")


class Redis:
    """Debian's redis-server on a loopback port, no persistence, pinned with the load generators."""

    def __init__(self, workdir: Path, cpus: set[int] | None) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.cpus = cpus
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Redis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("`redis-server` not found: install the Debian package 'redis-server'")
        log = self.workdir / "redis.log"
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                cmd,
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=(lambda: pin(self.cpus)) if self.cpus else None,
            )
        wait_port(self.port, self.process, log)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None
