"""Egress through a real proxy: Debian's tinyproxy, started per test on a loopback port.

HTTPS upstreams are reached through a CONNECT tunnel with TLS verified for the upstream's name
(trustme certificates, SSL_CERT_FILE); plain HTTP goes to the proxy in absolute form. The proxy's
credentials come from the proxy URL; the environment (HTTPS_PROXY, HTTP_PROXY, NO_PROXY) is read once
per provider, and a provider's `proxy:` key overrides it. First the client itself, then real gateway
processes.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
import yaml

from gateway import proxy
from gateway.config import ConfigError
from service.providers import http1
from tests.fakes.upstream import FakeUpstream
from tests.harness import free_port, run_cli
from tests.service.test_http1 import COMPLETION, OK, Server, ThreadedServer, _tls, answering, read_request

# Installed by tools/system-deps.sh (make test); missing, these tests fail rather than skip.
TINYPROXY = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"

USER, PASSWORD = "gw-user", "pr0xy-s3cret-pw"


class Tinyproxy:
    """tinyproxy in the foreground on 127.0.0.1, allowing CONNECT to `connect_ports` only."""

    def __init__(self, workdir: Path, connect_ports: tuple[int, ...] = (), auth: bool = False) -> None:
        self.port = free_port()
        self.log = workdir / f"tinyproxy-{self.port}.log"
        conf = workdir / f"tinyproxy-{self.port}.conf"
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 30",
            "MaxClients 50",
            "Allow 127.0.0.1",
            "LogLevel Connect",
            f'LogFile "{self.log}"',
            *(f"ConnectPort {port}" for port in connect_ports),
        ]
        if auth:
            lines.append(f"BasicAuth {USER} {PASSWORD}")
        conf.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen(
            [TINYPROXY, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tinyproxy did not start: {self.log_text()}") from None
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Callable[..., Tinyproxy]]:
    started: list[Tinyproxy] = []

    def start(connect_ports: tuple[int, ...] = (), auth: bool = False) -> Tinyproxy:
        started.append(Tinyproxy(tmp_path, connect_ports, auth))
        return started[-1]

    yield start
    for one in started:
        one.stop()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_bundle(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    return bundle


def recording(seen: list[bytes], answer: bytes = OK) -> Any:
    """Answers every request with `answer`, keeping each request's bytes in `seen`."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(100):
            try:
                seen.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                return
            writer.write(answer)
            await writer.drain()

    return script


async def post(pool: http1.Pool, url: str, via: proxy.Proxy | None) -> tuple[int, bytes]:
    head = http1.render_head("POST", url, {"content-type": "application/json"}, via)
    response = await pool.request(http1.with_body(head, b"{}"))
    try:
        return response.status, await response.read()
    finally:
        response.release()


# ---------------------------------------------------------------------------------------- the client


def test_https_goes_through_a_connect_tunnel_with_tls_verified(
    tinyproxy: Callable[..., Tinyproxy], ca: trustme.CA, ca_bundle: Path
) -> None:
    seen: list[bytes] = []

    async def main() -> None:
        async with Server(recording(seen), tls=_tls(ca, "localhost")) as server:
            relay = tinyproxy(connect_ports=(server.port,))
            via = proxy.parse(relay.url, "test")
            url = server.url("https", "localhost")
            pool = http1.Pool(url, proxy=via)
            assert [await post(pool, url, via) for _ in range(3)] == [(200, b'{"ok":true}')] * 3
            assert server.connections == 1  # one tunnel, kept alive
            await pool.close()
        assert relay.log_text().count("CONNECT localhost:") == 1
        assert seen[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost:")  # origin form inside

        async with Server(recording(seen), tls=_tls(ca, "other.example")) as server:
            relay = tinyproxy(connect_ports=(server.port,))
            via = proxy.parse(relay.url, "test")
            url = server.url("https", "localhost")
            with pytest.raises(http1.ConnectError, match=f"through proxy {relay.url}: .*certificate"):
                await post(http1.Pool(url, proxy=via), url, via)

    asyncio.run(main())


def test_plain_http_goes_to_the_proxy_in_absolute_form(tinyproxy: Callable[..., Tinyproxy]) -> None:
    seen: list[bytes] = []

    async def main() -> None:
        async with Server(recording(seen)) as server:
            relay = tinyproxy()
            via = proxy.parse(relay.url, "test")
            url = server.url()
            head = http1.render_head("POST", url, {}, via)
            assert head.startswith(f"POST http://127.0.0.1:{server.port}/v1/chat/completions HTTP/1.1\r\n".encode())
            pool = http1.Pool(url, proxy=via)
            assert [await post(pool, url, via) for _ in range(2)] == [(200, b'{"ok":true}')] * 2
            await pool.close()
        assert seen and all(b"(tinyproxy/" in request.lower() for request in seen)
        assert all(request.startswith(b"POST /v1/chat/completions HTTP/1.1") for request in seen)

    asyncio.run(main())


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_credentials_the_proxy_requires_are_sent_and_never_reach_the_upstream(
    scheme: str, tinyproxy: Callable[..., Tinyproxy], ca: trustme.CA, ca_bundle: Path
) -> None:
    seen: list[bytes] = []

    async def main() -> None:
        async with Server(recording(seen), tls=_tls(ca, "localhost") if scheme == "https" else None) as server:
            relay = tinyproxy(connect_ports=(server.port,), auth=True)
            url = server.url(scheme, "localhost")
            anonymous = proxy.parse(relay.url, "test")
            with pytest.raises(http1.ProxyError, match=f"proxy {relay.url} refused .*407") as refused:
                await post(http1.Pool(url, proxy=anonymous), url, anonymous)
            assert USER not in str(refused.value)
            if scheme == "https":  # (tinyproxy answers a plain request with wrong credentials by a 401 of its own)
                wrong = proxy.parse(f"http://{USER}:not-it@127.0.0.1:{relay.port}", "test")
                with pytest.raises(http1.ProxyError, match=r"refused CONNECT .*: 401"):
                    await post(http1.Pool(url, proxy=wrong), url, wrong)
            via = proxy.parse(f"http://{USER}:{PASSWORD}@127.0.0.1:{relay.port}", "test")
            assert PASSWORD not in repr(via) and PASSWORD not in str(via)
            assert await post(http1.Pool(url, proxy=via), url, via) == (200, b'{"ok":true}')
        assert seen and not any(b"proxy-authorization" in request.lower() for request in seen)

    asyncio.run(main())


def test_a_refusing_or_dead_proxy_is_a_clean_error_naming_it(
    tinyproxy: Callable[..., Tinyproxy], ca: trustme.CA, ca_bundle: Path
) -> None:
    async def main() -> None:
        dead = proxy.parse(f"http://{USER}:{PASSWORD}@127.0.0.1:{free_port()}", "test")
        for url in ("http://127.0.0.1:9/v1", "https://localhost:9/v1"):
            with pytest.raises(http1.ConnectError, match=f"cannot connect to proxy {dead}: ") as failed:
                await post(http1.Pool(url, proxy=dead), url, dead)
            assert PASSWORD not in str(failed.value) and USER not in str(failed.value)
        async with Server(answering(OK), tls=_tls(ca, "localhost")) as server:
            relay = tinyproxy(connect_ports=(server.port + 1,))  # CONNECT to this port is not allowed
            via = proxy.parse(relay.url, "test")
            url = server.url("https", "localhost")
            with pytest.raises(
                http1.ProxyError, match=f"proxy {relay.url} refused CONNECT to localhost:{server.port}: 403"
            ):
                await post(http1.Pool(url, proxy=via), url, via)

    asyncio.run(main())


# ---------------------------------------------------------------------------------------- the choice


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "bypassed"),
    [
        ("api.openai.com", 443, "*", True),
        ("api.openai.com", 443, "openai.com", True),
        ("api.openai.com", 443, ".openai.com", True),
        ("api.openai.com", 443, "*.openai.com", True),
        ("openai.com", 443, ".openai.com", True),
        ("notopenai.com", 443, "openai.com", False),
        ("api.openai.com", 443, "example.com, openai.com", True),
        ("API.OpenAI.com", 443, "api.openai.COM", True),
        ("api.openai.com", 443, "api.openai.com:8443", False),
        ("api.openai.com", 8443, "api.openai.com:8443", True),
        ("10.1.2.3", 80, "10.0.0.0/8", True),
        ("10.1.2.3", 80, "10.1.2.3", True),
        ("11.1.2.3", 80, "10.0.0.0/8", False),
        ("::1", 80, "::1", True),
        ("::1", 80, "[::1]:80", True),
        ("::1", 80, "[::1]:81", False),
        ("localhost", 80, "", False),
        ("localhost", 80, " , ", False),
    ],
)
def test_no_proxy_means_what_it_means_to_curl(host: str, port: int, no_proxy: str, bypassed: bool) -> None:
    assert proxy.bypassed(host, port, no_proxy) is bypassed


@pytest.mark.parametrize(
    ("url", "environ", "chosen"),
    [
        ("https://api.openai.com/v1", {"HTTPS_PROXY": "http://p:1"}, "http://p:1"),
        ("https://api.openai.com/v1", {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://p:1"}, "http://lower:1"),
        ("https://api.openai.com/v1", {"HTTP_PROXY": "http://p:1"}, None),
        ("http://ollama:11434/v1", {"HTTP_PROXY": "http://p:1", "HTTPS_PROXY": "http://q:1"}, "http://p:1"),
        ("http://ollama:11434/v1", {"http_proxy": "p:3128"}, "http://p:3128"),
        ("https://api.openai.com/v1", {"ALL_PROXY": "http://all:1"}, "http://all:1"),
        ("https://api.openai.com/v1", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "openai.com"}, None),
        ("https://api.openai.com/v1", {"HTTPS_PROXY": "http://p:1", "no_proxy": "*"}, None),
        ("https://api.openai.com/v1", {"HTTPS_PROXY": "http://p"}, "http://p:80"),
        ("https://api.openai.com/v1", {}, None),
    ],
)
def test_the_environment_picks_the_proxy_by_scheme(url: str, environ: dict[str, str], chosen: str | None) -> None:
    found = proxy.resolve(None, url, environ, "providers.x")
    assert (str(found) if found else None) == chosen


def test_the_provider_key_overrides_the_environment() -> None:
    environ = {"HTTPS_PROXY": "http://env:1"}
    assert proxy.resolve("", "https://api.openai.com/v1", environ, "providers.x") is None
    assert str(proxy.resolve("http://mine:2", "https://api.openai.com/v1", environ, "providers.x")) == "http://mine:2"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("socks5://u:pw-secret@p:1080", "only http:// proxies"),
        ("https://p:3128", "only http:// proxies"),
        ("http://u:pw-secret@p:notaport", "malformed port"),
        ("http://u:pw-secret@p:3128/path", "scheme, host and port only"),
    ],
)
def test_a_bad_proxy_url_names_the_variable_and_never_the_password(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"HTTPS_PROXY \\(for providers.x\\): .*{message}") as error:
        proxy.resolve(None, "https://api.openai.com/v1", {"HTTPS_PROXY": value}, "providers.x")
    assert "pw-secret" not in str(error.value)


def test_proxy_credentials_are_percent_decoded_into_basic_auth() -> None:
    found = proxy.parse("http://us%40er:p%3Ass@p:1", "x")
    assert found.authorization == "Basic dXNAZXI6cDpzcw=="  # base64("us@er:p:ss")
    assert "p%3Ass" in found.secrets and "p:ss" in found.secrets


# ---------------------------------------------------------------------------------------- the gateway


def _config(api_url: str, **provider: Any) -> dict[str, Any]:
    return {
        "providers": {"up": {"type": "openai", "api_url": api_url, "api_key": "sk-test", **provider}},
        "models": {"gpt-4o": {"provider": "up", "model": "upstream-model"}},
    }


def _chat(gateway: Any) -> httpx.Response:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=gateway.base_url, timeout=30, trust_env=False) as client:
        return client.post("/v1/chat/completions", json=body)


def test_the_gateway_reaches_an_https_upstream_through_https_proxy(
    gateway_factory: Any, tinyproxy: Callable[..., Tinyproxy], ca: trustme.CA, ca_bundle: Path, tmp_path: Path
) -> None:
    seen: list[bytes] = []
    with ThreadedServer(recording(seen, COMPLETION), _tls(ca, "localhost")) as server:
        relay = tinyproxy(connect_ports=(server.port,))
        gateway = gateway_factory(
            _config(f"https://localhost:{server.port}/v1"),
            env={"HTTPS_PROXY": relay.url, "SSL_CERT_FILE": str(ca_bundle), "NO_PROXY": ""},
        )
        response = _chat(gateway)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "Hello!"
    assert f"CONNECT localhost:{server.port}" in relay.log_text()
    assert seen and b"authorization: Bearer sk-test" in seen[0]


def test_the_gateway_sends_plain_http_through_http_proxy_and_honours_no_proxy(
    gateway_factory: Any, tinyproxy: Callable[..., Tinyproxy], upstream: FakeUpstream
) -> None:
    relay = tinyproxy()
    via_proxy = gateway_factory(_config(upstream.url + "/v1"), env={"HTTP_PROXY": relay.url, "NO_PROXY": ""})
    assert _chat(via_proxy).status_code == 200
    assert "tinyproxy" in upstream.last().headers.get("Via", "")

    upstream.received.clear()
    dead = f"http://127.0.0.1:{free_port()}"
    direct = gateway_factory(_config(upstream.url + "/v1"), env={"HTTP_PROXY": dead, "NO_PROXY": "localhost,127.0.0.1"})
    assert _chat(direct).status_code == 200
    assert "Via" not in upstream.last().headers

    upstream.received.clear()
    overridden = gateway_factory(_config(upstream.url + "/v1", proxy=""), env={"HTTP_PROXY": dead, "NO_PROXY": ""})
    assert _chat(overridden).status_code == 200
    assert "Via" not in upstream.last().headers


def test_the_gateway_supplies_the_credentials_the_proxy_requires_and_never_logs_them(
    gateway_factory: Any, tinyproxy: Callable[..., Tinyproxy], upstream: FakeUpstream
) -> None:
    relay = tinyproxy(auth=True)
    url = f"http://{USER}:{PASSWORD}@127.0.0.1:{relay.port}"
    gateway = gateway_factory(_config(upstream.url + "/v1", proxy=url), env={"LOG_LEVEL": "DEBUG"})
    assert _chat(gateway).status_code == 200
    assert "tinyproxy" in upstream.last().headers.get("Via", "")
    assert "Proxy-Authorization" not in upstream.last().headers

    refused = gateway_factory(_config(upstream.url + "/v1", proxy=relay.url), env={"LOG_LEVEL": "DEBUG"})
    response = _chat(refused)
    assert response.status_code == 502
    assert f"proxy {relay.url}" in response.json()["error"]["message"]

    wrong = gateway_factory(
        _config(upstream.url + "/v1", proxy=f"http://{USER}:{PASSWORD}x@127.0.0.1:{relay.port}"),
        env={"LOG_LEVEL": "DEBUG"},
    )
    response = _chat(wrong)  # tinyproxy answers with a 401 and resets the connection: some error, never the password
    assert response.status_code >= 400 and PASSWORD not in response.text
    for process in (gateway, refused, wrong):
        process.stop()
        assert PASSWORD not in process.log_text()
        assert "Traceback" not in process.log_text()


def test_a_dead_or_refusing_proxy_is_a_clean_503_or_502_naming_it(
    gateway_factory: Any, tinyproxy: Callable[..., Tinyproxy], ca: trustme.CA, ca_bundle: Path
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    gateway = gateway_factory(
        _config("https://api.openai.com/v1"), env={"HTTPS_PROXY": f"http://{USER}:{PASSWORD}@{dead}", "NO_PROXY": ""}
    )
    response = _chat(gateway)
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert f"cannot connect to proxy http://{dead}" in error["message"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert PASSWORD not in response.text and USER not in response.text

    with ThreadedServer(recording([], COMPLETION), _tls(ca, "localhost")) as server:
        relay = tinyproxy(connect_ports=(server.port + 1,))
        refusing = gateway_factory(
            _config(f"https://localhost:{server.port}/v1", proxy=relay.url), env={"SSL_CERT_FILE": str(ca_bundle)}
        )
        response = _chat(refusing)
    assert response.status_code == 502, response.text
    assert f"proxy {relay.url} refused CONNECT to localhost:{server.port}: 403" in response.json()["error"]["message"]
    for process in (gateway, refusing):
        process.stop()
        assert "Traceback" not in process.log_text()
        assert PASSWORD not in process.log_text()


def test_a_bad_proxy_key_or_variable_is_a_config_error_without_the_password(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(_config("https://api.openai.com/v1", proxy=f"socks5://{USER}:{PASSWORD}@p:1080")))
    result = run_cli(["--config", str(path), "--check-config"])
    assert result.returncode == 2
    assert "providers.up.proxy: 'socks5://p:1080': only http:// proxies are supported" in result.stderr
    assert PASSWORD not in result.stderr + result.stdout

    path.write_text(yaml.safe_dump(_config("https://api.openai.com/v1")))
    bad = {"HTTPS_PROXY": f"http://{USER}:{PASSWORD}@p:port", "NO_PROXY": ""}
    for args in (["--check-config"], []):  # the same refusal at start-up, before any worker runs
        result = run_cli(["--config", str(path), *args], env=bad)
        assert result.returncode == 2, result.stderr
        assert "HTTPS_PROXY (for providers.up): 'http://p:port' has a malformed port" in result.stderr
        assert PASSWORD not in result.stderr + result.stdout and "Traceback" not in result.stderr
    # An upstream NO_PROXY sends direct does not care what the variable holds.
    assert run_cli(["--config", str(path), "--check-config"], env={**bad, "NO_PROXY": "openai.com"}).returncode == 0
