"""The `llm-gateway` command."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from dataclasses import replace

import uvloop

from . import logs
from .config import Config, ConfigError, KeyLimits, load

# Seconds past shutdown_delay + shutdown_grace after which a worker that has not exited is killed.
_KILL_MARGIN = 10.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-gateway",
        description="An OpenAI-compatible LLM gateway: REST facade and gRPC ChatService.",
    )
    parser.add_argument("--config", help="YAML config file (default: $CONFIG_PATH, else ./config.yml, else built-in)")
    parser.add_argument("--host", help="address to listen on (server.host, $SERVER_HOST)")
    parser.add_argument("--port", type=int, help="REST port (server.port, $SERVER_PORT)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port (server.grpc_port, $GRPC_PORT)")
    parser.add_argument("--grpc-target", help="host:port of a remote gRPC service for the facade to call")
    parser.add_argument("--workers", type=int, help="worker processes sharing the ports (server.workers)")
    parser.add_argument("--grpc-only", action="store_true", help="serve the gRPC service only, no REST facade")
    parser.add_argument("--check-config", action="store_true", help="validate the config and exit")
    return parser


def _apply_flags(config: Config, args: argparse.Namespace) -> Config:
    flags = {
        "host": args.host,
        "port": args.port,
        "grpc_port": args.grpc_port,
        "grpc_target": args.grpc_target,
        "workers": args.workers,
    }
    server = replace(config.server, **{k: v for k, v in flags.items() if v is not None})
    if not (1 <= server.port <= 65535 and 1 <= server.grpc_port <= 65535 and server.workers >= 1):
        raise ConfigError("command line: ports must be 1-65535 and workers at least 1")
    return replace(config, server=server)


def _worker(config: Config, grpc_only: bool) -> None:
    logs.configure(config.log_level)
    for provider in config.providers.values():
        logs.add_secret(provider.api_key)
    from . import tracing
    from .runner import serve

    tracing.configure()
    try:
        # uvloop (also Sanic's choice) costs about 8% less CPU per request than asyncio's own loop here.
        uvloop.run(serve(config, grpc_only=grpc_only))
    finally:
        tracing.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = _apply_flags(load(args.config), args)
    except ConfigError as exc:
        print(f"llm-gateway: config error: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"llm-gateway: {config.source} is valid")
        return 0
    logs.configure(config.log_level)
    log = logs.get_logger("cli")
    srv = config.server
    for provider in config.providers.values():
        if provider.type not in ("dummy", "ollama") and not provider.api_key:
            log.warning("provider has no api_key", provider=provider.name)
    _tenancy_notes(config, log)
    log.info(
        "llm-gateway starting",
        config=config.source,
        rest=None if args.grpc_only else f"http://{srv.host}:{srv.port}",
        grpc=f"{srv.grpc_target} (remote)" if srv.grpc_target else f"{srv.host}:{srv.grpc_port}",
        workers=srv.workers,
        models=sorted(config.models),
    )
    if srv.workers == 1:
        try:
            _worker(config, args.grpc_only)
        except OSError as exc:
            log.error("cannot start", error=str(exc))
            return 1
        return 0
    return _supervise(config, args.grpc_only)


def _tenancy_notes(config: Config, log: logs.Logger) -> None:
    srv = config.server
    if not config.auth.keys and not _loopback(srv.host):
        log.warning(
            "auth is off (no auth.keys) and the gateway listens beyond loopback: anyone who can reach it"
            " spends the providers' keys",
            host=srv.host,
        )
    limited = config.limits.models or any(k.limits != KeyLimits() for k in config.auth.keys)
    if limited and srv.workers > 1 and not config.state.redis_url:
        log.warning(
            f"rate limits are held per worker: each of the {srv.workers} workers enforces 1/{srv.workers} of"
            " every limit; set state.redis_url to share them exactly",
            workers=srv.workers,
        )


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _supervise(config: Config, grpc_only: bool) -> int:
    """Run N workers that share the ports (SO_REUSEPORT). SIGTERM or SIGINT is passed on to them, and
    they drain (see runner); a repeated signal is passed on too, which a draining worker ignores, so
    it never cuts streams short. A worker still alive well after its drain should be over is killed."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Workers keep metric values in shared files here, so /metrics on any worker shows the sum.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="llm-gateway-metrics-")
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker, args=(config, grpc_only), name=f"worker-{i}")
        for i in range(config.server.workers)
    ]
    for process in workers:
        process.start()
    give_up: list[float] = []

    def stop(signum: int, _frame: object) -> None:
        if not give_up:
            srv = config.server
            give_up.append(time.monotonic() + srv.shutdown_delay + srv.shutdown_grace + _KILL_MARGIN)
        for process in workers:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    killed = False
    for process in workers:
        while process.is_alive():
            process.join(0.2)
            if give_up and time.monotonic() > give_up[0] and process.is_alive():
                logs.get_logger("cli").error("worker did not stop after its drain; killing it", pid=process.pid)
                process.kill()
                killed = True
        if process.pid is not None:
            from .metrics import mark_worker_dead

            mark_worker_dead(process.pid)
    return 1 if killed else max((process.exitcode or 0) for process in workers)


if __name__ == "__main__":
    sys.exit(main())
