"""Tenancy: gateway API keys, the models each may use, and rate limits per key and per model.

The chat service calls `Tenancy.admit` before it routes a request, and the request's `Tenant` is
finished (counted, settled, its slot released) exactly once, in `RequestRecord.finish`, however the
request ends. Both transports reach it the same way: the key travels in the call's metadata.

    keys.py      keys held as digests, and who a call is
    limits.py    scopes, reservations, OpenAI's headers and 429s
    state.py     the state interface; memory.py, redis.py and failover.py implement it
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from prometheus_client import Counter

from gateway import metrics
from gateway.call import CallInfo, new_request_id
from gateway.config import ApiKeyConfig, Config
from gateway.logs import get_logger
from llm_gateway.v1 import chat_pb2

from ..accounting import RequestRecord
from .failover import FailoverState
from .keys import KeyRing, model_not_found
from .limits import (
    CHARS_PER_TOKEN,
    Scopes,
    completion_cap,
    estimate_prompt_tokens,
    headers,
    key_buckets,
    model_buckets,
    rejection,
)
from .limits import too_large as too_large_error
from .memory import MemoryState
from .redis import RedisState
from .state import Bucket, LimitState

__all__ = ["Admission", "KeyUse", "Tenancy", "Tenant"]

log = get_logger("tenancy")


class KeyUse:
    """One key's use of one model: its name and labels for the access log, its metric children."""

    __slots__ = ("_model", "_outcomes", "completion_tokens", "metadata", "name", "prompt_tokens")

    def __init__(self, key: ApiKeyConfig | None, model: str) -> None:
        self.name = key.name if key is not None else ""
        self.metadata: Mapping[str, str] = key.metadata if key is not None else {}
        self._model = model
        self._outcomes: dict[int, Counter] = {}
        if key is not None:
            self.prompt_tokens = metrics.KEY_TOKENS.labels(self.name, model, "prompt")
            self.completion_tokens = metrics.KEY_TOKENS.labels(self.name, model, "completion")

    def finish(self, status: int, usage: chat_pb2.Usage | None) -> None:
        if not self.name:
            return
        child = self._outcomes.get(status)
        if child is None:  # a handful of statuses per pair, bound the first time each is seen
            child = self._outcomes[status] = metrics.KEY_REQUESTS.labels(self.name, self._model, str(status))
        child.inc()
        if usage is not None:
            self.prompt_tokens.inc(usage.prompt_tokens)
            self.completion_tokens.inc(usage.completion_tokens)


class Admission:
    """A request that passed its limits: what it holds until it is finished."""

    __slots__ = ("_done", "_lease", "_prompt", "_reserved", "_scopes", "_state", "use")

    def __init__(self, use: KeyUse, scopes: Scopes, state: LimitState, reserved: int, prompt: int, lease: str) -> None:
        self.use = use
        self._scopes = scopes
        self._state = state
        self._reserved = reserved
        self._prompt = prompt
        self._lease = lease
        self._done = False

    @property
    def name(self) -> str:
        return self.use.name

    @property
    def metadata(self) -> Mapping[str, str]:
        return self.use.metadata

    def finish(self, status: int, usage: chat_pb2.Usage | None) -> None:
        """Settle once: the provider's usage replaces the reservation (without usage, the prompt's
        estimate does: the provider read the prompt, its output is unknown); the slot is released."""
        if self._done:
            return
        self._done = True
        self.use.finish(status, usage)
        scopes = self._scopes
        if scopes.tokens:
            used = usage.prompt_tokens + usage.completion_tokens if usage is not None else self._prompt
            delta = used - self._reserved
            self._state.settle([(bucket, delta) for bucket in scopes.tokens], scopes.pools, self._lease)
        elif scopes.pools:
            self._state.settle((), scopes.pools, self._lease)


Tenant = KeyUse | Admission
ChatOrEmbedding = chat_pb2.CreateChatCompletionRequest | chat_pb2.CreateEmbeddingRequest


class _Pair:
    """What admitting one (key, model) pair needs, built at start-up."""

    __slots__ = ("limited", "scopes", "too_large", "use")

    def __init__(self, use: KeyUse, scopes: Scopes, limited: tuple[Counter, ...], too_large: tuple[Counter, ...]):
        self.use = use
        self.scopes = scopes
        self.limited = limited  # per charge, then per pool: the rate_limited_total child
        self.too_large = too_large  # per tokens bucket


class Tenancy:
    def __init__(self, config: Config) -> None:
        self._keys = KeyRing(config.auth.keys)
        self._models = config.models
        self._default_cap = config.limits.default_max_tokens
        self.state = _state(config)
        self._owns_state = True
        state = config.state
        self._held_as = (state.redis_url, state.timeout, state.slot_lease, config.server.workers)
        by_key = key_buckets(config)
        by_model = model_buckets(config)
        pairs: dict[tuple[str, str], _Pair] = {}
        owners: list[ApiKeyConfig | None] = list(config.auth.keys) if config.auth.keys else [None]
        for key in owners:
            name = key.name if key is not None else ""
            allowed = key.models if key is not None and key.models is not None else tuple(config.models)
            for model in allowed:
                k_req, k_tok, k_pool = by_key.get(name, ((), (), ()))
                m_req, m_tok, _ = by_model.get(model, ((), (), ()))
                scopes = Scopes(k_req + m_req, k_tok + m_tok, k_pool)
                label = name or "none"
                limited = tuple(
                    metrics.RATE_LIMITED.labels(label, b.scope, b.kind) for b in (*scopes.requests, *scopes.tokens)
                ) + tuple(metrics.RATE_LIMITED.labels(label, "key", "parallel") for _ in scopes.pools)
                large = tuple(metrics.RATE_LIMITED.labels(label, b.scope, "too_large") for b in scopes.tokens)
                pairs[(name, model)] = _Pair(KeyUse(key, model), scopes, limited, large)
        self._pairs = pairs
        self._allowed = {key.name: key.models for key in config.auth.keys}
        self._lists: dict[str, chat_pb2.ListModelsResponse] = {}

    @staticmethod
    def carry_over(old: Tenancy | None, new: Tenancy | None) -> None:
        """After a config reload: the new core keeps the old one's limit state when it is held the same
        way, so buckets and the slots of calls still running on the old core carry over, not reset."""
        if old is None or new is None or old._held_as != new._held_as:
            return
        fresh, new.state = new.state, old.state
        old._owns_state = False
        asyncio.get_running_loop().create_task(fresh.close())

    @classmethod
    def build(cls, config: Config) -> Tenancy | None:
        """None when there is nothing to enforce (no keys, no model limits): the chat path skips it all."""
        if not config.auth.keys and not config.limits.models:
            return None
        return cls(config)

    async def admit(self, request: ChatOrEmbedding, call: CallInfo, record: RequestRecord) -> None:
        """Authenticate, check the model, take the limits; raises 401, 404 or 429. The record's tenant is
        then finished once, by RequestRecord.finish, however the request ends."""
        key = self._keys.authenticate(call) if self._keys else None
        model = request.model
        pair = self._pairs.get((key.name if key is not None else "", model))
        if pair is None:
            if key is None and model in self._models:
                return  # auth off, and this model has no limits
            raise model_not_found(model)
        if key is not None:
            record.tenant = pair.use  # counted and logged under the key from here on, 429s included
        scopes = pair.scopes
        if not scopes:
            return
        prompt = reserved = 0
        charges: list[tuple[Bucket, float]] = [(bucket, 1.0) for bucket in scopes.requests]
        if scopes.tokens:
            if isinstance(request, chat_pb2.CreateChatCompletionRequest):
                prompt = estimate_prompt_tokens(request)
                reserved = prompt + completion_cap(request, self._default_cap)
            else:  # embeddings: the input is all there is, and its text is nearly all of the message
                prompt = reserved = request.ByteSize() // CHARS_PER_TOKEN
            for index, bucket in enumerate(scopes.tokens):
                if reserved > bucket.limit:
                    pair.too_large[index].inc()
                    raise too_large_error(bucket, reserved)
                charges.append((bucket, float(reserved)))
        lease = new_request_id() if scopes.pools else ""
        verdict = await self.state.admit(charges, scopes.pools, lease)
        if not verdict.ok:
            pair.limited[verdict.failed].inc()
            error = rejection(verdict, scopes, [cost for _, cost in charges])
            log.debug(
                "rate limited",
                key=pair.use.name,
                scope=error.quota_subject,
                kind=error.type,
                retry_ms=round(verdict.retry_ms),
            )
            raise error
        if verdict.levels:
            call.response_metadata.update(headers(verdict.levels, len(scopes.requests)))
        assert verdict.state is not None
        record.tenant = Admission(pair.use, scopes, verdict.state, reserved, prompt, lease)

    def list_models(self, call: CallInfo, every: chat_pb2.ListModelsResponse) -> chat_pb2.ListModelsResponse:
        if not self._keys:
            return every
        name = self._keys.authenticate(call).name
        listed = self._lists.get(name)
        if listed is None:  # once per key: the list never changes while the process runs
            allowed = self._allowed[name]
            data = [m for m in every.data if allowed is None or m.id in allowed]
            listed = self._lists[name] = chat_pb2.ListModelsResponse(object=every.object, data=data)
        return listed

    async def close(self) -> None:
        if self._owns_state:
            await self.state.close()


def _state(config: Config) -> LimitState:
    """Redis (behind the in-process fallback) when configured; else this process, with its share of
    each limit when several workers split them."""
    share = 1.0 / config.server.workers
    if config.state.redis_url:
        primary = RedisState(config.state.redis_url, config.state.timeout, config.state.slot_lease)
        return FailoverState(primary, MemoryState(share))
    return MemoryState(share)
