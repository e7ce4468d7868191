"""The fake upstream: Debian's nginx answering fixed OpenAI-style bodies from memory.

One api_url per body kind, so no request needs parsing: `/unary/v1` answers a chat completion,
`/stream/v1` a 20-chunk SSE stream with a usage chunk and `[DONE]`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import orjson

from .procs import pin, wait_port

TEMPLATE = Path(__file__).with_name("nginx.conf.template")
PROXY_TEMPLATE = Path(__file__).with_name("nginx-proxy.conf.template")
STREAM_CHUNKS = 20
USAGE = {"prompt_tokens": 9, "completion_tokens": STREAM_CHUNKS, "total_tokens": 9 + STREAM_CHUNKS}


class MissingTool(RuntimeError):
    """A Debian package the benchmark needs is not installed."""


def require(binary: str, package: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.access(f"/usr/sbin/{binary}", os.X_OK) else None)
    if path is None:
        raise MissingTool(f"`{binary}` not found: install the Debian package '{package}' (apt-get install {package})")
    return path


def unary_body() -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": "bench-model",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello! How can I help you today?", "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
            "system_fingerprint": "fp_bench",
        }
    )


def stream_body() -> bytes:
    """20 chunks (role + content, content..., finish_reason), the usage chunk, then [DONE]."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "bench-model"}
    events = []
    for i in range(STREAM_CHUNKS):
        last = i == STREAM_CHUNKS - 1
        delta: dict[str, object] = {} if last else {"content": f"tok{i} "}
        if i == 0:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": "stop" if last else None}
        events.append({**base, "choices": [choice], "usage": None})
    events.append({**base, "choices": [], "usage": USAGE})
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def anthropic_unary_body() -> bytes:
    return orjson.dumps(
        {
            "id": "msg_bench",
            "type": "message",
            "role": "assistant",
            "model": "claude-bench",
            "content": [{"type": "text", "text": "Hello! How can I help you today?"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 9, "output_tokens": STREAM_CHUNKS},
        }
    )


def anthropic_stream_body() -> bytes:
    """Anthropic's event stream with as many text deltas as the OpenAI stream has content chunks."""
    events: list[tuple[str, dict[str, object]]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_bench",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-bench",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 9, "output_tokens": 1},
                },
            },
        ),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        ("ping", {"type": "ping"}),
    ]
    # The role comes in a chunk of its own (from message_start, as OpenAI's own streams send it), so 18
    # deltas make the same 20 chunks as the OpenAI body, then the usage chunk and [DONE].
    for i in range(STREAM_CHUNKS - 2):
        delta = {"type": "text_delta", "text": f"tok{i} "}
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}))
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": STREAM_CHUNKS},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps(data)) for name, data in events)


EMBEDDING_INPUTS = 16
EMBEDDING_DIMENSIONS = 1536


def embeddings_body(base64_form: bool) -> bytes:
    """16 vectors of 1536 dimensions, as floats or as OpenAI's base64 of little-endian float32."""
    import base64
    import struct

    data = []
    for i in range(EMBEDDING_INPUTS):
        vector = [((i * 7919 + j * 104729) % 20001 - 10000) / 10000 * 0.05 for j in range(EMBEDDING_DIMENSIONS)]
        packed = struct.pack(f"<{EMBEDDING_DIMENSIONS}f", *vector)
        embedding: object = (
            base64.b64encode(packed).decode()
            if base64_form
            else list(struct.unpack(f"<{EMBEDDING_DIMENSIONS}f", packed))  # float32 values, as upstreams send
        )
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    usage = {"prompt_tokens": 8 * EMBEDDING_INPUTS, "total_tokens": 8 * EMBEDDING_INPUTS}
    return orjson.dumps({"object": "list", "data": data, "model": "bench-embedding", "usage": usage})


# Every fixed body the upstream serves: the api_url path prefix, the path below it, the body.
def bodies() -> list[tuple[str, str, bytes]]:
    return [
        ("unary", "v1/chat/completions", unary_body()),
        ("stream", "v1/chat/completions", stream_body()),
        ("anthropic-unary", "v1/messages", anthropic_unary_body()),
        ("anthropic-stream", "v1/messages", anthropic_stream_body()),
        ("embed-float", "v1/embeddings", embeddings_body(False)),
        ("embed-base64", "v1/embeddings", embeddings_body(True)),
    ]


class Nginx:
    """The fake upstream; with `proxy_to`, instead nginx as a reverse proxy in front of that port."""

    def __init__(self, prefix: Path, port: int, cpus: set[int] | None, proxy_to: int | None = None) -> None:
        self.binary = require("nginx", "nginx")
        self.prefix = prefix
        self.port = port
        self.cpus = cpus
        self.proxy_to = proxy_to
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, kind: str) -> str:
        """The api_url a provider uses for `kind` ("unary" or "stream")."""
        return f"{self.base}/{kind}/v1"

    def render(self) -> Path:
        self.prefix.mkdir(parents=True, exist_ok=True)
        values = {
            "user": "user root;" if os.geteuid() == 0 else "",
            "prefix": str(self.prefix),
            "port": str(self.port),
            "upstream_port": str(self.proxy_to or ""),
        }
        if self.proxy_to is not None:
            return self._write(PROXY_TEMPLATE, values)
        for kind, below, body in bodies():
            path = self.prefix / "www" / kind / below
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
        return self._write(TEMPLATE, values)

    def _write(self, template: Path, values: dict[str, str]) -> Path:
        text = template.read_text()
        for key, value in values.items():
            text = text.replace("{{" + key + "}}", value)
        conf = self.prefix / "nginx.conf"
        conf.write_text(text)
        return conf

    def start(self) -> Nginx:
        conf = self.render()
        log = (self.prefix / "stderr.log").open("ab")
        self.process = subprocess.Popen(
            [self.binary, "-p", str(self.prefix), "-c", str(conf), "-e", str(self.prefix / "error.log")],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=(lambda: pin(self.cpus)) if self.cpus else None,
        )
        wait_port(self.port, self.process, self.prefix / "error.log")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
