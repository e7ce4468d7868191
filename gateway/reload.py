"""Hot config reload, in the main process: triggers, validation, the change report, the metrics.

Triggers are SIGHUP and, unless `server.watch_config: false`, a change in the config file's
directory: Kubernetes updates a mounted ConfigMap by swapping its `..data` symlink, which a watch on
the file itself never sees. Bursts are debounced (watchfiles) and the file's SHA-256 is compared, so
an unchanged file does nothing.

The new file is parsed and validated whole before anything changes. A bad one changes nothing: one
log line names the key, as at start-up, and the old config keeps serving. A good one is handed to
`apply`, which swaps it in every worker (see gateway/runner.py and service/live.py): calls in flight
finish on the config they started with, new ones get the new one.

What a running process cannot change (ports, workers, the process mode: every `server` key but the
shutdown timings) keeps its old value and is reported as needing a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from . import logs, metrics
from .config import Config, ConfigError, load_text

log = logs.get_logger("reload")

# Server keys a running process applies; every other one needs a restart.
LIVE_SERVER_KEYS = frozenset({"shutdown_delay", "shutdown_grace"})
RESULTS = ("applied", "rejected", "unchanged")
_DEBOUNCE_MS = 1000


def _chattier(one: str, other: str) -> str:
    levels = [one, other]
    return min(levels, key=lambda name: logging.getLevelName("WARNING" if name == "WARN" else name))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_file(config: Config) -> Path | None:
    """The file `config` was read from; None for the built-in default."""
    return None if config.source.startswith("<") else Path(config.source)


def effective(current: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with the server keys that need a restart kept as they are, and the names of those that differ."""
    restart = [
        f"server.{f.name}"
        for f in fields(current.server)
        if f.name not in LIVE_SERVER_KEYS and getattr(current.server, f.name) != getattr(new.server, f.name)
    ]
    live = {name: getattr(new.server, name) for name in LIVE_SERVER_KEYS}
    return replace(new, server=replace(current.server, **live)), restart


def changes(old: Config, new: Config) -> dict[str, Any]:
    """What a reload changes, by name only: never a value, so never a secret."""
    report: dict[str, Any] = {}

    def named(kind: str, before: dict[str, Any], after: dict[str, Any]) -> None:
        added = sorted(after.keys() - before.keys())
        removed = sorted(before.keys() - after.keys())
        changed = sorted(name for name in before.keys() & after.keys() if before[name] != after[name])
        for what, names in (("added", added), ("removed", removed), ("changed", changed)):
            if names:
                report[f"{kind}_{what}"] = names

    named("models", dict(old.models), dict(new.models))
    named("providers", dict(old.providers), dict(new.providers))
    old_auth, new_auth = getattr(old, "auth", None), getattr(new, "auth", None)
    if old_auth is not None and new_auth is not None:
        named("keys", {k.name: k for k in old_auth.keys}, {k.name: k for k in new_auth.keys})
    sections = [
        f.name
        for f in fields(old)
        if f.name not in ("models", "providers", "auth", "source", "server")
        and getattr(old, f.name) != getattr(new, f.name)
    ]
    if sections:
        report["sections_changed"] = sections
    return report


class Reloader:
    """Reloads the config `current` was loaded from. `prepare` turns a parsed file into the config the
    process runs (the command-line flags applied); `apply` puts a good one in force everywhere, and
    says whether it could."""

    def __init__(self, current: Config, prepare: Callable[[Config], Config], apply: Callable[[Config], bool]) -> None:
        self.current = current
        self._prepare = prepare
        self._apply = apply
        self.path = config_file(current)
        self._digest = self._read_digest()
        self._rejected = ""  # the digest last refused, so a watch does not report the same bad file again
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[str]] = set()
        for result in RESULTS:
            metrics.CONFIG_RELOADS.labels(result)
        metrics.CONFIG_INFO.labels(self._digest).set(1)
        metrics.flush()

    def _read_digest(self) -> str:
        if self.path is None:
            return digest(b"")
        try:
            return digest(self.path.read_bytes())
        except OSError:
            return ""

    async def reload(self, trigger: str) -> str:
        """One reload; the result, or "" when a watch saw no change to the file. Never raises."""
        async with self._lock:  # SIGHUP and the watch never interleave
            try:
                return self._reload(trigger)
            except Exception:  # a bug must not end the process that serves
                log.error("config reload failed", exc_info=True, trigger=trigger)
                return ""
            finally:
                metrics.flush()

    def _reload(self, trigger: str) -> str:
        if self.path is None:
            data = b""
        else:
            try:
                data = self.path.read_bytes()
            except OSError as exc:  # a ConfigMap swap in progress, a file moved away
                return self._rejected_with(f"config file {self.path}: {exc.strerror}", digest(b""), trigger)
        new_digest = digest(data)
        if new_digest == self._digest:
            if trigger == "watch":
                return ""
            metrics.CONFIG_RELOADS.labels("unchanged").inc()
            log.info("config unchanged", trigger=trigger, sha256=new_digest)
            return "unchanged"
        if trigger == "watch" and new_digest == self._rejected:
            return ""
        if self.path is not None and not data.strip():
            # Valid at start-up (the defaults), but here most likely a file caught while it is rewritten:
            # taking it would drop every model.
            return self._rejected_with(f"config file {self.path}: empty", new_digest, trigger)
        try:
            text = data.decode("utf-8")
            parsed = load_text(text, self.current.source, os.environ) if self.path is not None else self.current
            new = self._prepare(parsed)
        except UnicodeDecodeError:
            return self._rejected_with(f"config file {self.path}: not UTF-8 text", new_digest, trigger)
        except ConfigError as exc:
            return self._rejected_with(str(exc), new_digest, trigger)
        new, restart = effective(self.current, new)
        report = changes(self.current, new)
        old_level = self.current.log_level
        if not self._apply(new):  # valid, yet it could not be built (logged where it failed)
            return self._rejected_with("the new config could not be put in force", new_digest, trigger)
        self.current = new
        metrics.CONFIG_INFO.labels(self._digest).set(0)
        metrics.CONFIG_INFO.labels(new_digest).set(1)
        self._digest, self._rejected = new_digest, ""
        metrics.CONFIG_RELOADS.labels("applied").inc()
        if restart:
            report["needs_a_restart"] = restart
        # The report is logged at the chattier of the two levels, so a reload that changes the level
        # is still reported; a change that needs a restart keeps its old value: a warning.
        logs.configure(_chattier(old_level, new.log_level))
        (log.warning if restart else log.info)("config reloaded", trigger=trigger, sha256=new_digest, **report)
        logs.configure(new.log_level)
        return "applied"

    def _rejected_with(self, error: str, bad_digest: str, trigger: str) -> str:
        self._rejected = bad_digest
        metrics.CONFIG_RELOADS.labels("rejected").inc()
        log.error("config reload rejected; the old config keeps serving", trigger=trigger, error=error)
        return "rejected"

    def on_signal(self) -> None:
        """For loop.add_signal_handler(SIGHUP, ...)."""
        task = asyncio.get_running_loop().create_task(self.reload("SIGHUP"))
        self._tasks.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._tasks.discard)

    async def watch(self, stop: asyncio.Event) -> None:
        """Reload on every change in the config file's directory until `stop` is set."""
        if self.path is None:
            return
        import watchfiles

        directory = self.path.absolute().parent
        name = self.path.name

        def relevant(_change: object, path: str) -> bool:
            # The file itself (edited, or replaced by a rename), or Kubernetes' `..data` symlink swap; never
            # the other files of the directory (a log file there would reload every 100 ms).
            entry = os.path.basename(path)
            return entry == name or entry.startswith("..")

        log.debug("watching the config directory", directory=str(directory))
        try:
            async for _ in watchfiles.awatch(
                directory, watch_filter=relevant, debounce=_DEBOUNCE_MS, stop_event=stop, recursive=False
            ):
                await self.reload("watch")
        except Exception as exc:  # the directory went away, an inotify limit: SIGHUP still works
            log.error(
                "cannot watch the config directory; SIGHUP still reloads", directory=f"{directory}", error=repr(exc)
            )
