"""The Redis side of per-tenant rate limits: the Lua scripts and what they keep.

Both limits of a tenant live under its own hash tag (``RateLimitKeys`` in
memory/keys.py), so one script checks and takes both in ONE round trip, on one
Redis Cluster slot:

| key | zset of | score (ms) | TTL |
|---|---|---|---|
| ``tm:rl:{<tenant>}:turns`` | admitted turns | start | 61 s |
| ``tm:rl:{<tenant>}:streams`` | running streams | lease deadline | 2 x lease, refreshed |

- Turns per minute is a sliding-window log: entries older than ``WINDOW_MS`` are
  dropped, and a turn is refused when the window holds the limit. At most N
  turns start in any window, exactly; the retry time is the moment the oldest
  entry leaves it.
- Concurrent streams are leases scored with their deadline; expired leases are
  dropped before counting, so the slots of a pod that died come back when its
  leases run out.

Times come from Redis ``TIME`` inside the scripts: one clock for every pod. A
refused request takes nothing (no window entry, no lease).

This module only talks to Redis: no timeouts, no failure policy. What a refusal
or an unreachable Redis means for a request is app/ratelimit.py's decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from infra.redis_client import RedisLike
from memory.keys import RateLimitKeys

WINDOW_MS = 60_000

Limit = Literal["turns_per_minute", "streams"]

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

_REFUSED: dict[int, Limit] = {1: "turns_per_minute", 2: "streams"}


@dataclass(frozen=True)
class Admission:
    """What the admission script answered."""

    admitted: bool
    refused: Limit | None  # the limit that refused it, when not admitted
    retry_ms: int  # turns_per_minute: until the oldest entry leaves the window
    count: int  # entries of the limit that decided


class RateLimitStore:
    """The rate-limit records of every tenant, each operation one round trip.

    Every method raises what the Redis client raises (connection errors,
    timeouts); the caller decides what a failure means.
    """

    def __init__(self, redis: RedisLike) -> None:
        self.redis = redis
        self._admit = redis.register_script(ADMIT)
        self._renew = redis.register_script(RENEW)

    async def admit(
        self, tenant: str, member: str, *, turns_per_minute: int, max_streams: int, lease_ms: int
    ) -> Admission:
        """Takes a window entry and a stream lease (``member``), or neither.

        A limit of 0 is off: it is neither checked nor recorded.
        """
        keys = RateLimitKeys(tenant)
        args: list[Any] = [turns_per_minute, max_streams, lease_ms, member, WINDOW_MS]
        reply = await self._admit(keys=[keys.turns, keys.streams], args=args)
        admitted, refused, retry_ms, count = (int(x) for x in reply)
        return Admission(bool(admitted), _REFUSED.get(refused), retry_ms, count)

    async def renew(self, tenant: str, member: str, lease_ms: int) -> bool:
        """Pushes a lease's deadline ``lease_ms`` ahead; False if it is gone."""
        return bool(
            await self._renew(keys=[RateLimitKeys(tenant).streams], args=[member, lease_ms])
        )

    async def release(self, tenant: str, member: str) -> None:
        """Gives a stream lease back (absent already: nothing happens)."""
        await self.redis.zrem(RateLimitKeys(tenant).streams, member)

    async def streams_held(self, tenant: str) -> int:
        """Live leases of ``tenant``; expired ones that no script purged yet don't count."""
        t = await self.redis.time()
        now_ms = int(t[0]) * 1000 + int(t[1]) // 1000
        return int(await self.redis.zcount(RateLimitKeys(tenant).streams, f"({now_ms}", "+inf"))


__all__ = ["ADMIT", "RENEW", "WINDOW_MS", "Admission", "Limit", "RateLimitStore"]
