"""`python -m bench.instructions`: instructions per request under callgrind, for A/B comparisons that
the noise of CPU time cannot settle (a 0.03 ms budget on a shared 2-core machine).

Starts nginx (the bench's fake upstream) and the gateway under `valgrind --tool=callgrind` with
instrumentation off, warms it up, then turns it on (`callgrind_control -i on`) for exactly
`--requests` sequential requests over one kept-alive connection, and prints instructions per
request, for every process thread
together (the ledger's SQLite thread included). Callgrind counts instructions, not time: the same
code, config and requests give the same count to within a fraction of a percent, whatever else the
machine does. It is about 50 times slower than the real thing; the absolute figure is instructions,
not milliseconds, and only differences between paths (or between two commits) are meant to be read.
Needs valgrind (Debian); it is not a `make test` dependency.
"""

from __future__ import annotations

import argparse
import http.client
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from . import features, load, systems
from .procs import free_port, wait_port
from .upstream import Nginx

PATHS = (
    "rest-inproc",
    "rest-keys",
    "rest-keys-redis",
    "rest-full",
    "rest-full-redis",
    "rest-anthropic",
    "grpc-direct",
    "grpc-floor",
)
GRPC_PATHS = ("grpc-direct", "grpc-floor")


def _control(*args: str) -> str:
    done = subprocess.run(["callgrind_control", *args], capture_output=True, text=True, check=False)
    return done.stdout + done.stderr


def _requests(port: int, body: bytes, authorization: str, count: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"content-type": "application/json", **({"authorization": authorization} if authorization else {})}
    for _ in range(count):
        connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"status {response.status}: {data[:300]!r}")
    connection.close()


def _grpc_requests(port: int, kind: str, count: int) -> None:
    """`count` sequential calls over one channel: StreamChatCompletion read to its end for streams."""
    import grpc

    from llm_gateway.v1 import chat_pb2, chat_pb2_grpc

    request = chat_pb2.CreateChatCompletionRequest(
        model=f"bench-{kind}", messages=[chat_pb2.ChatMessage(role="user", content_text="Say hello.")]
    )
    if kind == "stream":
        request.stream = True
        request.stream_options.include_usage = True
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)  # type: ignore[no-untyped-call]
        for _ in range(count):
            if kind == "stream":
                for _chunk in stub.StreamChatCompletion(request, timeout=120):
                    pass
            else:
                stub.CreateChatCompletion(request, timeout=120)


def measure(path: str, kind: str, requests: int, warmup: int, workdir: Path) -> int:
    """Instructions for `requests` requests of `kind` on `path` (all threads of the gateway process)."""
    nginx = Nginx(workdir / f"nginx-{path}-{kind}", free_port(), None).start()
    redis: features.Redis | None = None
    try:
        config = systems.gateway_config({k: nginx.url(k) for k in ("unary", "stream")}, "WARNING")
        authorization = ""
        if path not in ("rest-inproc", *GRPC_PATHS):
            if path in features.REDIS_FEATURES:
                redis = features.Redis(workdir, None).start()
            config = features.config(path, config, nginx.base, workdir, redis.url if redis else "")
            authorization = features.authorization(path)
        port = free_port()
        conf = workdir / f"{path}-{kind}.yml"
        conf.write_text(yaml.safe_dump(config))
        out = workdir / f"callgrind-{path}-{kind}.out"
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
        ]
        grpc_port = free_port()
        if path == "grpc-floor":  # bench/grpc_floor.py: grpc.aio answering with a fixed response
            cmd += ["bench.grpc_floor", "--port", str(grpc_port)]
        else:
            cmd += ["gateway.cli", "--config", str(conf), "--workers", "1"]
        if path == "grpc-direct":  # the service alone; calls from a Python gRPC client
            cmd.append("--grpc-only")
        env = systems.bench_env({"SERVER_PORT": str(port), "GRPC_PORT": str(grpc_port)})
        log = workdir / f"{path}-{kind}.log"
        with log.open("ab") as sink:
            proc = subprocess.Popen(cmd, cwd=systems.ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            body = load.request_body(f"bench-{kind}", kind == "stream")

            def send(count: int) -> None:
                if path in GRPC_PATHS:
                    _grpc_requests(grpc_port, kind, count)
                else:
                    _requests(port, body, authorization, count)

            wait_port(grpc_port if path in GRPC_PATHS else port, proc, log, 600)
            send(warmup)
            _control("-i", "on", str(proc.pid))
            send(requests)
            time.sleep(0.5)  # the ledger thread's write of the last records falls inside the window
            _control("-i", "off", str(proc.pid))
            _control("-d", str(proc.pid))
        finally:
            proc.terminate()
            proc.wait(120)
        return _total(workdir, out)
    finally:
        if redis is not None:
            redis.stop()
        nginx.stop()


def _total(workdir: Path, out: Path) -> int:
    """The sum of the 'summary:'/'totals:' lines of every dump callgrind wrote for this run."""
    total = 0
    for dump in workdir.glob(out.name + "*"):
        best = 0
        for line in dump.read_text(errors="replace").splitlines():
            match = re.match(r"(?:summary|totals):\s+(\d+)", line)
            if match:
                best = max(best, int(match.group(1)))
        total += best
    return total


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--paths", default="rest-inproc,rest-keys,rest-full")
    parser.add_argument("--kinds", default="unary")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found: install the Debian package 'valgrind'")
    workdir = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    base: dict[str, float] = {}
    print(f"{'path':<18} {'kind':<7} {'instructions/request':>22} {'vs rest-inproc':>16}")
    for kind in args.kinds.split(","):
        for path in args.paths.split(","):
            if path not in PATHS:
                raise SystemExit(f"unknown path {path!r}: one of {', '.join(PATHS)}")
            per = measure(path, kind, args.requests, args.warmup, workdir) / args.requests
            base.setdefault(kind, per) if path == "rest-inproc" else None
            extra = f"{per - base[kind]:+,.0f}" if kind in base and path != "rest-inproc" else ""
            print(f"{path:<18} {kind:<7} {per:>22,.0f} {extra:>16}", flush=True)
    print(f"(callgrind files in {workdir})")


if __name__ == "__main__":
    main()
