"""The admin API itself, free of any transport: its coroutines are the snake_case names of the
AdminService RPCs, so the gRPC servicer and the in-process REST path dispatch to it by method name.

Every call needs the master key (`auth.master_key`), compared by its SHA-256 digest in constant time.
Each call is logged with its caller ("master") and action, never a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson

from gateway.call import CallInfo
from gateway.config import ApiKeyConfig, ConfigError, parse_api_key
from gateway.errors import (
    ConflictError,
    FailedPreconditionError,
    InvalidApiKeyError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from gateway.logs import get_logger
from llm_gateway.v1 import admin_pb2
from service.spend.prices import usd

from ..tenancy.keys import digest, presented_key
from .store import KeyExists, StoredKey
from .sync import KeySync

if TYPE_CHECKING:
    from service.chat import ChatCore

log = get_logger("admin")

SECRET_PREFIX = "sk-gw-"
USAGE_GROUPS = {"key": "key_name", "team": "team", "model": "model", "provider": "provider", "day": "day"}
DEFAULT_GROUPS = ("key", "model", "day")
DEFAULT_RANGE = timedelta(days=30)


class AdminCore:
    def __init__(self, current: Callable[[], ChatCore]) -> None:
        self._current = current  # the ChatCore in force: a config reload changes it

    # ------------------------------------------------------------------ keys

    async def create_key(self, request: admin_pb2.CreateKeyRequest, call: CallInfo) -> admin_pb2.CreatedKey:
        core = self._authorize(call, "create_key", key=request.name)
        sync = _sync(core)
        name = request.name
        if any(key.name == name for key in core.config.auth.keys):
            raise ConflictError(f"A key named {name!r} is in the config file already.", param="name")
        spec = _spec(request)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        sha256 = hashlib.sha256(secret.encode()).hexdigest()
        try:
            parse_api_key("key", {"name": name, "key_sha256": sha256, **spec}, core.config.models)
        except ConfigError as exc:
            raise InvalidRequestError(f"Invalid key: {exc}.", param=str(exc).split(":", 1)[0]) from None
        stored = StoredKey(name, sha256, spec, time.time())
        try:
            await sync.store.create(stored)
        except KeyExists:
            raise ConflictError(f"A key named {name!r} exists already (revoked keys keep their names).") from None
        await sync.changed()
        log.info("admin call done", caller="master", action="create_key", key=name)
        return admin_pb2.CreatedKey(key=_stored_message(stored), secret=secret)

    async def list_keys(self, request: admin_pb2.ListKeysRequest, call: CallInfo) -> admin_pb2.ListKeysResponse:
        core = self._authorize(call, "list_keys")
        keys = [_key_message(key) for key in core.config.auth.keys]
        sync = core.keysync
        if sync is not None:
            for stored in await sync.store.keys(include_revoked=request.include_revoked):
                keys.append(_stored_message(stored))
        return admin_pb2.ListKeysResponse(keys=keys)

    async def revoke_key(self, request: admin_pb2.RevokeKeyRequest, call: CallInfo) -> admin_pb2.Key:
        core = self._authorize(call, "revoke_key", key=request.name)
        if any(key.name == request.name for key in core.config.auth.keys):
            raise FailedPreconditionError(
                f"The key {request.name!r} is in the config file: remove it there (config keys are read-only).",
                param="name",
            )
        sync = _sync(core)
        stored = await sync.store.revoke(request.name, time.time())
        if stored is None:
            raise NotFoundError(f"No key named {request.name!r}.", param="name")
        await sync.changed()
        log.info("admin call done", caller="master", action="revoke_key", key=request.name)
        return _stored_message(stored)

    # ------------------------------------------------------------------ usage and budgets

    async def get_usage(self, request: admin_pb2.GetUsageRequest, call: CallInfo) -> admin_pb2.GetUsageResponse:
        core = self._authorize(call, "get_usage")
        sync = _sync(core)
        end = _moment(request.end, "end") if request.HasField("end") else datetime.now(UTC)
        start = _moment(request.start, "start") if request.HasField("start") else end - DEFAULT_RANGE
        groups = tuple(request.group_by) or DEFAULT_GROUPS
        for group in groups:
            if group not in USAGE_GROUPS:
                raise InvalidRequestError(
                    f"Invalid 'group_by': {group!r}; it must be one of {', '.join(USAGE_GROUPS)}.", param="group_by"
                )
        columns = [USAGE_GROUPS[group] for group in dict.fromkeys(groups)]
        totals = await sync.store.ledger.totals(columns, since=start.timestamp(), until=end.timestamp())
        rows = []
        for total in totals:
            row = admin_pb2.UsageRow(
                requests=total["requests"],
                prompt_tokens=total["prompt_tokens"],
                cached_tokens=total["cached_tokens"],
                completion_tokens=total["completion_tokens"],
                cost_micro_usd=total["cost_micro"],
                cost_usd=usd(total["cost_micro"]),
            )
            for group, column in USAGE_GROUPS.items():
                if column in total:
                    setattr(row, group, str(total[column]))
            rows.append(row)
        return admin_pb2.GetUsageResponse(start=_rfc3339(start), end=_rfc3339(end), rows=rows)

    async def get_budgets(self, request: admin_pb2.GetBudgetsRequest, call: CallInfo) -> admin_pb2.GetBudgetsResponse:
        core = self._authorize(call, "get_budgets")
        tenancy = core.tenancy
        if tenancy is None:
            return admin_pb2.GetBudgetsResponse()
        out = []
        for budget, counter, spent, counted in await tenancy.book.levels(tenancy.state):
            status = admin_pb2.BudgetStatus(
                scope=budget.scope,
                name=budget.owner,
                period=budget.config.period,
                current=counter.period,
                limit_usd=usd(counter.limit),
                spent_usd=usd(spent),
                remaining_usd=usd(max(counter.limit - max(spent, counted or 0), 0)),
            )
            if counted is not None:
                status.counted_usd = usd(counted)
            out.append(status)
        return admin_pb2.GetBudgetsResponse(budgets=out)

    # ------------------------------------------------------------------ the caller

    def _authorize(self, call: CallInfo, action: str, **detail: Any) -> ChatCore:
        core = self._current()
        master = core.config.auth.master_sha256
        if not master:
            log.info("admin call refused", action=action, reason="no master key configured")
            raise PermissionDeniedError("The admin API is off: set auth.master_key in the gateway's config.")
        secret = presented_key(call)
        if not secret or not hmac.compare_digest(digest(secret), master):
            log.info("admin call refused", action=action, reason="missing or wrong master key")
            raise InvalidApiKeyError("The admin API needs the master key: Authorization: Bearer <auth.master_key>.")
        log.info("admin call", caller="master", action=action, **detail)
        return core


def _sync(core: ChatCore) -> KeySync:
    sync = core.keysync
    if sync is None:
        raise FailedPreconditionError("Created keys and usage need the usage ledger: set usage.database (it is empty).")
    return sync


def _spec(request: admin_pb2.CreateKeyRequest) -> dict[str, Any]:
    """The request as a config key's fields (the stored form)."""
    metadata: Any = {}
    if request.HasField("metadata"):
        metadata = orjson.loads(request.metadata)
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise InvalidRequestError("Invalid 'metadata': it must be an object of strings.", param="metadata")
    limits = {
        name: getattr(request.limits, name) for name in ("rpm", "tpm", "max_parallel") if request.limits.HasField(name)
    }
    spec: dict[str, Any] = {"models": list(request.models) or None, "limits": limits, "metadata": metadata}
    if request.HasField("budget"):
        budget = request.budget
        # str() of the double: 0.1 is "0.1", so the config's exact decimal parse applies.
        spec["budget"] = {
            "usd": str(budget.usd) if budget.HasField("usd") else None,
            "period": budget.period or "month",
        }
    return spec


def _key_message(key: ApiKeyConfig) -> admin_pb2.Key:
    """A key of the config file: read-only."""
    limits = admin_pb2.KeyLimits()
    for name in ("rpm", "tpm", "max_parallel"):
        value = getattr(key.limits, name)
        if value is not None:
            setattr(limits, name, value)
    message = admin_pb2.Key(
        name=key.name,
        models=list(key.models or ()),
        limits=limits,
        metadata=orjson.dumps(dict(key.metadata)).decode(),
        source=key.source,
        read_only=True,
    )
    if key.budget is not None:
        message.budget.usd = float(Decimal(key.budget.micro_usd) / 1_000_000)
        message.budget.period = key.budget.period
    return message


def _stored_message(stored: StoredKey) -> admin_pb2.Key:
    spec = stored.spec
    limits = admin_pb2.KeyLimits(**spec.get("limits") or {})
    message = admin_pb2.Key(
        name=stored.name,
        models=spec.get("models") or [],
        limits=limits,
        metadata=orjson.dumps(spec.get("metadata") or {}).decode(),
        source="admin",
        read_only=False,
        created_at=_rfc3339(datetime.fromtimestamp(stored.created_at, UTC)),
    )
    budget = spec.get("budget")
    if budget:
        message.budget.usd = float(budget["usd"])
        message.budget.period = budget["period"]
    if stored.revoked_at is not None:
        message.revoked_at = _rfc3339(datetime.fromtimestamp(stored.revoked_at, UTC))
    return message


def _moment(text: str, param: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequestError(
            f"Invalid {param!r}: {text!r} is not an RFC 3339 time or a date (YYYY-MM-DD).", param=param
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
