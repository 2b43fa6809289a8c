"""Per-tenant rate limits as the app applies them: turns per minute and
concurrent streams, admission, stream leases, and what to do when Redis is down.

The records and the scripts that check and take both limits in ONE round trip
live in memory/rate_limits.py (keys in memory/keys.py). This module decides
what they mean for a request:

- **Turns per minute**: at most N turns start in any 60-second window;
  ``Retry-After`` is the moment the oldest entry leaves the window.
- **Concurrent streams**: a running turn holds a lease and renews it every
  third of ``stream_lease_s``. A pod that dies (``kill -9``, OOM, lost node)
  stops renewing, so its slots come back within ``stream_lease_s``, never
  later. A stream refused for concurrency is told ``Retry-After: 1``: streams
  end at their own pace, and nothing better is known.

Refusals are ``RateLimited`` (429, ``rate_limited`` or ``too_many_streams``,
with ``Retry-After``), part of the ``TiermemError`` family that app/ maps to
HTTP in one place.

When Redis cannot be reached (or answers slower than ``timeout_s``), the
limiter **fails open** by default: the turn goes on, unlimited, and
``tiermem_errors_total{kind="rate_limit_unavailable"}`` counts it. A turn
needs Redis anyway (its commit retries, then ends with a retryable error), so
refusing it here would only add a second failure to the first. ``fail_mode =
"closed"`` refuses such turns with 503 (``RateLimitUnavailable``) instead, for
deployments that must never exceed a limit.
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
from typing import Literal

from infra.errors import TiermemError, Unavailable
from infra.redis_client import REDIS_ERRORS, RedisLike
from infra.settings import Settings
from memory.keys import RateLimitKeys
from memory.metrics import Metrics
from memory.rate_limits import Limit, RateLimitStore

log = logging.getLogger("tiermem.ratelimit")

# A stream refused for concurrency cannot know when a slot frees up.
STREAMS_RETRY_AFTER_S = 1
# What a limiter call may raise when Redis is down, refuses, or is too slow.
_UNAVAILABLE: tuple[type[BaseException], ...] = (*REDIS_ERRORS, OSError, TimeoutError)
# At most one "Redis unavailable" warning per this many seconds: a dead Redis
# would otherwise log once per turn.
_WARN_EVERY_S = 10.0

FailMode = Literal["open", "closed"]

_CODES: dict[Limit, str] = {"turns_per_minute": "rate_limited", "streams": "too_many_streams"}


class RateLimited(TiermemError):
    """A tenant is over one of its limits; retry after ``retry_after_s`` seconds."""

    code = "rate_limited"
    http_status = 429
    retryable = True
    default_message = "rate limited; retry later"

    def __init__(self, limit: Limit, retry_after_s: int, message: str) -> None:
        super().__init__(message, code=_CODES[limit], headers={"Retry-After": str(retry_after_s)})
        self.limit = limit
        self.retry_after_s = retry_after_s


class RateLimitUnavailable(Unavailable):
    """Redis could not be asked and the limiter fails closed."""

    code = "rate_limit_unavailable"
    default_message = "rate limits cannot be checked now; retry"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


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
        self.store = RateLimitStore(redis)
        self.turns_per_minute = turns_per_minute
        self.max_streams = max_streams
        self.stream_lease_s = stream_lease_s
        self.fail_mode = fail_mode
        self.timeout_s = timeout_s
        self.metrics = metrics
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
        # Before the round trip: a bad tenant is the caller's bug, never
        # something to fail open on when Redis happens to be down.
        RateLimitKeys(tenant)
        lease = StreamLease(self, tenant, member) if self.max_streams > 0 else None
        self.round_trips += 1
        try:
            answer = await asyncio.wait_for(
                self.store.admit(
                    tenant, member, turns_per_minute=self.turns_per_minute,
                    max_streams=self.max_streams, lease_ms=self._lease_ms,
                ),
                self.timeout_s,
            )  # fmt: skip
        except _UNAVAILABLE as exc:
            self._unavailable(exc)
            # The script may have run before the reply was lost: the lease is
            # still released (ZREM of an absent member is harmless) or expires.
            return lease
        if answer.admitted:
            return lease
        if self.metrics is not None:
            self.metrics.errors.labels(
                "rate_limited_turns"
                if answer.refused == "turns_per_minute"
                else "rate_limited_streams"
            ).inc()
        if answer.refused == "turns_per_minute":
            retry_s = max(1, math.ceil(answer.retry_ms / 1000))
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
            raise RateLimitUnavailable()

    async def renew(self, tenant: str, member: str) -> bool | None:
        """Pushes a lease's deadline ``stream_lease_s`` ahead. False if the lease
        is gone; None if Redis did not answer (the lease stays as it was)."""
        self.round_trips += 1
        try:
            return await asyncio.wait_for(
                self.store.renew(tenant, member, self._lease_ms), self.timeout_s
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
            await asyncio.wait_for(self.store.release(tenant, member), self.timeout_s)
        except _UNAVAILABLE as exc:
            log.debug("stream lease not released (it will expire): %s", exc)

    async def streams_held(self, tenant: str) -> int:
        """Live leases of ``tenant`` (expired ones not counted); for tests and ops."""
        return await self.store.streams_held(tenant)
