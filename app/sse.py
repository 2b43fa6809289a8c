"""Server-sent events framing and the streaming response of a turn.

The one place the graph's typed events (``graph.events``) become bytes: each is
framed as ``event: <name>`` and ``data: <JSON of .data()>``. Each event carries
``id: <turn_id>:<seq>`` so a client can resume with ``Last-Event-ID``; a
heartbeat comment goes out when nothing was sent for ``heartbeat_s`` so proxies
keep idle streams open.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import orjson
from starlette.responses import StreamingResponse

from graph.events import Token, TurnEvent
from infra.llm import LLMToken

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
    "Connection": "keep-alive",
}


def frame(event_id: str, event: str, data: dict[str, Any]) -> bytes:
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (
        event_id.encode(),
        event.encode(),
        orjson.dumps(data),
    )


HEARTBEAT = b": heartbeat\n\n"


# What ``queued_events`` yields after ``heartbeat_s`` of silence.
HEARTBEAT_DUE = object()


async def queued_events(queue: asyncio.Queue[Any], heartbeat_s: float) -> AsyncIterator[Any]:
    """What a producer puts on ``queue``, until it puts None; ``HEARTBEAT_DUE``
    after ``heartbeat_s`` of silence.

    Text that queued up while the socket was busy (the turn's ``Token`` events,
    or the LLM's own ``LLMToken``s on the OpenAI front's proxy) comes as one
    item: the same text, fewer frames and sends under load.

    One timer per stream, not a timeout per event: it fires ``heartbeat_s``
    after the last item given, and when nothing was given since, it puts
    ``HEARTBEAT_DUE`` on the queue itself (a token costs no timer)."""
    loop = asyncio.get_running_loop()
    last = loop.time()  # when an item was last given
    timer: asyncio.TimerHandle

    def beat() -> None:
        nonlocal timer
        due = last + heartbeat_s
        if loop.time() >= due:
            queue.put_nowait(HEARTBEAT_DUE)
            due = loop.time() + heartbeat_s
        timer = loop.call_at(due, beat)

    held: Any = _NOTHING  # taken off the queue, not given yet
    timer = loop.call_at(last + heartbeat_s, beat)
    try:
        while True:
            if held is not _NOTHING:
                item, held = held, _NOTHING
            elif queue.empty():
                item = await queue.get()
            else:
                item = queue.get_nowait()
            if item is None:
                return
            kind = type(item)
            if (kind is Token or kind is LLMToken) and not queue.empty():
                texts = [item.text]
                while not queue.empty():
                    nxt = queue.get_nowait()
                    if type(nxt) is not kind:
                        held = nxt
                        break
                    texts.append(nxt.text)
                item = kind("".join(texts))
            elif item is HEARTBEAT_DUE and loop.time() < last + heartbeat_s:
                continue  # put just before something else was given: not due now
            last = loop.time()
            yield item
    finally:
        timer.cancel()


async def relay(
    queue: asyncio.Queue[TurnEvent | None], turn_id: str, heartbeat_s: float
) -> AsyncIterator[bytes]:
    """Frames the events a turn puts on ``queue`` until it puts None."""
    seq = 0
    async for item in queued_events(queue, heartbeat_s):
        if item is HEARTBEAT_DUE:
            yield HEARTBEAT
            continue
        event = cast("TurnEvent", item)
        yield frame(f"{turn_id}:{seq}", event.name, event.data())
        seq += 1


_NOTHING = object()


def event_stream(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
