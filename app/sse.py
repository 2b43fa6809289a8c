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


async def relay(
    queue: asyncio.Queue[TurnEvent | None], turn_id: str, heartbeat_s: float
) -> AsyncIterator[bytes]:
    """Frames the events a turn puts on ``queue`` until it puts None.

    Token events that queued up while the socket was busy go out as one event
    (the same text, fewer frames and sends under load)."""
    seq = 0
    held: object = _NOTHING  # taken off the queue, not sent yet
    while True:
        if held is not _NOTHING:
            item, held = cast("TurnEvent | None", held), _NOTHING
        elif queue.empty():
            try:
                # asyncio.timeout, not wait_for: no extra task per event.
                async with asyncio.timeout(heartbeat_s):
                    item = await queue.get()
            except TimeoutError:
                yield HEARTBEAT
                continue
        else:
            item = queue.get_nowait()
        if item is None:
            return
        if type(item) is Token and not queue.empty():
            texts = [item.text]
            while not queue.empty():
                nxt = queue.get_nowait()
                if type(nxt) is not Token:
                    held = nxt
                    break
                texts.append(nxt.text)
            item = Token("".join(texts))
        yield frame(f"{turn_id}:{seq}", item.name, item.data())
        seq += 1


_NOTHING = object()


def event_stream(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
