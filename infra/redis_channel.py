"""One Redis pub/sub channel, listened to on a connection of its own.

``ChannelListener`` subscribes to a channel and hands every message's payload to
``on_message``; it knows nothing of what the messages mean.

It is a bare asyncio ``Protocol``, not redis-py's PubSub, on purpose: a message
is parsed and handed over inside ``data_received``, in the same turn of the event
loop that read it from the socket. A redis-py reader would hand it over a few
loop turns later, and a request that arrived in the same turn (a turn of the
same session, sent the moment another pod said ``done``) could be served from a
copy the message was about to drop.

Pub/sub delivers at most once and only while subscribed, so after every
(re)subscription ``on_reset`` is called: whatever was published while the
listener was away is lost, and the owner must act as if it had missed
everything. A lost connection is retried with a capped exponential backoff.

On a Redis Cluster a PUBLISH reaches every node (the cluster bus broadcasts it),
so listening on any one node hears every publisher; after a failure the
listener moves on to the next node the cluster client knows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection

from infra.redis_client import RedisLike

log = logging.getLogger("tiermem.redis")

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
# A subscribed connection is silent when nobody publishes: it is PINGed this
# often, and given up when nothing at all came back for three times as long (a
# frozen Redis or a black-holed link would otherwise never be noticed).
PING_EVERY_S = 5.0


def _command(*parts: str) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        raw = p.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class _RespPushParser:
    """Just enough RESP2 for a subscribed connection: arrays of bulk strings and
    integers (``message``/``subscribe`` pushes), simple strings and errors."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        out: list[Any] = []
        while True:
            parsed = self._parse(0)
            if parsed is None:
                return out
            value, end = parsed
            del self._buf[:end]
            out.append(value)

    def _line(self, pos: int) -> tuple[bytes, int] | None:
        end = self._buf.find(b"\r\n", pos)
        if end < 0:
            return None
        return bytes(self._buf[pos:end]), end + 2

    def _parse(self, pos: int) -> tuple[Any, int] | None:
        line = self._line(pos)
        if line is None:
            return None
        head, pos = line
        kind, rest = head[:1], head[1:]
        if kind in (b"+", b"-"):
            return (head, pos)
        if kind == b":":
            return (int(rest), pos)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return (None, pos)
            if len(self._buf) < pos + n + 2:
                return None
            return (bytes(self._buf[pos : pos + n]), pos + n + 2)
        if kind == b"*":
            items = []
            for _ in range(int(rest)):
                parsed = self._parse(pos)
                if parsed is None:
                    return None
                item, pos = parsed
                items.append(item)
            return (items, pos)
        raise ValueError(f"unexpected RESP reply {head[:40]!r}")


class _Subscriber(asyncio.Protocol):
    def __init__(self, listener: ChannelListener) -> None:
        self.listener = listener
        self.parser = _RespPushParser()
        loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.last_data = loop.time()

    def data_received(self, data: bytes) -> None:
        self.last_data = asyncio.get_running_loop().time()
        try:
            for reply in self.parser.feed(data):
                self.listener._reply(reply)
        except Exception as exc:  # a reply we cannot read: start again
            log.exception("unreadable reply on the Redis channel")
            self.connection_lost(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class ChannelListener:
    def __init__(
        self,
        client: RedisLike,
        channel: str,
        on_message: Callable[[bytes], None],
        on_reset: Callable[[], None],
        *,
        connect_timeout_s: float = 2.0,
    ) -> None:
        self._client = client
        self._channel = channel.encode()
        self._on_message = on_message
        self._on_reset = on_reset
        self._connect_timeout_s = connect_timeout_s
        self._task: asyncio.Task[None] | None = None
        self._next_node = 0
        self.subscribed = asyncio.Event()
        self.resets = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="redis-channel")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _reply(self, reply: Any) -> None:
        if isinstance(reply, bytes) and reply.startswith(b"-"):
            raise ValueError(f"Redis refused the subscription: {reply[:200]!r}")
        if not isinstance(reply, list) or not reply:
            return  # +OK of AUTH
        kind = reply[0]
        if kind == b"message" and len(reply) == 3 and reply[1] == self._channel:
            self._on_message(reply[2])
        elif kind == b"subscribe":
            self.resets += 1
            self._on_reset()
            self.subscribed.set()

    def _target(self) -> tuple[str, int, dict[str, Any]]:
        """Host, port and credentials of the node to listen on."""
        c = self._client
        if isinstance(c, RedisCluster):
            nodes = c.get_nodes() or [c.get_default_node()]
            node = nodes[self._next_node % len(nodes)]
            self._next_node += 1
            kw = dict(node.connection_kwargs)
            return str(node.host), int(node.port), kw
        assert isinstance(c, Redis)
        pool = c.connection_pool
        kw = dict(pool.connection_kwargs)
        if issubclass(pool.connection_class, SSLConnection):
            kw["_tls"] = True
        return str(kw.get("host", "127.0.0.1")), int(kw.get("port", 6379)), kw

    async def _run(self) -> None:
        delay = BACKOFF_FIRST_S
        loop = asyncio.get_running_loop()
        while True:
            transport: asyncio.BaseTransport | None = None
            try:
                host, port, kw = self._target()
                tls = ssl.create_default_context() if kw.get("_tls") or kw.get("ssl") else None
                async with asyncio.timeout(self._connect_timeout_s):
                    made, proto = await loop.create_connection(
                        lambda: _Subscriber(self), host, port, ssl=tls
                    )
                # A stream transport, though not always of asyncio's class: uvloop's
                # TCPTransport (what `tiermem serve` runs on) does not derive from
                # asyncio.WriteTransport, so no isinstance check here.
                transport = made
                writer = cast(asyncio.WriteTransport, made)
                if kw.get("password"):
                    user = kw.get("username")
                    auth = ("AUTH", user, kw["password"]) if user else ("AUTH", kw["password"])
                    writer.write(_command(*auth))
                writer.write(_command("SUBSCRIBE", self._channel.decode()))
                while not proto.lost.done():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(proto.lost), PING_EVERY_S)
                    if loop.time() - proto.last_data > 3 * PING_EVERY_S:
                        break
                    if self.subscribed.is_set():
                        delay = BACKOFF_FIRST_S
                    writer.write(_command("PING"))
                log.warning("lost the Redis channel %s; again in %.1f s", self._channel, delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "cannot listen on the Redis channel %s (%s); again in %.1f s",
                    self._channel, exc, delay,
                )  # fmt: skip
            finally:
                self.subscribed.clear()
                if transport is not None:
                    transport.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)
