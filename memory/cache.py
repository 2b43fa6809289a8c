"""One cache layer: a bounded in-process LRU (L1) over Redis (L2), for every kind of
cached result tiermem keeps.

Kinds (``CacheName``) and who uses them:

- ``response``: whole LLM replies to deterministic requests (memory/response_cache.py);
- ``embedding``: vectors by model and text (memory/embedding_cache.py);
- ``tool``: results of MCP tools the config marks cacheable (graph/tools.py);
- ``retrieval``: a turn's L3 hits, per session (graph/nodes.py);
- ``summary``: an archived batch's summary, by batch id, model and prompt version
  (memory/archiver.py), so a retried archive never pays the LLM twice.

Rules, owned here:

- **Keys.** A caller gives the kind, a scope and the parts that change the result;
  the key is a SHA-256 of them (memory/keys.py ``CacheKeys``). The scope is the
  tenant (hash tag ``{<tenant>}``) or one session (``{<tenant>:<session>}``, so
  forgetting the session deletes its entries with the rest of its keys). L1 holds
  tenant-scoped entries only: a session's entries must vanish on every pod when
  it is forgotten, and only L2 can promise that.
- **TTLs** are per kind and jittered by ±10%, so entries written together do not
  expire together (no synchronised recomputation).
- **Single flight.** On a miss, one computation per key: in this process callers
  share one future; across pods the first takes a short Redis lease (``SET NX
  PX``) and the others poll L2 for its result for a bounded time, then compute
  themselves (a dead lease holder costs a wait, never a failure). Session-scoped
  entries take no lease: only the pod holding the session computes them.
- **What is never cached**: errors (the computation raised), results the caller
  calls uncacheable (a partial stream, an empty reply), entries over the size cap.
  An explicit short-lived ``empty`` marker is stored for results the caller calls
  empty (a retrieval that found nothing), so a key that has no value is not
  recomputed on every lookup either.
- **Off switches**: ``TIERMEM_CACHE=off`` for all, ``TIERMEM_CACHE_<KIND>=false``
  per kind, and a caller's ``bypass`` reason (``Cache-Control: no-cache``, a
  non-deterministic request): then nothing is read or written.
- **Redis down** is a miss (and a skipped write), never an error: the cache is an
  optimisation.

Metrics: ``tiermem_cache_hits_total{cache,tier}``, ``tiermem_cache_misses_total``,
``tiermem_cache_bypass_total{cache,reason}``, ``tiermem_cache_singleflight_waits_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import orjson

from infra.redis_client import REDIS_ERRORS, RedisLike
from infra.settings import Settings
from memory.keys import CacheKeys
from memory.metrics import Metrics

log = logging.getLogger("tiermem.cache")

CacheName = Literal["response", "embedding", "tool", "retrieval", "summary"]
CACHE_NAMES: tuple[CacheName, ...] = ("response", "embedding", "tool", "retrieval", "summary")
Outcome = Literal["hit", "miss", "bypass"]
JITTER = 0.10
_EMPTY = b"\x00empty"
_POLL_FIRST_S = 0.01
_POLL_MAX_S = 0.2

T = TypeVar("T")


@dataclass(frozen=True)
class CachePolicy:
    """How one kind is cached."""

    ttl_s: float
    enabled: bool = True
    # A marker for "computed, found nothing", kept this long (0: not stored).
    empty_ttl_s: float = 0.0
    max_entry_bytes: int = 512 * 1024


@dataclass(frozen=True)
class Scope:
    """Whose entry: a tenant's, one session's (deleted with the session), or, with
    ``tenant`` None, every tenant's (only for what no tenant's data shapes)."""

    tenant: str | None
    session_id: str | None = None


@dataclass
class Cached(Generic[T]):
    """A lookup's answer: the value (None for a cached empty result), and how it
    was had: ``hit`` (from L1 or L2, or from another caller's computation),
    ``miss`` (computed here), ``bypass`` (the cache was not used)."""

    value: T | None
    outcome: Outcome
    tier: Literal["l1", "l2", "flight", ""] = ""


class _Lru:
    """A bounded LRU of encoded entries with their expiry times."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            self._pop(key)
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: str, raw: bytes, expires_at: float) -> None:
        if self.max_entries <= 0 or len(raw) > self.max_bytes // 4:
            return
        self._pop(key)
        self._entries[key] = (expires_at, raw)
        self.bytes += len(raw)
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._pop(oldest)

    def _pop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= len(entry[1])

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def jittered(ttl_s: float, rng: random.Random | None = None) -> float:
    """``ttl_s`` ±10%, uniformly."""
    r = (rng or random).uniform(-JITTER, JITTER)
    return max(0.001, ttl_s * (1.0 + r))


def digest(parts: Any) -> str:
    """A stable hash of JSON-like ``parts`` (dict keys sorted)."""
    raw = orjson.dumps(parts, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return hashlib.sha256(raw).hexdigest()


class Cache:
    """The layer. ``fetch`` is the whole protocol for callers; ``get``/``put`` are
    for callers that compute in pieces (a streamed reply)."""

    @classmethod
    def from_settings(cls, s: Settings, redis: RedisLike, metrics: Metrics) -> Cache:
        cap = s.cache_max_entry_bytes
        policies = {
            "response": CachePolicy(s.cache_response_ttl_s, s.cache_response, max_entry_bytes=cap),
            "embedding": CachePolicy(s.cache_embedding_ttl_s, s.cache_embedding,
                                     max_entry_bytes=cap),
            # Each cacheable tool names its own TTL (TIERMEM_MCP_CONFIG); this is
            # the default for one that does not.
            "tool": CachePolicy(300.0, s.cache_tool, max_entry_bytes=cap),
            "retrieval": CachePolicy(float(s.retrieval_cache_ttl_s), s.cache_retrieval,
                                     empty_ttl_s=s.cache_empty_ttl_s, max_entry_bytes=cap),
            "summary": CachePolicy(s.cache_summary_ttl_s, s.cache_summary, max_entry_bytes=cap),
        }  # fmt: skip
        return cls(
            redis, metrics, policies, enabled=s.cache == "on", l1_entries=s.cache_l1_entries,
            l1_bytes=s.cache_l1_bytes, lease_s=s.cache_lease_s, wait_s=s.cache_wait_s,
        )  # fmt: skip

    def __init__(
        self,
        redis: RedisLike,
        metrics: Metrics,
        policies: Mapping[str, CachePolicy],
        *,
        enabled: bool = True,
        l1_entries: int = 10_000,
        l1_bytes: int = 64 * 1024 * 1024,
        lease_s: float = 10.0,
        wait_s: float = 10.0,
    ) -> None:
        self.redis = redis
        self.metrics = metrics
        self.policies = dict(policies)
        self.enabled = enabled
        self.lease_s = lease_s
        self.wait_s = wait_s
        self.l1 = _Lru(l1_entries, l1_bytes)
        self._flights: dict[str, asyncio.Future[bytes | None]] = {}
        self._owner = f"{id(self):x}-{random.getrandbits(48):012x}"

    # --- switches ------------------------------------------------------------------
    def bypass_reason(self, name: CacheName, requested: str | None = None) -> str | None:
        """Why ``name`` is not used now (None: it is)."""
        if not self.enabled:
            return "off"
        policy = self.policies.get(name)
        if policy is None or not policy.enabled:
            return "kind_off"
        return requested

    def bypassed(self, name: CacheName, requested: str | None = None) -> str | None:
        """``bypass_reason``, counted in ``tiermem_cache_bypass_total`` when there is one."""
        reason = self.bypass_reason(name, requested)
        if reason is not None:
            self.metrics.cache_bypass.labels(name, reason).inc()
        return reason

    def key(self, name: CacheName, scope: Scope, parts: Any) -> str:
        return CacheKeys(scope.tenant, scope.session_id).entry(name, digest(parts))

    # --- reads and writes ----------------------------------------------------------
    async def get(self, name: CacheName, scope: Scope, parts: Any) -> Cached[bytes]:
        """The cached raw value, or a miss (a cached empty result: a hit with None)."""
        if self.bypassed(name) is not None:
            return Cached(None, "bypass")
        key = self.key(name, scope, parts)
        found = await self._read(key, scope)
        if found is None:
            self.metrics.cache_misses.labels(name).inc()
            return Cached(None, "miss")
        raw, tier = found
        self.metrics.cache_hits.labels(name, tier).inc()
        return Cached(None if raw == _EMPTY else raw, "hit", tier)

    async def put(
        self, name: CacheName, scope: Scope, parts: Any, raw: bytes | None,
        *, ttl_s: float | None = None,
    ) -> bool:  # fmt: skip
        """Stores ``raw`` (None: the empty marker, if the kind keeps one). False
        when it was not stored (off, over the cap, Redis down)."""
        if self.bypass_reason(name) is not None:
            return False
        return await self._write(name, self.key(name, scope, parts), scope, raw, ttl_s)

    async def fetch(
        self,
        name: CacheName,
        scope: Scope,
        parts: Any,
        compute: Callable[[], Awaitable[T]],
        *,
        encode: Callable[[T], bytes],
        decode: Callable[[bytes], T],
        cacheable: Callable[[T], bool] = lambda _v: True,
        empty: Callable[[T], bool] = lambda _v: False,
        bypass: str | None = None,
        ttl_s: float | None = None,
    ) -> Cached[T]:
        """The value for ``parts``: cached, or computed once (single flight) and
        stored. ``compute`` raising is passed through and caches nothing; a value
        ``cacheable`` refuses is returned and not stored; one ``empty`` calls empty
        is stored as the empty marker (and a hit on it gives ``value=None``).
        ``ttl_s`` replaces the kind's TTL (a tool's own, say)."""
        if self.bypassed(name, bypass) is not None:
            return Cached(await compute(), "bypass")
        key = self.key(name, scope, parts)
        found = await self._read(key, scope)
        if found is not None:
            raw, tier = found
            self.metrics.cache_hits.labels(name, tier).inc()
            return Cached(None if raw == _EMPTY else decode(raw), "hit", tier)
        flight = self._flights.get(key)
        if flight is not None:
            # Someone in this process computes it now: share its result.
            self.metrics.cache_waits.labels(name, "process").inc()
            shared = await asyncio.shield(flight)
            if shared is not None:
                self.metrics.cache_hits.labels(name, "flight").inc()
                return Cached(None if shared == _EMPTY else decode(shared), "hit", "flight")
            # Theirs failed or was not cacheable: compute our own.
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._flights.setdefault(key, future)
        leased = False
        try:
            # A session's entries are computed by the pod that holds the session
            # (one turn at a time, one archiver by its own lease): no pod to
            # race, so no lease round trips on the turn's path.
            leased = scope.session_id is None and await self._lease(key)
            theirs = None
            if leased:
                # Another pod may have stored it and let the lease go between
                # this pod's read and its lease: read once more (a miss is
                # about to pay for a computation; this is one round trip).
                again = await self._read(key, scope)
                theirs = again[0] if again is not None else None
            elif scope.session_id is None:
                theirs = await self._wait_for(name, key, scope)
            if theirs is not None:
                self.metrics.cache_hits.labels(name, "flight").inc()
                future.set_result(theirs)
                return Cached(None if theirs == _EMPTY else decode(theirs), "hit", "flight")
            self.metrics.cache_misses.labels(name).inc()
            value = await compute()
            stored: bytes | None = None
            if empty(value):
                stored = _EMPTY if await self._write(name, key, scope, None, ttl_s) else None
            elif cacheable(value):
                raw = encode(value)
                stored = raw if await self._write(name, key, scope, raw, ttl_s) else None
            future.set_result(stored)
            return Cached(value, "miss")
        finally:
            if not future.done():
                future.set_result(None)  # failed: those waiting compute their own
            if self._flights.get(key) is future:
                del self._flights[key]
            if leased:
                # Released at once, stored or not: waiting pods then read the
                # entry, or see the lease gone and compute themselves.
                await self._release(key)

    async def get_many(
        self, name: CacheName, scope: Scope, parts: list[Any]
    ) -> list[bytes | None] | None:
        """Raw values for many keys at once (None where missed), in one round trip
        for what L1 lacks; None when the cache is not used (off, or Redis down)."""
        if self.bypassed(name) is not None:
            return None
        found = await self._read_many([self.key(name, scope, p) for p in parts], scope)
        if found is None:
            return None
        for tier in ("l1", "l2"):
            n = sum(1 for f in found if f is not None and f[1] == tier)
            if n:
                self.metrics.cache_hits.labels(name, tier).inc(n)
        if missed := sum(1 for f in found if f is None):
            self.metrics.cache_misses.labels(name).inc(missed)
        return [f[0] if f is not None else None for f in found]

    async def put_many(self, name: CacheName, scope: Scope, items: list[tuple[Any, bytes]]) -> int:
        """Stores many entries in one round trip; returns how many were stored."""
        if not items or self.bypass_reason(name) is not None:
            return 0
        entries = [(self.key(name, scope, parts), raw, None) for parts, raw in items]
        return sum(await self._write_many(name, scope, entries))

    def clear_l1(self) -> int:
        """Empties this process's L1; returns how many entries it held."""
        n = len(self.l1)
        self.l1.clear()
        return n

    # --- internals -----------------------------------------------------------------
    async def _read(self, key: str, scope: Scope) -> tuple[bytes, Literal["l1", "l2"]] | None:
        found = await self._read_many([key], scope)
        return found[0] if found is not None else None

    async def _read_many(
        self, keys: list[str], scope: Scope
    ) -> list[tuple[bytes, Literal["l1", "l2"]] | None] | None:
        """Each key's raw value and the tier it came from (None: missed): L1 first
        (tenant entries only), then one pipeline for the rest, whose answers join
        L1 for what remains of their TTL. None when Redis did not answer."""
        now = time.monotonic()
        in_l1 = scope.session_id is None
        out: list[tuple[bytes, Literal["l1", "l2"]] | None] = [None] * len(keys)
        missing: list[int] = []
        for i, key in enumerate(keys):
            raw = self.l1.get(key, now) if in_l1 else None
            if raw is None:
                missing.append(i)
            else:
                out[i] = (raw, "l1")
        if not missing:
            return out
        try:
            pipe = self.redis.pipeline(transaction=False)
            for i in missing:
                pipe.get(keys[i])
                pipe.pttl(keys[i])
            replies = await pipe.execute()
        except REDIS_ERRORS as exc:
            log.debug("cache read skipped: %s", exc)
            return None
        for n, i in enumerate(missing):
            value, pttl = replies[2 * n], replies[2 * n + 1]
            if value is None:
                continue
            raw = bytes(value)
            out[i] = (raw, "l2")
            if in_l1 and isinstance(pttl, int) and pttl > 0:
                self.l1.put(keys[i], raw, now + pttl / 1000)
        return out

    async def _write(
        self, name: str, key: str, scope: Scope, raw: bytes | None, ttl_s: float | None = None
    ) -> bool:
        (stored,) = await self._write_many(name, scope, [(key, raw, ttl_s)])
        return stored

    async def _write_many(
        self, name: str, scope: Scope, entries: Sequence[tuple[str, bytes | None, float | None]]
    ) -> list[bool]:
        """Stores (key, raw, TTL override) entries in one pipeline; per entry,
        whether it was stored. ``raw`` None is the empty marker (with the kind's
        empty TTL; not stored where it has none). TTLs are jittered; an entry over
        the size cap is refused; tenant entries join L1."""
        policy = self.policies[name]
        stored = [False] * len(entries)
        kept: list[tuple[int, str, bytes, float]] = []
        for i, (key, raw, ttl_s) in enumerate(entries):
            if raw is None:
                if policy.empty_ttl_s > 0:
                    kept.append((i, key, _EMPTY, jittered(policy.empty_ttl_s)))
            elif len(raw) > policy.max_entry_bytes:
                self.metrics.cache_bypass.labels(name, "too_large").inc()
            else:
                kept.append((i, key, raw, jittered(ttl_s if ttl_s is not None else policy.ttl_s)))
        if not kept:
            return stored
        try:
            pipe = self.redis.pipeline(transaction=False)
            for _, key, raw, ttl in kept:
                pipe.set(key, raw, px=max(1, int(ttl * 1000)))
            await pipe.execute()
        except REDIS_ERRORS as exc:
            log.debug("cache write skipped: %s", exc)
            return stored
        now = time.monotonic()
        for i, key, raw, ttl in kept:
            stored[i] = True
            if scope.session_id is None:
                self.l1.put(key, raw, now + ttl)
        return stored

    async def _lease(self, key: str) -> bool:
        """True: this caller computes (it holds the lease, or Redis cannot say)."""
        try:
            got = await self.redis.set(
                CacheKeys.lease_of(key), self._owner, nx=True, px=int(self.lease_s * 1000)
            )
        except REDIS_ERRORS:
            return True
        return bool(got)

    async def _release(self, key: str) -> None:
        with contextlib.suppress(*REDIS_ERRORS):  # else it expires by itself
            await self.redis.delete(CacheKeys.lease_of(key))

    async def _wait_for(self, name: str, key: str, scope: Scope) -> bytes | None:
        """Another pod holds the lease: its result, polled from L2 until its lease
        goes or ``wait_s`` passes (then None: compute here)."""
        self.metrics.cache_waits.labels(name, "pod").inc()
        deadline = time.monotonic() + self.wait_s
        delay = _POLL_FIRST_S
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_S)
            found = await self._read(key, scope)
            if found is not None:
                return found[0]
            try:
                if not await self.redis.exists(CacheKeys.lease_of(key)):
                    # The holder gave up (failed, or its result was not cacheable).
                    found = await self._read(key, scope)
                    return found[0] if found is not None else None
            except REDIS_ERRORS:
                return None
        return None
