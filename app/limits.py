"""Limits on what a client may send: body size, and how slowly it may send it.

``BodySizeLimit`` is pure ASGI (not BaseHTTPMiddleware, which would buffer SSE
responses): it refuses a declared Content-Length over the limit at once, and
stops a chunked body the moment it passes the limit.

``http_protocol(settings)`` is the HTTP protocol uvicorn runs (httptools, as
before) with two read deadlines, because uvicorn has none of its own: its only
timer is the keep-alive one, armed after a response and cancelled by any byte
received, so a client trickling a byte at a time holds a connection (and a
file descriptor) forever, and one that connects and sends nothing is never
dropped at all.

- Headers: ``TIERMEM_HEADER_TIMEOUT_S`` (default 10 s) from the moment the
  connection opens, or from the first byte of a later request on a kept-alive
  connection, until the request's headers are complete. A connection that has
  not begun a request by then is closed quietly (it may be a client's spare
  pooled connection); one in the middle of its headers gets 408 first.
- Body: ``TIERMEM_BODY_TIMEOUT_S`` (default 30 s) from the start of the
  request's handling until its body is complete. If no response has started,
  the client gets 408 ``{"error": {"code": "request_timeout", ...}}``, and the
  app sees the client as gone (``http.disconnect``), as if it had left; if a
  response has started (or is done, say a 404 to a body nobody reads), the
  connection is simply closed. This is a deadline on the whole body, not an
  idle timer, so a steady trickle cannot extend it.
- Header size: a request whose headers pass ``MAX_HEADER_BYTES`` (64 KiB, as
  much as any real client sends; nginx allows 32 KiB) gets 431 and is closed.
  httptools sets no bound, and keeps a header it is still receiving in a
  bytes object it extends by copying, so within the header deadline a fast
  client could otherwise make it hold, and copy over and over, gigabytes.

These live in the protocol and not in ASGI middleware because the app is not
called until the headers are complete, and a body the app never reads is
never seen by middleware. The defaults are generous for any real client on a
slow link (a 64 KiB body at 30 s is about 2 KB/s); a reply stream is bounded by
neither: once the body is in, the connection is the app's.
"""

from __future__ import annotations

import asyncio
import json
from asyncio import TimerHandle
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from app.errors import error_body, error_response
from infra.settings import Settings


class BodyTooLarge(HTTPException):
    """Raised from ``receive()`` for a body that passes the limit while it streams
    in. An HTTPException, so FastAPI's body parsing lets it through (it would turn
    a plain exception into "invalid JSON")."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body is over the limit of {max_bytes} bytes")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    await self._refuse(scope, receive, send)
                    return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except BodyTooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, "body_too_large", f"request body is over the limit of {self.max_bytes} bytes"
        )
        await response(scope, receive, send)


def http_protocol(settings: Settings) -> type[HttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, with this app's read
    deadlines (see the module docstring)."""
    return type(
        "TimedHttpToolsProtocol",
        (TimedHttpToolsProtocol,),
        {"header_timeout_s": settings.header_timeout_s, "body_timeout_s": settings.body_timeout_s},
    )


MAX_HEADER_BYTES = 64 * 1024


class TimedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header and a body read deadline, and a
    bound on the size of a request's headers."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_header_bytes: int = MAX_HEADER_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: TimerHandle | None = None
        self._in_headers = False
        self._header_bytes = 0
        self._body_timer: TimerHandle | None = None
        self._body_cycle: RequestResponseCycle | None = None

    # --- the header deadline ------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        # On a fresh connection the clock started when it opened; a later request
        # on a kept-alive one starts it with its first byte.
        if self._header_timer is None:
            self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._in_headers or self.transport.is_closing():
            return
        # Counts whole chunks that end inside a request's headers: the first may
        # also hold the end of the request before, a slight overcount.
        self._header_bytes += len(data)
        if self._header_bytes > self.max_header_bytes:
            self._write_error(
                431,
                "headers_too_large",
                f"the request headers are over the limit of {self.max_header_bytes} bytes",
            )
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._header_bytes = 0
        self._cancel_header_timer()
        super().on_headers_complete()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request behind a reply still being sent: that reply is
            # not the slow client's fault, so the clock restarts once more.
            self._arm_header_timer()
            return
        if self._in_headers:
            self._write_error(408, "request_timeout", "the request headers did not arrive in time")
        self.transport.close()

    # --- the body deadline --------------------------------------------------------
    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        super()._start_asgi_task(cycle, app)
        # A pipelined request starts only when the one before it is answered:
        # its clock starts then, not while its reading was paused.
        if cycle.more_body:
            self._cancel_body_timer()
            self._body_cycle = cycle
            self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_timed_out)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._body_cycle is self.cycle:
            self._cancel_body_timer()

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = None
        self._body_cycle = None

    def _body_timed_out(self) -> None:
        cycle = self._body_cycle
        self._body_timer = None
        self._body_cycle = None
        if cycle is None or self.transport.is_closing():
            return
        if not cycle.response_started:
            # What connection_lost would do, now: the app's receive() returns
            # http.disconnect and whatever it sends later is dropped, so the 408
            # below is the only response on the wire.
            cycle.disconnected = True
            cycle.message_event.set()
            self._write_error(408, "request_timeout", "the request body did not arrive in time")
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def _write_error(self, status: int, code: str, message: str) -> None:
        """An error response written straight to the socket, where the app has
        not answered this request (it may never have seen it)."""
        if (
            self.cycle is not None
            and self.cycle.response_started
            and not (self.cycle.response_complete or self.cycle.disconnected)
        ):
            return  # the app's response to an earlier request is on the wire
        body = json.dumps(error_body(code, message)).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
            ]
        )
        self.transport.write(b"".join(head) + body)
