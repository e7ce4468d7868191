"""Rate-limit scopes, reservations, and how a verdict reads to a client: OpenAI's headers and 429s.

Scopes: per key (rpm, tpm, max_parallel) and per model across every key (rpm, tpm). A request charges
1 to each requests bucket and its reservation to each tokens bucket, and takes a slot of its key's
max_parallel; the state backend admits all of it or none. The reservation is an estimate of the prompt
plus the completion cap (max_completion_tokens, max_tokens, or `limits.default_max_tokens`) times `n`;
after the response the provider's usage replaces it, once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.config import ApiKeyConfig, Config
from gateway.errors import RateLimitError
from llm_gateway.v1 import chat_pb2

from .state import Bucket, Level, SlotPool, Verdict

# Tokens counted for an image, audio clip or file in a prompt (OpenAI's low-detail image cost).
ATTACHMENT_TOKENS = 85
# Tokens of framing per message, and for the reply's priming, as OpenAI's cookbook counts them.
MESSAGE_TOKENS = 4
REPLY_TOKENS = 3
CHARS_PER_TOKEN = 4


# Below this many bytes of request, the prompt's estimate is its encoded size (one C call): text is
# nearly all of a small request, and walking its messages costs ~5x more than the whole check.
SMALL_REQUEST_BYTES = 2048


def estimate_prompt_tokens(request: chat_pb2.CreateChatCompletionRequest, model: str | None = None) -> int:
    """About four characters a token: cheap (no tokenizer), and within a few tokens for English text.
    `model`: the request's model when the caller has read it already (each read builds a new str)."""
    size = request.ByteSize()
    if size < SMALL_REQUEST_BYTES:  # an image's URL counts its bytes here, not 85 tokens: a few tokens under at most
        # The message framing (role, tags) stands for MESSAGE_TOKENS; the model's name is not prompt.
        return (size - len(request.model if model is None else model)) // CHARS_PER_TOKEN + REPLY_TOKENS
    chars = 0
    attachments = 0
    messages = request.messages  # each access of a repeated field builds a wrapper (0.2 us): read once
    for message in messages:
        kind = message.WhichOneof("content")
        if kind == "content_text":
            chars += len(message.content_text)
        elif kind == "content_parts":
            for part in message.content_parts.parts:
                if part.HasField("text"):
                    chars += len(part.text)
                else:
                    attachments += 1
        calls = message.tool_calls
        if calls:  # iterating an empty repeated field still costs an iterator (0.4 us)
            for call in calls:
                chars += len(call.function.arguments) + len(call.function.name)
    tools = request.tools
    if tools:
        for tool in tools:
            chars += tool.ByteSize()
    return chars // CHARS_PER_TOKEN + MESSAGE_TOKENS * len(messages) + REPLY_TOKENS + ATTACHMENT_TOKENS * attachments


def completion_cap(request: chat_pb2.CreateChatCompletionRequest, default: int) -> int:
    if request.HasField("max_completion_tokens"):
        cap = request.max_completion_tokens
    elif request.HasField("max_tokens"):
        cap = request.max_tokens
    else:
        cap = default
    n = request.n  # unset reads 0, as an explicit 0 does: both mean one choice
    return max(cap, 0) * (n if n > 1 else 1)


_ceil = math.ceil  # a module global: one read per header, not `math` then its attribute

_MS_TEXT = ("0s", *(f"{ms}ms" for ms in range(1, 1000)))  # the reset header of most requests: no formatting


def go_duration(ms: float) -> str:
    """A duration as OpenAI (and Go) write it: `20ms`, `1s`, `1.5s`, `6m0s`, `1h0m0s`."""
    whole = max(0, math.ceil(ms - 1e-9))
    if whole < 1000:
        return _MS_TEXT[whole]
    hours, rest = divmod(whole, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


@dataclass(frozen=True, slots=True)
class Scopes:
    """Every scope a (key, model) pair must pass, built once at start-up."""

    requests: tuple[Bucket, ...]
    tokens: tuple[Bucket, ...]
    pools: tuple[SlotPool, ...]

    def __bool__(self) -> bool:
        return bool(self.requests or self.tokens or self.pools)


KeyScopes = tuple[tuple[Bucket, ...], tuple[Bucket, ...], tuple[SlotPool, ...]]


def _bucket(scope: str, owner: str, kind: str, limit: int | None) -> tuple[Bucket, ...]:
    suffix = "rpm" if kind == "requests" else "tpm"
    return (Bucket(f"{scope}:{owner}:{suffix}", scope, owner, kind, limit),) if limit else ()


def key_buckets(config: Config, keys: Sequence[ApiKeyConfig] | None = None) -> dict[str, KeyScopes]:
    out: dict[str, KeyScopes] = {}
    for key in config.auth.keys if keys is None else keys:
        name, limits = key.name, key.limits
        pools = (SlotPool(f"key:{name}:parallel", name, limits.max_parallel),) if limits.max_parallel else ()
        out[name] = (_bucket("key", name, "requests", limits.rpm), _bucket("key", name, "tokens", limits.tpm), pools)
    return out


def model_buckets(config: Config) -> dict[str, KeyScopes]:
    return {
        model: (_bucket("model", model, "requests", limits.rpm), _bucket("model", model, "tokens", limits.tpm), ())
        for model, limits in config.limits.models.items()
    }


_HEADER_NAMES = {
    kind: (f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}")
    for kind in ("requests", "tokens")
}


def headers(levels: Sequence[Level], requests: int, out: dict[str, str]) -> None:
    """OpenAI's x-ratelimit-* for the tightest requests scope and the tightest tokens scope, into `out`
    (the call's response metadata: no dict of its own per request)."""
    if requests == 1 and len(levels) == 2:  # one requests and one tokens scope, the common shape: no min()
        _put(out, _REQUESTS, levels[0])
        _put(out, _TOKENS, levels[1])
        return
    if requests:
        _put(out, _REQUESTS, levels[0] if requests == 1 else min(levels[:requests], key=_remaining))
    if len(levels) > requests:
        _put(out, _TOKENS, levels[requests] if len(levels) == requests + 1 else min(levels[requests:], key=_remaining))


_REQUESTS, _TOKENS = _HEADER_NAMES["requests"], _HEADER_NAMES["tokens"]
_LIMIT_TEXT: dict[float, str] = {}  # a handful of limits (the config's, times a worker's share): formatted once


def _put(out: dict[str, str], names: tuple[str, str, str], tight: Level) -> None:
    limit, remaining, reset_ms = tight
    text = _LIMIT_TEXT.get(limit)
    if text is None:
        if len(_LIMIT_TEXT) > 1024:  # limits of configs reloaded many times over
            _LIMIT_TEXT.clear()
        text = _LIMIT_TEXT[limit] = str(int(limit))
    limit_name, remaining_name, reset_name = names
    out[limit_name] = text
    # %d of a float truncates, which is floor for positives: one operator, not int() then str().
    out[remaining_name] = "%d" % (remaining + 1e-9) if remaining > -1e-9 else "0"  # noqa: UP031
    whole = _ceil(reset_ms - 1e-9)
    out[reset_name] = _MS_TEXT[whole] if 0 <= whole < 1000 else go_duration(reset_ms)  # most resets: no call


def _remaining(level: Level) -> float:
    return level[1]


def _who(scope: str, owner: str) -> str:
    return owner if scope == "key" else f"model {owner}"


def rejection(verdict: Verdict, scopes: Scopes, costs: Sequence[float]) -> RateLimitError:
    """The 429 for a verdict that failed: OpenAI's body, Retry-After, and the gRPC details."""
    charged = (*scopes.requests, *scopes.tokens)
    retry = max(verdict.retry_ms, 1.0)
    if verdict.failed < len(charged):
        bucket = charged[verdict.failed]
        kind, subject = bucket.kind, f"{bucket.scope}:{bucket.owner}"
        what = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
        who = _who(bucket.scope, bucket.owner)
        requested = costs[verdict.failed]
    else:
        pool = scopes.pools[verdict.failed - len(charged)]
        kind, subject, what, who, requested = "requests", f"key:{pool.owner}", "parallel requests", pool.owner, 1
    message = (
        f"Rate limit reached for {who} on {what}: Limit {int(verdict.limit)}, "
        f"Used {math.ceil(verdict.used - 1e-9)}, Requested {int(requested)}. Please try again in {go_duration(retry)}."
    )
    error = RateLimitError(
        message,
        code="rate_limit_exceeded",
        headers={"retry-after": str(math.ceil(retry / 1000)), "retry-after-ms": str(math.ceil(retry))},
    )
    error.type = kind
    error.retry_after = retry / 1000
    error.quota_subject, error.quota_description = subject, what
    return error


def too_large(bucket: Bucket, requested: float) -> RateLimitError:
    """A reservation that exceeds a bucket's whole capacity can never pass: a 429 the SDKs do not retry."""
    error = RateLimitError(
        f"Request too large for {_who(bucket.scope, bucket.owner)} on tokens per min (TPM): Limit "
        f"{int(bucket.limit)}, Requested {int(requested)}. The input or output tokens must be reduced in order "
        "to run successfully.",
        code="rate_limit_exceeded",
        headers={"x-should-retry": "false"},
    )
    error.type = "tokens"
    error.quota_subject, error.quota_description = f"{bucket.scope}:{bucket.owner}", "tokens per min (TPM)"
    return error
