"""A headless Chromium driven over the Chrome DevTools Protocol: the Debian `chromium` binary, a websocket, no
browser download and no driver.

    with Browser.launch(tmp_path) as browser:
        page = browser.new_page()
        page.navigate("http://...")
        page.wait_for("document.title !== ''")
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

from websockets.sync.client import ClientConnection, connect

CHROMIUM_PACKAGE = "chromium"
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-port=0",
    "--window-size=1280,2400",
)


class CDPError(RuntimeError):
    pass


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
        self.process = process
        self.log = log
        self._exit = ExitStack()
        # As a context manager: the form every websockets version supports without a deprecation warning.
        self._socket: ClientConnection = self._exit.enter_context(connect(url, max_size=None, open_timeout=timeout))
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[int, queue.Queue[dict[str, Any]]] = {}
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def launch(cls, workdir: Path, timeout: float = 30.0) -> Browser:
        binary = chromium_path()
        if binary is None:
            raise FileNotFoundError(
                f"no Chromium: install the Debian package `{CHROMIUM_PACKAGE}` (apt-get install {CHROMIUM_PACKAGE}; "
                ".ci/run installs it)"
            )
        profile = workdir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        log = workdir / "chromium.log"
        # Chromium writes the DevTools address on stderr; a thread keeps reading it so the pipe never fills.
        process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "HOME": str(workdir)},
        )
        assert process.stderr is not None
        address: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            assert process.stderr is not None
            with log.open("wb") as out:
                for line in process.stderr:
                    out.write(line)
                    out.flush()
                    found = _LISTENING.search(line.decode(errors="replace"))
                    if found:
                        address.put(found.group(1))

        threading.Thread(target=pump, daemon=True).start()
        try:
            url = address.get(timeout=timeout)
        except queue.Empty:
            process.kill()
            process.wait(10)
            raise CDPError(f"Chromium did not start within {timeout}s:\n{log.read_text(errors='replace')}") from None
        try:
            return cls(process, url, log, timeout)
        except BaseException:
            process.kill()
            process.wait(10)
            raise

    def _read(self) -> None:
        try:
            for raw in self._socket:
                message = json.loads(raw)
                waiter = self._waiting.get(message.get("id", -1))
                if waiter is not None:
                    waiter.put(message)
                else:
                    self.events.put(message)
        except Exception:  # the socket closed: whoever waits times out with a clear message
            return

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        ident = next(self._ids)
        waiter: queue.Queue[dict[str, Any]] = queue.Queue()
        self._waiting[ident] = waiter
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        with self._lock:
            self._socket.send(json.dumps(message))
        try:
            reply = waiter.get(timeout=30)
        except queue.Empty:
            raise CDPError(f"no answer to {method} within 30s") from None
        finally:
            del self._waiting[ident]
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def new_page(self, width: int = 1280, height: int = 2400) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        page.send("Page.enable")
        page.send("Runtime.enable")
        page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        return page

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except CDPError:
            pass
        finally:
            self._exit.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def __enter__(self) -> Browser:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


class Page:
    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return self.browser.send(method, params, self.session)

    def navigate(self, url: str) -> None:
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"cannot open {url}: {result['errorText']}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (awaited if it is a promise), as JSON."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, what: str = "") -> Any:
        """Polls a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what or expression}")
            time.sleep(0.1)

    def click(self, selector: str) -> None:
        clicked = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return false; e.scrollIntoView({block: 'center'}); e.click(); return true; })()"
        )
        if not clicked:
            raise CDPError(f"nothing to click at {selector!r}")

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
