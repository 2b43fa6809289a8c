"""L1: the in-process pool of hot sessions on one pod.

An LRU bounded by session count and by bytes: what each session's objects take
in this process (``SessionState.approx_bytes``, checked against ``tracemalloc``),
plus the pool's own entry. A hit costs no I/O.
Each session also has an asyncio lock here, so two turns of one session on this
pod run one after the other; across pods the version compare-and-set of the L2
commit keeps state consistent.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from memory.models import SessionState, Turn

Key = tuple[str, str]

# What the pool itself spends per session, on top of ``SessionState.approx_bytes``:
# the entry, its key tuple, its float timestamp and its slot in the ordered dict.
ENTRY_BYTES = 256
# And per turn, for the size it keeps of each (a dict slot and a pair).
TURN_SIZE_BYTES = 112


@dataclass(slots=True)
class _Entry:
    state: SessionState
    size: int
    last_used: float
    # Each turn's size, by object (held, so its id cannot be reused): a commit
    # sizes only its new turn, not the whole live context again.
    turn_sizes: dict[int, tuple[Turn, int]]


class L1Pool:
    def __init__(self, max_sessions: int, max_bytes: int, idle_evict_s: float) -> None:
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self.idle_evict_s = idle_evict_s
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._locks: dict[Key, asyncio.Lock] = {}
        self._waiting: dict[Key, int] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        # Hits whose copy turned out stale at commit (another pod had committed).
        self.stale_hits = 0
        self.queued = 0  # turns waiting for their session's lock

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def peek(self, tenant: str, session_id: str) -> SessionState | None:
        """The session if held, without counting a lookup or touching the LRU."""
        entry = self._entries.get((tenant, session_id))
        return entry.state if entry is not None else None

    def get(self, tenant: str, session_id: str) -> SessionState | None:
        key = (tenant, session_id)
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        entry.last_used = time.monotonic()
        self._entries.move_to_end(key)
        return entry.state

    def put(self, state: SessionState) -> None:
        key = (state.tenant, state.session_id)
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        known = old.turn_sizes if old is not None else {}
        sizes: dict[int, tuple[Turn, int]] = {}

        def turn_bytes(turn: Turn) -> int:
            held = known.get(id(turn))
            n = held[1] if held is not None else turn.approx_bytes()
            sizes[id(turn)] = (turn, n)
            return n

        size = state.approx_bytes(turn_bytes)
        size += ENTRY_BYTES + TURN_SIZE_BYTES * len(sizes)
        self._entries[key] = _Entry(state, size, time.monotonic(), sizes)
        self.bytes += size
        self._shrink()

    def drop(self, tenant: str, session_id: str) -> bool:
        key = (tenant, session_id)
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self.bytes -= entry.size
        return True

    def clear(self) -> int:
        """Forgets every session (their turns in progress keep their objects and
        put them back at commit, once the compare-and-set says they are current)."""
        n = len(self._entries)
        self._entries.clear()
        self.bytes = 0
        return n

    def evict_idle(self, now: float | None = None) -> int:
        """Drops sessions idle longer than ``idle_evict_s`` and not in a turn."""
        now = time.monotonic() if now is None else now
        victims = [
            k
            for k, e in self._entries.items()
            if now - e.last_used > self.idle_evict_s and not self._busy(k)
        ]
        for k in victims:
            self.drop(*k)
            self.evictions += 1
        return len(victims)

    def _busy(self, key: Key) -> bool:
        lock = self._locks.get(key)
        return lock is not None and lock.locked()

    def _shrink(self) -> None:
        # Oldest first; a session in the middle of a turn is skipped (its state
        # object is still referenced by the turn, and it would be re-added at commit).
        if len(self._entries) <= self.max_sessions and self.bytes <= self.max_bytes:
            return
        for key in list(self._entries):
            if len(self._entries) <= self.max_sessions and self.bytes <= self.max_bytes:
                break
            if self._busy(key) and len(self._entries) > 1:
                continue
            self.drop(*key)
            self.evictions += 1

    @asynccontextmanager
    async def session_turn(
        self, tenant: str, session_id: str, on_wait: Callable[[], None] | None = None
    ) -> AsyncIterator[None]:
        """Serialises the turns of one session on this pod; ``on_wait`` is called
        first when another turn holds the session (this one will queue)."""
        key = (tenant, session_id)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        self._waiting[key] = self._waiting.get(key, 0) + 1
        waited = lock.locked()
        if waited:
            self.queued += 1
            if on_wait is not None:
                on_wait()
        try:
            await lock.acquire()
        finally:
            if waited:
                self.queued -= 1
        try:
            yield
        finally:
            lock.release()
            self._waiting[key] -= 1
            if self._waiting[key] == 0:
                # Nobody else holds or waits for it: forget the lock so the map
                # does not grow with every session ever seen.
                del self._waiting[key]
                del self._locks[key]

    @property
    def hit_ratio(self) -> float:
        """Hits that were current, over all lookups."""
        total = self.hits + self.misses
        return (self.hits - self.stale_hits) / total if total else 0.0
