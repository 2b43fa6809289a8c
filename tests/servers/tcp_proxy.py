"""A small TCP proxy on 127.0.0.1 that stands between a client and one upstream
server and can break the link on demand: add latency, black-hole it, cut it, or
refuse new connections.

It runs its own asyncio loop in a daemon thread, so it keeps forwarding (or
misbehaving) on time even while the test's loop is busy, and a frozen test loop
never freezes the "network". Every control is a plain method, safe to call from
any thread or coroutine.

The faults, and what they stand for:

- ``delay_s``: each chunk is forwarded ``delay_s`` after it arrived, in order (a
  slow or distant link). Changing it applies to chunks that arrive afterwards.
- ``blackhole()``: bytes in both directions are read and thrown away; connections
  stay open and new ones are accepted (a partition, or a server whose replies
  vanish). Nothing sent meanwhile ever reaches the other side. ``heal()`` ends
  it and aborts the connections that lost bytes (their byte streams are out of
  step and a real client would have timed them out anyway).
- ``cut()``: aborts every open connection at once (RST), as a restart of the
  server or a load balancer dropping its flows would.
- ``refuse()``: new connections are closed as soon as they are accepted (the
  port looks dead); existing ones go on. ``heal()`` ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

_CHUNK = 65536


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    lost_bytes: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for w in (self.client, self.upstream):
            if w is not None and not w.is_closing():
                # abort(): RST rather than FIN, like a dead peer or a dropped flow.
                w.transport.abort()


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream_host``:``upstream_port``."""

    def __init__(self, upstream_host: str, upstream_port: int, port: int = 0) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = "127.0.0.1"
        self.port = port
        self.delay_s = 0.0
        self._blackholed = False
        self._refusing = False
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        # Counters for tests to assert on.
        self.accepted = 0
        self.refused = 0
        self.dropped_bytes = 0
        self.forwarded_bytes = 0

    # --- lifecycle -------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> TcpProxy:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(512)
        self.port = int(sock.getsockname()[1])
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)

            async def serve() -> None:
                self._server = await asyncio.start_server(self._handle, sock=sock)
                ready.set()

            loop.run_until_complete(serve())
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name=f"tcp-proxy-{self.port}")
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError(f"tcp proxy on {self.port} did not start")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for link in list(self._links):
                link.abort()
                for t in link.tasks:
                    t.cancel()
            self._links.clear()

        with contextlib.suppress(RuntimeError, TimeoutError):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        self._loop = self._thread = None

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def redis_url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    @property
    def open_connections(self) -> int:
        return len(self._links)

    # --- faults ----------------------------------------------------------------------
    def blackhole(self) -> None:
        """From now on, bytes in both directions are thrown away."""
        self._blackholed = True

    def refuse(self) -> None:
        """From now on, new connections are closed as soon as they are accepted."""
        self._refusing = True

    def heal(self) -> None:
        """Back to forwarding. Connections that lost bytes to the black hole are aborted."""
        self._blackholed = False
        self._refusing = False
        self._call(self._abort_where, lambda link: link.lost_bytes > 0)

    def cut(self) -> int:
        """Aborts every open connection (RST); returns how many there were."""
        return self._call(self._abort_where, lambda _link: True)

    # --- internals -------------------------------------------------------------------
    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = self._loop
        if loop is None:
            raise RuntimeError("proxy not started")

        async def run() -> T:
            return fn(*args)

        return self._run(run(), loop)

    @staticmethod
    def _run(coro: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop) -> T:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(10)

    def _abort_where(self, pred: Callable[[_Link], bool]) -> int:
        victims = [link for link in self._links if pred(link)]
        for link in victims:
            link.abort()
        return len(victims)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            self.refused += 1
            writer.transport.abort()
            return
        self.accepted += 1
        link = _Link(client=writer)
        self._links.add(link)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                # Upstream down: the client sees its connection reset, as it would
                # connecting to the dead server directly.
                link.abort()
                return
            link.upstream = up_writer
            link.tasks = [
                asyncio.create_task(self._pump(link, reader, up_writer)),
                asyncio.create_task(self._pump(link, up_reader, writer)),
            ]
            # When either side ends, the whole link ends.
            _done, pending = await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            self._links.discard(link)
            for w in (link.client, link.upstream):
                if w is not None and not w.is_closing():
                    w.close()

    async def _pump(
        self, link: _Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send(queue, dst))
        try:
            while True:
                try:
                    data = await src.read(_CHUNK)
                except (ConnectionError, OSError):
                    break
                if not data:
                    break
                if self._blackholed:
                    link.lost_bytes += len(data)
                    self.dropped_bytes += len(data)
                    continue
                queue.put_nowait((time.monotonic() + self.delay_s, data))
            queue.put_nowait(None)
            await sender
        finally:
            if not sender.done():
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender

    async def _send(
        self, queue: asyncio.Queue[tuple[float, bytes] | None], dst: asyncio.StreamWriter
    ) -> None:
        while True:
            item = await queue.get()
            if item is None:
                with contextlib.suppress(ConnectionError, OSError):
                    if dst.can_write_eof():
                        dst.write_eof()
                return
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                dst.write(data)
                await dst.drain()
            except (ConnectionError, OSError):
                return
            self.forwarded_bytes += len(data)
