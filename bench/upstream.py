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


class Nginx:
    def __init__(self, prefix: Path, port: int, cpus: set[int] | None) -> None:
        self.binary = require("nginx", "nginx")
        self.prefix = prefix
        self.port = port
        self.cpus = cpus
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
        }
        for kind, body in (("unary", unary_body()), ("stream", stream_body())):
            path = self.prefix / "www" / kind / "v1" / "chat" / "completions"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
        text = TEMPLATE.read_text()
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
