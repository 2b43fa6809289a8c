"""Forgetting and the session index, end to end: the real app on a real Redis and
Milvus Lite, a fake OpenAI-compatible LLM."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from app.auth import hash_key
from app.services import Services
from tests.harness import AppServer, TurnResult, make_settings, post_turn
from tests.servers.fake_vllm import FakeVLLM

KEYS = {"key-a": "acme", "key-b": "bravo"}


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeVLLM]:
    llm = FakeVLLM(reply_tokens=6).start()
    yield llm
    llm.stop()


def settings_for(tmp_path: Path, redis_url: str, llm: FakeVLLM, **overrides: Any) -> Any:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"sha256": hash_key(k), "tenant": t}
                                         for k, t in KEYS.items()]}))  # fmt: skip
    return make_settings(tmp_path, redis_url, llm_url=llm.base_url, auth="on",
                         api_keys_file=keys, archive_threshold=2, **overrides)  # fmt: skip


def auth(key: str = "key-a") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def turn(app: AppServer, sid: str, message: str, user: str = "u1",
               key: str = "key-a") -> TurnResult:  # fmt: skip
    async with httpx.AsyncClient(timeout=120) as client:
        return await post_turn(client, app.url, sid, message, user=user, headers=auth(key))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def wait_for(predicate: Any, what: str, within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def memories(app: AppServer, user: str, query: str, key: str = "key-a") -> list[Any]:
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.get(f"{app.url}/v1/users/{user}/memories",
                             params={"query": query}, headers=auth(key))  # fmt: skip
    assert r.status_code == 200, r.text
    return list(r.json()["memories"])


async def session_keys(redis_url: str, sid: str) -> list[str]:
    r = aioredis.from_url(redis_url)
    try:
        return sorted([k.decode() async for k in r.scan_iter(match=f"tm:{{*:{sid}}}*")])
    finally:
        await r.aclose()


async def archived(app: AppServer, user: str, sid: str, word: str) -> None:
    async def found() -> bool:
        return any(m["session_id"] == sid for m in await memories(app, user, word))

    await wait_for(found, f"session {sid} archived")


@pytest.fixture
async def app(tmp_path: Path, redis_url: str, fake_llm: FakeVLLM) -> Any:
    fake_llm.reset()
    async with AppServer(settings_for(tmp_path, redis_url, fake_llm)) as srv:
        yield srv


async def test_sessions_are_listed_newest_first_per_tenant_and_user(app: AppServer) -> None:
    ids = [new_id("ls") for _ in range(3)]
    for n, sid in enumerate(ids):
        await turn(app, sid, "hello", user="u1" if n < 2 else "u2")
    other = new_id("ls")
    await turn(app, other, "hello", key="key-b")
    async with httpx.AsyncClient() as client:
        body = (await client.get(f"{app.url}/v1/sessions", headers=auth())).json()
        listed = [s["session_id"] for s in body["sessions"]]
        assert listed[:3] == ids[::-1] and other not in listed  # newest first, own tenant
        mine = (await client.get(f"{app.url}/v1/sessions", params={"user_id": "u1"},
                                 headers=auth())).json()  # fmt: skip
        assert [s["session_id"] for s in mine["sessions"]][:2] == ids[1::-1]
        assert ids[2] not in [s["session_id"] for s in mine["sessions"]]
        # Pages, with the cursor the route gives.
        first = (await client.get(f"{app.url}/v1/sessions", params={"limit": 1},
                                  headers=auth())).json()  # fmt: skip
        second = (await client.get(f"{app.url}/v1/sessions",
                                   params={"limit": 1, "cursor": first["next_cursor"]},
                                   headers=auth())).json()  # fmt: skip
        assert [s["session_id"] for s in first["sessions"]] == [ids[2]]
        assert [s["session_id"] for s in second["sessions"]] == [ids[1]]
        bad = await client.get(f"{app.url}/v1/sessions", params={"cursor": "nope"},
                               headers=auth())  # fmt: skip
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_cursor"


async def test_forgetting_a_session_removes_it_everywhere_once(
    app: AppServer, redis_url: str
) -> None:
    sid = new_id("fs")
    await turn(app, sid, "My boat is called Seabird.")
    await turn(app, sid, "She is moored in Brest.")
    await archived(app, "u1", sid, "Seabird boat")
    async with httpx.AsyncClient() as client:
        r = await client.delete(f"{app.url}/v1/sessions/{sid}", headers=auth())
        assert r.status_code == 200, r.text
        removed = r.json()["removed"]
        assert removed["l2_keys"] > 0 and removed["memories"] > 0
        assert (await client.get(f"{app.url}/v1/sessions/{sid}", headers=auth())).status_code == 404
        listed = (await client.get(f"{app.url}/v1/sessions", headers=auth())).json()
        assert sid not in [s["session_id"] for s in listed["sessions"]]
        again = (await client.delete(f"{app.url}/v1/sessions/{sid}", headers=auth())).json()
        assert again["removed"] == {"l2_keys": 0, "memories": 0}  # idempotent
    assert all(m["session_id"] != sid for m in await memories(app, "u1", "Seabird boat"))
    assert app.services.l1.peek("acme", sid) is None
    # Only the marker that refuses the id for a while is left in Redis.
    assert [k.rsplit(":", 1)[-1] for k in await session_keys(redis_url, sid)] == ["forgotten"]
    late = await turn(app, sid, "Hello again?")
    assert late.final.event == "error"
    assert late.final.data["error"]["code"] == "session_forgotten"
    # The refused turn stored nothing (its retrieval may have cached what it
    # found elsewhere, under the short cache TTL).
    left = {k.split("}:", 1)[1].rsplit(":", 1)[0] for k in await session_keys(redis_url, sid)}
    assert left <= {"forgotten", "c:retrieval"} and "forgotten" in left


async def test_forgetting_memories_keeps_the_sessions(app: AppServer) -> None:
    sid = new_id("fm")
    await turn(app, sid, "My cat is called Tibbles.", user="mo")
    await turn(app, sid, "Tibbles is ginger.", user="mo")
    await archived(app, "mo", sid, "Tibbles cat")
    async with httpx.AsyncClient() as client:
        r = await client.delete(f"{app.url}/v1/users/mo/memories", headers=auth())
        assert r.status_code == 200 and r.json()["removed"]["memories"] > 0
        assert (await client.get(f"{app.url}/v1/sessions/{sid}", headers=auth())).status_code == 200
    assert await memories(app, "mo", "Tibbles cat") == []


async def test_forgetting_a_user_removes_only_that_user_of_that_tenant(app: AppServer) -> None:
    mine = [new_id("fu"), new_id("fu")]
    for sid in mine:
        await turn(app, sid, "My dog is called Rex.", user="zed")
        await turn(app, sid, "Rex likes the beach.", user="zed")
    theirs = new_id("fu")
    await turn(app, theirs, "My dog is called Rex.", user="amy")
    elsewhere = new_id("fu")
    await turn(app, elsewhere, "My dog is called Rex.", user="zed", key="key-b")
    for sid in mine:
        await archived(app, "zed", sid, "Rex dog")
    async with httpx.AsyncClient() as client:
        r = await client.delete(f"{app.url}/v1/users/zed", headers=auth())
        assert r.status_code == 200, r.text
        assert r.json()["removed"]["sessions"] == sorted(mine)
        for sid in mine:
            gone = await client.get(f"{app.url}/v1/sessions/{sid}", headers=auth())
            assert gone.status_code == 404
        kept = await client.get(f"{app.url}/v1/sessions/{theirs}", headers=auth())
        other_tenant = await client.get(f"{app.url}/v1/sessions/{elsewhere}", headers=auth("key-b"))
        assert kept.status_code == 200 and other_tenant.status_code == 200
        again = (await client.delete(f"{app.url}/v1/users/zed", headers=auth())).json()
        assert again["removed"] == {"sessions": [], "l2_keys": 0, "memories": 0}
    assert await memories(app, "zed", "Rex dog") == []


async def test_another_pods_copy_is_dropped(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    a = AppServer(settings_for(a_dir, redis_url, fake_llm, milvus_uri=str(tmp_path / "m.db")))
    b = AppServer(settings_for(b_dir, redis_url, fake_llm, milvus_uri=str(tmp_path / "m.db")))
    async with a, b:
        sid = new_id("pod")
        await turn(b, sid, "hello")
        assert b.services.l1.peek("acme", sid) is not None
        async with httpx.AsyncClient() as client:
            r = await client.delete(f"{a.url}/v1/sessions/{sid}", headers=auth())
        assert r.status_code == 200

        async def dropped() -> bool:
            return b.services.l1.peek("acme", sid) is None

        await wait_for(dropped, "pod b dropping its copy")


async def test_an_archive_in_flight_cannot_bring_rows_back(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    sid = new_id("race")
    box: dict[str, Services] = {}

    async def forget_now(_batch_id: str) -> None:
        # Between the archive's upsert and its check: the worst moment.
        await box["services"].forgetter.session("acme", sid)

    services = Services(settings_for(tmp_path, redis_url, fake_llm),
                        archive_after_upsert=forget_now)  # fmt: skip
    box["services"] = services
    async with AppServer(services.settings, services) as app:
        await turn(app, sid, "My boat is called Seabird.")
        await turn(app, sid, "She is moored in Brest.")

        async def settled() -> bool:
            return await services.l2.read_meta("acme", sid) is None

        await wait_for(settled, "the forget inside the archive")
        await services.archiver.drain(30)
        assert all(m["session_id"] != sid for m in await memories(app, "u1", "Seabird boat"))


async def test_a_turn_in_flight_when_its_session_is_forgotten_is_not_stored(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    fake_llm.reset()
    fake_llm.token_interval_s = 0.2
    try:
        async with AppServer(settings_for(tmp_path, redis_url, fake_llm)) as app:
            sid = new_id("fly")
            await turn(app, sid, "first")
            running = asyncio.create_task(turn(app, sid, "second, slowly"))
            await asyncio.sleep(0)  # let the turn start
            deadline = time.monotonic() + 60
            while len(fake_llm.chat_requests()) < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            async with httpx.AsyncClient() as client:
                await client.delete(f"{app.url}/v1/sessions/{sid}", headers=auth())
            result = await running
            assert result.final.event == "error"
            assert result.final.data["error"]["code"] == "session_forgotten"
            async with httpx.AsyncClient() as client:
                gone = await client.get(f"{app.url}/v1/sessions/{sid}", headers=auth())
            assert gone.status_code == 404
    finally:
        fake_llm.token_interval_s = 0.0


async def test_docs_can_be_turned_off(tmp_path: Path, redis_url: str, fake_llm: FakeVLLM) -> None:
    off = AppServer(settings_for(tmp_path, redis_url, fake_llm, docs=False))
    async with off, httpx.AsyncClient() as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await client.get(off.url + path)).status_code == 404
    on = AppServer(settings_for(tmp_path, redis_url, fake_llm))
    async with on, httpx.AsyncClient() as client:
        assert (await client.get(on.url + "/openapi.json")).status_code == 200
