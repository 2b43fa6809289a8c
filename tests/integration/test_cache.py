"""The cache layer (memory/cache.py) against real Redis, standalone and Cluster.

Each ``Pod`` is one ``Cache`` with its own client and its own ``Metrics``, so two
of them on one Redis are two pods of the service: they share L2, never L1 or
their in-process single flight. Keys are unique per test (uuid tenants and
parts), so tests never meet on the shared servers. Nothing of Redis is mocked;
where a test needs a computation to be at a given point while another caller
arrives, the computation itself waits for what the other caller shows (a
metric), never for a fixed time.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio
from redis.crc import key_slot

from infra.redis_client import RedisLike, create_redis
from infra.settings import Settings
from memory.cache import (
    CACHE_NAMES,
    JITTER,
    Cache,
    Cached,
    CachePolicy,
    Scope,
    digest,
    jittered,
)
from memory.keys import CacheKeys, InvalidId
from memory.metrics import Metrics
from tests.servers.redis_server import RedisServer, free_port

TTL_S = 60.0
EMPTY_TTL_S = 20.0
# How long a test lets a condition it waits for take on a loaded machine.
WAIT_FOR_S = 30.0


def policies(**overrides: CachePolicy) -> dict[str, CachePolicy]:
    out = {name: CachePolicy(TTL_S, empty_ttl_s=EMPTY_TTL_S) for name in CACHE_NAMES}
    out.update(overrides)
    return out


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """A counter's value (0 when never incremented), e.g. sample(m, "cache_hits", ...)."""
    return metrics.registry.get_sample_value(f"tiermem_{name}_total", labels) or 0.0


async def wait_until(cond: Callable[[], bool], what: str, within_s: float = WAIT_FOR_S) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {within_s} s")
        await asyncio.sleep(0.005)


def tenant() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def parts() -> dict[str, Any]:
    return {"q": uuid.uuid4().hex, "n": 1}


class Boom(RuntimeError):
    pass


@dataclass
class Compute:
    """A computation that counts its calls; ``before`` runs first (a gate), then it
    raises ``error`` or returns ``value``."""

    value: Any = "v"
    before: Callable[[], Awaitable[None]] | None = None
    error: BaseException | None = None
    calls: int = 0

    async def __call__(self) -> Any:
        self.calls += 1
        if self.before is not None:
            await self.before()
        if self.error is not None:
            raise self.error
        return self.value


@dataclass
class Pod:
    cache: Cache
    metrics: Metrics
    redis: RedisLike
    fetches: list[Cached[Any]] = field(default_factory=list)

    async def fetch(
        self, scope: Scope, key_parts: Any, compute: Callable[[], Awaitable[Any]],
        name: str = "tool", **kw: Any,
    ) -> Cached[Any]:  # fmt: skip
        kw.setdefault("encode", orjson.dumps)
        kw.setdefault("decode", orjson.loads)
        got = await self.cache.fetch(name, scope, key_parts, compute, **kw)  # type: ignore[arg-type]
        self.fetches.append(got)
        return got

    def hits(self, tier: str, name: str = "tool") -> float:
        return sample(self.metrics, "cache_hits", cache=name, tier=tier)

    def misses(self, name: str = "tool") -> float:
        return sample(self.metrics, "cache_misses", cache=name)

    def bypassed(self, reason: str, name: str = "tool") -> float:
        return sample(self.metrics, "cache_bypass", cache=name, reason=reason)

    def waits(self, where: str, name: str = "tool") -> float:
        return sample(self.metrics, "cache_singleflight_waits", cache=name, where=where)


PodFactory = Callable[..., Pod]


@pytest.fixture
async def make_pod(any_redis_url: str) -> AsyncIterator[PodFactory]:
    """Pods on ``any_redis_url`` (standalone, then cluster), each with its own client."""
    clients: list[RedisLike] = []

    def make(pols: dict[str, CachePolicy] | None = None, **kw: Any) -> Pod:
        client = create_redis(any_redis_url, socket_timeout=5.0)
        clients.append(client)
        metrics = Metrics()
        return Pod(Cache(client, metrics, pols or policies(), **kw), metrics, client)

    yield make
    for client in clients:
        await client.aclose()


# --- outcomes and tiers ---------------------------------------------------------------
async def test_miss_then_l1_then_l2_on_another_pod(make_pod: PodFactory, any_redis: RedisLike):
    a, b = make_pod(), make_pod()
    scope, key_parts, compute = Scope(tenant()), parts(), Compute({"answer": 42})

    first = await a.fetch(scope, key_parts, compute)
    assert (first.value, first.outcome, first.tier) == ({"answer": 42}, "miss", "")
    assert compute.calls == 1
    key = a.cache.key("tool", scope, key_parts)
    assert orjson.loads(await any_redis.get(key)) == {"answer": 42}
    assert not await any_redis.exists(CacheKeys.lease_of(key)), "lease released"

    second = await a.fetch(scope, key_parts, compute)
    assert (second.value, second.outcome, second.tier) == ({"answer": 42}, "hit", "l1")

    other = await b.fetch(scope, key_parts, compute)
    assert (other.value, other.outcome, other.tier) == ({"answer": 42}, "hit", "l2")
    again = await b.fetch(scope, key_parts, compute)
    assert again.tier == "l1", "an L2 hit of a tenant entry fills that pod's L1"
    assert compute.calls == 1

    assert (a.misses(), a.hits("l1"), a.hits("l2")) == (1, 1, 0)
    assert (b.misses(), b.hits("l1"), b.hits("l2")) == (0, 1, 1)
    assert a.waits("pod") == a.waits("process") == 0


async def test_session_entries_never_enter_l1(make_pod: PodFactory, any_redis: RedisLike):
    a = make_pod()
    t, s = tenant(), f"s{uuid.uuid4().hex[:12]}"
    scope, key_parts = Scope(t, s), parts()
    key = a.cache.key("retrieval", scope, key_parts)
    assert key.startswith(f"tm:{{{t}:{s}}}:c:retrieval:")

    async def no_lease_taken() -> None:
        # Only the pod holding the session computes its entries: no lease round trip.
        assert await any_redis.exists(CacheKeys.lease_of(key)) == 0

    compute = Compute([1, 2, 3], before=no_lease_taken)

    assert (await a.fetch(scope, key_parts, compute, name="retrieval")).outcome == "miss"
    for _ in range(2):
        got = await a.fetch(scope, key_parts, compute, name="retrieval")
        assert (got.value, got.outcome, got.tier) == ([1, 2, 3], "hit", "l2")
    assert compute.calls == 1
    assert len(a.cache.l1) == 0
    assert a.hits("l2", "retrieval") == 2 and a.hits("l1", "retrieval") == 0

    # Deleting the session's keys (what forgetting it does) deletes the entry on
    # every pod at once: no L1 copy answers afterwards.
    assert await any_redis.delete(key) == 1
    assert (await a.fetch(scope, key_parts, compute, name="retrieval")).outcome == "miss"
    assert compute.calls == 2


async def test_shared_scope_entries(make_pod: PodFactory, any_redis: RedisLike) -> None:
    a, b = make_pod(), make_pod()
    key_parts, compute = parts(), Compute([0.5, 0.25])
    key = a.cache.key("embedding", Scope(None), key_parts)
    assert key.startswith("tm:c:shared:embedding:") and "{" not in key
    assert (await a.fetch(Scope(None), key_parts, compute, name="embedding")).outcome == "miss"
    assert (await a.fetch(Scope(None), key_parts, compute, name="embedding")).tier == "l1"
    assert (await b.fetch(Scope(None), key_parts, compute, name="embedding")).tier == "l2"
    assert compute.calls == 1
    assert await any_redis.exists(key) == 1


async def test_get_and_put(make_pod: PodFactory) -> None:
    a, b = make_pod(), make_pod()
    scope, key_parts = Scope(tenant()), parts()
    assert (await a.cache.get("response", scope, key_parts)).outcome == "miss"
    assert await a.cache.put("response", scope, key_parts, b"raw reply")
    got = await a.cache.get("response", scope, key_parts)
    assert (got.value, got.outcome, got.tier) == (b"raw reply", "hit", "l1")
    got = await b.cache.get("response", scope, key_parts)
    assert (got.value, got.outcome, got.tier) == (b"raw reply", "hit", "l2")
    # put(None) is the empty marker: a hit with no value.
    empty_parts = parts()
    assert await a.cache.put("response", scope, empty_parts, None)
    got = await b.cache.get("response", scope, empty_parts)
    assert (got.value, got.outcome) == (None, "hit")
    assert a.misses("response") == 1 and a.hits("l1", "response") == 1


async def test_get_many_and_put_many(make_pod: PodFactory) -> None:
    """Shared scope: on the cluster the keys lie on many slots (one pipeline)."""
    cap = 1024
    pols = policies(embedding=CachePolicy(TTL_S, max_entry_bytes=cap))
    a, b = make_pod(pols), make_pod(pols)
    items = [(parts(), f"vec{i}".encode()) for i in range(4)]
    too_large = (parts(), b"x" * (cap + 1))
    assert await a.cache.put_many("embedding", Scope(None), [*items, too_large]) == 4
    assert a.bypassed("too_large", "embedding") == 1

    asked = [p for p, _ in items] + [too_large[0], parts()]
    want = [raw for _, raw in items] + [None, None]
    assert await b.cache.get_many("embedding", Scope(None), asked) == want
    assert (b.hits("l2", "embedding"), b.misses("embedding")) == (4, 2)
    assert await b.cache.get_many("embedding", Scope(None), asked) == want
    assert (b.hits("l1", "embedding"), b.misses("embedding")) == (4, 4)
    assert await a.cache.get_many("embedding", Scope(None), asked) == want
    assert a.hits("l1", "embedding") == 4, "put_many fills the writer's L1"

    # A session's entries: stored, never in L1.
    c = make_pod(pols)
    session = Scope(tenant(), "s1")
    assert await c.cache.put_many("embedding", session, items) == 4
    assert len(c.cache.l1) == 0
    assert await c.cache.get_many("embedding", session, [p for p, _ in items]) == want[:4]
    assert c.hits("l2", "embedding") == 4


# --- single flight ----------------------------------------------------------------------
async def test_single_flight_in_one_process(make_pod: PodFactory) -> None:
    a = make_pod()
    scope, key_parts, n = Scope(tenant()), parts(), 100

    async def until_all_wait() -> None:
        # The one computation lasts until the 99 others have joined it.
        await wait_until(lambda: a.waits("process") >= n - 1, f"{n - 1} callers to join")
        await asyncio.sleep(0.01)

    compute = Compute({"shared": True}, before=until_all_wait)
    got = await asyncio.gather(*(a.fetch(scope, key_parts, compute) for _ in range(n)))
    assert compute.calls == 1
    assert all(g.value == {"shared": True} for g in got)
    assert sorted(g.outcome for g in got) == ["hit"] * (n - 1) + ["miss"]
    assert {g.tier for g in got if g.outcome == "hit"} == {"flight"}
    assert (a.misses(), a.hits("flight"), a.waits("process"), a.waits("pod")) == (1, 99, 99, 0)
    assert not a.cache._flights, "no flight is left behind"
    assert (await a.fetch(scope, key_parts, compute)).tier == "l1"


async def test_single_flight_across_pods(make_pod: PodFactory, any_redis: RedisLike) -> None:
    a, b = make_pod(), make_pod()
    scope, key_parts = Scope(tenant()), parts()
    key = a.cache.key("tool", scope, key_parts)

    async def until_other_pod_waits() -> None:
        # Whoever took the lease computes until the other pod is polling for it.
        assert await any_redis.exists(CacheKeys.lease_of(key)) == 1, "the lease is held"
        await wait_until(lambda: a.waits("pod") + b.waits("pod") >= 1, "the other pod to wait")

    compute = Compute("once", before=until_other_pod_waits)
    got_a, got_b = await asyncio.gather(
        a.fetch(scope, key_parts, compute), b.fetch(scope, key_parts, compute)
    )
    assert compute.calls == 1
    assert got_a.value == got_b.value == "once"
    (holder, got_h), (waiter, got_w) = sorted(
        [(a, got_a), (b, got_b)], key=lambda pair: pair[1].outcome != "miss"
    )
    assert (got_h.outcome, got_w.outcome, got_w.tier) == ("miss", "hit", "flight")
    assert (waiter.waits("pod"), waiter.hits("flight"), waiter.misses()) == (1, 1, 0)
    assert (holder.waits("pod"), holder.misses()) == (0, 1)
    assert await any_redis.exists(CacheKeys.lease_of(key)) == 0
    assert await any_redis.exists(key) == 1


async def test_lease_taken_between_read_and_lease(make_pod: PodFactory) -> None:
    """A pod whose read missed just before another pod stored the entry and let its
    lease go takes the (now free) lease: it must find the entry, not compute again."""
    a = make_pod()
    done = asyncio.Event()

    class LatePod(Cache):
        async def _lease(self, key: str) -> bool:
            await done.wait()  # the other pod finishes between this pod's read and lease
            return await super()._lease(key)

    metrics = Metrics()
    b = Pod(LatePod(a.redis, metrics, policies()), metrics, a.redis)
    scope, key_parts, compute = Scope(tenant()), parts(), Compute("once")

    late = asyncio.create_task(b.fetch(scope, key_parts, compute))
    await wait_until(lambda: b.cache._flights != {}, "the late pod to have read and missed")
    assert (await a.fetch(scope, key_parts, compute)).outcome == "miss"
    done.set()
    got = await late
    assert (got.value, got.outcome, got.tier) == ("once", "hit", "flight")
    assert compute.calls == 1
    assert (b.misses(), b.hits("flight")) == (0, 1)


@pytest.mark.parametrize("failure", ["raises", "uncacheable"])
async def test_failed_holder_releases_the_waiters_at_once(
    make_pod: PodFactory, any_redis: RedisLike, failure: str
) -> None:
    wait_s = 30.0
    # The lease outlives the wait: only its release can end the wait early.
    a, b = make_pod(lease_s=4 * wait_s, wait_s=wait_s), make_pod(lease_s=4 * wait_s, wait_s=wait_s)
    scope, key_parts = Scope(tenant()), parts()
    key = a.cache.key("tool", scope, key_parts)
    started = asyncio.Event()

    async def until_b_waits() -> None:
        started.set()
        await wait_until(lambda: b.waits("pod") >= 1, "pod b to wait")

    holder = Compute("partial", before=until_b_waits, error=Boom() if failure == "raises" else None)
    kw: dict[str, Any] = {"cacheable": lambda v: v != "partial"}
    task_a = asyncio.create_task(a.fetch(scope, key_parts, holder, **kw))
    await asyncio.wait_for(started.wait(), WAIT_FOR_S)

    own = Compute("b's own")
    t0 = time.monotonic()
    got_b = await b.fetch(scope, key_parts, own, **kw)
    waited = time.monotonic() - t0
    if failure == "raises":
        with pytest.raises(Boom):
            await task_a
    else:
        assert (await task_a).outcome == "miss"
    assert (got_b.value, got_b.outcome) == ("b's own", "miss")
    assert holder.calls == own.calls == 1
    assert b.waits("pod") == 1
    assert waited < wait_s / 3, f"b waited {waited:.1f} s of its {wait_s} s"
    assert orjson.loads(await any_redis.get(key)) == "b's own"
    assert await any_redis.exists(CacheKeys.lease_of(key)) == 0


async def test_compute_that_raises_caches_nothing(make_pod: PodFactory, any_redis: RedisLike):
    a = make_pod()
    scope, key_parts = Scope(tenant()), parts()
    key = a.cache.key("tool", scope, key_parts)
    failing = Compute(error=Boom("down"))
    with pytest.raises(Boom, match="down"):
        await a.fetch(scope, key_parts, failing)
    assert await any_redis.exists(key, CacheKeys.lease_of(key)) == 0
    assert not a.cache._flights and len(a.cache.l1) == 0
    with pytest.raises(Boom):
        await a.fetch(scope, key_parts, failing)
    assert failing.calls == 2, "an error is never cached"
    ok = Compute("fine")
    assert (await a.fetch(scope, key_parts, ok)).outcome == "miss"
    assert (await a.fetch(scope, key_parts, ok)).tier == "l1"


async def test_in_process_waiters_of_a_failed_computation_compute_their_own(
    make_pod: PodFactory,
) -> None:
    a = make_pod()
    scope, key_parts, n = Scope(tenant()), parts(), 10
    calls = 0

    async def compute() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await wait_until(lambda: a.waits("process") >= n - 1, "the others to join")
            raise Boom("first")
        return "second"

    got = await asyncio.gather(
        *(a.fetch(scope, key_parts, compute) for _ in range(n)), return_exceptions=True
    )
    assert sum(isinstance(g, Boom) for g in got) == 1, "only the failed caller sees its error"
    assert all(g.value == "second" for g in got if isinstance(g, Cached))
    assert 2 <= calls <= n
    assert (await a.fetch(scope, key_parts, compute)).value == "second"


async def test_dead_lease_holder_costs_a_wait_not_a_failure(
    make_pod: PodFactory, any_redis: RedisLike
) -> None:
    wait_s = 60.0
    a = make_pod(wait_s=wait_s)
    scope, key_parts, compute = Scope(tenant()), parts(), Compute("mine")
    key = a.cache.key("tool", scope, key_parts)
    lease_ms = 1500
    await any_redis.set(CacheKeys.lease_of(key), b"dead pod", px=lease_ms)
    t0 = time.monotonic()
    got = await a.fetch(scope, key_parts, compute)
    waited = time.monotonic() - t0
    assert (got.value, got.outcome) == ("mine", "miss")
    assert a.waits("pod") == 1
    assert waited < wait_s / 2, "it computed once the lease expired, not after wait_s"
    assert await any_redis.exists(key) == 1


async def test_wait_for_another_pod_is_bounded(make_pod: PodFactory, any_redis: RedisLike):
    wait_s = 1.0
    a = make_pod(wait_s=wait_s)
    scope, key_parts, compute = Scope(tenant()), parts(), Compute("mine")
    key = a.cache.key("tool", scope, key_parts)
    lease = CacheKeys.lease_of(key)
    await any_redis.set(lease, b"stuck pod", px=600_000)
    try:
        t0 = time.monotonic()
        got = await a.fetch(scope, key_parts, compute)
        waited = time.monotonic() - t0
        assert (got.value, got.outcome) == ("mine", "miss")
        assert waited >= wait_s
        assert a.waits("pod") == 1
        assert await any_redis.get(lease) == b"stuck pod", "another's lease is not ours to drop"
        assert await any_redis.exists(key) == 1
    finally:
        await any_redis.delete(lease)


# --- what is stored ---------------------------------------------------------------------
async def test_uncacheable_result_is_not_stored(make_pod: PodFactory, any_redis: RedisLike):
    a = make_pod()
    scope, key_parts, compute = Scope(tenant()), parts(), Compute("cut short")
    for _ in range(2):
        got = await a.fetch(scope, key_parts, compute, cacheable=lambda _v: False)
        assert (got.value, got.outcome) == ("cut short", "miss")
    assert compute.calls == 2
    assert await any_redis.exists(a.cache.key("tool", scope, key_parts)) == 0
    assert len(a.cache.l1) == 0


async def test_empty_result_is_a_short_lived_marker(make_pod: PodFactory, any_redis: RedisLike):
    pols = policies(retrieval=CachePolicy(300.0, empty_ttl_s=EMPTY_TTL_S))
    a, b = make_pod(pols), make_pod(pols)
    scope, key_parts, compute = Scope(tenant()), parts(), Compute([])
    key = a.cache.key("retrieval", scope, key_parts)
    t0 = time.monotonic()
    got = await a.fetch(scope, key_parts, compute, name="retrieval", empty=lambda v: v == [])
    assert (got.value, got.outcome) == ([], "miss"), "the caller gets what was computed"
    pttl = await any_redis.pttl(key)
    elapsed_ms = (time.monotonic() - t0) * 1000
    lo, hi = EMPTY_TTL_S * 1000 * (1 - JITTER), EMPTY_TTL_S * 1000 * (1 + JITTER)
    assert lo - elapsed_ms - 1 <= pttl <= hi, "the empty TTL, not the kind's"

    got = await a.fetch(scope, key_parts, compute, name="retrieval", empty=lambda v: v == [])
    assert (got.value, got.outcome, got.tier) == (None, "hit", "l1")
    got = await b.fetch(scope, key_parts, compute, name="retrieval", empty=lambda v: v == [])
    assert (got.value, got.outcome, got.tier) == (None, "hit", "l2")
    assert compute.calls == 1


async def test_empty_result_with_no_empty_ttl_is_not_stored(
    make_pod: PodFactory, any_redis: RedisLike
) -> None:
    a = make_pod(policies(retrieval=CachePolicy(300.0, empty_ttl_s=0.0)))
    scope, key_parts, compute = Scope(tenant()), parts(), Compute([])
    for _ in range(2):
        got = await a.fetch(scope, key_parts, compute, name="retrieval", empty=lambda v: not v)
        assert (got.value, got.outcome) == ([], "miss")
    assert compute.calls == 2
    assert await any_redis.exists(a.cache.key("retrieval", scope, key_parts)) == 0


async def test_entry_over_the_size_cap_is_not_stored(make_pod: PodFactory, any_redis: RedisLike):
    cap = 1024
    a = make_pod(policies(tool=CachePolicy(TTL_S, max_entry_bytes=cap)))
    scope = Scope(tenant())

    def raw(v: bytes) -> bytes:
        return v

    at_cap, over = parts(), parts()
    fits = Compute(b"x" * cap)
    assert (await a.fetch(scope, at_cap, fits, encode=raw, decode=raw)).outcome == "miss"
    assert (await a.fetch(scope, at_cap, fits, encode=raw, decode=raw)).tier == "l1"
    assert await any_redis.strlen(a.cache.key("tool", scope, at_cap)) == cap

    big = Compute(b"x" * (cap + 1))
    for _ in range(2):
        got = await a.fetch(scope, over, big, encode=raw, decode=raw)
        assert (got.value, got.outcome) == (b"x" * (cap + 1), "miss")
    assert big.calls == 2
    assert await any_redis.exists(a.cache.key("tool", scope, over)) == 0
    assert a.bypassed("too_large") == 2
    assert not await a.cache.put("tool", scope, over, b"y" * (cap + 1))
    assert a.bypassed("too_large") == 3


# --- TTLs -------------------------------------------------------------------------------
def test_jittered_stays_within_ten_percent() -> None:
    rng = random.Random(7)
    got = [jittered(100.0, rng) for _ in range(10_000)]
    assert all(90.0 <= g <= 110.0 for g in got)
    assert min(got) < 91.0 and max(got) > 109.0, "spread over the whole band"
    assert 99.0 < sum(got) / len(got) < 101.0
    assert jittered(0.0) == 0.001, "never zero (a PX of 0 is refused)"


async def test_ttls_are_jittered_in_redis(make_pod: PodFactory, any_redis: RedisLike) -> None:
    ttl_s, n = 100.0, 200
    a = make_pod(policies(tool=CachePolicy(ttl_s)))
    scope, all_parts = Scope(tenant()), [parts() for _ in range(n)]
    t0 = time.monotonic()
    for p in all_parts:
        await a.fetch(scope, p, Compute("v"))
    pipe = any_redis.pipeline(transaction=False)
    for p in all_parts:
        pipe.pttl(a.cache.key("tool", scope, p))
    pttls = await pipe.execute()
    elapsed_ms = (time.monotonic() - t0) * 1000
    lo, hi = ttl_s * 1000 * (1 - JITTER), ttl_s * 1000 * (1 + JITTER)
    assert all(lo - elapsed_ms - 1 <= t <= hi for t in pttls), (min(pttls), max(pttls))
    assert max(pttls) - min(pttls) > ttl_s * 1000 * JITTER, "entries written together spread"


async def test_ttl_override(make_pod: PodFactory, any_redis: RedisLike) -> None:
    a = make_pod()
    scope, key_parts, own_ttl_s = Scope(tenant()), parts(), 1000.0
    t0 = time.monotonic()
    await a.fetch(scope, key_parts, Compute("v"), ttl_s=own_ttl_s)
    pttl = await any_redis.pttl(a.cache.key("tool", scope, key_parts))
    elapsed_ms = (time.monotonic() - t0) * 1000
    assert own_ttl_s * 900 - elapsed_ms - 1 <= pttl <= own_ttl_s * 1100


async def test_expired_entry_is_recomputed(make_pod: PodFactory, any_redis: RedisLike) -> None:
    ttl_s = 0.5
    a = make_pod(policies(tool=CachePolicy(ttl_s)))
    scope, key_parts, compute = Scope(tenant()), parts(), Compute("v")
    key = a.cache.key("tool", scope, key_parts)
    await a.fetch(scope, key_parts, compute)
    written = time.monotonic()
    # Gone from Redis, and past the longest TTL jitter gives L1.
    while await any_redis.exists(key) or time.monotonic() < written + ttl_s * (1 + JITTER):
        assert time.monotonic() < written + WAIT_FOR_S, "the entry never expired"
        await asyncio.sleep(0.05)
    assert (await a.fetch(scope, key_parts, compute)).outcome == "miss"
    assert compute.calls == 2


# --- switches ---------------------------------------------------------------------------
async def test_global_off_switch(make_pod: PodFactory, any_redis: RedisLike) -> None:
    a = make_pod(enabled=False)
    scope, key_parts, compute = Scope(tenant()), parts(), Compute("v")
    key = a.cache.key("tool", scope, key_parts)
    for _ in range(2):
        got = await a.fetch(scope, key_parts, compute)
        assert (got.value, got.outcome, got.tier) == ("v", "bypass", "")
    assert compute.calls == 2
    assert await any_redis.exists(key, CacheKeys.lease_of(key)) == 0
    assert (await a.cache.get("tool", scope, key_parts)).outcome == "bypass"
    assert not await a.cache.put("tool", scope, key_parts, b"x")
    assert await a.cache.get_many("tool", scope, [key_parts]) is None
    assert await a.cache.put_many("tool", scope, [(key_parts, b"x")]) == 0
    assert await any_redis.exists(key) == 0
    assert a.bypassed("off") == 4
    assert a.misses() == a.hits("l1") == a.hits("l2") == 0


async def test_kind_off_switch(make_pod: PodFactory, any_redis: RedisLike) -> None:
    pols = policies(tool=CachePolicy(TTL_S, enabled=False))
    del pols["summary"]  # a kind without a policy is off too
    a = make_pod(pols)
    scope, key_parts = Scope(tenant()), parts()
    for name in ("tool", "summary"):
        compute = Compute("v")
        for _ in range(2):
            assert (await a.fetch(scope, key_parts, compute, name=name)).outcome == "bypass"
        assert compute.calls == 2
        assert a.bypassed("kind_off", name) == 2
        assert await any_redis.exists(a.cache.key(name, scope, key_parts)) == 0  # type: ignore[arg-type]
    got = await a.fetch(scope, key_parts, Compute("v"), name="response")
    assert got.outcome == "miss", "other kinds stay on"


async def test_caller_bypass_neither_reads_nor_writes(
    make_pod: PodFactory, any_redis: RedisLike
) -> None:
    a = make_pod()
    scope, key_parts = Scope(tenant()), parts()
    await a.fetch(scope, key_parts, Compute("cached"))
    fresh = Compute("fresh")
    got = await a.fetch(scope, key_parts, fresh, bypass="no_cache")
    assert (got.value, got.outcome) == ("fresh", "bypass")
    assert fresh.calls == 1
    assert a.bypassed("no_cache") == 1
    assert orjson.loads(await any_redis.get(a.cache.key("tool", scope, key_parts))) == "cached"
    assert (await a.fetch(scope, key_parts, fresh)).value == "cached"


async def test_switches_from_settings(any_redis: RedisLike) -> None:
    off = Cache.from_settings(Settings(cache="off"), any_redis, Metrics())
    assert all(off.bypass_reason(name) == "off" for name in CACHE_NAMES)
    some = Cache.from_settings(
        Settings(cache_tool=False, cache_empty_ttl_s=7.0, cache_max_entry_bytes=4096),
        any_redis, Metrics(),
    )  # fmt: skip
    assert some.bypass_reason("tool") == "kind_off"
    assert some.bypass_reason("response") is None
    assert some.bypass_reason("response", "nondeterministic") == "nondeterministic"
    assert some.policies["retrieval"].empty_ttl_s == 7.0
    assert {p.max_entry_bytes for p in some.policies.values()} == {4096}


# --- keys -------------------------------------------------------------------------------
async def test_tenants_are_isolated(make_pod: PodFactory) -> None:
    a = make_pod()
    uid = uuid.uuid4().hex[:12]
    ta, tb = f"a{uid}", f"b{uid}"
    key_parts = parts()
    got_a = await a.fetch(Scope(ta), key_parts, Compute("for a"))
    got_b = await a.fetch(Scope(tb), key_parts, Compute("for b"))
    assert (got_a.outcome, got_b.outcome) == ("miss", "miss")
    assert (await a.fetch(Scope(ta), key_parts, Compute("x"))).value == "for a"
    assert (await a.fetch(Scope(tb), key_parts, Compute("x"))).value == "for b"
    assert a.misses() == 2

    d = digest(key_parts)
    key_a = a.cache.key("tool", Scope(ta), key_parts)
    assert key_a == CacheKeys(ta).entry("tool", d) == f"tm:c:{{{ta}}}:tool:{d}"
    assert a.cache.key("tool", Scope(tb), key_parts) == f"tm:c:{{{tb}}}:tool:{d}"
    session_key = a.cache.key("retrieval", Scope(ta, "s1"), key_parts)
    assert session_key == CacheKeys(ta, "s1").entry("retrieval", d)
    assert session_key == f"tm:{{{ta}:s1}}:c:retrieval:{d}"
    # One slot per tag: the entry, its lease, and the session's other keys together.
    assert key_slot(key_a.encode()) == key_slot(CacheKeys.lease_of(key_a).encode())
    assert key_slot(session_key.encode()) == key_slot(f"tm:{{{ta}:s1}}:meta".encode())
    assert a.cache.key("retrieval", Scope(ta, "s2"), key_parts) != session_key


def test_digest_and_key_validation() -> None:
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})
    cache = Cache(None, Metrics(), policies())  # type: ignore[arg-type]
    for bad in (Scope("a}b"), Scope("a", "s{1"), Scope("a:b"), Scope("")):
        with pytest.raises(InvalidId):
            cache.key("tool", bad, {})


# --- Redis down -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["standalone", "cluster"])
async def test_unreachable_redis_is_a_miss(kind: str) -> None:
    port = free_port()
    client: RedisLike
    if kind == "standalone":
        client = redis.asyncio.from_url(
            f"redis://127.0.0.1:{port}", socket_timeout=0.5, socket_connect_timeout=0.5
        )
    else:
        client = create_redis(f"redis+cluster://127.0.0.1:{port}", socket_timeout=0.5)
    metrics = Metrics()
    cache = Cache(client, metrics, policies())
    pod = Pod(cache, metrics, client)
    scope, key_parts, compute = Scope(tenant()), parts(), Compute({"computed": True})
    try:
        for _ in range(2):
            got = await pod.fetch(scope, key_parts, compute)
            assert (got.value, got.outcome) == ({"computed": True}, "miss")
        assert compute.calls == 2, "a write that failed leaves nothing in L1 either"
        session = Scope(scope.tenant, "s1")
        assert (await pod.fetch(session, key_parts, compute)).outcome == "miss"
        assert (await cache.get("tool", scope, key_parts)).outcome == "miss"
        assert not await cache.put("tool", scope, key_parts, b"x")
        assert await cache.get_many("tool", scope, [key_parts]) is None
        assert await cache.put_many("tool", scope, [(key_parts, b"x")]) == 0
        assert not cache._flights
    finally:
        await client.aclose()


async def test_redis_going_down_mid_way(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    client = create_redis(server.url, socket_timeout=0.5)
    metrics = Metrics()
    pod = Pod(Cache(client, metrics, policies()), metrics, client)
    tenant_scope, session_scope = Scope(tenant()), Scope(tenant(), "s1")
    key_parts, compute = parts(), Compute("v")
    try:
        await pod.fetch(tenant_scope, key_parts, compute)
        await pod.fetch(session_scope, key_parts, compute)
        assert compute.calls == 2
        server.stop()
        got = await pod.fetch(tenant_scope, key_parts, compute)
        assert (got.value, got.outcome, got.tier) == ("v", "hit", "l1"), "L1 still answers"
        got = await pod.fetch(session_scope, key_parts, compute)
        assert (got.value, got.outcome) == ("v", "miss"), "no L1 for a session: computed"
        assert compute.calls == 3
    finally:
        await client.aclose()
        server.stop()
