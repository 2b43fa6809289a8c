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

Coherence across pods, with no read on an L1 hit: a load from L2 lists this pod
among the session's ``holders`` (same script); a commit makes its pod the only
holder, publishes the new version with the holders it displaced, and returns
only once each of them has dropped its copy and acknowledged (a sticky session
has no other holder, so its commit waits for nothing). A holder that does not
answer within HANDOFF_WAIT_S (dead, cut off) is suspected and not waited for
until it is heard from again; for it, the compare-and-set still catches a stale
copy, and the reply is stored marked ``stale_context``.

Nodes of the turn graph orchestrate: they ask the facade, they never patch a
``SessionState``. Redis failures surface as ``StorageUnavailable`` once the
commit deadline is spent, so a short outage still completes the turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from infra.errors import Unavailable
from memory.keys import ACK_TAG, thread_of_meta_key
from memory.l1_pool import L1Pool
from memory.l2_store import (
    AlreadyCommitted,
    CheckpointWrite,
    CommitOutcome,
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
# Longest wait for the other holders' acknowledgements before `done`. Only a
# dead or cut-off pod lets it run out; that pod is then suspected and not
# waited for again until it is heard from.
HANDOFF_WAIT_S = 1.0
# Bound on the suspected pods remembered (pod ids of crashed pods pile up).
MAX_SUSPECTS = 1024

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
        pod_id: str | None = None,
    ) -> None:
        self.l1 = l1
        self.l2 = l2
        self.metrics = metrics
        self.commit_deadline_s = commit_deadline_s
        # Who this process is in a session's ``holders`` (new at every start: a
        # restarted pod holds nothing).
        self.pod_id = pod_id or _pod_id()
        # Commits of this pod in flight, by (session, version they publish):
        # the acknowledgements heard so far (see _await_handoff).
        self._handoffs: dict[tuple[tuple[str, str], int], _Handoff] = {}
        self._suspects: set[str] = set()
        self._acks: set[asyncio.Task[None]] = set()
        # Whether the invalidation channel is up (set by the app once it listens).
        self.listening: Callable[[], bool] = lambda: False
        # Sessions check_owner loaded from L2 for a turn about to run: that
        # turn's open() is the L1 miss, not a hit.
        self._preloaded: set[tuple[str, str]] = set()

    # --- reading ------------------------------------------------------------------
    @asynccontextmanager
    async def turn_lock(
        self, tenant: str, session_id: str, on_wait: Callable[[], None] | None = None
    ) -> AsyncIterator[None]:
        """Turns of one session run one at a time on this pod (``on_wait``: called
        when this one has to queue behind another)."""
        async with self.l1.session_turn(tenant, session_id, on_wait):
            yield

    async def check_owner(self, tenant: str, session_id: str, user_id: str) -> None:
        """Refuses (SessionUserMismatch, 409) a turn of another user than the one
        the session's first turn bound it to, before the turn starts. Free on an
        L1 hit; on a miss it is the turn's load (kept in L1 for its ``open``). A
        session L2 does not have is kept as new and bound to no one yet (a turn
        refused after this check, by the rate limits, binds nothing): its first
        turn does not ask L2 twice, and the commit's compare-and-set still
        refuses a session someone else created meanwhile."""
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
                state = _new_session(tenant, session_id, None)
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
        if session.user_id is None and session.version == 0:
            session.user_id = user_id  # a new session: its first turn binds it
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
        """From L2 into this pod's hands: the load lists this pod as a holder."""
        try:
            return await self.l2.load(tenant, session_id, holder=self.pod_id)
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
            handoff_key = ((session.tenant, session.session_id), session.version + 1)
            # Registered before the commit is sent: a holder's ack can be heard
            # before this coroutine sees the commit's reply.
            handoff = _Handoff() if self.listening() else None
            if handoff is not None:
                self._handoffs[handoff_key] = handoff
            try:
                outcome = await self.l2.commit_held(
                    session, turn, replace_last=replace, meta_updates=meta,
                    checkpoint=checkpoint, user_id=user_id, holder=self.pod_id,
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
                await self._await_handoff(handoff, outcome)
                return outcome.version
            finally:
                if handoff is not None:
                    self._handoffs.pop(handoff_key, None)

    async def _await_handoff(self, handoff: _Handoff | None, outcome: CommitOutcome) -> None:
        """Returns once every other pod that held the session has dropped its
        copy and said so, so a client that sends its next turn to one of them the
        moment it sees `done` finds no stale copy there. Free when this pod was
        the only holder (a sticky session): no wait, no round trip."""
        others = [pod for pod in outcome.others if pod not in self._suspects]
        if not others or handoff is None:
            # Nobody else held it, or this pod cannot hear acks while its
            # channel is down (the compare-and-set still catches a stale copy).
            return
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + HANDOFF_WAIT_S
        while not handoff.acked.issuperset(others):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            handoff.heard.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(handoff.heard.wait(), remaining)
        self.metrics.l1_handoff_waits.observe(loop.time() - start)
        missing = set(others) - handoff.acked
        if missing:
            log.warning("no L1 ack from pod(s) %s within %.1f s", sorted(missing), HANDOFF_WAIT_S)
            self.metrics.l1_ack_timeouts.inc(len(missing))
            if len(self._suspects) + len(missing) > MAX_SUSPECTS:
                self._suspects.clear()
            self._suspects |= missing

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
        """A message of the invalidation channel (infra/redis_channel.py listens).

        ``<meta key> <version> <writer> <holders...>``: another pod committed.
        An L1 copy older than ``version`` is dropped, so this pod never builds a
        prompt from it (the next turn reloads from L2); if this pod is among the
        holders the commit listed, it acknowledges, and the writer sends `done`
        only then. A forget publishes ``<meta key> <version>`` alone.

        ``ack <writer> <meta key> <version> <holder>``: a holder's answer to a
        commit of this pod."""
        words = payload.decode(errors="replace").split()
        if len(words) == 5 and words[0] == ACK_TAG:
            self._on_ack(*words[1:])
            return
        if len(words) < 2 or not words[1].isdigit():
            return
        thread = thread_of_meta_key(words[0])
        if thread is None:
            return
        writer = words[2] if len(words) > 2 else ""
        if writer == self.pod_id:
            return  # this pod's own commit
        version = int(words[1])
        state = self.l1.peek(*thread)
        if state is not None and state.version < version:
            self.l1.drop(*thread)
            self.metrics.l1_invalidations.labels("commit").inc()
        if self.pod_id in words[3:]:
            task = asyncio.get_running_loop().create_task(self._ack(writer, words[0], version))
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)

    def _on_ack(self, writer: str, meta_key: str, version: str, holder: str) -> None:
        self._suspects.discard(holder)  # heard from: alive
        thread = thread_of_meta_key(meta_key)
        if writer != self.pod_id or thread is None or not version.isdigit():
            return
        handoff = self._handoffs.get((thread, int(version)))
        if handoff is not None:
            handoff.acked.add(holder)
            handoff.heard.set()

    async def _ack(self, writer: str, meta_key: str, version: int) -> None:
        try:
            await self.l2.publish_ack(writer, meta_key, version, self.pod_id)
        except L2Error as exc:
            # The writer waits out HANDOFF_WAIT_S and suspects this pod.
            log.warning("L1 ack to pod %s not sent: %s", writer, exc)

    def on_channel_reset(self) -> None:
        """The invalidation channel was (re)subscribed: what was published while
        it was away is lost, so every L1 copy may be stale."""
        n = self.l1.clear()
        if n:
            self.metrics.l1_invalidations.labels("channel_reset").inc(n)


class _Handoff:
    """The acknowledgements heard for one commit of this pod."""

    __slots__ = ("acked", "heard")

    def __init__(self) -> None:
        self.acked: set[str] = set()
        self.heard = asyncio.Event()


def retryable_in_place(turn: Turn) -> bool:
    """A turn that a retry with its turn_id runs again in place: one that failed,
    or one cut short by a drain (the client was told to retry). A turn the client
    walked away from is kept as it is and replayed."""
    if turn.status == "failed":
        return True
    return turn.status == "interrupted" and (turn.usage or {}).get("interrupted_by") == "drain"


def _pod_id() -> str:
    """``<host>.<random>``: readable in logs, unique per process start."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:63] or "pod"
    return f"{host}.{uuid.uuid4().hex[:8]}"


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
