"""The dashboards against a real Prometheus scraping a live gateway.

Debian's `prometheus` binary scrapes the gateway's /metrics every second while known traffic goes through it: unary
and streamed chat over REST (with and without stream_options.include_usage), the same over gRPC, an unknown model
and an upstream 500. Then every PromQL expression in both dashboards runs through Prometheus' HTTP API: each must
parse and return data, and the token totals must equal exactly the usage the fake upstream sent.

The traffic goes out in two identical rounds with a scrape in between, so each series exists before its second
round and every rate() and histogram_quantile() has a real increase to work on.
"""

from __future__ import annotations

import math
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
import yaml

from gateway.jsonpb import MessageCodec
from llm_gateway.v1 import chat_pb2, chat_pb2_grpc
from service.spend import builtin
from tests.fakes.upstream import FakeUpstream
from tests.harness import GatewayProcess, free_port
from tests.observability.stack import (
    BUDGET_PANEL_TITLES,
    DASHBOARD_FILES,
    KEY_PANEL_TITLES,
    expressions,
    load_dashboard,
    require_tool,
)

REQUEST = MessageCodec.for_type(chat_pb2.CreateChatCompletionRequest)
WINDOW = "1m"  # what $__rate_interval, $__interval and $__range stand for: longer than the whole test
TOKEN_KINDS = ("prompt", "completion", "total")
UNARY_USAGE = (11, 7, 18)  # completion()'s usage
STREAM_USAGE = (9, 3, 12)  # chunks()'s final usage chunk, three pieces


def eventually(predicate: Callable[[], bool], timeout: float = 15.0, interval: float = 0.2) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


# ---------------------------------------------------------------------------------------------- Prometheus


@dataclass
class Prometheus:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET an HTTP API endpoint; errors (400 for a bad query) come back as their JSON body."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body: dict[str, Any] = orjson.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = orjson.loads(exc.read())
        return body

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("/api/v1/query", query=expr)

    def vector(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        answer = self.query(expr)
        assert answer["status"] == "success", f"{expr}: {answer}"
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in answer["data"]["result"]}

    def scalar(self, expr: str) -> float | None:
        values = list(self.vector(expr).values())
        return values[0] if values else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[GatewayProcess], Prometheus]]:
    binary = require_tool("prometheus", "prometheus")
    started: list[Prometheus] = []

    def start(gateway: GatewayProcess) -> Prometheus:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "llm-gateway",
                            "metrics_path": "/metrics",
                            "static_configs": [{"targets": [f"127.0.0.1:{gateway.port}"]}],
                        }
                    ],
                }
            )
        )
        log_path = tmp_path / "prometheus.log"
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log_path.open("ab"),
            stderr=subprocess.STDOUT,
        )
        server = Prometheus(process, f"http://127.0.0.1:{port}", log_path)
        started.append(server)

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {process.returncode}:\n{server.log()}")
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=1) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        assert eventually(ready, timeout=20), f"prometheus did not become ready:\n{server.log()}"
        return server

    yield start
    for server in started:
        server.process.terminate()
        try:
            server.process.wait(10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(5)


# ---------------------------------------------------------------------------------------------- traffic


@dataclass(frozen=True)
class Sent:
    """One request and what the metrics must show for it: tokens by (model, provider), success or not."""

    model: str
    provider: str
    usage: tuple[int, int, int] | None
    ok: bool


def post_chat(gateway: GatewayProcess, body: dict[str, Any]) -> int:
    request = urllib.request.Request(
        f"{gateway.base_url}/v1/chat/completions",
        data=orjson.dumps(body),
        headers={"content-type": "application/json", "authorization": "Bearer client-key"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            payload = response.read()
            if body.get("stream"):
                assert payload.rstrip().endswith(b"data: [DONE]"), payload[-200:]
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)


def chat(model: str, stream: bool = False, include_usage: bool | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Hello"}]}
    if stream:
        body["stream"] = True
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    return body


def send_round(gateway: GatewayProcess, stub: chat_pb2_grpc.ChatServiceStub) -> list[Sent]:
    """One round of known traffic; returns what was sent."""
    sent: list[Sent] = []

    def rest(body: dict[str, Any], provider: str, usage: tuple[int, int, int] | None) -> None:
        status = post_chat(gateway, body)
        assert (status == 200) == (usage is not None), (body, status, gateway.log_text()[-3000:])
        sent.append(Sent(body["model"] if provider != "none" else "unknown", provider, usage, status == 200))

    rest(chat("gpt-4o"), "openai", UNARY_USAGE)
    rest(chat("gpt-4o", stream=True, include_usage=True), "openai", STREAM_USAGE)
    rest(chat("llama3.2", stream=True), "ollama", STREAM_USAGE)  # the client did not ask for usage
    rest(chat("llama3.2", stream=True, include_usage=False), "ollama", STREAM_USAGE)
    rest(chat("llama3.2"), "ollama", UNARY_USAGE)
    rest(chat("no-such-model"), "none", None)  # 404, counted against model "unknown"
    rest(chat("flaky"), "broken", None)  # the upstream answers 500
    rest(chat("flaky", stream=True), "broken", None)

    reply = stub.CreateChatCompletion(REQUEST.decode(chat("gpt-4o")), timeout=10)
    assert reply.usage.total_tokens == UNARY_USAGE[2]
    sent.append(Sent("gpt-4o", "openai", UNARY_USAGE, True))
    pieces = list(stub.StreamChatCompletion(REQUEST.decode(chat("llama3.2", stream=True)), timeout=10))
    assert pieces
    sent.append(Sent("llama3.2", "ollama", STREAM_USAGE, True))
    return sent


def expected_tokens(sent: list[Sent], kind: str) -> dict[tuple[str, str], float]:
    totals: Counter[tuple[str, str]] = Counter()
    for request in sent:
        if request.usage is not None:
            totals[(request.model, request.provider)] += request.usage[TOKEN_KINDS.index(kind)]
    return dict(totals)


def token_totals(prometheus: Prometheus, kind: str) -> dict[tuple[str, str], float]:
    """sum by (model, provider) of a token counter, without the series still at zero."""
    vector = prometheus.vector(f"sum by (model, provider) (llm_gateway_{kind}_tokens_total)")
    return {(dict(k)["model"], dict(k)["provider"]): v for k, v in vector.items() if v}


def grouped(sent: list[Sent], labels: str, kind: str) -> dict[tuple[str, ...], float]:
    """Expected token totals summed by `labels` ("model" or "model, provider")."""
    totals: dict[tuple[str, ...], float] = {}
    for (model, provider), value in expected_tokens(sent, kind).items():
        names = {"model": model, "provider": provider}
        key = tuple(names[label.strip()] for label in labels.split(","))
        totals[key] = totals.get(key, 0) + value
    return totals


# ---------------------------------------------------------------------------------------------- dashboards

_CUMULATIVE_TOKENS = re.compile(r"^sum by \(([\w, ]+)\) \(llm_gateway_(\w+)_tokens_total\b")
_CUMULATIVE_COST = re.compile(r"^sum by \((\w+)\) \(llm_gateway_cost_usd_total\b")


def expected_cost(sent: list[Sent], label: str) -> dict[tuple[str, ...], float]:
    """USD by model (or by key and team: "none", auth is off), from the built-in prices; unpriced models have none."""
    micro: Counter[tuple[str, ...]] = Counter()
    for request in sent:
        price = builtin().lookup(request.model)
        if request.usage is not None and price is not None:
            prompt, completion, _ = request.usage
            micro[(request.model,) if label == "model" else ("none",)] += price.cost(prompt, 0, completion)
    return {labels: value / 1_000_000 for labels, value in micro.items()}


def cumulative_tokens(answer: dict[str, Any], labels: str) -> dict[tuple[str, ...], float]:
    """A `sum by (labels)` answer as {label values: value}, without the series still at zero."""
    names = [label.strip() for label in labels.split(",")]
    return {
        tuple(r["metric"][name] for name in names): float(r["value"][1])
        for r in answer["data"]["result"]
        if float(r["value"][1])
    }


_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana's variables the way it does for "All": built-in intervals and every templating variable."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"{expr}: ${name} is not a dashboard variable"
        return variables[name]

    return _VARIABLE.sub(replace, expr)


def dashboard_variables(dashboard: dict[str, Any]) -> dict[str, str]:
    values = {"__rate_interval": WINDOW, "__interval": WINDOW, "__range": WINDOW}
    for variable in dashboard.get("templating", {}).get("list", []):
        values[variable["name"]] = variable.get("allValue") or ".*"
    return values


def has_finite_value(answer: dict[str, Any]) -> bool:
    data = answer["data"]
    if data["resultType"] == "scalar":
        return math.isfinite(float(data["result"][1]))
    samples = [r["value"][1] for r in data["result"] if "value" in r]
    samples += [v[1] for r in data["result"] for v in r.get("values", [])]
    return any(math.isfinite(float(s)) for s in samples)


def answered(prometheus: Prometheus, query: str, where: str) -> dict[str, Any]:
    """The answer to a dashboard query, which must parse and hold data with a finite value."""
    answer = prometheus.query(query)
    assert answer["status"] == "success", f"{where}: {query}: {answer}"
    assert answer["data"]["result"], f"{where}: no data for {query}"
    assert has_finite_value(answer), f"{where}: only NaN for {query}: {answer}"
    return answer


# ---------------------------------------------------------------------------------------------- the test


def test_every_dashboard_query_returns_data_and_token_totals_are_exact(
    upstream: FakeUpstream,
    gateway_factory: Callable[..., GatewayProcess],
    prometheus_for: Callable[[GatewayProcess], Prometheus],
) -> None:
    started = time.monotonic()
    broken = FakeUpstream().start()
    try:
        upstream.by_stream_flag()
        broken.reply(500, {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}})
        gateway = gateway_factory(
            {
                "providers": {
                    "openai": {"type": "openai", "api_key": "sk-test", "api_url": f"{upstream.url}/v1"},
                    "ollama": {"type": "ollama", "api_url": upstream.url},
                    "broken": {"type": "openai", "api_key": "sk-test", "api_url": f"{broken.url}/v1"},
                },
                "models": {"gpt-4o": "openai", "llama3.2": "ollama", "flaky": "broken"},
                # One attempt per request and no cooldown, so every round asks the upstreams the same way.
                "routing": {"retries": 0, "cooldown_failures": 1000},
            }
        )
        prometheus = prometheus_for(gateway)

        def requests_scraped() -> float | None:
            return prometheus.scalar("sum(llm_gateway_requests_total)")

        with grpc.insecure_channel(gateway.grpc_address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            sent = send_round(gateway, stub)
            assert eventually(lambda: requests_scraped() == len(sent)), (len(sent), requests_scraped())
            sent += send_round(gateway, stub)
        assert eventually(lambda: requests_scraped() == len(sent)), (len(sent), requests_scraped())

        # Token totals: exactly the usage the fake upstream sent, per model and provider.
        def tokens_exact() -> bool:
            return all(token_totals(prometheus, kind) == expected_tokens(sent, kind) for kind in TOKEN_KINDS)

        eventually(tokens_exact, timeout=5)
        for kind in TOKEN_KINDS:
            assert token_totals(prometheus, kind) == expected_tokens(sent, kind), f"{kind} tokens"
        labelled = '{__name__=~"llm_gateway_((prompt|completion|total)_tokens|requests)_total", %s=""}'
        for label in ("model", "provider"):
            assert prometheus.vector(labelled % label) == {}, f"series with an empty {label} label"
        failed = prometheus.scalar('sum(llm_gateway_requests_total{outcome!~"2.."})')
        assert failed == sum(not s.ok for s in sent)
        assert (
            prometheus.scalar('sum(llm_gateway_requests_total{model="unknown", provider="none", outcome="404"})') == 2
        )

        # Every PromQL expression of both dashboards parses and returns data.
        checked = cumulative_checked = 0
        for path in DASHBOARD_FILES:
            dashboard = load_dashboard(path)
            variables = dashboard_variables(dashboard)
            for title, expr in expressions(dashboard):
                if title in KEY_PANEL_TITLES or title in BUDGET_PANEL_TITLES:  # test_prometheus_{keys,budgets}.py
                    continue
                query = substitute(expr, variables)
                answer = answered(prometheus, query, f"{path.name}: {title}")
                cumulative = _CUMULATIVE_TOKENS.search(query)
                if cumulative and "[" not in query:  # a cumulative token panel: exactly what upstream sent
                    labels, kind = cumulative.groups()
                    assert cumulative_tokens(answer, labels) == grouped(sent, labels, kind), f"{path.name}: {title}"
                    cumulative_checked += 1
                cost = _CUMULATIVE_COST.search(query)
                if cost and "[" not in query:  # a cumulative cost panel: the usage times the prices
                    label = cost.group(1)
                    assert cumulative_tokens(answer, label) == pytest.approx(expected_cost(sent, label)), title
                    cumulative_checked += 1
                checked += 1
            for variable in dashboard["templating"]["list"]:
                match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"])
                assert match, f"{path.name}: variable {variable['name']}: {variable['query']}"
                selector = substitute(match.group(1), variables)
                values = prometheus.api(f"/api/v1/label/{match.group(2)}/values", **{"match[]": selector})
                assert values["status"] == "success" and values["data"], f"{path.name}: {variable['name']}: {values}"
                if variable["name"] == "model":
                    assert {"gpt-4o", "llama3.2"} <= set(values["data"])
        assert checked >= 20
        assert cumulative_checked == 5, "the token dashboard's two cumulative panels, the spend dashboard's three"
    finally:
        broken.stop()
    assert time.monotonic() - started < 60
