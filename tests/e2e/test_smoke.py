from __future__ import annotations

import gc
import uuid

import httpx

from app.main import YOUNG_GC_THRESHOLD
from tests.harness import AppServer, make_settings, post_turn


async def test_turns_stream_and_commit(tmp_path, redis_url):
    settings = make_settings(tmp_path, redis_url, archive_threshold=3)
    async with AppServer(settings) as srv, httpx.AsyncClient(timeout=30) as c:
        sid = "s-" + uuid.uuid4().hex[:8]
        results = []
        for i in range(4):
            r = await post_turn(c, srv.url, sid, f"hello number {i}")
            assert r.status_code == 200, r.body
            results.append(r)
        print([e.event for e in results[0].events])
        print(results[-1].done)
        assert results[0].events[0].event == "meta"
        s = (await c.get(f"{srv.url}/v1/sessions/{sid}")).json()
        print(s)
        assert s["turn_count"] == 4


async def test_archive_happens(tmp_path, redis_url, caplog):
    import asyncio
    import logging

    caplog.set_level(logging.INFO)
    settings = make_settings(tmp_path, redis_url, archive_threshold=3)
    async with AppServer(settings) as srv, httpx.AsyncClient(timeout=30) as c:
        sid = "s-" + uuid.uuid4().hex[:8]
        for i in range(3):
            await post_turn(c, srv.url, sid, f"hello number {i}")
        for _ in range(50):
            s = (await c.get(f"{srv.url}/v1/sessions/{sid}")).json()
            if s["archived_upto"]:
                break
            await asyncio.sleep(0.1)
        print(s["archived_upto"], s["running_summary"])
        print([r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING])
        assert s["archived_upto"] == 3


async def test_start_up_objects_are_frozen_and_young_collections_are_rarer(tmp_path, redis_url):
    """The lifespan keeps what start-up built out of the collector and raises
    the youngest generation's threshold (app/main.py says why)."""
    gc.set_threshold(700, 10, 10)
    gc.unfreeze()
    async with AppServer(make_settings(tmp_path, redis_url)):
        assert gc.get_threshold()[0] == YOUNG_GC_THRESHOLD
        assert gc.get_freeze_count() > 10_000
