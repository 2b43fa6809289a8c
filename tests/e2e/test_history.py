"""`GET /v1/sessions/{id}/turns`: the whole history, archived turns included, through
real HTTP against uvicorn, real Redis (standalone and Cluster) and Milvus Lite."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from app.auth import hash_key
from memory.history import read_history
from tests.harness import AppServer, make_settings, post_turn

A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
# One batch's archiving: an LLM summary (the dev LLM), an embedding (hashing) and
# two Redis scripts. Generous for a loaded machine; the wait ends as soon as done.
SECONDS_PER_BATCH = 20.0


def sid() -> str:
    return "h-" + uuid.uuid4().hex[:12]


def keyed_settings(tmp_path: Path, redis_url: str, **overrides: Any) -> Any:
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": [
        {"sha256": hash_key("key-a"), "tenant": "acme"},
        {"sha256": hash_key("key-b"), "tenant": "globex"},
    ]}))  # fmt: skip
    return make_settings(tmp_path, redis_url, auth="on", api_keys_file=keys_file, **overrides)


async def wait_archived(
    c: httpx.AsyncClient, url: str, session: str, upto: int, batches: int
) -> None:
    deadline = time.monotonic() + SECONDS_PER_BATCH * max(1, batches)
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = (await c.get(f"{url}/v1/sessions/{session}", headers=A)).json()
        if state["archived_upto"] >= upto:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"archived_upto stuck at {state.get('archived_upto')}, wanted {upto}")


async def all_pages(c: httpx.AsyncClient, url: str, limit: int) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    before: int | None = None
    for _ in range(1000):
        params = {"limit": limit} | ({"before": before} if before is not None else {})
        r = await c.get(f"{url}/turns", params=params, headers=A)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["turns"]) <= limit
        turns += page["turns"]
        before = page["next_before"]
        if before is None:
            return turns
        assert page["turns"][-1]["turn"] == before
    raise AssertionError("paging never ended")


def message(i: int) -> str:
    # Several lines, one imitating a transcript line of the next turn.
    return f"fact {i}: the sky has {i} clouds.\n[turn {i + 1}] user: not a turn\n" + "x" * 300


async def test_pages_reach_every_turn_from_l2_then_l3(tmp_path: Path, any_redis_url: str) -> None:
    # A small context budget compacts every turn, so archiving trims the L2 log.
    settings = keyed_settings(
        tmp_path, any_redis_url, archive_threshold=4, context_budget_tokens=256
    )
    session = sid()
    n = 14
    async with AppServer(settings) as srv, httpx.AsyncClient(timeout=60) as c:
        url = f"{srv.url}/v1/sessions/{session}"
        for i in range(1, n + 1):
            r = await post_turn(c, srv.url, session, message(i), headers=A)
            assert r.done["status"] == "complete"
        await wait_archived(c, srv.url, session, 12, batches=3)
        meta = await srv.services.l2.read_meta("acme", session)
        assert meta is not None and meta.log_base > 4, "the log was not trimmed"

        turns = await all_pages(c, url, limit=5)
        assert [t["turn"] for t in turns] == list(range(n, 0, -1))  # newest first, each once
        by_source = {t["turn"]: t["source"] for t in turns}
        assert {i for i, s in by_source.items() if s == "l3"} == set(range(1, meta.log_base))
        assert {i for i, s in by_source.items() if s == "l2"} == set(range(meta.log_base, n + 1))
        for t in turns:
            assert t["complete"] is True
            assert t["archived"] is (t["turn"] <= 12)
            user, *rest = t["messages"]
            assert user == {"role": "user", "content": message(t["turn"])}
            assert rest and rest[-1]["role"] == "assistant" and rest[-1]["content"]
            if t["source"] == "l3":
                assert len(t["batch_id"]) == 32
            else:
                assert t["turn_id"] and t["status"] == "complete" and t["created_at"] > 0
        # An L2 turn reads as GET /v1/sessions/{id} shows it.
        state = (await c.get(url, headers=A)).json()
        newest = state["unarchived_turns"][-1]
        assert newest["messages"] == turns[0]["messages"]

        # A page from the middle, and a `before` past the end.
        r = (await c.get(f"{url}/turns", params={"before": 7, "limit": 3}, headers=A)).json()
        assert [t["turn"] for t in r["turns"]] == [6, 5, 4] and r["next_before"] == 4
        r = (await c.get(f"{url}/turns", params={"before": 999}, headers=A)).json()
        assert [t["turn"] for t in r["turns"]] == list(range(n, 0, -1)) and r["next_before"] is None
        assert r["turn_count"] == n and r["archived_upto"] == 12
        r = (await c.get(f"{url}/turns", params={"before": 1}, headers=A)).json()
        assert r["turns"] == [] and r["next_before"] is None

        # Validation: 422 in the project's error shape.
        for params in ({"limit": 0}, {"limit": 101}, {"before": 0}, {"before": "x"}):
            r = await c.get(f"{url}/turns", params=params, headers=A)
            assert r.status_code == 422, params
            assert r.json()["error"]["code"], params
        r = await c.get(f"{srv.url}/v1/sessions/{sid()}/turns", headers=A)
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"

        # Another tenant sees nothing of it, in L2 or L3.
        r = await c.get(f"{url}/turns", headers=B)
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
        assert await srv.services.l3.batches_overlapping("globex", session, 1, n) == []
        assert len(await srv.services.l3.batches_overlapping("acme", session, 1, n)) == 3
        assert await read_history(srv.services.l2, srv.services.l3, "globex", session) is None


async def test_long_turns_come_back_whole_from_l3(tmp_path: Path, redis_url: str) -> None:
    settings = keyed_settings(tmp_path, redis_url, archive_threshold=4, context_budget_tokens=256)
    session = sid()
    big = 12_000  # 4 of these were past the old 30,000-character L3 text cap
    async with AppServer(settings) as srv, httpx.AsyncClient(timeout=60) as c:
        url = f"{srv.url}/v1/sessions/{session}"
        sent = {}
        for i in range(1, 6):
            sent[i] = f"long {i}\n" + chr(ord("a") + i) * big
            r = await post_turn(c, srv.url, session, sent[i], headers=A)
            assert r.done["status"] == "complete"
        await wait_archived(c, srv.url, session, 4, batches=1)
        # Whether the first batch's archive trimmed the log up to turn 4 or 5
        # depends on when it ran; a second batch (short turns) trims past 5
        # either way, so turns 1-4 are surely read back from L3.
        for i in range(6, 9):
            sent[i] = f"short {i}"
            r = await post_turn(c, srv.url, session, sent[i], headers=A)
            assert r.done["status"] == "complete"
        await wait_archived(c, srv.url, session, 8, batches=1)
        meta = await srv.services.l2.read_meta("acme", session)
        assert meta is not None
        [batch] = await srv.services.l3.batches_overlapping("acme", session, 1, 4)
        # Stored as pieces, so nothing is cut: the whole batch is there.
        assert batch.cut is False and len(batch.text) > 4 * big
        turns = (await c.get(f"{url}/turns", params={"limit": 100}, headers=A)).json()["turns"]
        assert [t["turn"] for t in turns] == [8, 7, 6, 5, 4, 3, 2, 1]
        for t in turns:
            if t["source"] == "l2":
                assert t["complete"] and t["messages"][0]["content"] == sent[t["turn"]]
        l3_turns = {t["turn"]: t for t in turns if t["source"] == "l3"}
        assert set(l3_turns) == set(range(1, meta.log_base)) and meta.log_base > 5
        for i in range(1, 5):
            assert l3_turns[i]["complete"], i
            assert l3_turns[i]["messages"][0]["content"] == sent[i]
            assert l3_turns[i]["batch_id"] == batch.batch_id
