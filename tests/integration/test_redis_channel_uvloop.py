"""The L1 invalidation listener on uvloop, the loop `tiermem serve` runs on: its
transports are not asyncio's classes, and the listener must still subscribe and
deliver (it once asserted asyncio.WriteTransport and never subscribed)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import asyncio, sys, uvloop
from infra.redis_channel import ChannelListener
from infra.redis_client import create_redis

async def main():
    redis = create_redis(sys.argv[1], socket_timeout=5.0, max_connections=8)
    got = asyncio.Event()
    seen = []
    listener = ChannelListener(redis, "tm:test:uvloop", lambda m: (seen.append(m), got.set()),
                               lambda: None)
    listener.start()
    await asyncio.wait_for(listener.subscribed.wait(), 60)
    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    await redis.publish("tm:test:uvloop", b"k 7")
    await asyncio.wait_for(got.wait(), 60)
    print("delivered", seen)
    await listener.aclose()
    await redis.aclose()

uvloop.run(main())
"""


async def test_the_listener_subscribes_and_delivers_on_uvloop(redis_url: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SCRIPT, redis_url, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert out.decode().strip() == "delivered [b'k 7']"
