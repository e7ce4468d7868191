"""Tenancy: gateway API keys, the models each may use, and rate limits per key and per model.

The chat service calls `Tenancy.admit` before it routes a request, and the request's `Tenant` is
finished (counted, settled, its slot released) exactly once, in `RequestRecord.finish`, however the
request ends. Both transports reach it the same way: the key travels in the call's metadata.

    keys.py      keys held as digests, and who a call is
    limits.py    scopes, reservations, OpenAI's headers and 429s
    state.py     the state interface; memory.py, redis.py and failover.py implement it
    budgets.py   spend per key and team per calendar period, seeded from the usage ledger

The key table (digests, and what admitting each key and model takes) is built whole and put in place
in one assignment, so keys created or revoked through the admin API change it without a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence

from prometheus_client import Counter

from gateway import metrics
from gateway.call import CallInfo, new_request_id
from gateway.config import ApiKeyConfig, Config
from gateway.hotmetrics import incrementer
from gateway.logs import get_logger
from llm_gateway.v1 import chat_pb2

from ..accounting import RequestRecord
from ..spend.meter import NO_KEY
from .budgets import Budget, BudgetBook, refusal, unchecked
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
from .state import MISSING, UNCHECKED, Bucket, BudgetCounter, LimitState, Verdict

__all__ = ["Admission", "KeyUse", "Tenancy", "Tenant"]

log = get_logger("tenancy")

_CHAT = chat_pb2.CreateChatCompletionRequest  # one global read per request, not a module attribute too


class KeyUse:
    """One key's use of one model: its name and labels for the access log, its metric children."""

    __slots__ = ("_model", "_outcomes", "caller", "completion_tokens", "metadata", "name", "prompt_tokens")

    def __init__(self, key: ApiKeyConfig | None, model: str) -> None:
        self.name = key.name if key is not None else ""
        self.metadata: Mapping[str, str] = key.metadata if key is not None else {}
        # The ledger's and the cost metric's (key, team): "none" without a key (auth off).
        self.caller = (self.name or NO_KEY, self.metadata.get("team", ""))
        self._model = model
        self._outcomes: dict[int, Callable[[float], None]] = {}
        if key is not None:
            self.prompt_tokens = incrementer(metrics.KEY_TOKENS.labels(self.name, model, "prompt"))
            self.completion_tokens = incrementer(metrics.KEY_TOKENS.labels(self.name, model, "completion"))

    def finish(self, status: int, usage: chat_pb2.Usage | None, cost: int = 0) -> None:
        if usage is None:  # counted as a request, with no tokens
            self.counted(status, 0, 0)
        else:
            self.counted(status, usage.prompt_tokens, usage.completion_tokens)

    def counted(self, status: int, prompt: int, completion: int) -> None:
        """As `finish` with a usage whose two counts the caller has read already (each read is a call)."""
        if not self.name:
            return
        inc = self._outcomes.get(status)
        if inc is None:  # a handful of statuses per pair, bound the first time each is seen
            inc = self._outcomes[status] = incrementer(metrics.KEY_REQUESTS.labels(self.name, self._model, str(status)))
        inc(1.0)
        self.prompt_tokens(prompt)
        self.completion_tokens(completion)


class Admission:
    """A request that passed its limits: what it holds until it is finished."""

    __slots__ = ("_budgets", "_done", "_lease", "_pair", "_prompt", "_reserved", "_state", "caller", "use")

    def __init__(
        self,
        pair: _Pair,
        state: LimitState,
        reserved: int,
        prompt: int,
        lease: str,
        budgets: Sequence[tuple[BudgetCounter, int]] = (),
    ) -> None:
        self.use = use = pair.use
        self.caller = use.caller
        self._pair = pair  # its scopes, read when it is finished: one field, not one per scope
        self._state = state
        self._reserved = reserved
        self._prompt = prompt
        self._lease = lease
        self._budgets = budgets  # (counter, micro-dollars reserved)
        self._done = False

    @property
    def name(self) -> str:
        return self.use.name

    @property
    def metadata(self) -> Mapping[str, str]:
        return self.use.metadata

    def finish(self, status: int, usage: chat_pb2.Usage | None, cost: int = 0) -> None:
        """Settle once: the provider's usage replaces the reservation (without usage, the prompt's
        estimate does: the provider read the prompt, its output is unknown); the actual cost (micro-dollars)
        replaces the budgets' reservation; the slot is released."""
        if self._done:
            return
        self._done = True
        if usage is not None:  # its counts read once, for the key's metrics and the settlement
            prompt, completion = usage.prompt_tokens, usage.completion_tokens
            self.use.counted(status, prompt, completion)
            used = prompt + completion
        else:
            self.use.finish(status, None)
            used = self._prompt
        pair = self._pair
        tokens = pair.tokens
        adjust: Sequence[tuple[Bucket, float]] = ()
        if tokens:
            delta = used - self._reserved
            if delta:  # a reservation that was exact has nothing to settle
                one = pair.one_tokens
                # One tokens bucket (the common case): a list display, no comprehension to call.
                adjust = [(one, delta)] if one is not None else [(bucket, delta) for bucket in tokens]
        budgets = self._budgets
        spends = [(counter, cost) for counter, _ in budgets] if budgets else ()  # reservations go with the lease
        pools = pair.pools
        if adjust or pools or spends:
            self._state.settle(adjust, pools, self._lease, spends)


Tenant = KeyUse | Admission
ChatOrEmbedding = chat_pb2.CreateChatCompletionRequest | chat_pb2.CreateEmbeddingRequest


class _Pair:
    """What admitting one (key, model) pair needs, built once per key table."""

    __slots__ = (
        "budgets",
        "leased",
        "limited",
        "limits",
        "one_tokens",
        "pools",
        "request_charges",
        "requests",
        "room",
        "scopes",
        "tokens",
        "too_large",
        "use",
    )

    def __init__(
        self,
        use: KeyUse,
        scopes: Scopes,
        limited: tuple[Counter, ...],
        too_large: tuple[Counter, ...],
        budgets: tuple[Budget, ...] = (),
    ):
        self.use = use
        self.scopes = scopes
        self.request_charges = tuple((bucket, 1.0) for bucket in scopes.requests)
        self.limited = limited  # per charge, then per pool, then per budget: the rate_limited_total child
        self.too_large = too_large  # per tokens bucket
        self.budgets = budgets
        # Worked out here, read per request as plain fields:
        self.limits = bool(scopes or budgets)  # anything to take at all
        self.requests = len(scopes.requests)
        self.tokens = scopes.tokens
        self.one_tokens = scopes.tokens[0] if len(scopes.tokens) == 1 else None
        self.pools = scopes.pools
        self.leased = bool(scopes.pools or budgets)  # slots and reservations are held under a lease
        # The smallest tokens limit: a reservation within it fits every tokens bucket (one comparison).
        self.room = min((bucket.limit for bucket in scopes.tokens), default=math.inf)


class _Table:
    """The keys in force and every (key, model) pair they admit; replaced whole, never changed."""

    __slots__ = ("allowed", "keys", "lists", "pairs", "ring")

    def __init__(self, keys: tuple[ApiKeyConfig, ...], config: Config, book: BudgetBook, auth: bool) -> None:
        self.keys = keys
        self.ring = KeyRing(keys)
        by_key = key_buckets(config, keys)
        by_model = model_buckets(config)
        pairs: dict[tuple[str, str], _Pair] = {}
        owners: list[ApiKeyConfig | None] = list(keys) if auth else [None]
        for key in owners:
            name = key.name if key is not None else ""
            allowed = key.models if key is not None and key.models is not None else tuple(config.models)
            budgets = book.for_key(key) if key is not None else ()
            for model in allowed:
                k_req, k_tok, k_pool = by_key.get(name, ((), (), ()))
                m_req, m_tok, _ = by_model.get(model, ((), (), ()))
                scopes = Scopes(k_req + m_req, k_tok + m_tok, k_pool)
                label = name or "none"
                limited = (
                    tuple(
                        metrics.RATE_LIMITED.labels(label, b.scope, b.kind) for b in (*scopes.requests, *scopes.tokens)
                    )
                    + tuple(metrics.RATE_LIMITED.labels(label, "key", "parallel") for _ in scopes.pools)
                    + tuple(metrics.RATE_LIMITED.labels(label, b.scope, "budget") for b in budgets)
                )
                large = tuple(metrics.RATE_LIMITED.labels(label, b.scope, "too_large") for b in scopes.tokens)
                pairs[(name, model)] = _Pair(KeyUse(key, model), scopes, limited, large, budgets)
        self.pairs = pairs
        self.allowed = {key.name: key.models for key in keys}
        self.lists: dict[str, chat_pb2.ListModelsResponse] = {}


class Tenancy:
    def __init__(self, config: Config) -> None:
        self._config = config
        # Auth is on with keys in the config, or with a master key (keys then come from the admin API).
        self._auth = bool(config.auth.keys or config.auth.master_sha256)
        self._models = config.models
        self._default_cap = config.limits.default_max_tokens
        self.book = BudgetBook(config)
        self._deny_unchecked = config.budgets.when_state_down == "deny"
        self.state = _state(config)
        self._owns_state = True
        self._watch_recovery()
        state = config.state
        self._held_as = (state.redis_url, state.timeout, state.slot_lease, config.server.workers)
        self._table = _Table(config.auth.keys, config, self.book, self._auth)
        with contextlib.suppress(RuntimeError):  # built on the serving loop: the budget gauges start
            asyncio.get_running_loop()
            self.book.start_gauges()

    @property
    def state(self) -> LimitState:
        return self._state

    @state.setter
    def state(self, state: LimitState) -> None:
        self._state = state
        self._local = state if isinstance(state, MemoryState) else None

    @property
    def keys(self) -> tuple[ApiKeyConfig, ...]:
        """Every key in force: the config's, then those created through the admin API."""
        return self._table.keys

    def set_keys(self, created: Sequence[ApiKeyConfig]) -> None:
        """Put the admin API's keys in force beside the config's, in one assignment (a name or secret the
        config already has is skipped: the config's key wins)."""
        config_keys = self._config.auth.keys
        names = {key.name for key in config_keys}
        digests = {key.sha256 for key in config_keys}
        extra = tuple(key for key in created if key.name not in names and key.sha256 not in digests)
        gone = {key.name for key in self._table.keys} - {key.name for key in (*config_keys, *extra)}
        self._table = _Table(config_keys + extra, self._config, self.book, self._auth)
        self.book.forget(gone)

    def _watch_recovery(self) -> None:
        if isinstance(self.state, FailoverState):
            book, state = self.book, self.state

            async def recovered() -> None:
                await book.reseed_all(state.primary)

            state.on_recovered = recovered

    @staticmethod
    def carry_over(old: Tenancy | None, new: Tenancy | None) -> None:
        """After a config reload: the new core keeps the old one's limit state when it is held the same
        way, so buckets and the slots of calls still running on the old core carry over, not reset.
        Keys created through the admin API stay in force until the new core's own sync has loaded them."""
        if old is not None and new is not None:
            new.set_keys([key for key in old.keys if key.source == "admin"])
        if old is None or new is None or old._held_as != new._held_as:
            return
        fresh, new.state = new.state, old.state
        old._owns_state = False
        new._watch_recovery()
        asyncio.get_running_loop().create_task(fresh.close())

    @classmethod
    def build(cls, config: Config) -> Tenancy | None:
        """None when there is nothing to enforce (no keys, no model limits): the chat path skips it all."""
        if not config.auth.keys and not config.limits.models and not config.auth.master_sha256:
            return None
        return cls(config)

    async def admit(self, request: ChatOrEmbedding, call: CallInfo, record: RequestRecord) -> None:
        """Authenticate, check the model, take the limits; raises 401, 404 or 429. The record's tenant is
        then finished once, by RequestRecord.finish, however the request ends."""
        table = self._table  # one read: a key table swapped meanwhile applies from the next request
        key = table.ring.authenticate(call) if self._auth else None
        model = request.model
        pair = table.pairs.get((key.name if key is not None else "", model))
        if pair is None:
            if key is None and model in self._models:
                return  # auth off, and this model has no limits
            raise model_not_found(model)
        if key is not None:
            record.tenant = pair.use  # counted and logged under the key from here on, 429s included
        if not pair.limits:
            return
        budgets = pair.budgets
        tokens = pair.tokens
        prompt = reserved = 0
        charges: list[tuple[Bucket, float]]
        if tokens or budgets:
            if isinstance(request, _CHAT):
                prompt = estimate_prompt_tokens(request, model)
                reserved = prompt + completion_cap(request, self._default_cap)
            else:  # embeddings: the input is all there is, and its text is nearly all of the message
                prompt = reserved = request.ByteSize() // CHARS_PER_TOKEN
            if reserved > pair.room:  # too large for some tokens bucket: the first such one answers
                for index, bucket in enumerate(tokens):
                    if reserved > bucket.limit:
                        pair.too_large[index].inc()
                        raise too_large_error(bucket, reserved)
            one = pair.one_tokens
            if one is not None:  # one tokens bucket (the common case): the list built in one display
                charges = [*pair.request_charges, (one, float(reserved))]
            else:
                charges = [*pair.request_charges, *[(bucket, float(reserved)) for bucket in tokens]]
        else:
            charges = [*pair.request_charges]  # (bucket, 1.0), built once per pair
        spend: Sequence[tuple[BudgetCounter, int]] = ()
        if budgets:  # the most this request can cost, reserved in each budget
            most = self.book.pricing.reserve(model, prompt, reserved - prompt)
            now = time.time()
            spend = [(budget.counter(now), most) for budget in budgets]
        lease = new_request_id() if pair.leased else ""  # what slots and reservations are held under
        pools = pair.pools
        local = self._local
        if local is not None:  # in this process: a plain call, no coroutine to create and await
            taken = local.take(charges, pools, lease, spend)
            if type(taken) is list:  # admitted (the common case): its levels alone, no Verdict built
                if taken:
                    headers(taken, pair.requests, call.response_metadata)
                record.tenant = Admission(pair, local, reserved, prompt, lease, spend)
                return
            assert isinstance(taken, Verdict)
            verdict = taken
        else:
            verdict = await self.state.admit(charges, pools, lease, spend)
        if verdict.failed == MISSING:  # a new period, a restarted Redis: counters seeded from the ledger
            assert verdict.state is not None
            if await self.book.seed(verdict.state, verdict.missing):
                verdict = await self.state.admit(charges, pools, lease, spend)
            elif self._deny_unchecked:
                raise unchecked()
            else:  # neither the ledger nor the state can seed it: as when the state is down, unchecked
                spend = ()
                verdict = await self.state.admit(charges, pools, lease)
        if not verdict.ok:
            if verdict.failed in (UNCHECKED, MISSING):
                raise unchecked()
            pair.limited[verdict.failed].inc()
            held = len(charges) + len(pools)
            if verdict.failed >= held:
                counter, most = spend[verdict.failed - held]
                log.debug("budget spent", key=pair.use.name, budget=counter.id, used=verdict.used)
                raise refusal(counter, verdict.used, most)
            error = rejection(verdict, pair.scopes, [cost for _, cost in charges])
            log.debug(
                "rate limited",
                key=pair.use.name,
                scope=error.quota_subject,
                kind=error.type,
                retry_ms=round(verdict.retry_ms),
            )
            raise error
        if verdict.levels:
            headers(verdict.levels, pair.requests, call.response_metadata)
        assert verdict.state is not None
        record.tenant = Admission(pair, verdict.state, reserved, prompt, lease, spend if verdict.budgeted else ())

    def list_models(self, call: CallInfo, every: chat_pb2.ListModelsResponse) -> chat_pb2.ListModelsResponse:
        if not self._auth:
            return every
        table = self._table
        name = table.ring.authenticate(call).name
        listed = table.lists.get(name)
        if listed is None:  # once per key and key table
            allowed = table.allowed[name]
            data = [m for m in every.data if allowed is None or m.id in allowed]
            listed = table.lists[name] = chat_pb2.ListModelsResponse(object=every.object, data=data)
        return listed

    async def close(self) -> None:
        await self.book.close()
        if self._owns_state:
            await self.state.close()


def _state(config: Config) -> LimitState:
    """Redis (behind the in-process fallback) when configured; else this process, with its share of
    each limit when several workers split them."""
    share = 1.0 / config.server.workers
    if config.state.redis_url:
        # A budget reservation outlives any call (the deadline caps them), then lapses: a dead replica's go.
        hold = config.server.request_timeout + 60.0
        from .redis import RedisState  # redis-py: imported only where the state lives in Redis

        primary = RedisState(config.state.redis_url, config.state.timeout, config.state.slot_lease, hold)
        return FailoverState(primary, MemoryState(share), deny_budgets=config.budgets.when_state_down == "deny")
    return MemoryState(share)
