"""Per-tenant rate limits in Redis: turns per minute and concurrent streams.

Both limits of a tenant live under its own hash tag, so one Lua script checks
and takes both in ONE round trip, on one Redis Cluster slot:

| key | zset of | score (ms) | TTL |
|---|---|---|---|
| ``tm:rl:{<tenant>}:turns`` | admitted turns | start | 61 s |
| ``tm:rl:{<tenant>}:streams`` | running streams | lease deadline | 2 x lease, refreshed |

- **Turns per minute** is a sliding-window log: entries older than 60 s are
  dropped, and a turn is refused when ``turns_per_minute`` remain. At most N
  turns start in any 60-second window, exactly; ``Retry-After`` is the moment
  the oldest entry leaves the window. Memory is N small members per tenant.
- **Concurrent streams** are leases: a running turn holds a member scored with
  its deadline and renews it every third of ``stream_lease_s``; expired leases
  are dropped before counting. A pod that dies (``kill -9``, OOM, lost node)
  stops renewing, so its slots come back within ``stream_lease_s``, never
  later. A stream refused for concurrency is told ``Retry-After: 1``: streams
  end at their own pace, and nothing better is known.

Times come from Redis ``TIME`` inside the scripts: one clock for every pod.
A refused request takes nothing (no window entry, no lease).

When Redis cannot be reached (or answers slower than ``timeout_s``), the
limiter **fails open** by default: the turn goes on, unlimited, and
``tiermem_errors_total{kind="rate_limit_unavailable"}`` counts it. A turn
needs Redis anyway (its commit retries, then ends with a retryable error), so
refusing it here would only add a second failure to the first. ``fail_mode =
"closed"`` refuses such turns with 503 instead, for deployments that must
never exceed a limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from infra.redis_client import REDIS_ERRORS, RedisLike
from infra.settings import Settings
from memory.keys import PREFIX, validate_id
from memory.metrics import Metrics

log = logging.getLogger("tiermem.ratelimit")

WINDOW_MS = 60_000
# A stream refused for concurrency cannot know when a slot frees up.
STREAMS_RETRY_AFTER_S = 1
# What a limiter call may raise when Redis is down, refuses, or is too slow.
_UNAVAILABLE: tuple[type[BaseException], ...] = (*REDIS_ERRORS, OSError, TimeoutError)
# At most one "Redis unavailable" warning per this many seconds: a dead Redis
# would otherwise log once per turn.
_WARN_EVERY_S = 10.0

Limit = Literal["turns_per_minute", "streams"]
FailMode = Literal["open", "closed"]

# Returns {admitted (1/0), refused limit (0 none, 1 turns, 2 streams), retry ms, count}.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local per_min = tonumber(ARGV[1])
local max_streams = tonumber(ARGV[2])
local lease_ms = tonumber(ARGV[3])
local member = ARGV[4]
local window = tonumber(ARGV[5])
local streams = 0
if max_streams > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  streams = redis.call('ZCARD', KEYS[2])
  if streams >= max_streams then
    return {0, 2, 0, streams}
  end
end
if per_min > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  local turns = redis.call('ZCARD', KEYS[1])
  if turns >= per_min then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, 1, tonumber(oldest[2]) + window - now, turns}
  end
  redis.call('ZADD', KEYS[1], now, member)
  redis.call('PEXPIRE', KEYS[1], window + 1000)
end
if max_streams > 0 then
  redis.call('ZADD', KEYS[2], now + lease_ms, member)
  redis.call('PEXPIRE', KEYS[2], lease_ms * 2)
end
return {1, 0, 0, streams + 1}
"""

# Renews a lease that still exists; a lease already purged stays gone (taking
# it back could exceed the limit). Returns 1 if renewed.
RENEW = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_ms = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], 'XX', now + lease_ms, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease_ms * 2)
return 1
"""


def turns_key(tenant: str) -> str:
    return f"{PREFIX}:rl:{{{validate_id(tenant, 'tenant')}}}:turns"


def streams_key(tenant: str) -> str:
    return f"{PREFIX}:rl:{{{validate_id(tenant, 'tenant')}}}:streams"


class RateLimited(Exception):
    """A tenant is over one of its limits; retry after ``retry_after_s`` seconds."""

    def __init__(self, limit: Limit, retry_after_s: int, message: str) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.message = message


class RateLimitUnavailable(Exception):
    """Redis could not be asked and the limiter fails closed."""


@dataclass(eq=False)
class StreamLease:
    """A concurrent-stream slot held by one turn.

    The turn's task ``claim``s it and holds it (``held``) while it runs; if the
    turn never starts (the client left before the stream did), whoever admitted
    it calls ``release_if_unclaimed``. Whatever is missed expires with the lease.
    """

    limiter: RateLimiter
    tenant: str
    member: str
    claimed: bool = False
    released: bool = False
    _renewer: asyncio.Task[None] | None = field(default=None, repr=False)

    def claim(self) -> None:
        self.claimed = True

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        await self.limiter.release(self.tenant, self.member)

    async def release_if_unclaimed(self) -> None:
        if not self.claimed:
            await self.release()

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Renews the lease while the body runs; releases it afterwards."""
        self.claim()
        self._renewer = asyncio.create_task(self._renew_forever(), name="stream-lease")
        try:
            yield
        finally:
            # Not awaited: awaiting a cancelled task here could swallow a
            # cancellation meant for the turn's own task.
            self._renewer.cancel()
            await self.release()

    async def _renew_forever(self) -> None:
        period = self.limiter.stream_lease_s / 3
        while True:
            await asyncio.sleep(period)
            if await self.limiter.renew(self.tenant, self.member) is False:
                # Purged: taking the slot back could exceed the limit, so the
                # stream runs on without one. (None: no answer; try again.)
                log.warning("stream lease lost before it was renewed (Redis slow or down?)")
                return


class RateLimiter:
    """Both limits of every tenant; see the module docstring. A limit of 0 is off."""

    def __init__(
        self,
        redis: RedisLike,
        *,
        turns_per_minute: int,
        max_streams: int,
        stream_lease_s: float = 30.0,
        fail_mode: FailMode = "open",
        timeout_s: float = 0.25,
        metrics: Metrics | None = None,
    ) -> None:
        if turns_per_minute < 0 or max_streams < 0:
            raise ValueError("limits must be >= 0 (0 = off)")
        if stream_lease_s <= 0 or timeout_s <= 0:
            raise ValueError("stream_lease_s and timeout_s must be positive")
        self.redis = redis
        self.turns_per_minute = turns_per_minute
        self.max_streams = max_streams
        self.stream_lease_s = stream_lease_s
        self.fail_mode = fail_mode
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._admit = redis.register_script(ADMIT)
        self._renew = redis.register_script(RENEW)
        self._lease_ms = max(1, math.ceil(stream_lease_s * 1000))
        self._last_warning = -math.inf
        # Round trips issued, so tests and benches can count what limiting costs.
        self.round_trips = 0

    @classmethod
    def from_settings(
        cls, settings: Settings, redis: RedisLike, metrics: Metrics | None = None
    ) -> RateLimiter | None:
        """The limiter the settings ask for, or None when both limits are off
        (then admission costs nothing: no Redis round trip)."""
        if not settings.rate_turns_per_minute and not settings.rate_max_streams:
            return None
        return cls(
            redis,
            turns_per_minute=settings.rate_turns_per_minute,
            max_streams=settings.rate_max_streams,
            stream_lease_s=settings.rate_stream_lease_s,
            fail_mode=settings.rate_fail_mode,
            timeout_s=settings.rate_redis_timeout_s,
            metrics=metrics,
        )

    async def admit(self, tenant: str) -> StreamLease | None:
        """Takes a turn (and a stream slot) for ``tenant`` in one round trip.

        Returns the stream lease to hold while the turn runs (None when streams
        are not limited). Raises ``RateLimited`` over a limit, and
        ``RateLimitUnavailable`` when Redis cannot answer and the limiter fails
        closed.
        """
        member = uuid.uuid4().hex
        lease = StreamLease(self, tenant, member) if self.max_streams > 0 else None
        args: list[Any] = [
            self.turns_per_minute, self.max_streams, self._lease_ms, member, WINDOW_MS,
        ]  # fmt: skip
        keys = [turns_key(tenant), streams_key(tenant)]
        self.round_trips += 1
        try:
            reply = await asyncio.wait_for(self._admit(keys=keys, args=args), self.timeout_s)
        except _UNAVAILABLE as exc:
            self._unavailable(exc)
            # The script may have run before the reply was lost: the lease is
            # still released (ZREM of an absent member is harmless) or expires.
            return lease
        admitted, refused, retry_ms, _count = (int(x) for x in reply)
        if admitted:
            return lease
        if self.metrics is not None:
            self.metrics.errors.labels(
                "rate_limited_turns" if refused == 1 else "rate_limited_streams"
            ).inc()
        if refused == 1:
            retry_s = max(1, math.ceil(retry_ms / 1000))
            raise RateLimited(
                "turns_per_minute", retry_s,
                f"this tenant may start {self.turns_per_minute} turns per minute; "
                f"retry in {retry_s} s",
            )  # fmt: skip
        raise RateLimited(
            "streams", STREAMS_RETRY_AFTER_S,
            f"this tenant may have {self.max_streams} streams at once; retry when one ends",
        )  # fmt: skip

    def _unavailable(self, exc: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels("rate_limit_unavailable").inc()
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            log.warning(
                "rate limits unavailable (Redis: %s); failing %s",
                type(exc).__name__ if not str(exc) else exc,
                self.fail_mode,
            )
        if self.fail_mode == "closed":
            raise RateLimitUnavailable("rate limits cannot be checked: Redis unavailable")

    async def renew(self, tenant: str, member: str) -> bool | None:
        """Pushes a lease's deadline ``stream_lease_s`` ahead. False if the lease
        is gone; None if Redis did not answer (the lease stays as it was)."""
        self.round_trips += 1
        try:
            return bool(
                await asyncio.wait_for(
                    self._renew(keys=[streams_key(tenant)], args=[member, self._lease_ms]),
                    self.timeout_s,
                )
            )
        except _UNAVAILABLE as exc:
            log.debug("stream lease not renewed: %s", exc)
            return None

    async def release(self, tenant: str, member: str) -> None:
        """Gives a stream slot back; if Redis cannot be reached, the lease expires."""
        if self.max_streams <= 0:
            return
        self.round_trips += 1
        try:
            await asyncio.wait_for(self.redis.zrem(streams_key(tenant), member), self.timeout_s)
        except _UNAVAILABLE as exc:
            log.debug("stream lease not released (it will expire): %s", exc)

    async def streams_held(self, tenant: str) -> int:
        """Live leases of ``tenant`` (expired ones not counted); for tests and ops."""
        t = await self.redis.time()
        now_ms = int(t[0]) * 1000 + int(t[1]) // 1000
        return int(await self.redis.zcount(streams_key(tenant), f"({now_ms}", "+inf"))
