"""Slow clients are dropped: header and body read deadlines (app/limits.py).

Raw TCP clients on 127.0.0.1 trickle a request a byte at a time (or connect and
send nothing); the server must close each within its deadline, with a 408 JSON
error where a response can still be sent, while ordinary turns keep completing.
The deadlines are short settings here; every bound below is derived from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.limits import MAX_HEADER_BYTES, http_protocol
from tests.harness import AppServer, ServeProcess, make_settings, post_turn
from tests.servers.fake_vllm import FakeVLLM

# A byte every DRIP_S keeps any idle timer from firing: only a deadline closes these.
DRIP_S = 0.25


@dataclass
class Trickle:
    opened: float
    closed: float | None = None
    received: bytes = b""

    @property
    def open_for(self) -> float:
        assert self.closed is not None, "still open"
        return self.closed - self.opened

    @property
    def status(self) -> int | None:
        if not self.received.startswith(b"HTTP/1.1 "):
            return None
        return int(self.received.split(b" ", 2)[1])

    @property
    def error_code(self) -> str:
        body = self.received.partition(b"\r\n\r\n")[2]
        return str(json.loads(body)["error"]["code"])


async def trickle(port: int, first: bytes, drip: bytes, give_up_s: float) -> Trickle:
    """Sends ``first``, then ``drip`` every DRIP_S until the server closes the
    connection (or ``give_up_s`` passes: then ``closed`` stays None)."""
    # Noted before connecting: the server's clock starts later, when it accepts.
    t = Trickle(opened=time.monotonic())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if first:
            writer.write(first)
        while time.monotonic() - t.opened < give_up_s:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), DRIP_S)
            except TimeoutError:
                if drip:
                    writer.write(drip)
                    await writer.drain()
                continue
            if not chunk:
                t.closed = time.monotonic()
                break
            t.received += chunk
    except (ConnectionResetError, BrokenPipeError):
        t.closed = time.monotonic()
    finally:
        writer.close()
    return t


def slow_headers(session: str) -> bytes:
    return f"POST /v1/sessions/{session}/turns HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".encode()


def slow_body(path: str) -> bytes:
    # Declares far more body than the drips deliver before the deadline.
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Content-Length: 4000\r\n\r\n{"
    ).encode()


def assert_closed_by_deadline(trickles: list[Trickle], deadline_s: float) -> None:
    """Closed no earlier than the deadline (the client notes the time before it
    connects, so before the server's clock starts; less a little for timer
    granularity) and no later than twice it: the server's clock starts late by
    the accept backlog and fires late by event-loop lag, and the client sees the
    close late by its own loop's lag, all well under the deadline even on a
    loaded machine."""
    still_open = [t for t in trickles if t.closed is None]
    assert not still_open, f"{len(still_open)} of {len(trickles)} never closed"
    spans = sorted(t.open_for for t in trickles)
    assert spans[0] >= deadline_s - 0.05, spans[:5]
    assert spans[-1] <= 2 * deadline_s, spans[-5:]


@dataclass
class Turns:
    ok: list[tuple[float, float]]  # (started, ended) of each turn that got `done`
    failed: list[str]


async def turns_until(base: str, stop: asyncio.Event) -> Turns:
    """Ordinary turns, one after another, until ``stop`` is set."""
    out = Turns([], [])
    session = "slow-" + uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(timeout=30) as c:
        n = 0
        while not stop.is_set():
            n += 1
            started = time.monotonic()
            r = await post_turn(c, base, session, f"turn {n} while slow clients trickle")
            if r.status_code == 200 and r.events and r.final.event == "done":
                out.ok.append((started, time.monotonic()))
            else:
                out.failed.append(f"{r.status_code} {r.body or [e.event for e in r.events]}")
    return out


# --- a few hundred at once, against `tiermem serve` -------------------------------------
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 3.0
HEADER_TRICKLERS = 300
BODY_TRICKLERS = 100
IDLE = 50


@pytest.mark.slow
async def test_hundreds_of_trickling_connections_are_closed_while_turns_flow(
    tmp_path: Path, redis_url: str
) -> None:
    env = {
        "TIERMEM_REDIS_URL": redis_url,
        "TIERMEM_DATA_DIR": str(tmp_path / "data"),
        "TIERMEM_AUTH": "off",
        "TIERMEM_EMBEDDINGS": "hash",
        "TIERMEM_LOG_FORMAT": "text",
        "TIERMEM_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "TIERMEM_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    }
    serve = ServeProcess(env, tmp_path / "serve.log").start()
    try:
        give_up = 2 * BODY_TIMEOUT_S + 5
        stop = asyncio.Event()
        flowing = asyncio.create_task(turns_until(serve.url, stop))
        sid = "victim-" + uuid.uuid4().hex[:8]
        headers = [
            trickle(serve.port, slow_headers(sid), b"a", give_up) for _ in range(HEADER_TRICKLERS)
        ]
        bodies = [
            trickle(serve.port, slow_body(f"/v1/sessions/{sid}/turns"), b" ", give_up)
            for _ in range(BODY_TRICKLERS)
        ]
        idle = [trickle(serve.port, b"", b"", give_up) for _ in range(IDLE)]
        began = time.monotonic()
        results = await asyncio.gather(*headers, *bodies, *idle)
        ended = time.monotonic()
        stop.set()
        turns = await flowing
    finally:
        serve.terminate()

    by_header = results[:HEADER_TRICKLERS]
    by_body = results[HEADER_TRICKLERS : HEADER_TRICKLERS + BODY_TRICKLERS]
    by_idle = results[HEADER_TRICKLERS + BODY_TRICKLERS :]
    assert_closed_by_deadline(by_header, HEADER_TIMEOUT_S)
    assert_closed_by_deadline(by_body, BODY_TIMEOUT_S)
    assert_closed_by_deadline(by_idle, HEADER_TIMEOUT_S)
    assert all(t.status == 408 and t.error_code == "request_timeout" for t in by_header)
    assert all(t.status == 408 and t.error_code == "request_timeout" for t in by_body)
    # A connection that never began a request is closed without a word.
    assert all(t.received == b"" for t in by_idle)

    assert turns.failed == []
    during = [t for t in turns.ok if t[0] >= began and t[1] <= ended]
    assert len(during) >= 3, f"only {len(during)} turns completed among the slow clients"


# --- what each deadline does, in this process ------------------------------------------
H_S = 1.0
B_S = 1.5


@pytest.fixture
def slow_llm() -> Iterator[FakeVLLM]:
    # A reply that streams for well over both deadlines.
    llm = FakeVLLM(reply_tokens=20, token_interval_s=2.5 * B_S / 20).start()
    yield llm
    llm.stop()


def timed_server(tmp_path: Path, redis_url: str, **overrides: object) -> AppServer:
    settings = make_settings(
        tmp_path, redis_url, header_timeout_s=H_S, body_timeout_s=B_S, **overrides
    )
    srv = AppServer(settings)
    # What `tiermem serve` runs (app/cli.py); uvicorn loads it at start.
    srv.server.config.http = http_protocol(settings)
    return srv


async def test_each_deadline_and_what_the_client_gets(tmp_path: Path, redis_url: str) -> None:
    give_up = 2 * B_S + 5
    async with timed_server(tmp_path, redis_url) as srv:
        header, body, unread, idle = await asyncio.gather(
            trickle(srv.port, slow_headers("s1"), b"a", give_up),
            trickle(srv.port, slow_body("/v1/sessions/s1/turns"), b" ", give_up),
            # Answered 404 at once, body never read: only the deadline ends it.
            trickle(srv.port, slow_body("/no/such/path"), b" ", give_up),
            trickle(srv.port, b"", b"", give_up),
        )
    assert (header.status, header.error_code) == (408, "request_timeout")
    assert_closed_by_deadline([header], H_S)
    assert (body.status, body.error_code) == (408, "request_timeout")
    assert b"connection: close" in body.received.lower()
    assert_closed_by_deadline([body], B_S)
    assert unread.status == 404
    assert_closed_by_deadline([unread], B_S)
    assert idle.received == b""
    assert_closed_by_deadline([idle], H_S)


async def test_slow_but_timely_requests_and_long_streams_are_untouched(
    tmp_path: Path, redis_url: str, slow_llm: FakeVLLM
) -> None:
    async with timed_server(tmp_path, redis_url, llm_url=slow_llm.base_url) as srv:
        # A body in pieces, done well inside the body deadline.
        payload = json.dumps({"user_id": "u1", "message": "hi", "retrieve": "never"}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        head = (
            "POST /v1/sessions/timely/turns HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        writer.write(head)
        third = len(payload) // 3
        for piece in (payload[:third], payload[third : 2 * third], payload[2 * third :]):
            await asyncio.sleep(B_S / 6)
            writer.write(piece)
        started = time.monotonic()
        raw = await asyncio.wait_for(reader.read(), timeout=30)
        streamed_for = time.monotonic() - started
        writer.close()
        assert raw.startswith(b"HTTP/1.1 200")
        assert b"event: done" in raw
        # The stream outlived both deadlines: they bound reading, not replying.
        assert streamed_for > 2 * B_S

        # And a keep-alive connection serves one request after another.
        slow_llm.token_interval_s = 0.0
        async with httpx.AsyncClient(timeout=30) as c:
            for n in range(2):
                r = await post_turn(c, srv.url, "kept", f"again {n}", retrieve="never")
                assert r.final.event == "done"


async def read_all(reader: asyncio.StreamReader, within_s: float) -> bytes | None:
    """What the server sent before closing; None if it reset the connection (it
    closes with request bytes still unread, so the kernel sends RST)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout=within_s)
    except ConnectionResetError:
        return None


async def test_oversized_headers_are_refused_at_once(tmp_path: Path, redis_url: str) -> None:
    async with timed_server(tmp_path, redis_url) as srv:
        # Headers just past the bound, in pieces the server reads as they come:
        # it has read all of them when it answers, so the 431 arrives intact.
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        started = time.monotonic()
        writer.write(slow_headers("s1"))
        piece = b"a" * (MAX_HEADER_BYTES // 8)
        for _ in range(9):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        raw = await read_all(reader, H_S)
        writer.close()
        assert time.monotonic() - started < H_S, "refused by the deadline, not the size"
        assert raw is not None and raw.startswith(b"HTTP/1.1 431"), raw
        assert json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["code"] == "headers_too_large"

        # A flood is cut off too, long before the deadline (a reset, or the 431).
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        started = time.monotonic()
        writer.write(slow_headers("s1") + b"a" * (16 * MAX_HEADER_BYTES))
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await writer.drain()
        flood = await read_all(reader, H_S)
        writer.close()
        assert time.monotonic() - started < H_S
        assert flood is None or flood.startswith(b"HTTP/1.1 431"), flood[:100]

        # Just under the bound is a request like any other.
        async with httpx.AsyncClient(timeout=30) as c:
            big = "b" * (MAX_HEADER_BYTES - 4096)
            r = await post_turn(c, srv.url, "big", "hi", headers={"X-Big": big}, retrieve="never")
            assert r.final.event == "done"
