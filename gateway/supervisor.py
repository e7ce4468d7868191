"""The main process of `--workers N`: starts the workers, passes SIGTERM on, and reloads the config.

Workers share the ports (SO_REUSEPORT). SIGTERM or SIGINT is passed on to every worker, which drains
(gateway/runner.py); a repeated signal is passed on too, and a draining worker ignores it, so it
never cuts streams short. A worker still alive well after its drain should be over is killed.

A reload (SIGHUP, or a change in the config's directory) is validated here, once; a good config is
then sent whole, pickled, down a pipe to each worker, so every worker swaps to the very same one
(a worker that re-read the file could read a newer one). Workers ignore SIGHUP.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import logs
from .config import Config

# Seconds past shutdown_delay + shutdown_grace after which a worker that has not exited is killed.
KILL_MARGIN = 10.0
_POLL = 0.2

log = logs.get_logger("cli")


def supervise(config: Config, grpc_only: bool, prepare: Callable[[Config], Config], worker: Callable[..., None]) -> int:
    made = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Workers keep metric values in shared files here, so /metrics on any worker shows the sum.
        made = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="llm-gateway-metrics-")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the reload handler is in place
    try:
        return asyncio.run(_run(config, grpc_only, prepare, worker))
    finally:
        if made is not None:  # ours, and every worker has exited: one directory per start would pile up
            shutil.rmtree(made, ignore_errors=True)


async def _run(
    config: Config, grpc_only: bool, prepare: Callable[[Config], Config], worker: Callable[..., None]
) -> int:
    from . import metrics  # after PROMETHEUS_MULTIPROC_DIR is set: this process counts the reloads
    from .reload import Reloader

    loop = asyncio.get_running_loop()
    context = multiprocessing.get_context("spawn")
    pipes = [context.Pipe(duplex=False) for _ in range(config.server.workers)]
    workers = [
        context.Process(target=worker, args=(config, grpc_only, reader), name=f"worker-{i}")
        for i, (reader, _) in enumerate(pipes)
    ]
    stop = asyncio.Event()
    give_up: list[float] = []

    def terminate() -> None:
        if not give_up:
            srv = reloader.current.server
            give_up.append(time.monotonic() + srv.shutdown_delay + srv.shutdown_grace + KILL_MARGIN)
            stop.set()
        for process in workers:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    # One sending thread per worker: a config larger than the pipe's buffer waits for a busy worker to
    # read it without holding up this loop (and SIGTERM), and one worker's configs stay in order.
    senders = [ThreadPoolExecutor(1, thread_name_prefix=f"config-to-worker-{i}") for i in range(len(workers))]

    def send(new: Config) -> bool:
        for process, (_, writer), sender in zip(workers, pipes, senders, strict=True):
            if process.is_alive():
                sender.submit(_send, writer, new, process.pid)
        return True

    reloader = Reloader(config, prepare, send)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, terminate)
    loop.add_signal_handler(signal.SIGHUP, reloader.on_signal)
    for process in workers:
        process.start()
    for reader, _ in pipes:
        reader.close()  # the workers hold their own copies
    watcher = loop.create_task(reloader.watch(stop)) if config.server.watch_config else None
    killed = await _wait(workers, give_up)
    stop.set()
    if watcher is not None:
        watcher.cancel()
    for sender in senders:  # a send still waiting fails by itself: its worker, the pipe's reader, is gone
        sender.shutdown(wait=False, cancel_futures=True)
    for process in workers:
        if process.pid is not None:
            metrics.mark_worker_dead(process.pid)
    return 1 if killed else max((process.exitcode or 0) for process in workers)


def _send(writer: Any, config: Config, pid: int | None) -> None:
    try:
        writer.send(config)
    except OSError as exc:  # the worker is gone
        log.error("cannot send the new config to a worker", pid=pid, error=str(exc))


async def _wait(workers: list[Any], give_up: list[float]) -> bool:
    """Until every worker has exited; True if one had to be killed."""
    killed = False
    while any(process.is_alive() for process in workers):
        await asyncio.sleep(_POLL)
        if give_up and time.monotonic() > give_up[0]:
            for process in workers:
                if process.is_alive():
                    log.error("worker did not stop after its drain; killing it", pid=process.pid)
                    process.kill()
                    killed = True
    for process in workers:
        process.join()
    return killed
