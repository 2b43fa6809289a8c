"""Per-tenant rate limits (app/ratelimit.py, memory/rate_limits.py) against real
Redis servers.

Turns per minute (sliding window), concurrent streams across two app instances
("pods") sharing one Redis, lease expiry after a `tiermem serve` process is
killed with -9, exact counts under concurrent admission (standalone and
Cluster), and what happens when Redis is stopped: fail open and fail closed.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import httpx
import pytest
import redis.asyncio as aioredis

from app.ratelimit import RateLimited, RateLimiter, RateLimitUnavailable
from infra.errors import TiermemError, Unavailable
from infra.redis_client import RedisLike
from infra.settings import Settings
from memory.keys import InvalidId, RateLimitKeys
from memory.rate_limits import WINDOW_MS
from tests.harness import AppServer, ServeProcess, l2_round_trips, make_settings, post_turn
from tests.security import write_keys
from tests.servers.fake_vllm import FakeVLLM
from tests.servers.redis_server import RedisServer

KEY_A, KEY_B = "key-acme-" + uuid.uuid4().hex, "key-globex-" + uuid.uuid4().hex
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


def sid() -> str:
    return "rl-" + uuid.uuid4().hex[:12]


def tenant() -> str:
    return "t" + uuid.uuid4().hex[:10]


def report(**figures: object) -> None:
    line = json.dumps({"suite": "rate_limits", **figures})
    print(line)
    path = os.environ.get("TIERMEM_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeVLLM]:
    llm = FakeVLLM(reply_tokens=8).start()
    yield llm
    llm.stop()


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.json"
    # Fresh tenants per test: the limits are per tenant and the Redis is shared.
    write_keys(path, [(KEY_A, tenant()), (KEY_B, tenant())])
    return path


def tenants_of(keys_file: Path) -> tuple[str, str]:
    entries = json.loads(keys_file.read_text())["keys"]
    return entries[0]["tenant"], entries[1]["tenant"]


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as c:
        yield c


async def test_defaults_are_off_and_cost_nothing(redis_url: str) -> None:
    s = Settings()
    assert s.rate_turns_per_minute == 0 and s.rate_max_streams == 0
    assert s.rate_fail_mode == "open"
    # Off: no limiter at all, so admission costs no Redis round trip (the
    # L1-hit turn stays at exactly one; tests/e2e/test_sessions.py asserts it).
    assert RateLimiter.from_settings(s, redis=None, metrics=None) is None  # type: ignore[arg-type]
    on = s.model_copy(update={"rate_turns_per_minute": 5})
    r = aioredis.from_url(redis_url)
    try:
        assert RateLimiter.from_settings(on, r, None) is not None
    finally:
        await r.aclose()


def test_keys_are_per_tenant_and_cannot_be_escaped() -> None:
    assert RateLimitKeys("acme").turns == "tm:rl:{acme}:turns"
    assert RateLimitKeys("acme").streams == "tm:rl:{acme}:streams"
    for bad in ("a}b", "a{b", "a*", 'a"b', "", "a:b", "a\x00b"):
        with pytest.raises(InvalidId):
            RateLimitKeys(bad)


def test_refusals_are_tiermem_errors_with_status_code_and_retry_after() -> None:
    turns = RateLimited("turns_per_minute", 17, "slow down")
    streams = RateLimited("streams", 1, "one at a time")
    down = RateLimitUnavailable()
    assert isinstance(turns, TiermemError) and isinstance(down, Unavailable)
    assert (turns.http_status, turns.code, dict(turns.headers)) == (
        429, "rate_limited", {"Retry-After": "17"},
    )  # fmt: skip
    assert (streams.http_status, streams.code, dict(streams.headers)) == (
        429, "too_many_streams", {"Retry-After": "1"},
    )  # fmt: skip
    assert (turns.message, turns.limit, turns.retry_after_s) == (
        "slow down",
        "turns_per_minute",
        17,
    )
    assert (down.http_status, down.code, down.retryable, dict(down.headers)) == (
        503, "rate_limit_unavailable", True, {"Retry-After": "1"},
    )  # fmt: skip
    # Per instance: one refusal's Retry-After never leaks into another's.
    assert dict(RateLimited("turns_per_minute", 3, "x").headers) == {"Retry-After": "3"}
    assert dict(turns.headers) == {"Retry-After": "17"}


async def test_turns_per_minute_is_per_tenant_with_retry_after(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM, keys_file: Path,
    client: httpx.AsyncClient,
) -> None:  # fmt: skip
    tenant_a, tenant_b = tenants_of(keys_file)
    settings = make_settings(
        tmp_path, redis_url, llm_url=fake_llm.base_url, auth="on", api_keys_file=keys_file,
        rate_turns_per_minute=3,
    )  # fmt: skip
    async with AppServer(settings) as srv:
        session = sid()
        for i in range(3):
            r = await post_turn(client, srv.url, session, f"turn {i}", headers=A)
            assert r.status_code == 200 and r.done["status"] == "complete"
        calls = len(fake_llm.chat_requests())
        refused = await client.post(
            f"{srv.url}/v1/sessions/{sid()}/turns", json={"user_id": "u1", "message": "one more"},
            headers=A,
        )  # fmt: skip
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limited"
        assert "3 turns per minute" in refused.json()["error"]["message"]
        retry_after = int(refused.headers["retry-after"])
        assert 1 <= retry_after <= 60
        # Refused before anything ran: no LLM call, and it took no window slot.
        assert len(fake_llm.chat_requests()) == calls
        rc = aioredis.from_url(redis_url)
        try:
            assert await rc.zcard(RateLimitKeys(tenant_a).turns) == 3
            assert 0 < await rc.pttl(RateLimitKeys(tenant_a).turns) <= WINDOW_MS + 1000
            # The other tenant has its own budget.
            for i in range(3):
                ok = await post_turn(client, srv.url, sid(), f"b {i}", headers=B)
                assert ok.status_code == 200, ok.body
            assert await rc.zcard(RateLimitKeys(tenant_b).turns) == 3
            # Slide the window: move A's entries to 5 s before they leave it (Redis
            # keeps real time; the entries are what the window is made of). 5 s,
            # not less: the refusal below must land inside it on a busy machine.
            left_ms = 5_000
            entries = cast(
                "list[tuple[bytes, float]]",
                await rc.zrange(RateLimitKeys(tenant_a).turns, 0, -1, withscores=True),
            )
            shifted = {m: score - (WINDOW_MS - left_ms) for m, score in entries}
            await rc.zadd(RateLimitKeys(tenant_a).turns, shifted)
            again = await client.post(
                f"{srv.url}/v1/sessions/{sid()}/turns", json={"user_id": "u1", "message": "x"},
                headers=A,
            )  # fmt: skip
            assert again.status_code == 429
            # Retry-After is the time until the oldest entry leaves, rounded up.
            wait_s = int(again.headers["retry-after"])
            assert 1 <= wait_s <= left_ms // 1000
            await asyncio.sleep(wait_s + 0.1)
            ok = await post_turn(client, srv.url, sid(), "after the window", headers=A)
            assert ok.status_code == 200 and ok.done["status"] == "complete"
            # The three old entries left; only the new one is in the window.
            assert await rc.zcard(RateLimitKeys(tenant_a).turns) == 1
        finally:
            await rc.aclose()


async def _open_stream(
    client: httpx.AsyncClient, url: str, started: asyncio.Event, headers: dict[str, str]
) -> list[str]:
    lines: list[str] = []
    async with client.stream(
        "POST", f"{url}/v1/sessions/{sid()}/turns",
        json={"user_id": "u1", "message": "a long story please"}, headers=headers,
    ) as resp:  # fmt: skip
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            lines.append(line)
            if line == "event: token":
                started.set()
    return lines


async def test_concurrent_streams_are_limited_across_pods_and_leases_renew(
    tmp_path: Path, redis_url: str, keys_file: Path, client: httpx.AsyncClient
) -> None:
    tenant_a, _ = tenants_of(keys_file)
    # Each stream lasts ~2 s, over three lease lengths: only renewal keeps it.
    llm = FakeVLLM(reply_tokens=20, token_interval_s=0.1).start()
    try:
        common = dict(
            llm_url=llm.base_url, auth="on", api_keys_file=keys_file, rate_max_streams=2,
            rate_stream_lease_s=0.6,
        )  # fmt: skip
        s1 = make_settings(tmp_path / "pod1", redis_url, **common)
        s2 = make_settings(tmp_path / "pod2", redis_url, **common)
        async with AppServer(s1) as pod1, AppServer(s2) as pod2:
            events = [asyncio.Event(), asyncio.Event()]
            streams = [asyncio.create_task(_open_stream(client, pod1.url, ev, A)) for ev in events]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 10)
            await asyncio.sleep(1.2)  # two lease lengths in: still held
            r = aioredis.from_url(redis_url)
            try:
                assert await r.zcard(RateLimitKeys(tenant_a).streams) == 2
                refused = await client.post(
                    f"{pod2.url}/v1/sessions/{sid()}/turns",
                    json={"user_id": "u1", "message": "third"}, headers=A,
                )  # fmt: skip
                assert refused.status_code == 429, refused.text
                assert refused.json()["error"]["code"] == "too_many_streams"
                assert refused.headers["retry-after"] == "1"
                # Another tenant is not affected by A's streams.
                other = await post_turn(client, pod2.url, sid(), "hello", headers=B)
                assert other.status_code == 200
                lines = await asyncio.wait_for(asyncio.gather(*streams), 20)
                assert all("event: done" in ls for ls in lines)
                # Released when the turns ended (after their commit), not by expiry.
                for _ in range(50):
                    if await r.zcard(RateLimitKeys(tenant_a).streams) == 0:
                        break
                    await asyncio.sleep(0.02)
                assert await r.zcard(RateLimitKeys(tenant_a).streams) == 0
                ok = await post_turn(client, pod2.url, sid(), "now there is room", headers=A)
                assert ok.status_code == 200 and ok.done["status"] == "complete"
                assert not pod1.services.turn_tasks
            finally:
                await r.aclose()
    finally:
        llm.stop()


@pytest.mark.slow
async def test_slots_of_a_killed_pod_expire_with_their_lease(
    tmp_path: Path, redis_url: str, client: httpx.AsyncClient
) -> None:
    tenant_t = tenant()
    llm = FakeVLLM(reply_tokens=400, token_interval_s=0.05).start()
    lease_s = 1.5
    env = {
        "TIERMEM_REDIS_URL": redis_url, "TIERMEM_DATA_DIR": str(tmp_path / "data"),
        "TIERMEM_AUTH": "off", "TIERMEM_DEFAULT_TENANT": tenant_t,
        "TIERMEM_EMBEDDINGS": "hash", "TIERMEM_LLM_URL": llm.base_url,
        "TIERMEM_LOG_FORMAT": "json", "TIERMEM_RATE_MAX_STREAMS": "1",
        "TIERMEM_RATE_STREAM_LEASE_S": str(lease_s),
    }  # fmt: skip
    proc = ServeProcess(env, tmp_path / "serve.log").start()
    other = make_settings(
        tmp_path / "pod2", redis_url, llm_url=llm.base_url, default_tenant=tenant_t,
        rate_max_streams=1, rate_stream_lease_s=lease_s,
    )  # fmt: skip
    try:
        # The second pod is up before the first dies: its start-up time must
        # not hide how long the slot stays taken.
        async with AppServer(other) as pod2:
            started = asyncio.Event()
            stream = asyncio.create_task(_open_stream(client, proc.url, started, {}))
            await asyncio.wait_for(started.wait(), 30)
            await asyncio.sleep(lease_s)  # renewed at least once by the live pod
            proc.kill9()
            killed_at = time.monotonic()
            llm.token_interval_s, llm.reply_tokens = 0.0, 5  # quick turns from here on
            with pytest.raises(httpx.HTTPError):
                await stream
            first = await client.post(
                f"{pod2.url}/v1/sessions/{sid()}/turns", json={"user_id": "u1", "message": "hi"}
            )
            # The dead pod's slot is still leased: nobody can tell it died yet.
            assert first.status_code == 429, first.text
            recovered_after = None
            while time.monotonic() - killed_at < lease_s + 3:
                r = await post_turn(client, pod2.url, sid(), "is there room now?")
                if r.status_code == 200:
                    recovered_after = time.monotonic() - killed_at
                    assert r.done["status"] == "complete"
                    break
                assert r.status_code == 429
                await asyncio.sleep(0.1)
        assert recovered_after is not None, "the dead pod's slot never came back"
        # Freed by expiry: not before the lease (less one renewal period) ran
        # out, and not much after it.
        assert lease_s * 2 / 3 - 0.2 <= recovered_after <= lease_s + 1.0
        report(fault="pod kill -9 holding a stream slot", injected=1,
               slot_recovered_s=round(recovered_after, 2), lease_s=lease_s)  # fmt: skip
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.kill9()
        llm.stop()


@pytest.mark.parametrize("kind", ["streams", "turns"])
async def test_exact_counts_under_concurrent_admission(any_redis: RedisLike, kind: str) -> None:
    limit = 5
    limiter = RateLimiter(
        any_redis,
        turns_per_minute=limit if kind == "turns" else 0,
        max_streams=limit if kind == "streams" else 0,
        timeout_s=5.0,
    )
    t = tenant()
    # Connect first: redis-py's asyncio RedisCluster fails some commands of a
    # burst that arrives on a client that has not connected yet (reported).
    await any_redis.ping()

    async def one() -> bool:
        try:
            await limiter.admit(t)
        except RateLimited:
            return False
        return True

    results = await asyncio.gather(*(one() for _ in range(40)))
    assert sum(results) == limit
    assert limiter.round_trips == 40  # one round trip per admission, refused or not
    key = RateLimitKeys(t).streams if kind == "streams" else RateLimitKeys(t).turns
    assert await any_redis.zcard(key) == limit
    assert await any_redis.pttl(key) > 0


async def test_lease_release_if_unclaimed(redis_url: str) -> None:
    r = aioredis.from_url(redis_url)
    try:
        limiter = RateLimiter(r, turns_per_minute=0, max_streams=3)
        t = tenant()
        unclaimed = await limiter.admit(t)
        claimed = await limiter.admit(t)
        assert unclaimed is not None and claimed is not None
        claimed.claim()
        assert await limiter.streams_held(t) == 2
        await unclaimed.release_if_unclaimed()
        await claimed.release_if_unclaimed()  # its task owns it: not released here
        assert await limiter.streams_held(t) == 1
        async with claimed.held():
            pass
        assert await limiter.streams_held(t) == 0
        assert limiter.round_trips == 2 + 2  # two admissions, two releases
    finally:
        await r.aclose()


async def test_renew_tells_a_lost_lease_from_no_answer(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis-renew").start()
    r = aioredis.from_url(server.url, socket_timeout=0.5)
    try:
        limiter = RateLimiter(r, turns_per_minute=0, max_streams=2, stream_lease_s=5.0)
        t = tenant()
        lease = await limiter.admit(t)
        assert lease is not None
        before = await r.zscore(RateLimitKeys(t).streams, lease.member)
        await asyncio.sleep(0.01)
        assert await limiter.renew(t, lease.member) is True
        assert (await r.zscore(RateLimitKeys(t).streams, lease.member) or 0) > (before or 0)
        await r.zrem(RateLimitKeys(t).streams, lease.member)
        # Gone: not taken back (that could exceed the limit).
        assert await limiter.renew(t, lease.member) is False
        assert await r.zcard(RateLimitKeys(t).streams) == 0
        server.stop()
        assert await limiter.renew(t, lease.member) is None  # no answer: try again later
    finally:
        await r.aclose()
        server.stop()


def _count(metrics_text: str, kind: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith("tiermem_errors_total{") and f'kind="{kind}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_redis_stopped_fail_open_and_fail_closed(
    tmp_path: Path, fake_llm: FakeVLLM, client: httpx.AsyncClient
) -> None:
    """A real redis-server, stopped: the fail-open pod admits (the turn then
    fails on its own, at commit, retryably); the fail-closed pod answers 503 at
    once without calling the LLM. After a restart, limits are enforced again."""
    server = RedisServer(tmp_path / "redis").start()
    common = dict(
        llm_url=fake_llm.base_url, rate_turns_per_minute=2, rate_max_streams=5,
        commit_deadline_s=0.5, redis_socket_timeout_s=0.5,
    )  # fmt: skip
    s_open = make_settings(tmp_path / "open", server.url, rate_fail_mode="open",
                           default_tenant=tenant(), **common)  # fmt: skip
    s_closed = make_settings(tmp_path / "closed", server.url, rate_fail_mode="closed",
                             default_tenant=tenant(), **common)  # fmt: skip
    try:
        async with AppServer(s_open) as p_open, AppServer(s_closed) as p_closed:
            session_open, session_closed = sid(), sid()
            assert (await post_turn(client, p_open.url, session_open, "warm")).status_code == 200
            assert (await post_turn(client, p_closed.url, session_closed, "warm")).status_code \
                == 200  # fmt: skip
            server.stop()
            calls = len(fake_llm.chat_requests())

            t0 = time.perf_counter()
            r_open = await post_turn(client, p_open.url, session_open, "while redis is down")
            assert r_open.status_code == 200, r_open.body
            # Admitted: the LLM was called (L1 hit), then the commit could not
            # reach Redis and the stream ended with a retryable error.
            assert len(fake_llm.chat_requests()) == calls + 1
            assert r_open.final.event == "error"
            assert r_open.final.data["error"]["code"] == "storage_unavailable"
            assert r_open.final.data["retryable"] is True
            open_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            r_closed = await client.post(
                f"{p_closed.url}/v1/sessions/{session_closed}/turns",
                json={"user_id": "u1", "message": "while redis is down"},
            )
            closed_s = time.perf_counter() - t0
            assert r_closed.status_code == 503, r_closed.text
            assert r_closed.json()["error"]["code"] == "rate_limit_unavailable"
            assert r_closed.headers["retry-after"] == "1"
            assert len(fake_llm.chat_requests()) == calls + 1  # nothing called
            assert closed_s < s_closed.rate_redis_timeout_s + 1.0

            m_open = (await client.get(f"{p_open.url}/metrics")).text
            m_closed = (await client.get(f"{p_closed.url}/metrics")).text
            assert _count(m_open, "rate_limit_unavailable") >= 1
            assert _count(m_closed, "rate_limit_unavailable") >= 1

            # Redis back (same port, its AOF): the limits hold again. Each
            # tenant had 1 turn counted before the outage; 2 per minute allowed.
            server.start()
            restarted = time.monotonic()
            turns = 0
            recovered_s = None
            for _ in range(3):
                r = await post_turn(client, p_closed.url, sid(), "after")
                if r.status_code == 429:
                    assert r.body is not None and r.body["error"]["code"] == "rate_limited"
                    break
                assert r.done["status"] == "complete"
                recovered_s = recovered_s or time.monotonic() - restarted
                turns += 1
            assert turns == 1
            # The acknowledged warm turns survived; the unacknowledged one during
            # the outage was not stored (nor twice).
            stored = []
            for url, session in ((p_open.url, session_open), (p_closed.url, session_closed)):
                state = (await client.get(f"{url}/v1/sessions/{session}")).json()
                stored.append([t["user"] for t in state["unarchived_turns"]])
            assert stored == [["warm"], ["warm"]]
            report(
                fault="redis stopped under rate limits", injected=1, acknowledged=2, lost=0,
                duplicated=0, recover_s=round(recovered_s or -1, 3),
                fail_open_turn_s=round(open_s, 3), fail_closed_answer_s=round(closed_s, 3),
            )  # fmt: skip
    finally:
        server.stop()


async def test_cost_of_limits_on_an_l1_hit_turn(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM, client: httpx.AsyncClient
) -> None:
    """With both limits on, an L1-hit turn still makes ONE L2 round trip (its
    commit); the limiter adds one before the turn (admission) and one after its
    last event (the stream slot's release)."""
    settings = make_settings(
        tmp_path, redis_url, llm_url=fake_llm.base_url, default_tenant=tenant(),
        rate_turns_per_minute=100, rate_max_streams=10,
    )  # fmt: skip
    session = sid()
    async with AppServer(settings) as srv:
        assert (await post_turn(client, srv.url, session, "first")).status_code == 200
        limiter = srv.services.rate_limiter
        assert isinstance(limiter, RateLimiter)
        before_l2, before_rl = l2_round_trips(srv.services), limiter.round_trips
        r = await post_turn(client, srv.url, session, "second")
        assert r.events[0].data["l1_hit"] is True
        for _ in range(50):  # the release runs after the last event
            if not srv.services.turn_tasks:
                break
            await asyncio.sleep(0.01)
        assert l2_round_trips(srv.services) - before_l2 == 1
        assert limiter.round_trips - before_rl == 2
        assert await limiter.streams_held(settings.default_tenant) == 0


async def test_limiter_times_out_on_a_stalled_redis(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis-stall").start()
    r = aioredis.from_url(server.url, socket_timeout=5)
    try:
        open_l = RateLimiter(r, turns_per_minute=10, max_streams=0, timeout_s=0.2)
        closed_l = RateLimiter(r, turns_per_minute=10, max_streams=0, timeout_s=0.2,
                               fail_mode="closed")  # fmt: skip
        await open_l.admit("warm")
        server.pause()  # SIGSTOP: connections stay open, nothing answers
        t0 = time.perf_counter()
        assert await open_l.admit("stalled") is None  # fail open, no stream limit
        assert time.perf_counter() - t0 < 0.5
        t0 = time.perf_counter()
        with pytest.raises(RateLimitUnavailable):
            await closed_l.admit("stalled")
        assert time.perf_counter() - t0 < 0.5
    finally:
        server.resume()
        await r.aclose()
        server.stop()
