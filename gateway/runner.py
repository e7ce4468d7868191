"""One worker process: the gRPC service and the REST facade on one event loop, and its drain."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

from . import logs, malloc, metrics
from .call import ChatBackend
from .config import Config

log = logs.get_logger("runner")

# Modules that libraries we use import optionally and the gateway never uses: their import fails while the
# service and the facade load, so no worker holds them (bench/profile-notes.md, round 2: memory).
# - trustme: Sanic's maker of development TLS certificates, which loads the `cryptography` bindings
#   (about 9 MB). A dev dependency here (tests), absent from the image: this makes the venv match it.
# - opentelemetry.sdk.metrics: redis-py's metrics export (1.3 MB), live only once an application calls
#   redis-py's observability init, which the gateway never does; its tracing uses opentelemetry.sdk.trace.
UNUSED_OPTIONAL = ("trustme", "opentelemetry.sdk.metrics")


async def serve(
    config: Config,
    grpc_only: bool = False,
    stop: asyncio.Event | None = None,
    reloads: Any = None,
    prepare: Callable[[Config], Config] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT (or `stop`), then drain: see `_drain`.

    Config reloads come from the main process through `reloads` (the read end of a pipe) in a worker
    of several; a process that is the only worker is given `prepare` and reloads on its own."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    malloc.fix_thresholds()  # large freed buffers go back to the system: RSS follows the load down
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Setting the event again is a no-op: a second signal never cuts the drain short.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    grpc_server = core = rest = flusher = live = watcher = None
    backend: ChatBackend | None = None
    srv = config.server
    current = [config]
    try:
        if not srv.grpc_target:
            with absent(UNUSED_OPTIONAL):  # the core's start-up may import what its config needs (redis-py)
                from llm_gateway.v1 import chat_pb2
                from service.admin.core import AdminCore
                from service.admin.servicer import SERVICE as ADMIN_SERVICE
                from service.admin.servicer import AdminServicer
                from service.chat import ChatCore
                from service.live import LiveCore
                from service.server import SERVICE_NAME, start_grpc_server

                from .inprocess import InProcessBackend

                core = ChatCore(config)
            admin = AdminCore(lambda: live.core if live is not None else core)  # the core in force
            others = [(AdminServicer(admin), ADMIN_SERVICE)]
            grpc_server = await start_grpc_server(core, f"{srv.host}:{srv.grpc_port}", others)
            backend = InProcessBackend(
                core, chat_pb2.DESCRIPTOR.services_by_name["ChatService"], [(admin, ADMIN_SERVICE)]
            )
            log.info("grpc listening", address=f"{srv.host}:{srv.grpc_port}", service=SERVICE_NAME)
            live = LiveCore(core, [grpc_server.servicer, backend])
        if not grpc_only:
            rest = await _start_rest(config, backend)

        def apply(new: Config) -> bool:
            for provider in new.providers.values():
                logs.add_secret(provider.api_key)
            if live is not None and not live.swap(new):
                return False
            current[0] = new  # the log level is set by whoever logs the reload, once it has
            return True

        if reloads is not None:
            _listen(reloads, apply)
        elif prepare is not None:
            from .reload import Reloader

            reloader = Reloader(config, prepare, apply)
            loop.add_signal_handler(signal.SIGHUP, reloader.on_signal)
            if srv.watch_config:
                watcher = asyncio.create_task(reloader.watch(stop))
        # Start-up objects (modules, descriptors, codec tables) never die: keep them out of every later
        # GC pass. Full collections then scan only request garbage (p99 at c=32: 28 -> 13 ms, unary).
        gc.collect()
        gc.freeze()
        if metrics.MULTIPROCESS:
            flusher = asyncio.create_task(metrics.flush_periodically())
        await stop.wait()
        if watcher is not None:
            watcher.cancel()
        await _drain(current[0].server.shutdown_delay, current[0].server.shutdown_grace, rest, grpc_server)
    finally:
        if rest is not None:
            await rest.close(loop.time())  # a no-op after a drain; after a failed start, closes at once
        if grpc_server is not None:
            await grpc_server.stop(loop.time())
        if live is not None:
            await live.close()  # the core in force, and any a reload replaced that was still finishing
        elif core is not None:
            await core.close()
        if flusher is not None:
            flusher.cancel()
        metrics.flush()  # what the last requests counted, before the worker's process ends


async def _drain(delay: float, grace: float, rest: Any, grpc_server: Any) -> None:
    """Kubernetes' order: not ready at once, still serving for `delay` seconds (endpoints are removed
    while the pod already has SIGTERM), then no new requests, and `grace` seconds for those in flight."""
    loop = asyncio.get_running_loop()
    log.info("shutting down", shutdown_delay=delay, shutdown_grace=grace)
    if rest is not None:
        rest.not_ready()
    if grpc_server is not None:
        await grpc_server.not_serving()
    if delay:
        await asyncio.sleep(delay)
    deadline = loop.time() + grace
    await asyncio.gather(
        *(part.close(deadline) for part in (rest,) if part is not None),
        *(part.stop(deadline) for part in (grpc_server,) if part is not None),
    )
    log.info("stopped")


def _listen(reloads: Any, apply: Callable[[Config], bool]) -> None:
    """Apply each config the main process sends; it validated it, and every worker gets the same one."""
    loop = asyncio.get_running_loop()

    def receive() -> None:
        try:
            new = reloads.recv()  # readable: the whole pickled Config is there or on its way
        except (EOFError, OSError):  # the main process is gone
            loop.remove_reader(reloads.fileno())
            return
        if apply(new):
            log.debug("config applied", models=sorted(new.models))
            logs.configure(new.log_level)

    loop.add_reader(reloads.fileno(), receive)


async def _start_rest(config: Config, backend: ChatBackend | None) -> Any:
    try:
        with absent(UNUSED_OPTIONAL):
            from rest_facade.server import start_rest_server  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # the facade is not built yet
        return None
    return await start_rest_server(config, backend)


@contextlib.contextmanager
def absent(names: tuple[str, ...]) -> Iterator[None]:
    """Within the block, importing one of `names` raises ImportError, as if it were not installed (None in
    sys.modules); a module that is imported already stays as it is. Modules that import one of them
    optionally (try/except ImportError) and load within the block go without it for good."""
    blocked = [name for name in names if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
