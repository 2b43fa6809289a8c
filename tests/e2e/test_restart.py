"""Release, restart the app process, continue: nothing lost, nothing duplicated."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from infra.embeddings import HashingEmbedder
from infra.milvus import AsyncMilvus
from memory.l3_store import L3Store
from tests.harness import ServeProcess


def _env(tmp_path: Path, redis_url: str) -> dict[str, str]:
    return {
        "TIERMEM_REDIS_URL": redis_url,
        "TIERMEM_DATA_DIR": str(tmp_path / "data"),
        "TIERMEM_AUTH": "off",
        "TIERMEM_EMBEDDINGS": "hash",
        "TIERMEM_ARCHIVE_THRESHOLD": "10",
        "TIERMEM_LOG_FORMAT": "json",
        "TIERMEM_LLM_URL": "",
    }


def _turn(url: str, session: str, message: str) -> dict:
    with httpx.stream(
        "POST",
        f"{url}/v1/sessions/{session}/turns",
        json={"user_id": "u1", "message": message},
        timeout=30,
    ) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines()]
    done = [line for line in lines if line == "event: done"]
    assert done, lines[-5:]
    return {"lines": lines}


async def test_release_restart_continue(tmp_path: Path, redis_url: str) -> None:
    session = "s-" + uuid.uuid4().hex[:12]
    log = tmp_path / "serve.log"
    first = ServeProcess(_env(tmp_path, redis_url), log).start()
    try:
        for i in range(1, 8):
            await asyncio.to_thread(_turn, first.url, session, f"turn {i} says hello")
        async with httpx.AsyncClient(timeout=10) as c:
            r = await c.post(f"{first.url}/v1/sessions/{session}/release")
        assert r.json()["released"] is True
    finally:
        assert first.terminate() == 0, first.log_tail()

    second = ServeProcess(_env(tmp_path, redis_url), log).start()
    try:
        for i in range(8, 13):
            await asyncio.to_thread(_turn, second.url, session, f"turn {i} says hello")
        deadline = time.monotonic() + 30
        while True:
            async with httpx.AsyncClient(timeout=10) as c:
                state = (await c.get(f"{second.url}/v1/sessions/{session}")).json()
            if state["archived_upto"] == 10 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    finally:
        assert second.terminate() == 0, second.log_tail()

    assert state["turn_count"] == 12
    assert state["archived_upto"] == 10
    assert [t["turn"] for t in state["unarchived_turns"]] == [11, 12]
    assert [t["user"] for t in state["unarchived_turns"]] == [
        "turn 11 says hello", "turn 12 says hello"]  # fmt: skip

    # The process is gone, so this test may open its Milvus Lite file.
    executor = ThreadPoolExecutor(2)
    milvus = AsyncMilvus(str(tmp_path / "data" / "milvus.db"), None, executor)
    store = L3Store(milvus, HashingEmbedder(), "tiermem_memories", 384)
    try:
        batches = await store.list_batches("default", session)
        assert [(b.first_turn, b.last_turn) for b in batches] == [(1, 10)]
        # The row is "<summary>\n\n<transcript>"; the transcript holds each turn
        # once: none lost, none twice.
        transcript = batches[0].text[batches[0].text.index("\n\n[turn 1] user:") :]
        for i in range(1, 11):
            assert transcript.count(f"[turn {i}] user: turn {i} says hello") == 1
        assert "turn 11 says hello" not in batches[0].text
    finally:
        await milvus.close()
        executor.shutdown()
