"""Every way a turn can go: bad input, LLM failure and retry, client disconnect,
heartbeats, replay of a finished turn, prefix-cache usage, API keys. Real
uvicorn, real httpx, real Redis, Milvus Lite and a fake OpenAI-compatible LLM."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from app.auth import hash_key
from tests.harness import AppServer, make_settings, parse_sse, post_turn
from tests.servers.fake_vllm import FakeVLLM


def sid() -> str:
    return "s-" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeVLLM]:
    llm = FakeVLLM(reply_tokens=12).start()
    yield llm
    llm.stop()


@pytest.fixture
async def app(tmp_path: Path, redis_url: str, fake_llm: FakeVLLM) -> AsyncIterator[AppServer]:
    fake_llm.reset()
    settings = make_settings(
        tmp_path, redis_url, llm_url=fake_llm.base_url, archive_threshold=100,
        max_message_chars=200, max_body_bytes=2048, heartbeat_s=0.2,
        llm_first_token_timeout_s=3.0, llm_read_timeout_s=3.0,
    )  # fmt: skip
    async with AppServer(settings) as srv:
        yield srv


async def session_keys(redis_url: str, session: str) -> list[bytes]:
    r = aioredis.from_url(redis_url)
    try:
        return [k async for k in r.scan_iter(match=f"tm:{{*:{session}}}*")]
    finally:
        await r.aclose()


BAD_BODIES = [
    ({"user_id": "u1"}, 422, "invalid_request"),
    ({"user_id": "u1", "message": ""}, 422, "empty_message"),
    ({"user_id": "u1", "message": "   "}, 422, "empty_message"),
    ({"user_id": "u1", "message": "x" * 201}, 413, "message_too_long"),
    ({"user_id": "u1", "message": "a\x00b"}, 422, "invalid_message"),
    ({"user_id": "u{1}", "message": "hi"}, 422, "invalid_request"),
    ({"user_id": "u*", "message": "hi"}, 422, "invalid_request"),
    ({"user_id": "u1", "message": "hi", "tenant_id": "other"}, 422, "invalid_request"),
    ({"user_id": "u1", "message": 42}, 422, "invalid_request"),
    ({"user_id": "u1", "message": "hi", "turn_id": "a b"}, 422, "invalid_request"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD_BODIES)
async def test_bad_bodies_are_refused_before_any_io(
    app: AppServer, fake_llm: FakeVLLM, redis_url: str, body: dict, status: int, code: str
) -> None:
    session = sid()
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.post(f"{app.url}/v1/sessions/{session}/turns", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["message"]
    assert await session_keys(redis_url, session) == []
    assert fake_llm.chat_requests() == []


@pytest.mark.parametrize(
    ("raw", "headers", "status", "code"),
    [
        (b"{not json", {"content-type": "application/json"}, 400, "invalid_json"),
        (b'{"user_id": "u1", "message": "\xff\xfe"}', {"content-type": "application/json"},
         400, "invalid_json"),
        (b"x" * 4096, {"content-type": "application/json"}, 413, "body_too_large"),
    ],
)  # fmt: skip
async def test_malformed_and_oversized_bodies(
    app: AppServer, redis_url: str, raw: bytes, headers: dict, status: int, code: str
) -> None:
    session = sid()
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.post(f"{app.url}/v1/sessions/{session}/turns", content=raw, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert await session_keys(redis_url, session) == []


@pytest.mark.parametrize("bad", ["a{b}", "a*", 'a"b', "x" * 129, "a:b", "a%00b"])
async def test_bad_session_ids(app: AppServer, redis_url: str, bad: str) -> None:
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.post(
            f"{app.url}/v1/sessions/{bad}/turns", json={"user_id": "u1", "message": "hi"}
        )
        g = await c.get(f"{app.url}/v1/sessions/{bad}")
    assert r.status_code in (404, 422), r.text
    assert g.status_code in (404, 422), g.text
    assert "error" in r.json() and "error" in g.json()
    assert await session_keys(redis_url, "*") == [] or all(
        b"{" not in k.split(b"}")[0][4:] for k in await session_keys(redis_url, "*")
    )


async def test_llm_error_commits_user_message_and_retry_completes_in_place(
    app: AppServer, fake_llm: FakeVLLM
) -> None:
    session = sid()
    async with httpx.AsyncClient(timeout=30) as c:
        ok = await post_turn(c, app.url, session, "first question")
        assert ok.done["status"] == "complete"
        fake_llm.inject("http_500", times=1)
        r = await post_turn(c, app.url, session, "second question", turn_id="retry-me")
        assert r.final.event == "error"
        err = r.final.data
        assert err["status"] == "failed" and err["retryable"] is True
        assert set(err["error"]) == {"code", "message"}
        assert err["error"]["code"].startswith("llm_")
        state = (await c.get(f"{app.url}/v1/sessions/{session}")).json()
        assert state["turn_count"] == 2
        assert state["unarchived_turns"][1]["status"] == "failed"
        assert state["unarchived_turns"][1]["user"] == "second question"
        # The same turn_id again: the failed turn is completed in place.
        again = await post_turn(c, app.url, session, "second question", turn_id="retry-me")
        assert again.done["status"] == "complete"
        assert again.done["turn"] == 2
        state = (await c.get(f"{app.url}/v1/sessions/{session}")).json()
        assert state["turn_count"] == 2
        assert [t["status"] for t in state["unarchived_turns"]] == ["complete", "complete"]
        assert state["unarchived_turns"][1]["assistant"] == again.text


async def test_finished_turn_is_replayed_not_rerun(app: AppServer, fake_llm: FakeVLLM) -> None:
    session = sid()
    async with httpx.AsyncClient(timeout=30) as c:
        first = await post_turn(c, app.url, session, "tell me once", turn_id="t-once")
        calls = len(fake_llm.chat_requests())
        again = await post_turn(c, app.url, session, "tell me once", turn_id="t-once")
        resumed = await post_turn(
            c, app.url, session, "tell me once", turn_id="t-once",
            headers={"Last-Event-ID": "t-once:3"},
        )  # fmt: skip
        # A server-issued id resumes by Last-Event-ID alone.
        issued = await post_turn(c, app.url, session, "another one")
        issued_id = issued.events[0].data["turn_id"]
        by_header = await post_turn(
            c, app.url, session, "another one", headers={"Last-Event-ID": f"{issued_id}:2"}
        )
        assert by_header.done["replayed"] is True and by_header.text == issued.text
        # A client-chosen id alone in the header is not trusted as this session's.
        alone = await post_turn(
            c, app.url, session, "tell me once", headers={"Last-Event-ID": "t-once:3"}
        )
        assert alone.status_code == 409
        assert alone.body["error"]["code"] == "foreign_last_event_id"
        bad = await post_turn(
            c, app.url, session, "tell me once", headers={"Last-Event-ID": "garbage"}
        )
    assert len(fake_llm.chat_requests()) == calls + 1  # only "another one" ran
    for r in (again, resumed):
        assert r.done["replayed"] is True and r.done["turn"] == 1
        assert r.text == first.text
    assert bad.status_code == 400 and bad.body["error"]["code"] == "invalid_last_event_id"
    async with httpx.AsyncClient(timeout=30) as c:
        state = (await c.get(f"{app.url}/v1/sessions/{session}")).json()
    assert state["turn_count"] == 2


async def test_event_ids_and_usage_with_prefix_cache(app: AppServer, fake_llm: FakeVLLM) -> None:
    session = sid()
    async with httpx.AsyncClient(timeout=30) as c:
        r1 = await post_turn(c, app.url, session, "hello there, how are you today?")
        r2 = await post_turn(c, app.url, session, "and what about tomorrow?")
    turn_id = r1.events[0].data["turn_id"]
    assert [e.id for e in r1.events] == [f"{turn_id}:{n}" for n in range(len(r1.events))]
    assert r1.done["usage"]["cached_tokens"] == 0
    u2 = r2.done["usage"]
    assert u2["prompt_tokens"] > r1.done["usage"]["prompt_tokens"]
    # The second prompt repeats the first prompt + reply: the simulator hits it.
    assert u2["cached_tokens"] > 0
    assert u2["expected_cacheable_tokens"] > 0
    assert abs(u2["cached_tokens"] - u2["expected_cacheable_tokens"]) <= 32
    assert u2["prefix_break"] is None
    assert r1.done["usage"]["ttft_ms"] is not None
    assert fake_llm.chat_requests()[-1].headers.get("x-session-id") == f"default:{session}"


async def test_heartbeats_while_waiting_for_first_token(app: AppServer, fake_llm: FakeVLLM) -> None:
    fake_llm.first_token_delay_s = 0.9
    try:
        async with httpx.AsyncClient(timeout=30) as c:
            r = await post_turn(c, app.url, sid(), "slow one")
    finally:
        fake_llm.first_token_delay_s = 0.0
    assert r.heartbeats >= 2
    assert r.done["status"] == "complete"


async def test_client_disconnect_cancels_upstream_and_records_interrupted(
    app: AppServer, fake_llm: FakeVLLM
) -> None:
    session = sid()
    fake_llm.token_interval_s = 0.2
    fake_llm.reply_tokens = 50
    try:
        async with httpx.AsyncClient(timeout=30) as c:
            async with c.stream(
                "POST", f"{app.url}/v1/sessions/{session}/turns",
                json={"user_id": "u1", "message": "a long story please"},
            ) as resp:  # fmt: skip
                lines: list[str] = []
                async for line in resp.aiter_lines():
                    lines.append(line)
                    if sum(1 for x in lines if x == "event: token") >= 2:
                        break
            closed_at = time.monotonic()
            req = fake_llm.chat_requests()[-1]
            for _ in range(50):
                if req.disconnected_at is not None:
                    break
                await asyncio.sleep(0.05)
            assert req.disconnected_at is not None
            assert req.disconnected_at - closed_at < 1.0
            state = {}
            for _ in range(50):
                state = (await c.get(f"{app.url}/v1/sessions/{session}")).json()
                if state.get("turn_count"):
                    break
                await asyncio.sleep(0.05)
    finally:
        fake_llm.token_interval_s = 0.0
        fake_llm.reply_tokens = 12
    assert state["turn_count"] == 1
    turn = state["unarchived_turns"][0]
    assert turn["status"] == "interrupted"
    assert turn["assistant"]  # the part generated before the client left
    events, _ = parse_sse(lines)
    partial = "".join(e.data["text"] for e in events if e.event == "token")
    assert turn["assistant"].startswith(partial)
    for _ in range(50):
        if not app.services.turn_tasks:
            break
        await asyncio.sleep(0.05)
    assert not app.services.turn_tasks


async def test_api_keys_map_to_tenants(tmp_path: Path, redis_url: str) -> None:
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": [
        {"sha256": hash_key("key-a"), "tenant": "acme"},
        {"sha256": hash_key("key-old"), "tenant": "acme", "revoked": True},
        {"sha256": hash_key("key-b"), "tenant": "globex"},
    ]}))  # fmt: skip
    settings = make_settings(tmp_path, redis_url, auth="on", api_keys_file=keys_file)
    session = sid()
    async with AppServer(settings) as srv, httpx.AsyncClient(timeout=30) as c:
        url = f"{srv.url}/v1/sessions/{session}"
        for headers in (
            {},
            {"Authorization": "Bearer nope"},
            {"Authorization": "Bearer key-old"},
            {"Authorization": "key-a"},
        ):
            r = await c.post(f"{url}/turns", json={"user_id": "u1", "message": "hi"},
                             headers=headers)  # fmt: skip
            assert r.status_code == 401, headers
            assert r.json()["error"]["code"] == "unauthorized"
            assert (await c.get(url, headers=headers)).status_code == 401
        a = {"Authorization": "Bearer key-a"}
        b = {"Authorization": "Bearer key-b"}
        r = await post_turn(c, srv.url, session, "acme's secret", headers=a)
        assert r.done["status"] == "complete"
        assert (await c.get(url, headers=a)).json()["turn_count"] == 1
        # Same session id under another tenant is another session.
        assert (await c.get(url, headers=b)).status_code == 404
        assert await session_keys(redis_url, session) != []
        assert all(b"{acme:" in k for k in await session_keys(redis_url, session))
        assert (await c.get(f"{srv.url}/healthz")).status_code == 200


async def test_a_turn_queued_behind_its_session_gets_its_headers_at_once(
    app: AppServer, fake_llm: FakeVLLM
) -> None:
    """A turn's response starts once the turn is under way (its LLM request
    sent); a turn that must first wait for another turn of its session is
    under way as it starts waiting: its client has the headers (and can see
    heartbeats) long before the first turn ends."""
    session = sid()
    fake_llm.token_interval_s = 0.15
    fake_llm.reply_tokens = 12
    marks: dict[str, float] = {}
    try:
        async with httpx.AsyncClient(timeout=30) as c:
            first_token = asyncio.Event()

            async def first() -> None:
                async with c.stream(
                    "POST", f"{app.url}/v1/sessions/{session}/turns",
                    json={"user_id": "u1", "message": "the long one"},
                ) as resp:  # fmt: skip
                    async for line in resp.aiter_lines():
                        if line == "event: token":
                            first_token.set()
                        if line == "event: done":
                            marks["first_done"] = time.monotonic()

            task = asyncio.create_task(first())
            await asyncio.wait_for(first_token.wait(), 10)
            async with c.stream(
                "POST", f"{app.url}/v1/sessions/{session}/turns",
                json={"user_id": "u1", "message": "and the next"},
            ) as resp:  # fmt: skip
                marks["second_headers"] = time.monotonic()
                assert resp.status_code == 200
                body = [line async for line in resp.aiter_lines()]
            await task
    finally:
        fake_llm.token_interval_s = 0.0
    assert marks["second_headers"] < marks["first_done"]
    events, _ = parse_sse(body)
    assert events[-1].event == "done" and events[-1].data["turn"] == 2
