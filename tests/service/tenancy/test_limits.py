"""The prompt's estimate and the completion cap that make a request's token reservation."""

from __future__ import annotations

import pytest

from llm_gateway.v1 import chat_pb2
from service.tenancy.limits import SMALL_REQUEST_BYTES, completion_cap, estimate_prompt_tokens

Message = chat_pb2.ChatMessage


def text(content: str, role: str = "user") -> chat_pb2.ChatMessage:
    return Message(role=role, content_text=content)


def image(url: str, caption: str = "") -> chat_pb2.ChatMessage:
    parts = [chat_pb2.ContentPart(type="image_url", image_url=chat_pb2.ImageUrl(url=url))]
    if caption:
        parts.insert(0, chat_pb2.ContentPart(type="text", text=caption))
    return Message(role="user", content_parts=chat_pb2.ContentPartList(parts=parts))


def request(*messages: chat_pb2.ChatMessage, **fields: object) -> chat_pb2.CreateChatCompletionRequest:
    return chat_pb2.CreateChatCompletionRequest(model="gpt-4o", messages=list(messages), **fields)  # type: ignore[arg-type]


def walked(req: chat_pb2.CreateChatCompletionRequest) -> int:
    """What the message walk of a large request counts: 4 characters a token, 4 a message, 3 for the
    reply, 85 an attachment."""
    chars = attachments = 0
    for message in req.messages:
        if message.WhichOneof("content") == "content_text":
            chars += len(message.content_text)
        else:
            for part in message.content_parts.parts:
                chars += len(part.text) if part.HasField("text") else 0
                attachments += 0 if part.HasField("text") else 1
    return chars // 4 + 4 * len(req.messages) + 3 + 85 * attachments


@pytest.mark.parametrize(
    ("messages", "low", "high"),
    [
        ((text("Hello there"),), 7, 11),  # the walk says 9
        ((text("You are terse.", "system"), text("Say hello in one short sentence.")), 15, 20),  # the walk: 18
        ((text("x" * 400),), 100, 110),  # the walk: 107
    ],
)
def test_a_small_request_is_estimated_from_its_size_close_to_the_walk(
    messages: tuple[chat_pb2.ChatMessage, ...], low: int, high: int
) -> None:
    req = request(*messages)
    assert req.ByteSize() < SMALL_REQUEST_BYTES
    assert low <= estimate_prompt_tokens(req) <= high
    assert abs(estimate_prompt_tokens(req) - walked(req)) <= 2


def test_a_large_request_is_walked_and_counts_each_attachment() -> None:
    data_url = "data:image/png;base64," + "A" * 100_000  # 100 KB of image: 85 tokens, not 25 000
    req = request(text("Describe these."), image(data_url, "first"), image(data_url))
    assert req.ByteSize() >= SMALL_REQUEST_BYTES
    assert estimate_prompt_tokens(req) == walked(req) == (15 + 5) // 4 + 4 * 3 + 3 + 85 * 2
    long_text = request(text("word " * 1000), text("and more " * 100, "assistant"))
    assert estimate_prompt_tokens(long_text) == walked(long_text)


def test_tools_and_tool_calls_count_in_a_large_request() -> None:
    call = chat_pb2.ToolCall(id="c1", type="function", function=chat_pb2.FunctionCall(name="lookup", arguments="{}"))
    assistant = Message(role="assistant", tool_calls=[call])
    tool = chat_pb2.Tool(type="function", function=chat_pb2.FunctionDefinition(name="lookup", description="d" * 3000))
    bare = request(text("q" * 2000), assistant)
    with_tools = request(text("q" * 2000), assistant, tools=[tool])
    assert estimate_prompt_tokens(bare) == (2000 + len("lookup") + len("{}")) // 4 + 4 * 2 + 3
    assert estimate_prompt_tokens(with_tools) - estimate_prompt_tokens(bare) >= 3000 // 4


@pytest.mark.parametrize(
    ("fields", "cap"),
    [
        ({}, 77),  # neither set: the configured default
        ({"max_tokens": 500}, 500),
        ({"max_completion_tokens": 100, "max_tokens": 500}, 100),  # max_completion_tokens wins
        ({"max_completion_tokens": 0, "max_tokens": 500}, 0),  # an explicit 0 is a cap, not "unset"
        ({"max_tokens": 10, "n": 3}, 30),  # n multiplies
        ({"n": 0}, 77),  # n 0 means one choice, as unset does
        ({"max_tokens": -5}, 0),
    ],
)
def test_the_completion_cap(fields: dict[str, int], cap: int) -> None:
    assert completion_cap(request(text("hi"), **fields), 77) == cap
