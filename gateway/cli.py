"""The `llm-gateway` command."""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import replace
from functools import partial
from typing import Any

import uvloop

from . import logs
from .config import Config, ConfigError, KeyLimits, load


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


def _worker(config: Config, grpc_only: bool, reloads: Any = None, prepare: Any = None) -> None:
    """One worker; `reloads` is its pipe from the main process, `prepare` is set when it is the only one."""
    # A worker of several leaves SIGHUP to the main process, which tells it; the only worker ignores it
    # until its reload handler is in place (SIGHUP's default is to end the process).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logs.configure(config.log_level)
    for provider in config.providers.values():
        logs.add_secret(provider.api_key)
    from . import tracing
    from .runner import serve

    tracing.configure()
    try:
        # uvloop (also Sanic's choice) costs about 8% less CPU per request than asyncio's own loop here.
        uvloop.run(serve(config, grpc_only=grpc_only, reloads=reloads, prepare=prepare))
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
    prepare = partial(_apply_flags, args=args)  # a reloaded file gets the same flags
    if srv.workers == 1:
        try:
            _worker(config, args.grpc_only, prepare=prepare)
        except OSError as exc:
            log.error("cannot start", error=str(exc))
            return 1
        return 0
    from .supervisor import supervise

    return supervise(config, args.grpc_only, prepare, _worker)


def _tenancy_notes(config: Config, log: logs.Logger) -> None:
    srv = config.server
    if srv.grpc_target:  # a facade only: keys and limits are the remote service's
        return
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


if __name__ == "__main__":
    sys.exit(main())
