"""Upstreams that report no usage: the gateway counts the tokens with the offline tokenizer, marks them as
estimated (the metrics' `usage` label, a vendor field in the usage a client asked for, the access log), and
leaves the counts of upstreams that do report alone. Counts are checked against toktok directly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
import toktok

from service import usage_estimate
from tests.fakes.upstream import FakeUpstream, chunks, completion
from tests.harness import GatewayProcess
from tests.rest_facade.rest import post, sse_events
from tests.service.test_metrics import scrape, tokens

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "name": "ada", "content": [{"type": "text", "text": "Name three colours, please."}]},
]
PIECES = ("Red, ", "green", " and blue", ".")
ESTIMATED = usage_estimate.ESTIMATED_KEY


def count(texts: list[str], encoding: str = "cl100k_base") -> int:
    return sum(toktok.batch_count(texts, encoding))


# The cookbook's formula: texts, 3 per message, 1 per name, 3 priming the reply.
PROMPT = count(["system", "You are terse.", "user", "Name three colours, please.", "ada"]) + 3 * 2 + 1 + 3
COMPLETION = count(["".join(PIECES)])


@pytest.fixture
def gateway(upstream: FakeUpstream, gateway_factory: Callable[..., GatewayProcess]) -> GatewayProcess:
    return gateway_factory(
        {
            "routing": {"retries": 0},
            "providers": {"local": {"type": "ollama", "api_url": upstream.url}},
            "models": {"llama": {"provider": "local", "model": "llama3.2"}},
        }
    )


def chat(gateway: GatewayProcess, **extra: Any) -> Any:
    return post(gateway.base_url, {"model": "llama", "messages": MESSAGES, **extra})


def test_stream_without_usage_is_counted_and_flagged(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    upstream.stream(chunks(PIECES, model="llama3.2", usage=False))
    reply = chat(gateway, stream=True, stream_options={"include_usage": True})
    events = [orjson.loads(e) for e in sse_events(reply.body)[:-1]]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == "".join(PIECES)
    last = events[-1]
    assert last["choices"] == [] and last["id"] == "chatcmpl-s1" and last["model"] == "llama3.2"
    assert last["usage"] == {
        "prompt_tokens": PROMPT,
        "completion_tokens": COMPLETION,
        "total_tokens": PROMPT + COMPLETION,
        ESTIMATED: True,
    }
    samples = scrape(gateway)
    assert tokens(samples, model="llama", usage="estimated") == (PROMPT, COMPLETION, PROMPT + COMPLETION)
    assert tokens(samples, model="llama", usage="reported") == (0, 0, 0)
    line = next(line for line in gateway.log_lines() if line.get("msg") == "chat completion")
    assert line["usage_estimated"] is True and line["completion_tokens"] == COMPLETION


def test_no_usage_chunk_unless_asked(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    upstream.stream(chunks(PIECES, usage=False))
    events = [orjson.loads(e) for e in sse_events(chat(gateway, stream=True).body)[:-1]]
    assert all("usage" not in event for event in events)
    assert tokens(scrape(gateway), usage="estimated") == (PROMPT, COMPLETION, PROMPT + COMPLETION)


def test_streamed_tool_arguments_are_counted(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-2024-08-06"}
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    fragments = ['{"ci', 'ty": "Pa', 'ris"}']
    events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [call]}}]}]
    events += [
        {**base, "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": f}}]}}]}
        for f in fragments
    ]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    upstream.stream(events)
    reply = chat(gateway, stream=True, stream_options={"include_usage": True})
    usage = orjson.loads(sse_events(reply.body)[-2])["usage"]
    # gpt-4o (the model the upstream named) counts with o200k_base.
    expected = count(["get_weather", "".join(fragments)], "o200k_base")
    assert (usage["completion_tokens"], usage[ESTIMATED]) == (expected, True)
    prompt = count(["system", "You are terse.", "user", "Name three colours, please.", "ada"], "o200k_base") + 10
    assert usage["prompt_tokens"] == prompt


def test_unary_without_usage(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    body = completion("Red, green and blue.")
    del body["usage"]
    upstream.reply(200, body)
    answer = orjson.loads(chat(gateway).body)
    assert answer["usage"] == {
        "prompt_tokens": PROMPT,
        "completion_tokens": COMPLETION,
        "total_tokens": PROMPT + COMPLETION,
        ESTIMATED: True,
    }
    upstream.reply(200, {**body, "usage": None})  # "usage": null, as some servers send it
    assert orjson.loads(chat(gateway).body)["usage"][ESTIMATED] is True
    assert tokens(scrape(gateway), usage="estimated")[1] == 2 * COMPLETION


def test_reported_usage_is_left_alone(gateway: GatewayProcess, upstream: FakeUpstream) -> None:
    upstream.stream(chunks(PIECES))  # usage 9 / 4 / 13
    reply = chat(gateway, stream=True, stream_options={"include_usage": True})
    assert orjson.loads(sse_events(reply.body)[-2])["usage"] == {
        "prompt_tokens": 9,
        "completion_tokens": 4,
        "total_tokens": 13,
    }
    samples = scrape(gateway)
    assert tokens(samples, usage="reported") == (9, 4, 13)
    assert tokens(samples, usage="estimated") == (0, 0, 0)


def test_encoding_by_model() -> None:
    assert usage_estimate.encoding_for("gpt-4o-mini") == "o200k_base"
    assert usage_estimate.encoding_for("openai/o3-mini") == "o200k_base"
    assert usage_estimate.encoding_for("gpt-4-turbo") == "cl100k_base"
    assert usage_estimate.encoding_for("llama3.2") == "cl100k_base"
