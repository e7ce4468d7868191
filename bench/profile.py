"""`python -m bench.profile`: py-spy samples of the gateway under one benchmark scenario.

Starts nginx and the gateway (in-process REST, the gRPC-only service for --path grpc-direct, or
in-process REST with one feature on for a feature path such as rest-keys-redis, with a redis-server
of its own when the path needs one: bench/features.py), runs the load, and records the gateway's
worker with `py-spy record --format raw` (collapsed stacks), then prints the top frames by own time
and by inclusive time. Needs py-spy (PyPI) on PATH or in the venv; it is not a project dependency.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from . import features, systems
from .procs import free_port
from .run import LOADGEN_CPUS, _grpc_target, _rest_target
from .upstream import Nginx


def _pyspy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy not found: pip install py-spy (a profiling tool, not a project dependency)")
    return found


def summarize(collapsed: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    out = [f"{total} samples", "", "own time:"]
    out += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    out += ["", "inclusive time:"]
    out += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top * 2)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    paths = ("rest-inproc", "rest-separate", "grpc-direct", *features.FEATURES)
    parser.add_argument("--path", choices=paths, default="rest-inproc")
    parser.add_argument("--kind", choices=("unary", "stream"), default="unary")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None, help="where to keep the raw profiles")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    nginx = Nginx(out / "nginx", free_port(), None).start()
    procs: list[systems.Proc] = []
    redis: features.Redis | None = None
    try:
        upstream = {kind: nginx.url(kind) for kind in ("unary", "stream")}
        config = systems.gateway_config(upstream, "WARNING")
        authorization = ""
        if args.path in features.FEATURES:
            if args.path in features.REDIS_FEATURES:
                redis = features.Redis(out, LOADGEN_CPUS).start()
            redis_url = redis.url if redis is not None else ""
            config = features.config(args.path, config, nginx.base, out, redis_url)
            authorization = features.authorization(args.path)
        if args.path == "rest-inproc" or args.path in features.FEATURES:
            gateway, rest, _ = systems.start_gateway(f"profile-{args.path}", out, config, 1)
            procs.append(gateway)
            targets = {"": gateway.pid}
        else:
            service, _, grpc_port = systems.start_gateway("profile-service", out, config, 1, grpc_only=True)
            procs.append(service)
            targets = {"service": service.pid}
            if args.path == "rest-separate":
                facade, rest, _ = systems.start_gateway(
                    "profile-facade", out, config, 1, grpc_target=f"127.0.0.1:{grpc_port}"
                )
                procs.append(facade)
                targets["facade"] = facade.pid
        if args.path == "grpc-direct":
            load = _grpc_target(f"127.0.0.1:{grpc_port}", args.kind)
        else:
            load = _rest_target(f"http://127.0.0.1:{rest}/v1/chat/completions", args.kind, out, authorization)
        load(args.concurrency, 2)  # warm-up
        spies = {
            name: subprocess.Popen(
                [
                    _pyspy(),
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(int(args.seconds)),
                    "--rate",
                    "500",
                    "--format",
                    "raw",
                    "--output",
                    str(out / f"{name or 'gateway'}.txt"),
                    "--nonblocking",
                    *(["--native"] if args.native else []),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, pid in targets.items()
        }
        runner = threading.Thread(target=load, args=(args.concurrency, args.seconds + 1))
        runner.start()
        for spy in spies.values():
            spy.wait()
        runner.join()
        for name in spies:
            path = out / f"{name or 'gateway'}.txt"
            print(f"== {args.path} {args.kind} c={args.concurrency}: {name or 'gateway'} ({path})")
            print(summarize(path, args.top))
    finally:
        for proc in procs:
            proc.stop()
        if redis is not None:
            redis.stop()
        nginx.stop()


if __name__ == "__main__":
    main()
