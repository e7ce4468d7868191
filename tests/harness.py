"""Run the gateway as a real process on loopback ports, the way users run it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rest_facade_available() -> bool:
    return (ROOT / "rest_facade" / "server.py").exists()


class GatewayProcess:
    def __init__(
        self,
        config: dict[str, Any] | None,
        workdir: Path,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.grpc_port = free_port()
        self.workdir = workdir
        self.log_path = workdir / f"gateway-{self.port}.log"
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = workdir / f"config-{self.port}.yml"
            self.config_path.write_text(yaml.safe_dump(config))
        self.env = {
            **os.environ,
            "SERVER_HOST": "127.0.0.1",
            "SERVER_PORT": str(self.port),
            "GRPC_PORT": str(self.grpc_port),
            **(env or {}),
        }
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "gateway.cli"]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd + list(self.args)

    def start(self, wait_grpc: bool = True, wait_rest: bool | None = None) -> GatewayProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(), cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        if wait_grpc:
            self.wait_grpc()
        if wait_rest if wait_rest is not None else rest_facade_available() and "--grpc-only" not in self.args:
            self.wait_rest()
        return self

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log_text()}")

    def wait_grpc(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.grpc_address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive()
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gRPC not ready:\n{self.log_text()}")
                time.sleep(0.05)

    def wait_rest(self, timeout: float = 20.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"REST not ready:\n{self.log_text()}")
            time.sleep(0.05)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.grpc_address)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                lines.append(orjson.loads(line))
        return lines

    def wait_log(self, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_lines():
                if predicate(line):
                    return line
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching log line:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)


@contextlib.contextmanager
def replicas(
    config: dict[str, Any], workdir: Path, count: int = 1, args: tuple[str, ...] = ()
) -> Iterator[list[GatewayProcess]]:
    """`count` gateways of one config, started in turn and stopped (SIGTERM) at the end, however it ends."""
    started: list[GatewayProcess] = []
    try:
        for _ in range(count):
            started.append(GatewayProcess(config, workdir, args=args).start())
        yield started
    finally:
        for process in started:
            process.stop()


def run_cli(
    args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
