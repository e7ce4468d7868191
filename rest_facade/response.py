"""The facade's own responses: Sanic's HTTPResponse, with the headers held and rendered more cheaply.

Sanic sends a response's header block as `format_http1_response(status, response.processed_headers)`:
its status line, then `b"%b: %b\\r\\n" % pair` for each (name, value) pair of bytes. For each header
Sanic's own `processed_headers` strips CR, LF and NUL with a per-character `str.translate` and encodes
name and value apart, and the response holds its headers in a case-insensitive multidict built twice
per response (about 12,000 instructions for the seven headers of a plain reply, 20,000 with a key's
six x-ratelimit-* more). Here the headers are a plain dict and the block is one string, checked and
encoded once, and handed to Sanic as a single pair, which it renders into the very same bytes.
"""

from __future__ import annotations

from typing import Any

from sanic import HTTPResponse
from sanic.helpers import has_message_body


class Response(HTTPResponse):
    """An HTTPResponse whose `headers` is the plain dict it was given, owned from then on.

    Every name put in it is lower case (ours, and Sanic's content-length, connection and
    transfer-encoding), so the dict's exact keys behave as Sanic's case-insensitive ones would."""

    __slots__ = ()

    def __init__(
        self,
        body: bytes | None = None,
        status: int = 200,
        headers: dict[str, Any] | None = None,
        content_type: str | None = None,
    ) -> None:
        # HTTPResponse's slots set directly: its __init__ builds a Header multidict, throws it away and
        # builds a second one from `headers`.
        self.asgi = False
        self.body = b"" if body is None else body
        self.content_type = content_type
        self.stream = None
        self.status = status
        self.headers = {} if headers is None else headers  # type: ignore[assignment]
        self._cookies = None

    @staticmethod
    def _sanitize_header_value(value: str) -> str:
        # isprintable() is one C pass, false for every control character; only those go to Sanic's translate.
        return value if value.isprintable() else HTTPResponse._sanitize_header_value(value)

    @property
    def processed_headers(self) -> list[tuple[bytes, bytes]]:  # type: ignore[override]
        """The header block as one (name, value) pair: the first name, and the rest of the block after
        its ": " (Sanic adds the last CRLF). The bytes Sanic's own pairs would give."""
        headers: dict[str, Any] = self.headers  # type: ignore[assignment]
        if has_message_body(self.status):  # type: ignore[no-untyped-call]
            headers.setdefault("content-type", self.content_type)
        if not headers:
            return []
        lines = [f"{name}: {value}" for name, value in headers.items()]  # f"{value}": content-length is an int
        joined = "".join(lines)
        if "\r" in joined or "\n" in joined or "\x00" in joined:  # what Sanic strips (three memchr passes)
            return self._each_header(headers)
        try:
            block = "\r\n".join(lines).encode("ascii")
        except UnicodeEncodeError:  # a value in UTF-8 (Sanic's surrogateescape), or a name Sanic would refuse
            return self._each_header(headers)
        first = len(next(iter(headers)))
        return [(block[:first], block[first + 2 :])]

    def _each_header(self, headers: dict[str, Any]) -> list[tuple[bytes, bytes]]:
        """Sanic's own pairs, one per header."""
        sanitize = self._sanitize_header_value
        return [
            (sanitize(name).encode("ascii"), sanitize(f"{value}").encode(errors="surrogateescape"))
            for name, value in headers.items()
        ]
