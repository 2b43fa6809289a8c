from __future__ import annotations

import asyncio

from app.sse import HEARTBEAT, frame, relay
from graph.events import Done, Meta, Token, TurnEvent


async def collect(items: list[TurnEvent | None], heartbeat_s: float = 5.0) -> list[bytes]:
    q: asyncio.Queue[TurnEvent | None] = asyncio.Queue()
    for it in items:
        q.put_nowait(it)
    return [chunk async for chunk in relay(q, "t1", heartbeat_s)]


def tok(text: str) -> Token:
    return Token(text)


async def test_queued_tokens_are_coalesced_and_order_kept() -> None:
    meta = Meta("t1", "s1", 1, l1_hit=False, dev_llm=True)
    done = Done("t1", 1, "complete", {})
    out = await collect([meta, tok("a"), tok("b"), tok("c"), done, None])
    assert out == [
        frame("t1:0", "meta", meta.data()),
        frame("t1:1", "token", {"text": "abc"}),
        frame("t1:2", "done", done.data()),
    ]


async def test_tokens_then_end_of_stream() -> None:
    out = await collect([tok("x"), tok("y"), None])
    assert out == [frame("t1:0", "token", {"text": "xy"})]


async def test_heartbeat_while_idle() -> None:
    q: asyncio.Queue[TurnEvent | None] = asyncio.Queue()
    gen = relay(q, "t1", 0.05)
    assert await anext(gen) == HEARTBEAT
    q.put_nowait(tok("z"))
    assert await anext(gen) == frame("t1:0", "token", {"text": "z"})
    q.put_nowait(None)
    assert [c async for c in gen] == []


async def test_heartbeats_only_after_silence_and_none_after_the_end() -> None:
    """Items given more often than heartbeat_s keep heartbeats away; a silence
    gets one per heartbeat_s; once the stream ended, its timer puts nothing
    more on the queue."""
    beat = 0.5
    q: asyncio.Queue[TurnEvent | None] = asyncio.Queue()
    gen = relay(q, "t1", beat)
    loop = asyncio.get_running_loop()
    got: list[bytes] = []
    # Tokens every beat/25 for 3 beats (only a stall of most of a beat between
    # two of them would let a heartbeat in).
    until = loop.time() + 3 * beat
    while loop.time() < until:
        loop.call_later(beat / 25, q.put_nowait, tok("a"))
        got.append(await anext(gen))
    assert HEARTBEAT not in got and len(got) >= 3
    # Then silence: the next item is a heartbeat, no sooner than a beat after.
    t0 = loop.time()
    assert await anext(gen) == HEARTBEAT
    assert loop.time() - t0 >= beat * 0.9
    q.put_nowait(None)
    assert [c async for c in gen] == []
    await asyncio.sleep(2 * beat)
    assert q.empty()
