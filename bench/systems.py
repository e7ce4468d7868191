"""The systems under test, each a process tree on loopback: the gateway in its two modes, and LiteLLM."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .procs import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
LITELLM_VENV = Path(__file__).resolve().parent / ".venv-litellm"
LITELLM_VERSION = "1.106.12"  # 1.107.0 was reported compromised: never unpin this blindly
PORTKEY_DIR = Path(__file__).resolve().parent / ".portkey"
PORTKEY_VERSION = "1.15.2"
PORTKEY_SERVER = PORTKEY_DIR / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
# Config keys the environment would override (gateway/config.py ENV_OVERRIDES): the bench sets its own.
_SCRUB = ("CONFIG_PATH", "SERVER_HOST", "SERVER_PORT", "GRPC_PORT", "GRPC_TARGET", "WORKERS", "LOG_LEVEL")
MODELS = ("bench-unary", "bench-stream")


def gateway_config(upstream: dict[str, str], log_level: str) -> dict[str, Any]:
    """`upstream` maps "unary"/"stream" to an api_url; one provider and one model per body kind."""
    return {
        "server": {"host": "127.0.0.1"},
        "logging": {"level": log_level},
        "routing": {"retries": 0},
        "providers": {
            f"bench-{kind}": {"type": "openai", "api_url": url, "api_key": "sk-bench-upstream-unused"}
            for kind, url in upstream.items()
        },
        "models": {f"bench-{kind}": f"bench-{kind}" for kind in upstream},
        # The ledger is on by default; here it is a feature scenario of its own (rest-full, features.py).
        "usage": {"database": ""},
    }


def listeners(port: int) -> int:
    """How many sockets listen on a loopback TCP port: one per SO_REUSEPORT worker."""
    suffix = f":{port:04X}"
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = [line.split() for line in Path(table).read_text().splitlines()[1:]]
        except OSError:
            continue
        count += sum(1 for row in rows if row[1].endswith(suffix) and row[3] == "0A")  # 0A: LISTEN
    return count


class Proc:
    """One started process tree; `pid` is its root."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], workdir: Path, cwd: Path = ROOT) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_listening(self, port: int, count: int, timeout: float = 120.0) -> None:
        wait_port(port, self.process, self.log, timeout)
        deadline = time.monotonic() + timeout
        while listeners(port) < count:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name}: {listeners(port)} of {count} workers listen on {port}; see {self.log}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return _env(extra or {})


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def start_gateway(
    name: str,
    workdir: Path,
    config: dict[str, Any],
    workers: int,
    grpc_only: bool = False,
    grpc_target: str | None = None,
) -> tuple[Proc, int, int]:
    """A gateway process tree; returns it with its REST and gRPC ports (wait_listening is done)."""
    rest_port, grpc_port = free_port(), free_port()
    path = workdir / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "gateway.cli", "--config", str(path), "--workers", str(workers)]
    if grpc_only:
        cmd.append("--grpc-only")
    if grpc_target:
        cmd += ["--grpc-target", grpc_target]
    env = _env({"SERVER_PORT": str(rest_port), "GRPC_PORT": str(grpc_port)})
    proc = Proc(name, cmd, env, workdir)
    try:
        proc.wait_listening(grpc_port if grpc_only else rest_port, workers)
    except BaseException:
        proc.stop()
        raise
    return proc, rest_port, grpc_port


def litellm_status() -> str | None:
    """None when the LiteLLM venv is usable, else why not."""
    binary = LITELLM_VENV / "bin" / "litellm"
    if not binary.exists():
        return f"not installed ({binary} missing)"
    return None


def install_litellm() -> str | None:
    """Create bench/.venv-litellm with the pinned LiteLLM proxy; None on success, else the error."""
    try:
        if not (LITELLM_VENV / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True, capture_output=True)
        pip = [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, f"litellm[proxy]=={LITELLM_VERSION}"], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        return f"pip failed: {(exc.stderr or '').strip()[-500:]}"
    except OSError as exc:
        return f"venv failed: {exc}"
    return None


def start_litellm(workdir: Path, upstream: dict[str, str], workers: int) -> tuple[Proc, int, str]:
    """LiteLLM's proxy; returns it, its port and the Authorization header its master key needs."""
    port = free_port()
    master_key = f"sk-bench-{secrets.token_hex(16)}"  # the proxy refuses to start without one
    config = {
        "model_list": [
            {
                "model_name": f"bench-{kind}",
                "litellm_params": {
                    "model": f"openai/bench-{kind}",
                    "api_base": url,
                    "api_key": "sk-bench-upstream-unused",
                },
            }
            for kind, url in upstream.items()
        ],
        "litellm_settings": {"telemetry": False, "drop_params": True},
    }
    path = workdir / f"litellm-{workers}.yml"
    path.write_text(yaml.safe_dump(config))
    cmd = [
        str(LITELLM_VENV / "bin" / "litellm"),
        "--config",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        str(workers),
    ]
    env = _env(
        {
            "LITELLM_LOG": "ERROR",
            "LITELLM_TELEMETRY": "False",
            "DISABLE_SCHEMA_UPDATE": "True",
            "LITELLM_MASTER_KEY": master_key,
        }
    )
    env.pop("VIRTUAL_ENV", None)
    proc = Proc(f"litellm-{workers}", cmd, env, workdir, cwd=workdir)
    try:
        proc.wait_listening(port, 1, timeout=180)
    except BaseException:
        proc.stop()
        raise
    return proc, port, f"Bearer {master_key}"


def portkey_status() -> str | None:
    """None when Portkey's gateway is installed in bench/.portkey, else why not."""
    return None if PORTKEY_SERVER.exists() else f"not installed ({PORTKEY_SERVER} missing)"


def install_portkey() -> str | None:
    """npm-install the pinned `@portkey-ai/gateway` into bench/.portkey; None on success, else the error."""
    try:
        PORTKEY_DIR.mkdir(exist_ok=True)
        subprocess.run(
            [
                "npm",
                "install",
                "--prefix",
                str(PORTKEY_DIR),
                "--no-audit",
                "--no-fund",
                f"@portkey-ai/gateway@{PORTKEY_VERSION}",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.CalledProcessError as exc:
        return f"npm failed: {(exc.stderr or '').strip()[-500:]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"npm failed: {exc}"
    return portkey_status()


def start_portkey(workdir: Path) -> tuple[Proc, int]:
    """Portkey's open-source gateway (Node.js, one process: it has no worker option); it and its port."""
    port = free_port()
    cmd = ["node", str(PORTKEY_SERVER), f"--port={port}", "--headless"]
    proc = Proc("portkey", cmd, _env({"NODE_ENV": "production"}), workdir, cwd=workdir)
    try:
        proc.wait_listening(port, 1, timeout=60)
    except BaseException:
        proc.stop()
        raise
    return proc, port


def peer_error(log: Path) -> str:
    """The last error a peer logged, as one line: the cause behind its HTTP 500. Portkey's 1.15.2 on Node.js
    answers every stream that way ("TypeError: immutable" in updateHeaders, Portkey-AI/gateway#1389, #1550)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    # A line may follow a progress spinner's "Starting AI Gateway..." on the same line.
    errors = [line.rsplit("...", 1)[-1].strip() for line in lines if "Error" in line and "    at " not in line]
    return errors[-1][-200:] if errors else ""


def portkey_headers(upstream_url: str) -> dict[str, str]:
    """Portkey routes each request by headers: the provider, and our upstream as its custom host."""
    return {"x-portkey-provider": "openai", "x-portkey-custom-host": upstream_url, "authorization": "Bearer bench"}
