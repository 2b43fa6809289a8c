"""The session facade: the only writer of session state, in L1 and in L2.

Everything that changes what a pod holds of a session, or what Redis holds of
it, goes through ``Sessions``:

- ``open``: the session from L1 (no I/O on a hit), else from L2 in one round
  trip, else a new one; kept in L1;
- ``commit``: the turn appended with the compare-and-set script (one round trip),
  retried after a conflict on the fresh state, then applied to L1;
- ``apply_archive``: the archiver moved the cursor; L1 follows, under the
  session's lock, or forgets the session when it missed a commit;
- ``drop``: L1 forgets a session (release, idle eviction, an unknown outcome).

Nodes of the turn graph orchestrate: they ask the facade, they never patch a
``SessionState``. Redis failures surface as ``StorageUnavailable`` once the
commit deadline is spent, so a short outage still completes the turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from infra.errors import Unavailable
from memory.keys import thread_of_meta_key
from memory.l1_pool import L1Pool
from memory.l2_store import (
    AlreadyCommitted,
    CheckpointWrite,
    DurabilityMisconfigured,
    DurabilityTimeout,
    L2Error,
    L2Store,
    SessionUserMismatch,
    VersionConflict,
)
from memory.metrics import Metrics
from memory.models import RenderedMark, SessionState, Turn

# What a forget publishes: newer than any session's version, so every pod drops it.
FORGOTTEN_VERSION = 2**62

log = logging.getLogger("tiermem.sessions")

COMMIT_CONFLICT_RETRIES = 5
# Longest wait for a commit's own invalidation message before `done`.
ECHO_WAIT_S = 0.05

# Builds the checkpoint a commit writes, once the turn's index and the new
# version are known (they move when a conflict is retried).
CheckpointFor = Callable[[int, int, str | None], CheckpointWrite | None]


__all__ = ["Committed", "Opened", "SessionUserMismatch", "Sessions", "StorageUnavailable"]


class StorageUnavailable(Unavailable):
    """L2 could not be reached within the turn's deadline."""

    code = "storage_unavailable"
    default_message = "session storage unavailable; retry"


@dataclass(frozen=True, slots=True)
class Opened:
    session: SessionState
    l1_hit: bool


@dataclass(frozen=True, slots=True)
class Committed:
    """What a commit did. ``duplicate_of`` is set when another request stored
    this turn_id first (that one is kept: at most once)."""

    turn: Turn
    version: int
    duplicate_of: int | None = None


class Sessions:
    def __init__(
        self,
        l1: L1Pool,
        l2: L2Store,
        metrics: Metrics,
        *,
        commit_deadline_s: float,
    ) -> None:
        self.l1 = l1
        self.l2 = l2
        self.metrics = metrics
        self.commit_deadline_s = commit_deadline_s
        # A commit of this pod in flight, per session: the version it will
        # publish, so its own invalidation message is not taken for another's.
        self._committing: dict[tuple[str, str], int] = {}
        # This pod's own invalidation messages, awaited before a commit returns
        # (see commit); ``listening`` says whether the channel is up (set by
        # the app once it listens).
        self._echoes: dict[tuple[tuple[str, str], int], asyncio.Future[None]] = {}
        self.listening: Callable[[], bool] = lambda: False
        # Sessions check_owner loaded from L2 for a turn about to run: that
        # turn's open() is the L1 miss, not a hit.
        self._preloaded: set[tuple[str, str]] = set()

    # --- reading ------------------------------------------------------------------
    @asynccontextmanager
    async def turn_lock(self, tenant: str, session_id: str) -> AsyncIterator[None]:
        """Turns of one session run one at a time on this pod."""
        async with self.l1.session_turn(tenant, session_id):
            yield

    async def check_owner(self, tenant: str, session_id: str, user_id: str) -> None:
        """Refuses (SessionUserMismatch, 409) a turn of another user than the one
        the session's first turn bound it to, before the turn starts. Free on an
        L1 hit; on a miss it is the turn's load (kept in L1 for its ``open``)."""
        key = (tenant, session_id)
        state = self.l1.peek(tenant, session_id)
        if state is None:
            try:
                state = await self._load(tenant, session_id)
            except StorageUnavailable:
                # Redis is down: the turn itself reports that (its stream ends
                # with a retryable storage_unavailable), and the commit script
                # refuses another user's turn anyway.
                return
            if state is None:
                return  # a new session: its first turn binds it
            if len(self._preloaded) > 10_000:
                self._preloaded.clear()  # turns that never started; only counters
            self._preloaded.add(key)
            self.l1.put(state)
        if state.user_id and state.user_id != user_id:
            raise SessionUserMismatch()

    async def open(self, tenant: str, session_id: str, user_id: str) -> Opened:
        """The session, bound to ``user_id``: a session belongs to the user of its
        first turn, and a turn of another user is refused (SessionUserMismatch,
        409) before anything is written."""
        key = (tenant, session_id)
        session: SessionState | None
        if key in self._preloaded:
            # check_owner loaded it for this turn: an L1 miss, already paid.
            self._preloaded.discard(key)
            session = self.l1.peek(tenant, session_id)
            hit = False
            self.l1.misses += 1
        else:
            session = self.l1.get(tenant, session_id)
            hit = session is not None
        self.metrics.l1_lookups.labels("hit" if hit else "miss").inc()
        if session is None:
            session = await self._load(tenant, session_id)
            if session is None:
                session = _new_session(tenant, session_id, user_id)
            self.l1.put(session)
        if session.user_id and session.user_id != user_id:
            raise SessionUserMismatch()
        return Opened(session, hit)

    async def stored_turn(self, tenant: str, session_id: str, turn_id: str) -> Turn | None:
        try:
            return await self.l2.committed_turn(tenant, session_id, turn_id)
        except L2Error as exc:
            raise StorageUnavailable(str(exc)) from exc

    async def tool_steps(self, tenant: str, session_id: str, turn_id: str) -> list[dict[str, Any]]:
        """What a turn in flight recorded of its tool steps (a retry resumes from it)."""
        try:
            return await self.l2.tool_steps(tenant, session_id, turn_id)
        except L2Error as exc:
            raise StorageUnavailable(str(exc)) from exc

    async def record_tool_step(
        self, tenant: str, session_id: str, turn_id: str, record: dict[str, Any]
    ) -> None:
        try:
            await self.l2.record_tool_step(tenant, session_id, turn_id, record)
        except L2Error as exc:
            raise StorageUnavailable(str(exc)) from exc

    async def _load(self, tenant: str, session_id: str) -> SessionState | None:
        try:
            return await self.l2.load(tenant, session_id)
        except L2Error as exc:
            raise StorageUnavailable(str(exc)) from exc

    # --- writing ------------------------------------------------------------------
    async def commit(
        self,
        session: SessionState,
        turn: Turn,
        *,
        user_id: str,
        prefix_version: str,
        compaction: tuple[int, str] | None,
        retry_of: int | None,
        rendered: RenderedMark | None,
        checkpoint_for: CheckpointFor,
        l1_hit: bool = False,
        agent: str = "",
    ) -> Committed:
        """Stores ``turn`` (appended, or in place of the failed turn ``retry_of``)
        and applies it to L1. ``rendered`` is the mark (length, digest) of the
        prompt + reply as sent, kept for the next turn's prefix accounting."""
        now = turn.created_at or time.time()
        meta = {"prefix_version": prefix_version, "updated_at": repr(now)}
        if agent and agent != session.agent:
            meta["agent"] = agent
        if compaction is not None:
            meta["context_start"] = str(compaction[0])
            meta["context_summary"] = compaction[1]
        new = session.version == 0
        if new:
            meta["created_at"] = repr(session.created_at or now)
        try:
            version = await self._commit_with_retry(
                session, turn, meta, user_id, retry_of, checkpoint_for, l1_hit
            )
        except AlreadyCommitted as dup:
            # Another pod stored this turn_id while we generated: keep theirs;
            # this pod's L1 has not seen it, so forget the session.
            self.l1.drop(session.tenant, session.session_id)
            return Committed(turn, session.version, duplicate_of=dup.index)
        if session.turns and session.turns[-1].index == turn.index:
            session.turns[-1] = turn
        else:
            session.turns.append(turn)
        session.version = version
        session.turn_count = turn.index
        session.user_id = user_id
        session.updated_at = now
        session.prefix_version = prefix_version
        session.agent = agent or session.agent
        if compaction is not None:
            session.context_start, session.context_summary = compaction
            session.turns = [t for t in session.turns if t.index >= session.context_start]
        session.last_rendered = rendered
        self.l1.put(session)
        if new:
            await self._index(session, user_id, float(meta["created_at"]))
        return Committed(turn, version)

    async def _index(self, session: SessionState, user_id: str, created_at: float) -> None:
        """A new session joins the tenant's index (GET /v1/sessions). One round
        trip on a session's first turn only; a failure costs the listing, not the
        turn (forgetting a user also scans for sessions the index missed)."""
        try:
            await self.l2.index_session(session.tenant, session.session_id, user_id, created_at)
        except L2Error as exc:
            log.warning("session %s not indexed: %s", session.session_id, exc)

    # --- forgetting -----------------------------------------------------------------
    async def forget(self, tenant: str, session_id: str, guard_s: int) -> dict[str, Any]:
        """Deletes the session from L2 and from every pod's L1. Its id is refused
        for ``guard_s`` (a marker key), so a turn in flight cannot commit it back
        and an archive in flight deletes what it wrote. Returns what it removed."""
        try:
            meta = await self.l2.read_meta(tenant, session_id)
            await self.l2.mark_forgotten(tenant, session_id, guard_s)
            keys = await self.l2.delete_session(tenant, session_id)
            user = meta.user_id if meta is not None else None
            await self.l2.unindex_session(tenant, session_id, user)
            # Every pod drops its copy: no version is newer than this.
            await self.l2.publish_version(tenant, session_id, FORGOTTEN_VERSION)
        except L2Error as exc:
            raise StorageUnavailable(str(exc)) from exc
        self.l1.drop(tenant, session_id)
        return {"l2_keys": keys, "user_id": user, "existed": meta is not None}

    async def _commit_with_retry(
        self,
        session: SessionState,
        turn: Turn,
        meta: dict[str, str],
        user_id: str,
        retry_of: int | None,
        checkpoint_for: CheckpointFor,
        l1_hit: bool,
    ) -> int:
        deadline = time.monotonic() + self.commit_deadline_s
        conflicts = 0
        delay = 0.05
        while True:
            last = session.turns[-1] if session.turns else None
            replace = (
                retry_of is not None
                and session.turn_count == retry_of
                and last is not None
                and last.index == retry_of
                and retryable_in_place(last)
            )
            turn.index = retry_of if replace and retry_of is not None else session.turn_count + 1
            checkpoint = checkpoint_for(turn.index, session.version + 1, session.checkpoint_id)
            key = (session.tenant, session.session_id)
            self._committing[key] = session.version + 1
            echo: asyncio.Future[None] | None = None
            echo_key = (key, session.version + 1)
            if self.listening():
                echo = asyncio.get_running_loop().create_future()
                self._echoes[echo_key] = echo
            try:
                version = await self.l2.commit(
                    session, turn, replace_last=replace, meta_updates=meta,
                    checkpoint=checkpoint, user_id=user_id,
                )  # fmt: skip
            except SessionUserMismatch:
                # Another pod bound the session to another user meanwhile.
                self.l1.drop(session.tenant, session.session_id)
                raise
            except (DurabilityTimeout, DurabilityMisconfigured):
                # Stored on the primary but not as durable as TIERMEM_ACK asks:
                # not acknowledged (the stream ends with this error, never
                # ``done``), and not retried here (a retry of the commit would
                # find its own turn and call it a duplicate). L1 forgets the
                # session, so its next turn reloads what L2 really has.
                self.l1.drop(session.tenant, session.session_id)
                raise
            except VersionConflict:
                # Someone else committed (another pod, or the archiver) before this
                # pod heard of it: reload and append after their turn. The reply
                # was streamed already, so it stands, stored with the mark
                # ``stale_context`` (its prompt missed that commit).
                conflicts += 1
                if conflicts == 1:
                    fresh_meta = await self._load(session.tenant, session.session_id)
                    if fresh_meta is None or fresh_meta.turn_count != session.turn_count:
                        if turn.usage is None:
                            turn.usage = {}
                        # In place: the caller reports this dict in `done`.
                        turn.usage["stale_context"] = True
                        self.metrics.stale_prompts.inc()
                        if l1_hit:
                            self.metrics.l1_lookups.labels("stale").inc()
                            self.l1.stale_hits += 1
                    if fresh_meta is not None:
                        _refresh(session, fresh_meta)
                        continue
                if conflicts > COMMIT_CONFLICT_RETRIES:
                    raise
                fresh = await self._load(session.tenant, session.session_id)
                if fresh is None:
                    # L2 lost the session (a Redis without persistence restarted,
                    # a failover to a replica that had not synced): what it held
                    # is gone, but the session goes on from an empty state rather
                    # than failing forever against a version L2 no longer has.
                    log.error("session vanished from L2; starting it again")
                    self.metrics.errors.labels("session_vanished").inc()
                    fresh = _new_session(session.tenant, session.session_id, session.user_id)
                _refresh(session, fresh)
            except L2Error as exc:
                # Redis down or restarting: keep trying until the deadline, so a
                # short outage still completes the turn.
                if time.monotonic() + delay > deadline:
                    self.l1.drop(session.tenant, session.session_id)
                    raise StorageUnavailable(str(exc)) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            else:
                if checkpoint is not None:
                    session.checkpoint_id = checkpoint.checkpoint_id
                if echo is not None:
                    # Wait for this commit's own invalidation message: Redis
                    # writes it to every subscribed pod in the same pass, so once
                    # it is back here the other pods have theirs, and a client
                    # that sends its next turn to another pod the moment it sees
                    # `done` finds that pod's copy dropped. A loop turn or two
                    # normally, never a round trip; bounded if it never comes.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(echo), ECHO_WAIT_S)
                return version
            finally:
                self._committing.pop(key, None)
                if echo is not None:
                    self._echoes.pop(echo_key, None)

    async def apply_archive(
        self, tenant: str, session_id: str, version: int, archived_upto: int, summary: str
    ) -> None:
        """The archiver moved the cursor of a session to ``archived_upto`` at
        ``version``. Runs under the session's lock, so it never interleaves with
        a turn's commit on this pod."""
        if (tenant, session_id) not in self.l1:
            return
        async with self.l1.session_turn(tenant, session_id):
            state = self.l1.get(tenant, session_id)
            if state is None:
                return
            if state.version >= version:
                # Reloaded or committed after the advance (a commit on an older
                # version fails its compare-and-set and reloads): it has it.
                return
            if state.version == version - 1:
                state.version = version
                state.archived_upto = archived_upto
                state.summary = summary
                state.summary_upto = archived_upto
            else:
                # L1 missed a commit elsewhere: forget it, the next turn reloads.
                self.l1.drop(tenant, session_id)

    def drop(self, tenant: str, session_id: str) -> bool:
        return self.l1.drop(tenant, session_id)

    # --- coherence across pods -------------------------------------------------
    def on_invalidation(self, payload: bytes) -> None:
        """Another writer committed ``<meta key> <version>``: an L1 copy older
        than that is dropped, so this pod never builds a prompt from it (the
        next turn reloads from L2). No round trip: the commit script published
        it to every pod (infra/redis_channel.py listens)."""
        key_b, _, version_b = payload.rpartition(b" ")
        thread = thread_of_meta_key(key_b.decode(errors="replace"))
        if thread is None or not version_b.isdigit():
            return
        version = int(version_b)
        echo = self._echoes.pop((thread, version), None)
        if echo is not None and not echo.done():
            echo.set_result(None)
        if self._committing.get(thread) == version:
            return  # this pod's own commit
        state = self.l1.peek(*thread)
        if state is not None and state.version < version:
            self.l1.drop(*thread)
            self.metrics.l1_invalidations.labels("commit").inc()

    def on_channel_reset(self) -> None:
        """The invalidation channel was (re)subscribed: what was published while
        it was away is lost, so every L1 copy may be stale."""
        n = self.l1.clear()
        if n:
            self.metrics.l1_invalidations.labels("channel_reset").inc(n)


def retryable_in_place(turn: Turn) -> bool:
    """A turn that a retry with its turn_id runs again in place: one that failed,
    or one cut short by a drain (the client was told to retry). A turn the client
    walked away from is kept as it is and replayed."""
    if turn.status == "failed":
        return True
    return turn.status == "interrupted" and (turn.usage or {}).get("interrupted_by") == "drain"


def _new_session(tenant: str, session_id: str, user_id: str | None) -> SessionState:
    now = time.time()
    return SessionState(tenant=tenant, session_id=session_id, user_id=user_id,
                        created_at=now, updated_at=now)  # fmt: skip


def _refresh(session: SessionState, fresh: SessionState) -> None:
    """Copies a freshly loaded state into the L1 object the turn holds."""
    last_rendered = session.last_rendered
    for name in SessionState.__slots__:
        setattr(session, name, getattr(fresh, name))
    session.last_rendered = last_rendered
