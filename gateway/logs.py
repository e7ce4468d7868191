"""Structured logs as JSON lines on stdout, shaped like Go's slog: time, level, msg, then attributes.

    log = get_logger("service")
    log.info("request", request_id="abc", model="gpt-4o", status=200)
    {"time":"2026-11-27T10:00:00.123Z","level":"INFO","msg":"request","request_id":"abc",...}

Configured secrets (API keys, client credentials) are replaced by "[REDACTED]" in every line, at every
level, as a last line of defence: the code never logs them on purpose.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

_secrets: set[str] = set()
_REDACTED = "[REDACTED]"


def add_secret(secret: str) -> None:
    if len(secret) >= 4:
        _secrets.add(secret)


def _redact(line: str) -> str:
    for secret in _secrets:
        if secret in line:
            line = line.replace(secret, _REDACTED)
    return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        millis = int((record.created - seconds) * 1000)
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z",
            "level": "WARN" if record.levelno == logging.WARNING else record.levelname,
            "msg": record.getMessage(),
        }
        attrs = getattr(record, "attrs", None)
        if attrs:
            entry.update(attrs)
        elif record.name and not record.name.startswith("llm_gateway"):
            entry["logger"] = record.name
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return _redact(orjson.dumps(entry, default=str).decode())


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if level == "WARN" else level)
    # Libraries speak at our level or above, never chattier than WARNING at INFO.
    for name in ("sanic.access",):
        logging.getLogger(name).disabled = True
    for name in ("sanic.root", "sanic.error", "sanic.server", "grpc", "asyncio", "watchfiles"):
        library = logging.getLogger(name)
        library.handlers[:] = []
        library.propagate = True
        library.setLevel(max(root.level, logging.WARNING) if name != "sanic.root" else root.level)


class Logger:
    """A thin wrapper over a stdlib logger that takes slog-style key=value attributes."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(f"llm_gateway.{name}")

    def enabled(self, level: int) -> bool:
        return self._logger.isEnabledFor(level)

    def debug(self, msg: str, **attrs: Any) -> None:
        if self._logger.isEnabledFor(logging.DEBUG):
            self._logger.debug(msg, extra={"attrs": attrs})

    def info(self, msg: str, **attrs: Any) -> None:
        if self._logger.isEnabledFor(logging.INFO):
            self._logger.info(msg, extra={"attrs": attrs})

    def warning(self, msg: str, **attrs: Any) -> None:
        self._logger.warning(msg, extra={"attrs": attrs})

    def error(self, msg: str, exc_info: bool = False, **attrs: Any) -> None:
        self._logger.error(msg, exc_info=exc_info, extra={"attrs": attrs})


def get_logger(name: str) -> Logger:
    return Logger(name)
