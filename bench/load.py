"""Load generators: Debian's wrk for HTTP, bench/grpc_load.py for gRPC. Both report one `LoadResult`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from .upstream import require

LUA = Path(__file__).with_name("post.lua")
_MARK = "BENCH_JSON "


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    client_cpu_s: float  # the load generator's own CPU time (it shares the machine's cores)

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def request_body(model: str, stream: bool) -> bytes:
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": "Say hello."}]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def _taskset(cpus: set[int] | None) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []


def _child_cpu() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system


def wrk(
    url: str,
    body: bytes,
    connections: int,
    seconds: float,
    workdir: Path,
    cpus: set[int] | None,
    authorization: str = "",
    headers: dict[str, str] | None = None,
) -> LoadResult:
    binary = require("wrk", "wrk")
    body_file = workdir / f"body-{len(body)}-{hash(body) & 0xFFFF:x}.json"
    body_file.write_bytes(body)
    cmd = [
        *_taskset(cpus),
        binary,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(LUA),
        url,
    ]
    before = _child_cpu()
    done = subprocess.run(
        cmd,
        env={
            **os.environ,
            "BENCH_BODY_FILE": str(body_file),
            "BENCH_AUTHORIZATION": authorization,
            "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in (headers or {}).items()),
        },
        capture_output=True,
        text=True,
        check=False,
    )
    client_cpu = _child_cpu() - before
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(_MARK)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    stats = json.loads(line[len(_MARK) :])
    secs = stats["duration_us"] / 1e6
    errors = sum(v for k, v in stats.items() if k.startswith("err_"))
    return LoadResult(
        requests=stats["requests"],
        errors=errors,
        seconds=round(secs, 3),
        rps=round(stats["requests"] / secs, 1),
        p50_ms=stats["p50_us"] / 1000,
        p90_ms=stats["p90_us"] / 1000,
        p99_ms=stats["p99_us"] / 1000,
        client_cpu_s=round(client_cpu, 3),
    )


def grpc(target: str, stream: bool, concurrency: int, seconds: float, cpus: set[int] | None) -> LoadResult:
    cmd = [
        *_taskset(cpus),
        sys.executable,
        "-m",
        "bench.grpc_load",
        "--target",
        target,
        "--concurrency",
        str(concurrency),
        "--seconds",
        str(seconds),
        *(["--stream"] if stream else []),
    ]
    root = Path(__file__).resolve().parent.parent
    before = _child_cpu()
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    client_cpu = _child_cpu() - before
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(_MARK)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"grpc load failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    stats = json.loads(line[len(_MARK) :])
    return LoadResult(**stats, client_cpu_s=round(client_cpu, 3))
