"""Sessions stored by the schema-v1 code (a turn was one user string and one
assistant string) are read and continued by today's code, on real Redis."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import orjson

from infra.redis_client import create_redis
from memory.keys import SessionKeys
from tests.harness import AppServer, make_settings, post_turn


def _v1_turn(index: int, turn_id: str, user: str, assistant: str, status: str) -> bytes:
    # Byte for byte what memory.models.Turn.encode wrote at schema version 1.
    return orjson.dumps(
        {"v": 1, "i": index, "id": turn_id, "u": user, "a": assistant, "s": status, "m": None,
         "t": 1700000000.0 + index, "usage": {"prompt_tokens": 10}, "n": -1}
    )  # fmt: skip


async def _write_v1_session(url: str, session: str) -> None:
    k = SessionKeys("default", session)
    r = create_redis(url, socket_timeout=2.0)
    try:
        now = time.time()
        await r.hset(
            k.meta,
            mapping={"schema": "1", "user_id": "u1", "version": "2", "turn_count": "2",
                     "archived_upto": "0", "context_start": "1", "context_summary": "",
                     "summary": "", "summary_upto": "0", "prefix_version": "", "log_base": "1",
                     "checkpoint_id": "", "created_at": repr(now), "updated_at": repr(now)},
        )  # fmt: skip
        await r.rpush(
            k.log,
            _v1_turn(1, "old-1", "my boat is called Ariel", "Nice name.", "complete"),
            _v1_turn(2, "old-2", "where is it moored?", "", "failed"),
        )
        await r.set(k.turn("old-1"), 1)
        await r.set(k.turn("old-2"), 2)
    finally:
        await r.aclose()


async def test_a_v1_session_is_read_and_continued(tmp_path: Path, any_redis_url: str) -> None:
    session = f"v1-{uuid.uuid4().hex[:8]}"
    await _write_v1_session(any_redis_url, session)
    settings = make_settings(tmp_path, any_redis_url, archive_threshold=100)
    async with AppServer(settings) as srv, httpx.AsyncClient(timeout=30) as c:
        # A finished v1 turn is replayed as it was stored.
        replay = await post_turn(c, srv.url, session, "my boat is called Ariel", turn_id="old-1")
        assert replay.done["replayed"] is True and replay.text == "Nice name."
        # The failed v1 turn is completed in place by its retry.
        retry = await post_turn(c, srv.url, session, "where is it moored?", turn_id="old-2")
        assert retry.done["status"] == "complete" and retry.done["turn"] == 2
        # And the session goes on after it.
        nxt = await post_turn(c, srv.url, session, "thanks")
        assert nxt.done["turn"] == 3
        state = (await c.get(f"{srv.url}/v1/sessions/{session}")).json()
    turns = state["unarchived_turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3]
    assert turns[0]["messages"] == [
        {"role": "user", "content": "my boat is called Ariel"},
        {"role": "assistant", "content": "Nice name."},
    ]
    assert turns[1]["messages"][0] == {"role": "user", "content": "where is it moored?"}
    assert turns[1]["messages"][1]["role"] == "assistant"
    assert turns[1]["status"] == "complete"
    # The new turn's prompt held the old turns: the dev LLM counts user messages.
    assert "user message 3 of this conversation" in nxt.text
