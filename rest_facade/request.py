"""The facade's Sanic request class: a body that has already arrived is taken without Sanic's stream.

Sanic reads a request body before the handler as `b"".join([data async for data in request.stream])`:
an async generator over `Http.read()` coroutines, about 14,000 instructions for a body that the
first read from the socket brought in whole, with the headers (the usual case for an API request).
The one thing skipped is Sanic's `http.lifecycle.read_body` signal, which the facade never registers.
"""

from __future__ import annotations

from sanic import Request
from sanic.http import Http


class FacadeRequest(Request):
    __slots__ = ()

    async def receive_body(self) -> None:
        stream = self.stream
        if not self.body and type(stream) is Http:
            # What Http.read() does for a Content-Length body wholly in its buffer, then its next read (the
            # end of the body); anything else (chunked, 100-continue, a body still arriving, one over the
            # size limit) is Sanic's own read.
            left = stream.request_bytes_left
            buffer = stream.recv_buffer
            if (
                stream.request_body is True  # type: ignore[comparison-overlap]  # True or "chunked"
                and not stream.expecting_continue
                and left
                and len(buffer) >= left
                and stream.request_bytes <= stream.request_max_size
            ):
                self.body = bytes(buffer[:left])
                del buffer[:left]
                stream.request_bytes_left = 0
                stream.request_body = None
                return
        await super().receive_body()  # type: ignore[no-untyped-call]
