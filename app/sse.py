"""Server-sent events framing and the streaming response of a turn.

Each event carries ``id: <turn_id>:<seq>`` so a client can resume with
``Last-Event-ID``; a heartbeat comment goes out when nothing was sent for
``heartbeat_s`` so proxies keep idle streams open.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.responses import StreamingResponse

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
    queue: asyncio.Queue[dict[str, Any] | None], turn_id: str, heartbeat_s: float
) -> AsyncIterator[bytes]:
    """Frames the events a turn puts on ``queue`` until it puts None."""
    seq = 0
    while True:
        if queue.empty():
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
        yield frame(f"{turn_id}:{seq}", item["event"], item["data"])
        seq += 1


def event_stream(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
