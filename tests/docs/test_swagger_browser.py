"""Swagger UI in a real headless Chromium, against a live gateway on the dummy model.

The page lists the operations, "Try it out" on POST /v1/chat/completions with the dummy example executes
for real and shows a 200 with the completion, and every request the page makes goes to the gateway itself (the
UI's assets come from the installed package, not a CDN). Screenshots go to test-output/docs/ (gitignored).

Chromium is the Debian package `chromium` (.ci/run installs it); without it this test fails, it does not skip.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.docs.cdp import CHROMIUM_PACKAGE, Browser, Page, chromium_path
from tests.harness import ROOT, GatewayProcess

OUTPUT = ROOT / "test-output" / "docs"
CHAT = "#operations-Chat-createChatCompletion"
EXPECTED_OPERATIONS = {
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
}


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    if chromium_path() is None:
        pytest.fail(
            f"Chromium is not installed: this test needs the Debian package `{CHROMIUM_PACKAGE}` "
            f"(apt-get install {CHROMIUM_PACKAGE}; .ci/run installs it)",
            pytrace=False,
        )
    with Browser.launch(tmp_path) as launched:
        yield launched


def js(selector: str) -> str:
    return json.dumps(selector)


def operations(page: Page) -> set[tuple[str, str]]:
    listed: list[list[str]] = page.evaluate(
        "[...document.querySelectorAll('.opblock')].map(b => ["
        " b.querySelector('.opblock-summary-method').textContent.trim(),"
        " b.querySelector('.opblock-summary-path').textContent.replace(/\\u200b/g, '').trim()])"
    )
    return {(method, path) for method, path in listed}


def requested_urls(browser: Browser) -> list[str]:
    urls: list[str] = []
    while not browser.events.empty():
        event: dict[str, Any] = browser.events.get_nowait()
        if event.get("method") == "Network.requestWillBeSent":
            urls.append(event["params"]["request"]["url"])
    return urls


def test_swagger_ui_lists_the_api_and_tries_a_completion(browser: Browser, gateway: GatewayProcess) -> None:
    page = browser.new_page()
    page.send("Network.enable")
    page.navigate(f"{gateway.base_url}/swagger/")
    page.wait_for("document.querySelectorAll('.opblock').length >= 4", what="the operations to be listed")
    assert page.evaluate("document.querySelector('.info .title').textContent").startswith("llm-gateway REST API")
    assert operations(page) >= EXPECTED_OPERATIONS
    page.screenshot(OUTPUT / "swagger-operations.png")

    # Expand POST /v1/chat/completions, "Try it out": the body is the spec's first example, the dummy model.
    page.click(f"{CHAT} .opblock-summary-control")
    page.wait_for(f"!!document.querySelector({js(CHAT + ' .try-out__btn')})", what="the Try it out button")
    page.click(f"{CHAT} .try-out__btn")
    body = page.wait_for(
        f"document.querySelector({js(CHAT + ' textarea.body-param__text')})?.value", what="the editable request body"
    )
    assert json.loads(body) == {"model": "dummy", "messages": [{"role": "user", "content": "Say hi"}]}

    page.click(f"{CHAT} .execute")
    status = page.wait_for(
        f"document.querySelector({js(CHAT + ' .live-responses-table .response .response-col_status')})"
        "?.textContent.trim()",
        what="the live response",
    )
    answer = page.wait_for(
        f"document.querySelector({js(CHAT + ' .live-responses-table .response-col_description pre')})?.textContent"
    )
    # The screenshot shows the curl command, the request URL, then the live response's status, body and headers.
    page.evaluate(f"document.querySelector({js(CHAT + ' .responses-inner')}).scrollIntoView()")
    shot = page.screenshot(OUTPUT / "swagger-try-it-out.png")

    assert status == "200", f"Swagger UI shows status {status!r}; see {shot}"
    completion = json.loads(answer)
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == "Hello from the dummy provider. You said: Say hi"
    details = CHAT + " .live-responses-table .response .response-col_description"
    headers = page.evaluate(f"document.querySelector({js(details)})?.textContent")
    assert "x-llm-gateway-model: dummy" in headers, headers

    # Offline: the page, its assets, the spec and the call all came from the gateway.
    urls = requested_urls(browser)
    assert f"{gateway.base_url}/openapi.yaml" in urls
    assert f"{gateway.base_url}/swagger/swagger-ui-bundle.js" in urls
    assert f"{gateway.base_url}/v1/chat/completions" in urls
    elsewhere = [url for url in urls if not url.startswith(gateway.base_url + "/") and not url.startswith("data:")]
    assert not elsewhere, f"Swagger UI fetched from outside the gateway: {elsewhere}"
