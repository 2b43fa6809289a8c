"""A memory-side failure in ``retrieve`` skips retrieval for the turn, with the
reason logged and counted; it never fails the turn. Real Milvus Lite."""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from infra.milvus import AsyncMilvus
from memory.l3_store import EMBEDDER_PROPERTY, collection_spec
from tests.harness import AppServer, make_settings, post_turn


async def _collection_of_another_embedder(uri: str, name: str) -> None:
    pool = ThreadPoolExecutor(max_workers=1)
    milvus = AsyncMilvus(uri, None, pool)
    try:
        await milvus.create_collection(
            name, collection_spec(384), properties={EMBEDDER_PROPERTY: "another-model"}
        )
    finally:
        await milvus.close()
        pool.shutdown(wait=True)


async def test_a_misconfigured_l3_skips_retrieval_and_the_turn_completes(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, redis_url)
    await _collection_of_another_embedder(settings.resolved_milvus_uri, settings.milvus_collection)
    session = f"s-{uuid.uuid4().hex[:8]}"
    caplog.set_level(logging.WARNING, logger="tiermem.turn")
    async with AppServer(settings) as srv, httpx.AsyncClient(timeout=30) as c:
        r = await post_turn(c, srv.url, session, "what did I say before?", retrieve="always")
        errors = srv.services.metrics.registry.get_sample_value(
            "tiermem_errors_total", {"kind": "retrieve"}
        )
        # The same L3 through the search route is a clear 500, not a crash.
        search = await c.get(f"{srv.url}/v1/users/u1/memories", params={"query": "boat"})
    assert r.final.event == "done" and r.done["status"] == "complete"
    assert not [e for e in r.events if e.event == "memory"]
    assert errors == 1
    assert any("retrieval skipped (memory_misconfigured)" in m for m in caplog.messages)
    assert search.status_code == 500
    assert search.json()["error"]["code"] == "memory_misconfigured"
