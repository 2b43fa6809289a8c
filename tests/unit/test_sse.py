from __future__ import annotations

import asyncio
from typing import Any

from app.sse import HEARTBEAT, frame, relay


async def collect(items: list[dict[str, Any] | None], heartbeat_s: float = 5.0) -> list[bytes]:
    q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    for it in items:
        q.put_nowait(it)
    return [chunk async for chunk in relay(q, "t1", heartbeat_s)]


def tok(text: str) -> dict[str, Any]:
    return {"event": "token", "data": {"text": text}}


async def test_queued_tokens_are_coalesced_and_order_kept() -> None:
    meta = {"event": "meta", "data": {"turn": 1}}
    done = {"event": "done", "data": {"turn": 1}}
    out = await collect([meta, tok("a"), tok("b"), tok("c"), done, None])
    assert out == [
        frame("t1:0", "meta", {"turn": 1}),
        frame("t1:1", "token", {"text": "abc"}),
        frame("t1:2", "done", {"turn": 1}),
    ]


async def test_tokens_then_end_of_stream() -> None:
    out = await collect([tok("x"), tok("y"), None])
    assert out == [frame("t1:0", "token", {"text": "xy"})]


async def test_heartbeat_while_idle() -> None:
    q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gen = relay(q, "t1", 0.05)
    assert await anext(gen) == HEARTBEAT
    q.put_nowait(tok("z"))
    assert await anext(gen) == frame("t1:0", "token", {"text": "z"})
    q.put_nowait(None)
    assert [c async for c in gen] == []
