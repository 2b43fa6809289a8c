"""memory/cache.py against a real Redis (standalone and a real Cluster): hits by tier,
single flight in a pod and across pods, what is never stored, TTL jitter, the
size cap, switches, scopes, Redis down."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from infra.redis_client import RedisLike, create_redis
from memory.cache import JITTER, Cache, CachePolicy, Scope, jittered
from memory.keys import CacheKeys
from memory.metrics import Metrics
from tests.harness import free_port

POLICIES = {
    "response": CachePolicy(100.0, max_entry_bytes=1024),
    "embedding": CachePolicy(100.0),
    "tool": CachePolicy(100.0, enabled=False),
    "retrieval": CachePolicy(100.0, empty_ttl_s=20.0),
    "summary": CachePolicy(100.0),
}


def cache(redis: RedisLike, **kw: Any) -> Cache:
    return Cache(redis, Metrics(), POLICIES, **kw)


def tenant() -> Scope:
    return Scope("t" + uuid.uuid4().hex[:10])


def counting(
    value: bytes = b"v", delay_s: float = 0.0
) -> tuple[list[int], Callable[[], Awaitable[bytes]]]:
    calls: list[int] = []

    async def compute() -> bytes:
        calls.append(1)
        if delay_s:
            await asyncio.sleep(delay_s)
        return value

    return calls, compute


async def fetch(c: Cache, scope: Scope, parts: Any, compute: Callable[[], Awaitable[bytes]],
                name: Any = "response", **kw: Any) -> Any:  # fmt: skip
    return await c.fetch(name, scope, parts, compute, encode=bytes, decode=bytes, **kw)


def sample(c: Cache, name: str, **labels: str) -> float:
    return float(c.metrics.registry.get_sample_value(name, labels) or 0.0)


async def test_miss_then_l1_hit_then_l2_hit_on_another_pod(any_redis: RedisLike) -> None:
    a, b = cache(any_redis), cache(any_redis)
    scope = tenant()
    calls, compute = counting(b"answer")
    first = await fetch(a, scope, {"q": 1}, compute)
    again = await fetch(a, scope, {"q": 1}, compute)
    other = await fetch(b, scope, {"q": 1}, compute)
    assert (first.outcome, first.value) == ("miss", b"answer")
    assert (again.outcome, again.tier, again.value) == ("hit", "l1", b"answer")
    assert (other.outcome, other.tier) == ("hit", "l2")
    assert len(calls) == 1
    assert sample(a, "tiermem_cache_hits_total", cache="response", tier="l1") == 1
    assert sample(a, "tiermem_cache_misses_total", cache="response") == 1


async def test_session_entries_never_sit_in_l1(any_redis: RedisLike) -> None:
    c = cache(any_redis)
    scope = Scope("t" + uuid.uuid4().hex[:8], "s" + uuid.uuid4().hex[:8])
    _, compute = counting()
    await fetch(c, scope, "p", compute, name="retrieval")
    again = await fetch(c, scope, "p", compute, name="retrieval")
    assert (again.outcome, again.tier) == ("hit", "l2") and len(c.l1) == 0
    key = c.key("retrieval", scope, "p")
    assert key.startswith(f"tm:{{{scope.tenant}:{scope.session_id}}}:c:retrieval:")


async def test_100_concurrent_lookups_in_one_pod_compute_once(any_redis: RedisLike) -> None:
    c = cache(any_redis)
    scope = tenant()
    calls, compute = counting(delay_s=0.2)
    got = await asyncio.gather(*(fetch(c, scope, "hot", compute) for _ in range(100)))
    assert len(calls) == 1
    assert sorted(g.outcome for g in got) == ["hit"] * 99 + ["miss"]
    assert {g.value for g in got} == {b"v"}
    assert sample(c, "tiermem_cache_singleflight_waits_total", cache="response",
                  where="process") == 99  # fmt: skip


async def test_two_pods_compute_once_the_other_waits(any_redis: RedisLike) -> None:
    a, b = cache(any_redis), cache(any_redis)
    scope = tenant()
    calls, slow = counting(delay_s=0.3)
    started = asyncio.Event()

    async def compute() -> bytes:
        started.set()
        return await slow()

    first = asyncio.create_task(fetch(a, scope, "hot", compute))
    await started.wait()  # pod a holds the lease: its computation runs
    second = await fetch(b, scope, "hot", compute)
    assert (await first).outcome == "miss"
    assert (second.outcome, second.tier, second.value) == ("hit", "flight", b"v")
    assert len(calls) == 1
    assert sample(b, "tiermem_cache_singleflight_waits_total", cache="response", where="pod") == 1


async def test_a_failure_is_not_stored_and_frees_waiting_pods_at_once(
    any_redis: RedisLike,
) -> None:
    a, b = cache(any_redis, wait_s=60.0), cache(any_redis, wait_s=60.0)
    scope = tenant()
    started = asyncio.Event()

    async def failing() -> bytes:
        started.set()
        await asyncio.sleep(0.2)
        raise RuntimeError("the LLM failed")

    first = asyncio.create_task(fetch(a, scope, "k", failing))
    await started.wait()
    t0 = time.monotonic()
    calls, compute = counting(b"fresh")
    second = await fetch(b, scope, "k", compute)
    with pytest.raises(RuntimeError):
        await first
    # The lease went with the failure: pod b computed itself, long before wait_s.
    assert second.outcome == "miss" and second.value == b"fresh" and len(calls) == 1
    assert time.monotonic() - t0 < b.wait_s / 2
    # And the failure left nothing behind: the next lookup finds b's value.
    assert (await fetch(a, scope, "k", compute)).value == b"fresh"


async def test_uncacheable_and_empty_results(any_redis: RedisLike) -> None:
    c = cache(any_redis)
    scope = Scope("t" + uuid.uuid4().hex[:8], "s" + uuid.uuid4().hex[:8])
    calls, compute = counting(b"partial")
    for _ in range(2):
        got = await fetch(c, scope, "x", compute, name="retrieval", cacheable=lambda _v: False)
        assert got.outcome == "miss"
    assert len(calls) == 2
    calls, compute = counting(b"")
    await fetch(c, scope, "nothing", compute, name="retrieval", empty=lambda v: not v)
    hit = await fetch(c, scope, "nothing", compute, name="retrieval", empty=lambda v: not v)
    assert (hit.outcome, hit.value) == ("hit", None) and len(calls) == 1
    ttl = await any_redis.pttl(c.key("retrieval", scope, "nothing"))
    assert 20_000 * (1 - JITTER) - 5_000 <= ttl <= 20_000 * (1 + JITTER)
    # A kind with no empty TTL stores no marker.
    calls, compute = counting(b"")
    for _ in range(2):
        await fetch(c, tenant(), "nothing", compute, name="summary", empty=lambda v: not v)
    assert len(calls) == 2


async def test_ttls_are_jittered_and_spread(any_redis: RedisLike) -> None:
    c = cache(any_redis)
    scope = tenant()
    for i in range(200):
        assert await c.put("embedding", scope, i, b"x")
    ttls = [await any_redis.pttl(c.key("embedding", scope, i)) for i in range(200)]
    assert all(100_000 * (1 - JITTER) - 10_000 <= t <= 100_000 * (1 + JITTER) for t in ttls)
    assert max(ttls) - min(ttls) > 10_000  # spread, not one instant
    values = [jittered(100.0) for _ in range(1000)]
    assert min(values) >= 90.0 and max(values) <= 110.0 and max(values) - min(values) > 15


async def test_an_entry_over_the_cap_is_not_stored(any_redis: RedisLike) -> None:
    c = cache(any_redis)
    scope = tenant()
    calls, compute = counting(b"x" * 2048)
    for _ in range(2):
        assert (await fetch(c, scope, "big", compute)).outcome == "miss"
    assert len(calls) == 2
    assert sample(c, "tiermem_cache_bypass_total", cache="response", reason="too_large") == 2
    assert await any_redis.exists(c.key("response", scope, "big")) == 0


@pytest.mark.parametrize(
    ("make", "name", "bypass", "reason"),
    [
        (lambda r: cache(r, enabled=False), "response", None, "off"),
        (lambda r: cache(r), "tool", None, "kind_off"),
        (lambda r: cache(r), "response", "no_cache", "no_cache"),
    ],
)
async def test_switches_bypass_and_write_nothing(
    any_redis: RedisLike, make: Callable[[RedisLike], Cache], name: str, bypass: str | None,
    reason: str,
) -> None:  # fmt: skip
    c = make(any_redis)
    scope = tenant()
    calls, compute = counting()
    for _ in range(2):
        got = await fetch(c, scope, "k", compute, name=name, bypass=bypass)
        assert got.outcome == "bypass" and got.value == b"v"
    assert len(calls) == 2
    assert await any_redis.exists(c.key(name, scope, "k")) == 0  # type: ignore[arg-type]
    assert sample(c, "tiermem_cache_bypass_total", cache=name, reason=reason) == 2


async def test_tenants_never_share_entries(any_redis: RedisLike) -> None:
    c = cache(any_redis)
    a, b = tenant(), tenant()
    calls, compute = counting()
    await fetch(c, a, "same", compute)
    assert (await fetch(c, b, "same", compute)).outcome == "miss"
    assert len(calls) == 2
    assert c.key("response", a, "same").startswith(f"tm:c:{{{a.tenant}}}:response:")
    assert CacheKeys(None).entry("embedding", "h") == "tm:c:shared:embedding:h"


async def test_many_at_once(any_redis: RedisLike) -> None:
    c, other = cache(any_redis), cache(any_redis)
    shared = Scope(None)
    parts = [uuid.uuid4().hex for _ in range(5)]
    assert await c.get_many("embedding", shared, parts) == [None] * 5
    assert await c.put_many("embedding", shared, [(p, p.encode()) for p in parts[:3]]) == 3
    got = await other.get_many("embedding", shared, parts)
    assert got == [p.encode() for p in parts[:3]] + [None, None]
    assert sample(other, "tiermem_cache_hits_total", cache="embedding", tier="l2") == 3
    assert await other.get_many("embedding", shared, parts[:3]) == [p.encode() for p in parts[:3]]
    assert sample(other, "tiermem_cache_hits_total", cache="embedding", tier="l1") == 3


async def test_redis_down_is_a_miss_never_an_error() -> None:
    dead = create_redis(f"redis://127.0.0.1:{free_port()}", socket_timeout=0.5)
    try:
        c = cache(dead)
        calls, compute = counting(b"computed")
        got = await fetch(c, tenant(), "k", compute)
        assert (got.outcome, got.value, len(calls)) == ("miss", b"computed", 1)
        assert await c.get_many("embedding", Scope(None), ["a"]) is None
        assert await c.put("response", tenant(), "k", b"v") is False
    finally:
        await dead.aclose()
