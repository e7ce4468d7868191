"""The chat service itself, free of any transport: routing, retries and fallbacks, deadlines, usage
capture, accounting.

The gRPC servicer and the in-process REST path both call this. Its public coroutine names are the
snake_case names of the ChatService RPCs, so a transport can dispatch to it by method name.

Deadlines: the caller's deadline (or the configured request timeout) bounds the whole request,
retries and backoff included; each deployment's own timeouts sit inside it.

Streams: an attempt that fails before its first chunk may be retried or fall back. Once a chunk has
been handed to the caller the stream is committed to that deployment: a later failure ends it with
an error and never splices another model's tokens into it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gateway import metrics, tracing
from gateway.call import CallInfo
from gateway.config import Config
from gateway.errors import GatewayError, InvalidRequestError
from llm_gateway.v1 import chat_pb2

from . import embeddings, usage_estimate
from .accounting import RequestRecord
from .admin.sync import KeySync
from .deadline import Deadline
from .ledger import writer_for
from .providers import Provider
from .retry import Attempt, AttemptPlan, retryable
from .router import Router
from .spans import RequestSpans
from .spend import SpendMeter
from .tenancy import Tenancy

if TYPE_CHECKING:
    from .tenancy.cooldown import CooldownSync

Batches = AsyncIterator[list[chat_pb2.ChatCompletionChunk]]
MAX_CHOICES = 128  # OpenAI's limit on `n`


class ChatCore:
    def __init__(self, config: Config, router: Router | None = None) -> None:
        self.config = config
        self.router = router or Router(config)
        self._default_timeout = config.server.request_timeout
        self._drain = config.server.drain_cancelled_streams
        self._draining: set[asyncio.Task[None]] = set()
        # Calls being served; a core that a config reload replaced is closed once this is 0 (service/live.py).
        self.in_flight = 0
        self.tenancy = Tenancy.build(config)
        self.cooldowns = _cooldown_sync(config, self.router)  # shared with Redis, if any
        self.spend = SpendMeter(config, writer_for(config.usage))  # prices resolved once; the ledger's writer
        if self.tenancy is not None:
            self.tenancy.book.writer = self.spend.ledger  # budgets seed from the ledger, unwritten records too
        self.keysync = KeySync.build(config, self.tenancy)  # the admin API's created keys, kept current
        # The tokenizer is not loaded here: its encodings take about 50 MB a process, which workers whose
        # upstreams report usage never need; the first estimate loads them (usage_estimate.count).
        self._fallbacks = {
            (name, other): metrics.FALLBACKS.labels(name, other)
            for name, route in config.models.items()
            for other in route.fallback
        }

    # ------------------------------------------------------------------ unary

    async def create_chat_completion(
        self, request: chat_pb2.CreateChatCompletionRequest, call: CallInfo
    ) -> chat_pb2.ChatCompletion:
        record = RequestRecord(call, request.model, stream=False, meter=self.spend)
        spans = RequestSpans(tracing.TRACER, "CreateChatCompletion", request, call) if tracing.TRACER else None
        response: chat_pb2.ChatCompletion | None = None
        self.in_flight += 1
        try:
            _validate(request)
            if self.tenancy is not None:  # key, model access and limits, before any routing
                await self.tenancy.admit(request, call, record)
            timeout = call.timeout or self._default_timeout
            plan = self.router.plan(request.model, time.monotonic() + timeout)
            loop = asyncio.get_running_loop()
            deadline = Deadline(loop.time() + timeout, loop)
            deadline.enter()  # by hand, not `async with`: two coroutines fewer per request
            try:
                response = await self._complete(plan, request, call, record, spans)
            except BaseException as exc:
                deadline.leave(exc)  # TimeoutError when the deadline cancelled us
                raise
            deadline.leave(None)
            if response.HasField("usage"):
                record.usage = response.usage
            else:  # the upstream reported none: the gateway counts it (only then)
                usage_estimate.settle_completion(record, request, response)
            return response
        except BaseException as exc:
            raise record.failed(exc) from None
        finally:
            self.in_flight -= 1
            record.finish()
            if spans is not None:
                reasons = tuple(c.finish_reason for c in response.choices) if response is not None else ()
                spans.finish(record, response.model if response is not None else "", reasons)

    async def _complete(
        self,
        plan: AttemptPlan,
        request: Any,
        call: CallInfo,
        record: RequestRecord,
        spans: RequestSpans | None,
        operation: Callable[[Provider], Callable[..., Awaitable[Any]]] | None = None,
    ) -> Any:
        """The unary call on the plan's deployments: the provider's `complete`, or what `operation` picks
        (it raises for a provider that cannot serve it, before any attempt is counted)."""
        error: GatewayError | None = None
        while (attempt := plan.next(error)) is not None:
            send = attempt.state.provider.complete if operation is None else operation(attempt.state.provider)
            upstream_call = await self._begin(attempt, request, call, record, spans)
            state, deployment = attempt.state, attempt.state.deployment
            sent = time.perf_counter()
            try:
                response = await send(request, deployment.upstream_model, upstream_call, deployment.timeouts)
            except GatewayError as exc:
                error = exc
                self._attempt_failed(attempt, exc, record, spans)
                continue
            except BaseException:
                state.abandoned()
                raise
            finally:
                record.upstream_wait += time.perf_counter() - sent
                record.metrics.in_flight(-1.0)
            state.succeeded()
            record.in_upstream = False
            self._answered(attempt, call)
            return response
        raise self._exhausted(error)

    # ------------------------------------------------------------------ streaming

    async def stream_chat_completion(self, request: chat_pb2.CreateChatCompletionRequest, call: CallInfo) -> Batches:
        """The stream in batches, never empty: the chunks that were ready together, as the provider
        read them. Callers that want one chunk at a time flatten it (the gRPC StreamChatCompletion)."""
        record = RequestRecord(call, request.model, stream=True, meter=self.spend)
        spans = RequestSpans(tracing.TRACER, "StreamChatCompletion", request, call) if tracing.TRACER else None
        response_model, reasons = "", list[str]()
        handed_off = False
        seen: list[list[chat_pb2.ChatCompletionChunk]] = []  # every batch, counted only if no usage arrives
        self.in_flight += 1
        try:
            _validate(request)
            if self.tenancy is not None:  # key, model access and limits, before any routing
                await self.tenancy.admit(request, call, record)
            timeout = call.timeout or self._default_timeout
            plan = self.router.plan(request.model, time.monotonic() + timeout)
            loop = asyncio.get_running_loop()
            deadline = Deadline(loop.time() + timeout, loop)  # one for the stream, entered per upstream read
            wants_usage = request.stream_options.include_usage
            attempt, batches, first = await self._open_stream(plan, request, call, record, spans, deadline)
            state = attempt.state
            clock = time.perf_counter
            batch = first
            try:
                while batch is not None:
                    now = clock()
                    if not record.first_chunk:
                        record.first_chunk = now
                    seen.append(batch)
                    out = batch
                    for chunk in batch:
                        if spans is not None:
                            response_model = response_model or chunk.model
                            reasons.extend(c.finish_reason for c in chunk.choices if c.HasField("finish_reason"))
                        if chunk.HasField("usage"):
                            record.usage = chunk.usage
                            if not wants_usage:
                                if not chunk.choices:  # the usage-only chunk the client did not ask for
                                    out = [c for c in out if c is not chunk]
                                    continue
                                chunk.ClearField("usage")
                        if not wants_usage and "usage" in chunk.extra:
                            del chunk.extra["usage"]  # the "usage": null that include_usage adds upstream
                    if out:
                        record.chunks += len(out)
                        yield out
                        record.client_wait += clock() - now
                    batch = await self._next_batch(batches, record, deadline)
            except GatewayError as exc:
                state.failed(time.monotonic(), counts=retryable(exc))
                record.upstream_failed(exc)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                state.abandoned()
                if isinstance(batches, _Pump) and record.usage is None:
                    handed_off = True
                    task = loop.create_task(self._drain_usage(batches, record, spans, deadline, request, seen))
                    self._draining.add(task)
                    task.add_done_callback(self._draining.discard)
                raise
            except BaseException:  # the deadline ran out, or a bug: no verdict on the deployment
                state.abandoned()
                raise
            else:
                state.succeeded()
            finally:
                record.metrics.in_flight(-1.0)
                if not handed_off:
                    await batches.aclose()  # type: ignore[attr-defined]
            if record.usage is None:  # the upstream reported none: the gateway counts it (only then)
                estimate = usage_estimate.settle_stream(record, request, seen)
                if wants_usage:
                    record.chunks += 1
                    yield [estimate]
        except BaseException as exc:
            raise record.failed(exc) from None
        finally:
            self.in_flight -= 1
            if not handed_off:
                if record.usage is None and seen:  # failed mid-stream: what streamed is still counted
                    usage_estimate.settle_stream(record, request, seen)
                record.finish()
                if spans is not None:
                    spans.finish(record, response_model, tuple(reasons))

    async def _open_stream(
        self,
        plan: AttemptPlan,
        request: chat_pb2.CreateChatCompletionRequest,
        call: CallInfo,
        record: RequestRecord,
        spans: RequestSpans | None,
        deadline: Deadline,
    ) -> tuple[Attempt, Batches, list[chat_pb2.ChatCompletionChunk] | None]:
        """Attempts until one yields its first chunks (or ends cleanly with none); that one is committed."""
        error: GatewayError | None = None
        while (attempt := plan.next(error)) is not None:
            upstream_call = await self._begin(attempt, request, call, record, spans)
            state, deployment = attempt.state, attempt.state.deployment
            batches: Batches = aiter(
                state.provider.stream(request, deployment.upstream_model, upstream_call, deployment.timeouts)
            )
            if self._drain:
                # The upstream is read in a task of its own, so a client that goes away cancels only us.
                batches = _Pump(batches)
            try:
                first = await self._next_batch(batches, record, deadline)
            except GatewayError as exc:
                error = exc
                await batches.aclose()  # type: ignore[attr-defined]
                record.metrics.in_flight(-1.0)
                self._attempt_failed(attempt, exc, record, spans)
                continue
            except BaseException:
                await batches.aclose()  # type: ignore[attr-defined]
                record.metrics.in_flight(-1.0)
                state.abandoned()
                raise
            self._answered(attempt, call)
            return attempt, batches, first
        raise self._exhausted(error)

    @staticmethod
    async def _next_batch(
        batches: Batches, record: RequestRecord, deadline: Deadline
    ) -> list[chat_pb2.ChatCompletionChunk] | None:
        record.in_upstream = True
        waited = time.perf_counter()
        # The deadline covers the whole stream; it wraps each wait (one timer per network read),
        # never a yield to the caller. Entered by hand: no __aenter__/__aexit__ coroutines per read.
        deadline.enter()
        try:
            batch = await anext(batches, None)
        except BaseException as exc:
            deadline.leave(exc)
            raise
        finally:
            record.upstream_wait += time.perf_counter() - waited
            record.in_upstream = False
        deadline.leave(None)
        return batch

    async def _drain_usage(
        self,
        batches: _Pump,
        record: RequestRecord,
        spans: RequestSpans | None,
        deadline: Deadline,
        request: chat_pb2.CreateChatCompletionRequest,
        seen: list[list[chat_pb2.ChatCompletionChunk]],
    ) -> None:
        """Read a stream its client left until the provider's final usage, so it is counted exactly."""
        try:
            async with deadline:
                async for batch in batches:
                    seen.append(batch)
                    usage = next((chunk.usage for chunk in batch if chunk.HasField("usage")), None)
                    if usage is not None:
                        record.usage = usage
                        break
        except Exception:  # the client is gone; what matters is what was counted
            pass
        finally:
            await batches.aclose()
            if record.usage is None:
                usage_estimate.settle_stream(record, request, seen)
            record.finish()
            if spans is not None:
                spans.finish(record)

    # ------------------------------------------------------------------ attempts

    async def _begin(
        self,
        attempt: Attempt,
        request: chat_pb2.CreateChatCompletionRequest | chat_pb2.CreateEmbeddingRequest,
        call: CallInfo,
        record: RequestRecord,
        spans: RequestSpans | None,
    ) -> CallInfo:
        if attempt.wait:
            await asyncio.sleep(attempt.wait)
        state = attempt.state
        record.metrics = self.router.metrics(request.model, state.deployment.provider)
        record.metrics.in_flight(1.0)
        record.attempts = attempt.number
        if attempt.model != request.model and attempt.model != record.served_by:
            self._fallbacks[(request.model, attempt.model)].inc()
        record.served_by = attempt.model
        record.deployment = state.deployment.name
        record.in_upstream = True
        state.started()
        if spans is not None and state.provider.url:
            return spans.upstream(attempt.model, state.deployment, state.provider.type, state.provider.url, call)
        return call

    @staticmethod
    def _attempt_failed(
        attempt: Attempt, error: GatewayError, record: RequestRecord, spans: RequestSpans | None
    ) -> None:
        attempt.state.failed(time.monotonic(), counts=retryable(error))
        record.upstream_failed(error)
        if spans is not None:
            spans.attempt_failed(error)

    @staticmethod
    def _answered(attempt: Attempt, call: CallInfo) -> None:
        metadata = call.response_metadata  # set in place: no dict built to update it from
        metadata["x-llm-gateway-model"] = attempt.model
        metadata["x-llm-gateway-deployment"] = attempt.state.deployment.name
        metadata["x-llm-gateway-attempts"] = str(attempt.number)

    @staticmethod
    def _exhausted(error: GatewayError | None) -> GatewayError:
        """The last attempt's error: a plan always makes a first attempt (cooldown never refuses one)."""
        if error is None:
            raise RuntimeError("an attempt plan ended before its first attempt")
        return error

    # ------------------------------------------------------------------ embeddings

    async def create_embedding(
        self, request: chat_pb2.CreateEmbeddingRequest, call: CallInfo
    ) -> chat_pb2.CreateEmbeddingResponse:
        self.in_flight += 1
        try:
            return await embeddings.create(self, request, call)
        finally:
            self.in_flight -= 1

    # ------------------------------------------------------------------ models

    async def list_models(self, request: chat_pb2.ListModelsRequest, call: CallInfo) -> chat_pb2.ListModelsResponse:
        models = self.router.list_models()
        return models if self.tenancy is None else self.tenancy.list_models(call, models)

    async def close(self) -> None:
        for task in list(self._draining):
            task.cancel()
        await asyncio.gather(*self._draining, return_exceptions=True)
        await self.router.close()
        if self.tenancy is not None:
            await self.tenancy.close()
        if self.cooldowns is not None:
            await self.cooldowns.close()
        if self.keysync is not None:
            await self.keysync.close()
        await self.spend.close()  # the ledger's last records are written before the worker ends


def _validate(request: chat_pb2.CreateChatCompletionRequest) -> None:
    if not request.model:
        raise InvalidRequestError("You must provide a model parameter.", param="model")
    if not request.messages:
        raise InvalidRequestError("'messages' must be a non-empty array.", param="messages")
    if request.HasField("n") and not 1 <= request.n <= MAX_CHOICES:
        raise InvalidRequestError(f"Invalid 'n': {request.n}; it must be between 1 and {MAX_CHOICES}.", param="n")


class _Pump:
    """An async iterator read ahead by its own task through a small queue."""

    _END = object()

    def __init__(self, source: Batches) -> None:
        self._source = source
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=8)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            async for item in self._source:
                await self._queue.put(item)
            await self._queue.put(self._END)
        except Exception as exc:  # handed to the reader, raised there
            await self._queue.put(exc)
        finally:
            await self._source.aclose()  # type: ignore[attr-defined]

    def __aiter__(self) -> _Pump:
        return self

    async def __anext__(self) -> list[chat_pb2.ChatCompletionChunk]:
        item = await self._queue.get()
        if item is self._END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[return-value]

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def _cooldown_sync(config: Config, router: Router) -> CooldownSync | None:
    if not config.state.redis_url:
        return None
    from .tenancy.cooldown import CooldownSync  # redis-py: imported only where the state lives in Redis

    return CooldownSync.build(config, router.deployments())
