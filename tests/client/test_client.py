"""tiermem_client against the real app: a real uvicorn server, real Redis and
Milvus Lite, the fake OpenAI-compatible LLM, and a real TCP proxy between the
client and the app that breaks the link (no mocks anywhere)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tiermem_client import (
    AsyncClient,
    AuthError,
    Client,
    Conflict,
    ConnectionFailed,
    DoneEvent,
    Event,
    InvalidRequest,
    MetaEvent,
    NotFound,
    ResetEvent,
    TiermemError,
    TokenEvent,
    Unavailable,
    join_text,
)

from app.auth import hash_key
from tests.harness import AppServer, make_settings
from tests.servers.fake_vllm import FakeVLLM
from tests.servers.tcp_proxy import TcpProxy


def sid() -> str:
    return "c-" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeVLLM]:
    llm = FakeVLLM(reply_tokens=12).start()
    yield llm
    llm.stop()


@pytest.fixture(autouse=True)
def _calm_llm(fake_llm: FakeVLLM) -> Iterator[None]:
    fake_llm.reset()
    fake_llm.clear_failures()
    yield
    fake_llm.clear_failures()
    fake_llm.token_interval_s = 0.0
    fake_llm.reply_tokens = 12


@pytest.fixture(scope="module")
async def app(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, fake_llm: FakeVLLM
) -> AsyncIterator[AppServer]:
    # A heartbeat every 0.2 s of silence: a client read that waits a second
    # without a byte means the link is gone, not that the turn is slow.
    settings = make_settings(
        tmp_path_factory.mktemp("client-app"), redis_url, llm_url=fake_llm.base_url,
        archive_threshold=100, heartbeat_s=0.2,
        llm_first_token_timeout_s=5.0, llm_read_timeout_s=5.0,
    )  # fmt: skip
    async with AppServer(settings) as srv:
        yield srv


async def stored_session(app: AppServer, session: str) -> dict[str, Any]:
    """The session as the app stores it, read beside the client (never through the proxy)."""
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.get(f"{app.url}/v1/sessions/{session}")
    return dict(r.json()) if r.status_code == 200 else {}


async def wait_for(check: Callable[[], Awaitable[bool]], what: str, within_s: float = 60) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def llm_requests(fake: FakeVLLM, session: str) -> int:
    key = f"default:{session}"
    return sum(1 for r in fake.chat_requests() if r.headers.get("x-session-id") == key)


def tokens_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenEvent))


def assert_numbered(events: list[Event]) -> str:
    """Every event the client gave has the id ``<turn_id>:<n>``, n = 0, 1, ...: none twice."""
    meta = events[0]
    assert isinstance(meta, MetaEvent)
    ids = [e.id for e in events if not isinstance(e, ResetEvent)]
    assert ids == [f"{meta.turn_id}:{n}" for n in range(len(ids))]
    return meta.turn_id


# --- turns -------------------------------------------------------------------------------
async def test_async_turn_gives_typed_events_and_the_reply(app: AppServer) -> None:
    session = sid()
    async with AsyncClient(app.url) as c:
        events = [e async for e in c.turn(session, user_id="u1", message="hello, who are you?")]
        meta, *middle, done = events
        assert isinstance(meta, MetaEvent) and meta.event == "meta"
        assert meta.session_id == session and meta.turn == 1 and not meta.replayed
        assert middle and all(isinstance(e, TokenEvent) and e.event == "token" for e in middle)
        assert isinstance(done, DoneEvent) and done.event == "done"
        assert done.status == "complete" and done.turn == 1 and done.turn_id == meta.turn_id
        assert done.usage["completion_tokens"] > 0
        # A turn id the client chose, so every retry of it is stored at most once.
        turn_id = assert_numbered(events)
        assert turn_id.startswith("c") and done.data["turn_id"] == turn_id
        text = tokens_of(events)
        state = await c.session(session)
        assert state["turn_count"] == 1
        assert state["unarchived_turns"][0]["assistant"] == text

        text2, done2 = await c.turn_text(session, user_id="u1", message="and once more",
                                         turn_id="my-own-id")  # fmt: skip
        assert done2["turn_id"] == "my-own-id" and done2["turn"] == 2 and text2
        assert (await c.session(session))["unarchived_turns"][1]["assistant"] == text2
        agents = await c.agents()
        assert agents["default"] in [a["name"] for a in agents["agents"]]
        assert "skills" in await c.skills()


async def test_sync_client_turns_and_reads(app: AppServer) -> None:
    session = sid()

    def run() -> tuple[list[Event], str, dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
        with Client(app.url) as c:
            events = list(c.turn(session, user_id="u2", message="hi from a thread"))
            text, done = c.turn_text(session, user_id="u2", message="a second one")
            state = c.session(session)
            pages = [c.history(session, limit=1)]
            pages.append(c.history(session, before=pages[0]["next_before"], limit=1))
            return events, text, done, state, pages

    # The blocking client runs in a thread: this loop serves the app meanwhile.
    events, text, done, state, pages = await asyncio.to_thread(run)
    assert isinstance(events[0], MetaEvent) and isinstance(events[-1], DoneEvent)
    assert_numbered(events)
    assert events[-1].status == "complete" and done["status"] == "complete"
    assert state["turn_count"] == 2
    assert [t["assistant"] for t in state["unarchived_turns"]] == [tokens_of(events), text]
    assert [p["turns"][0]["turn"] for p in pages] == [2, 1]
    assert pages[1]["next_before"] is None


async def test_a_stream_cut_mid_reply_is_resumed_and_the_reply_given_once(
    app: AppServer, fake_llm: FakeVLLM
) -> None:
    session = sid()
    fake_llm.token_interval_s = 0.05
    fake_llm.reply_tokens = 40
    retries: list[TiermemError] = []
    events: list[Event] = []
    seen_before_cut = ""
    with TcpProxy("127.0.0.1", app.port) as proxy:
        # backoff_base=1.0: the client comes back after the app has stored the
        # cut turn (it does so as soon as it notices the reset), so the resumed
        # stream is a replay. A reconnect that races the commit runs the turn
        # again, ends "duplicate", and the client asks once more, which a reset
        # may then have to fix up.
        async with AsyncClient(f"http://127.0.0.1:{proxy.port}", backoff_base=1.0,
                               on_retry=lambda e, n, d: retries.append(e)) as c:  # fmt: skip
            async for ev in c.turn(session, user_id="u1", message="a long story please"):
                events.append(ev)
                if not seen_before_cut and sum(isinstance(e, TokenEvent) for e in events) == 3:
                    seen_before_cut = tokens_of(events)
                    assert proxy.cut() == 1
        accepted = proxy.accepted
    assert [type(e) for e in retries] == [ConnectionFailed]
    assert accepted == 2  # one reconnect
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.replayed
    # The app stops a turn whose client left and stores what it had: that is the
    # reply, and the caller gets all of it, each piece once.
    assert done.status == "interrupted"
    assert done.usage.get("interrupted_by") == "client_disconnected"
    assert not [e for e in events if isinstance(e, ResetEvent)]
    assert sum(isinstance(e, MetaEvent) for e in events) == 1
    assert_numbered(events)
    text = tokens_of(events)
    # (Usually the app noticed the reset at once and stored just the text sent,
    # so the replay's full reply had nothing new: it was not given again.)
    assert text.startswith(seen_before_cut)
    state = await stored_session(app, session)
    assert state["turn_count"] == 1
    assert state["unarchived_turns"][0]["assistant"] == text
    assert llm_requests(fake_llm, session) == 1  # the replay did not ask the LLM


async def test_the_sync_client_resumes_a_cut_stream(app: AppServer, fake_llm: FakeVLLM) -> None:
    session = sid()
    fake_llm.token_interval_s = 0.05
    fake_llm.reply_tokens = 40
    with TcpProxy("127.0.0.1", app.port) as proxy:

        def run() -> tuple[list[Event], list[TiermemError]]:
            got: list[Event] = []
            retries: list[TiermemError] = []
            # backoff_base=1.0: as in the async test above.
            with Client(f"http://127.0.0.1:{proxy.port}", backoff_base=1.0,
                        on_retry=lambda e, n, d: retries.append(e)) as c:  # fmt: skip
                for ev in c.turn(session, user_id="u1", message="a long story please"):
                    got.append(ev)
                    if len(got) == 4 and not retries:
                        assert proxy.cut() == 1
            return got, retries

        events, retries = await asyncio.to_thread(run)
    assert [type(e) for e in retries] == [ConnectionFailed]
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.replayed and done.status == "interrupted"
    assert not [e for e in events if isinstance(e, ResetEvent)]
    assert_numbered(events)
    state = await stored_session(app, session)
    assert state["turn_count"] == 1
    assert state["unarchived_turns"][0]["assistant"] == tokens_of(events)


async def test_a_silent_stream_times_out_and_resumes_with_the_complete_reply(
    app: AppServer, fake_llm: FakeVLLM
) -> None:
    session = sid()
    fake_llm.token_interval_s = 0.05
    fake_llm.reply_tokens = 30
    retries: list[TiermemError] = []
    three_tokens, timed_out = asyncio.Event(), asyncio.Event()

    def on_retry(err: TiermemError, attempt: int, delay: float) -> None:
        retries.append(err)
        timed_out.set()

    with TcpProxy("127.0.0.1", app.port) as proxy:
        # A read waits 4 s at most: the app sends a heartbeat after 0.2 s of
        # silence, and the rest of the reply takes 1.4 s to generate, so the app
        # has stored the whole turn before the client gives up on the stream
        # (when the client closes, the proxy passes that on, and the app would
        # store the turn interrupted).
        client = AsyncClient(f"http://127.0.0.1:{proxy.port}", timeout=httpx.Timeout(4.0),
                             max_retries=30, backoff_max=0.5, on_retry=on_retry)  # fmt: skip
        got: list[Event] = []

        async def consume() -> list[Event]:
            async for ev in client.turn(session, user_id="u1", message="another long story"):
                got.append(ev)
                if sum(isinstance(e, TokenEvent) for e in got) >= 3:
                    three_tokens.set()
            return got

        task = asyncio.create_task(consume())
        try:
            await asyncio.wait_for(three_tokens.wait(), 30)
            # From now on nothing gets through, either way: the app streams on
            # into the void, the client hears no heartbeat.
            proxy.blackhole()
            seen_when_silenced = tokens_of(got)

            async def stored_complete() -> bool:
                turns = (await stored_session(app, session)).get("unarchived_turns") or []
                return bool(turns) and turns[0]["status"] == "complete"

            await wait_for(stored_complete, "the app to store the whole turn")
            await asyncio.wait_for(timed_out.wait(), 30)
            proxy.heal()
            events = await asyncio.wait_for(task, 60)
        finally:
            task.cancel()
            await client.aclose()
        dropped = proxy.dropped_bytes
    assert dropped > 0
    assert isinstance(retries[0], ConnectionFailed)
    assert isinstance(retries[0].__cause__, httpx.ReadTimeout)
    assert all(isinstance(e, ConnectionFailed) for e in retries)
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.replayed and done.status == "complete"
    assert not [e for e in events if isinstance(e, ResetEvent)]
    assert sum(isinstance(e, MetaEvent) for e in events) == 1
    assert_numbered(events)
    text = tokens_of(events)
    # The replay's one token held the whole reply: the caller got only the rest.
    assert text.startswith(seen_when_silenced) and len(text) > len(seen_when_silenced)
    state = await stored_session(app, session)
    assert state["turn_count"] == 1
    assert state["unarchived_turns"][0]["assistant"] == text
    assert llm_requests(fake_llm, session) == 1


@pytest.mark.parametrize("same_reply", [True, False], ids=["same-reply", "another-reply"])
async def test_a_turn_cut_by_a_drain_runs_again_on_another_pod(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM, same_reply: bool
) -> None:
    """Pod A drains mid-reply (its deadline cuts the stream with a retryable
    ``draining`` error); the load balancer (the proxy) now sends the client to
    pod B, where the same turn_id runs again in place. A reply the LLM writes
    the same way again is given on from where the caller was; another reply
    comes as a reset, then its text."""
    session = sid()
    fake_llm.token_interval_s = 0.05
    fake_llm.reply_tokens = 50  # 2.5 s of reply: the drain's 0.5 s deadline cuts it
    calls = iter(range(100))
    if not same_reply:
        fake_llm.reply_fn = lambda _m: f"Attempt {next(calls)}: " + "word " * 40
    pods = [make_settings(tmp_path / name, redis_url, llm_url=fake_llm.base_url,
                          archive_threshold=100, heartbeat_s=0.2, drain_timeout_s=0.5)
            for name in ("a", "b")]  # fmt: skip
    retries: list[TiermemError] = []
    events: list[Event] = []
    try:
        async with AppServer(pods[0]) as a, AppServer(pods[1]) as b:
            with TcpProxy("127.0.0.1", a.port) as proxy:
                url = f"http://127.0.0.1:{proxy.port}"
                async with AsyncClient(url, on_retry=lambda e, n, d: retries.append(e)) as c:
                    async for ev in c.turn(session, user_id="u1", message="a long story please"):
                        events.append(ev)
                        if not a.services.draining and len(events) == 4:
                            proxy.upstream_port = b.port
                            a.services.begin_drain()
            state = await stored_session(b, session)
    finally:
        fake_llm.reply_fn = None
    [err] = retries
    assert isinstance(err, Unavailable) and err.code == "draining" and err.status is None
    assert err.data is not None and err.data["interrupted_by"] == "drain"
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.status == "complete" and not done.replayed
    assert done.turn == 1 and state["turn_count"] == 1
    stored = state["unarchived_turns"][0]["assistant"]
    assert join_text(events) == stored
    assert sum(isinstance(e, MetaEvent) for e in events) == 1
    assert_numbered(events)
    resets = [e for e in events if isinstance(e, ResetEvent)]
    if same_reply:
        assert not resets and tokens_of(events) == stored
    else:
        [reset] = resets
        assert reset.reason == "regenerated" and reset.text.startswith("Attempt 1:")
        assert tokens_of(events[: events.index(reset)]).startswith("Attempt 0:")
    assert llm_requests(fake_llm, session) == 2


async def test_a_retryable_llm_error_is_retried_with_the_same_turn_id(
    app: AppServer, fake_llm: FakeVLLM
) -> None:
    session = sid()
    fake_llm.inject("http_500", times=1)
    retries: list[TiermemError] = []
    async with AsyncClient(app.url, on_retry=lambda e, n, d: retries.append(e)) as c:
        text, done = await c.turn_text(session, user_id="u1", message="are you there?")
        state = await c.session(session)
    [err] = retries
    # The stream's error event: no HTTP status, retryable, the stored turn's fields.
    assert isinstance(err, Unavailable) and err.code.startswith("llm_")
    assert err.status is None and err.retryable
    assert err.data is not None and err.data["status"] == "failed"
    assert err.data["turn_id"] == done["turn_id"]
    # The retry completed the failed turn in place: one turn, stored once.
    assert done["status"] == "complete" and done["turn"] == 1
    assert state["turn_count"] == 1
    assert state["unarchived_turns"][0]["status"] == "complete"
    assert state["unarchived_turns"][0]["assistant"] == text
    assert llm_requests(fake_llm, session) == 2


async def test_a_draining_pod_is_retried_after_its_retry_after(app: AppServer) -> None:
    session = sid()
    retries: list[tuple[TiermemError, float]] = []
    refused = asyncio.Event()

    def on_retry(err: TiermemError, attempt: int, delay: float) -> None:
        retries.append((err, delay))
        refused.set()

    app.services.draining = True
    try:
        async with AsyncClient(app.url, max_retries=0) as impatient:
            with pytest.raises(Unavailable) as no_retry:
                await impatient.turn_text(session, user_id="u1", message="hello?")
        assert no_retry.value.status == 503 and no_retry.value.code == "draining"
        async with AsyncClient(app.url, on_retry=on_retry) as c:
            task = asyncio.create_task(c.turn_text(session, user_id="u1", message="still there?"))
            await asyncio.wait_for(refused.wait(), 30)
            app.services.draining = False
            text, done = await asyncio.wait_for(task, 60)
    finally:
        app.services.draining = False
    [(err, delay)] = retries
    assert isinstance(err, Unavailable) and err.status == 503 and err.code == "draining"
    assert err.retry_after == 2.0 and delay >= 2.0
    assert done["status"] == "complete" and done["turn"] == 1 and text
    assert (await stored_session(app, session))["turn_count"] == 1


# --- errors, memories, forgetting ----------------------------------------------------------
async def test_errors_are_typed(tmp_path: Path, redis_url: str, fake_llm: FakeVLLM) -> None:
    # A user of its own: the suite shares Redis, and forget_user takes every session of it.
    user = f"typed-{uuid.uuid4().hex[:8]}"
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"sha256": hash_key("key-a"), "tenant": "acme"}]}))
    settings = make_settings(tmp_path, redis_url, llm_url=fake_llm.base_url, auth="on",
                             api_keys_file=keys)  # fmt: skip
    session = sid()
    async with AppServer(settings) as srv:
        async with AsyncClient(srv.url, api_key="wrong") as bad:
            with pytest.raises(AuthError) as denied:
                await bad.session(session)
            assert denied.value.status == 401 and denied.value.code == "unauthorized"
            with pytest.raises(AuthError):
                await bad.turn_text(session, user_id=user, message="hi")
        async with AsyncClient(srv.url) as anonymous:
            with pytest.raises(AuthError):
                await anonymous.agents()

        def blocking() -> None:
            with Client(srv.url, api_key="wrong") as c, pytest.raises(AuthError):
                next(iter(c.turn(session, user_id=user, message="hi")))

        await asyncio.to_thread(blocking)

        async with AsyncClient(srv.url, api_key="key-a") as c:
            with pytest.raises(NotFound) as missing:
                await c.session(session)
            assert missing.value.code == "session_not_found" and missing.value.status == 404
            _, done = await c.turn_text(session, user_id=user, message="hi")
            assert done["status"] == "complete"
            with pytest.raises(Conflict) as taken:
                await c.turn_text(session, user_id="someone-else", message="hi")
            assert taken.value.code == "session_user_mismatch" and taken.value.status == 409
            with pytest.raises(InvalidRequest) as empty:
                await c.turn_text(session, user_id=user, message="   ")
            assert empty.value.code == "empty_message" and empty.value.status == 422
            with pytest.raises(InvalidRequest) as agent:
                await c.turn_text(session, user_id=user, message="hi", agent="no-such-agent")
            assert agent.value.code == "unknown_agent"
            with pytest.raises(InvalidRequest):
                await c.history(session, limit=0)
            forgotten = await c.forget_user(user)
            assert forgotten["user_id"] == user and forgotten["removed"]["sessions"] == [session]
            with pytest.raises(NotFound):
                await c.session(session)


async def test_memories_history_and_forgetting(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    user = f"mo-{uuid.uuid4().hex[:8]}"  # its own: the suite shares Redis
    settings = make_settings(tmp_path, redis_url, llm_url=fake_llm.base_url, archive_threshold=2)
    session, other = sid(), sid()
    async with AppServer(settings) as srv, AsyncClient(srv.url) as c:
        await c.turn_text(session, user_id=user, message="My sailboat is called Albatross.")
        _, done = await c.turn_text(session, user_id=user, message="I keep it in Kiel harbour.")
        # The commit of turn 2 handed the batch of turns 1-2 to the archiver.
        assert done["usage"]["archived_batch"]
        await c.turn_text(other, user_id=user, message="Something else entirely.")
        found: dict[str, Any] = {}

        async def in_l3() -> bool:
            nonlocal found
            found = await c.search_memories(user, "sailboat Albatross", k=3)
            return any(m["session_id"] == session for m in found["memories"])

        await wait_for(in_l3, "the archived batch in L3")
        assert found["user_id"] == user
        hit = next(m for m in found["memories"] if m["session_id"] == session)
        assert (hit["first_turn"], hit["last_turn"]) == (1, 2)
        history = await c.history(session)
        assert [t["turn"] for t in history["turns"]] == [2, 1]
        assert history["turn_count"] == 2
        listed = await c.list_sessions(user_id=user)
        assert {session, other} <= {s["session_id"] for s in listed["sessions"]}

        removed = await c.forget_memories(user)
        assert removed["removed"]["memories"] >= 1
        after = await c.search_memories(user, "sailboat Albatross", k=3)
        assert not [m for m in after["memories"] if m["session_id"] == session]
        assert (await c.session(session))["turn_count"] == 2  # the sessions stay

        gone = await c.forget_session(other)
        assert gone["session_id"] == other
        with pytest.raises(NotFound):
            await c.session(other)
