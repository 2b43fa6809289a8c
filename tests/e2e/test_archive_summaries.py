"""A batch summary the model wrote is indexed only when the turns back it: one
that names or numbers something they never said is kept out of L3 and counted,
and the running summary the prompt carries is the extractive one instead."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import AppServer, make_settings, post_turn
from tests.servers.fake_vllm import FakeVLLM, ScriptedReply

TENANT = "default"


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeVLLM]:
    llm = FakeVLLM(reply_tokens=12).start()
    yield llm
    llm.stop()


async def _archived(srv: AppServer, session: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        meta = await srv.services.l2.read_meta(TENANT, session)
        if meta is not None and meta.archived_upto >= 2:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("batch not archived")


async def _run(
    tmp_path: Path, redis_url: str, fake: FakeVLLM, summary: str
) -> tuple[AppServer, str, list[dict[str, object]], float, str]:
    fake.reset()
    settings = make_settings(tmp_path, redis_url, llm_url=fake.base_url, archive_threshold=2)
    session = "sum-" + uuid.uuid4().hex[:8]
    fake.script(ScriptedReply(text="Nice."), ScriptedReply(text="Noted."),
                ScriptedReply(text=summary))  # fmt: skip
    async with AppServer(settings) as srv, httpx.AsyncClient(timeout=30) as c:
        await post_turn(c, srv.url, session, "I keep my sailboat in Brest.")
        await post_turn(c, srv.url, session, "Its berth is number 42.")
        await _archived(srv, session)
        rows = await srv.services.milvus.query(
            srv.services.l3.collection, filter=f'session_id == "{session}"',
            output_fields=["kind", "text"], limit=50, consistency_level="Strong",
        )  # fmt: skip
        rejected = (
            srv.services.metrics.registry.get_sample_value("tiermem_summaries_rejected_total")
            or 0.0
        )
        meta = await srv.services.l2.read_meta(TENANT, session)
        assert meta is not None
        return srv, session, rows, rejected, meta.summary


async def test_a_grounded_summary_is_indexed(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    good = "The user keeps a sailboat in Brest, at berth 42."
    _, _, rows, rejected, running = await _run(tmp_path, redis_url, fake_llm, good)
    assert rejected == 0
    assert [r["text"] for r in rows if r["kind"] == "summary"] == [good]
    assert running == good


async def test_an_invented_summary_is_kept_out_and_counted(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    bad = "The user is looking for a sailboat to explore the Mediterranean for 3 weeks."
    _, _, rows, rejected, running = await _run(tmp_path, redis_url, fake_llm, bad)
    assert rejected == 1
    assert [r for r in rows if r["kind"] == "summary"] == []
    # The turns are all there, as chunks.
    text = "".join(r["text"] for r in rows if r["kind"] == "turns")
    assert "Brest" in text and "berth is number 42" in text
    assert "Mediterranean" not in running and "Brest" in running
