"""L2: the session's durable state in Redis (standalone or Cluster).

Owns the meta hash, the append-only turn log, turn idempotency records, the
archive lease, batch outbox records, the retrieval cache, and the per-turn
LangGraph checkpoint. Loading a session and committing a turn are one round
trip each; commit is a compare-and-set on the session version, so a pod with a
stale L1 can never overwrite newer state.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, cast

import orjson
from redis.exceptions import NoScriptError, ResponseError

from infra.errors import Conflict, Misconfigured, Unavailable
from infra.redis_client import REDIS_ERRORS, RedisLike, on_one_connection, scan_keys
from memory import l2_scripts
from memory.keys import (
    ACK_TAG,
    INVALIDATION_CHANNEL,
    META_SCAN_PATTERN,
    CacheKeys,
    SessionKeys,
    TenantKeys,
    split_thread_id,
    validate_id,
)
from memory.metrics import Metrics
from memory.models import SessionState, Turn

_PING_ERRORS: tuple[type[BaseException], ...] = (*REDIS_ERRORS, OSError)


# The session index lives this many session TTLs after the tenant's newest session.
INDEX_TTL_SESSIONS = 4


@dataclass(frozen=True, slots=True)
class CommitOutcome:
    """A stored commit: the session's new version, and the other pods whose L1
    copies it made stale (they acknowledge its invalidation)."""

    version: int
    others: tuple[str, ...] = ()


class L2Error(Unavailable):
    """Redis could not be reached or answered with an error."""

    code = "storage_unavailable"
    default_message = "session storage unavailable; retry"


class DurabilityTimeout(Unavailable):
    """The turn is stored on the primary, but not yet where ``TIERMEM_ACK`` says
    an acknowledged turn must be (a replica, the AOF) within the wait: it is not
    acknowledged. A retry with the same turn_id replays it once it is durable
    (or runs it again if a failover lost it)."""

    code = "durability_timeout"
    default_message = "the turn is not yet durable; retry with the same turn_id"


class DurabilityMisconfigured(Misconfigured):
    """Redis refused the durability wait (WAITAOF on a server without AOF or
    older than 7.2): an operator must fix TIERMEM_ACK or the server."""

    code = "durability_misconfigured"


AckMode = Literal["primary", "replica", "aof"]


class AlreadyCommitted(Conflict):
    """A turn with this turn_id is already in the log."""

    code = "duplicate_turn"

    def __init__(self, index: int) -> None:
        super().__init__(f"turn already stored as turn {index}")
        self.index = index


class SessionUserMismatch(Conflict):
    """The session belongs to another user: its first turn bound it."""

    code = "session_user_mismatch"
    default_message = "this session belongs to another user"


class SessionForgotten(Conflict):
    """The session was forgotten while this turn ran: the turn is not stored."""

    code = "session_forgotten"
    default_message = (
        "this session was just forgotten (deleted); its id is refused for a few minutes"
    )


class VersionConflict(Conflict):
    """Another writer committed since this state was loaded."""

    code = "version_conflict"
    retryable = True

    def __init__(self, current_version: int) -> None:
        super().__init__(f"session version moved to {current_version}")
        self.current_version = current_version


@dataclass(frozen=True, slots=True)
class CheckpointWrite:
    """A LangGraph checkpoint record, already encoded by the checkpointer's serde
    (graph/): L2 stores it in the commit's script without knowing its format."""

    checkpoint_id: str
    record: bytes
    ns: str = ""


@dataclass(frozen=True, slots=True)
class BatchRecord:
    batch_id: str
    status: str
    first: int
    last: int
    attempts: int
    next_try_at: float


def _flat_to_dict(flat: list[Any]) -> dict[str, str]:
    it = iter(flat)
    return {_s(k): _s(v) for k, v in zip(it, it, strict=True)}


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class L2Store:
    def __init__(
        self,
        redis: RedisLike,
        *,
        session_ttl_s: int,
        turn_record_ttl_s: int,
        checkpoints_kept: int = 2,
        metrics: Metrics | None = None,
        ack: AckMode = "primary",
        ack_timeout_ms: int = 1000,
        ack_replicas: int = 1,
    ) -> None:
        """``ack`` is what a commit waits for before it returns (TIERMEM_ACK):
        ``primary`` nothing more; ``replica`` ``WAIT ack_replicas`` replicas;
        ``aof`` ``WAITAOF 1 0``, the primary's AOF fsynced. Each wait gives up
        after ``ack_timeout_ms`` (DurabilityTimeout); keep it under the Redis
        socket timeout, or the read times out first."""
        if ack not in ("primary", "replica", "aof"):
            raise ValueError(f"unknown ack mode {ack!r}")
        if ack_timeout_ms < 1 or ack_replicas < 1:
            # WAIT 0 / WAITAOF with timeout 0 blocks forever.
            raise ValueError("ack_timeout_ms and ack_replicas must be at least 1")
        self.redis = redis
        self.ack = ack
        self.ack_timeout_ms = ack_timeout_ms
        self.ack_replicas = ack_replicas
        self.session_ttl_s = session_ttl_s
        self.turn_record_ttl_s = turn_record_ttl_s
        self.checkpoints_kept = max(1, checkpoints_kept)
        self._load = redis.register_script(l2_scripts.LOAD)
        self._commit = redis.register_script(l2_scripts.COMMIT)
        self._advance = redis.register_script(l2_scripts.ADVANCE)
        self._cut = redis.register_script(l2_scripts.CUT_BATCH)
        self._committed = redis.register_script(l2_scripts.COMMITTED_TURN)
        self._tool_step = redis.register_script(l2_scripts.RECORD_TOOL_STEP)
        self._index = redis.register_script(l2_scripts.INDEX_SESSION)
        # Round trips to Redis are what an L1 hit saves: counted as a metric
        # (tiermem_l2_round_trips_total), which the benchmarks and tests read.
        self._round_trips = (metrics or Metrics()).l2_round_trips

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        self._round_trips.inc()
        try:
            return await script(keys=keys, args=args)
        except REDIS_ERRORS as exc:
            raise L2Error(f"redis: {exc}") from exc

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except _PING_ERRORS:
            return False

    # --- sessions ---------------------------------------------------------------
    async def load(
        self, tenant: str, session_id: str, *, scope: str = "context", holder: str = ""
    ) -> SessionState | None:
        """The session with the turns of its live context (or its unarchived
        tail with ``scope="unarchived"``), in one round trip. ``holder``: the pod
        that keeps the copy in its L1, listed in the meta's ``holders`` in the
        same script (the next commit by another pod waits for its ack)."""
        k = SessionKeys(tenant, session_id)
        meta_flat, raw_turns = await self._run(self._load, [k.meta, k.log], [scope, holder])
        if not meta_flat:
            return None
        state = SessionState.from_meta(tenant, session_id, _flat_to_dict(meta_flat))
        state.turns = [Turn.decode(r) for r in raw_turns]
        return state

    async def read_meta(self, tenant: str, session_id: str) -> SessionState | None:
        """The session's meta without its turns."""
        k = SessionKeys(tenant, session_id)
        self._round_trips.inc()
        try:
            flat = await self.redis.hgetall(k.meta)
        except REDIS_ERRORS as exc:
            raise L2Error(f"redis: {exc}") from exc
        if not flat:
            return None
        return SessionState.from_meta(tenant, session_id, {_s(a): _s(b) for a, b in flat.items()})

    async def commit(
        self,
        state: SessionState,
        turn: Turn,
        *,
        replace_last: bool = False,
        meta_updates: dict[str, str] | None = None,
        checkpoint: CheckpointWrite | None = None,
        user_id: str,
    ) -> int:
        """``commit_held`` by no pod: the new version (benchmarks, tests)."""
        outcome = await self.commit_held(
            state, turn, replace_last=replace_last, meta_updates=meta_updates,
            checkpoint=checkpoint, user_id=user_id, holder="",
        )  # fmt: skip
        return outcome.version

    async def commit_held(
        self,
        state: SessionState,
        turn: Turn,
        *,
        replace_last: bool = False,
        meta_updates: dict[str, str] | None = None,
        checkpoint: CheckpointWrite | None = None,
        user_id: str,
        holder: str,
    ) -> CommitOutcome:
        """Append ``turn`` (or replace the last turn, retried in place) and bump the
        version, if L2 is still at ``state.version``. Returns the new version and
        the other pods that held the session (``holder``, the committing pod, is
        now its only holder); raises VersionConflict otherwise. ``checkpoint`` is
        written in the same script (``l2_scripts.PUT_CHECKPOINT``'s function), so
        LangGraph tooling sees every turn at no extra round trip."""
        k = SessionKeys(state.tenant, state.session_id)
        ns = checkpoint.ns if checkpoint is not None else ""
        fields: list[str] = []
        for name, field_value in (meta_updates or {}).items():
            fields += [name, field_value]
        keys = [
            k.meta,
            k.log,
            k.turn(turn.turn_id),
            k.cp(ns, checkpoint.checkpoint_id if checkpoint else "none"),
            k.cp_index(ns),
            k.cp_namespaces,
            k.forgotten,
        ]
        args = [state.version, turn.encode(), turn.index, "replace" if replace_last else "append",
                self.session_ttl_s, self.turn_record_ttl_s,
                checkpoint.checkpoint_id if checkpoint else "", checkpoint.record if checkpoint
                else b"", ns, self.checkpoints_kept, k.cp(ns, ""), k.cp_writes(ns, ""), user_id,
                holder, *fields]  # fmt: skip
        if self.ack == "primary":
            result = await self._run(self._commit, keys, args)
        else:
            result = await self._commit_durably(keys, args)
        ok, value = int(result[0]), int(result[1])
        if ok == 1:
            return CommitOutcome(value, tuple(_s(result[2]).split()))
        if ok == 0:
            raise VersionConflict(value)
        if ok == 2:
            # Stored before (by an attempt whose wait timed out or whose reply
            # was lost, or by another pod): acknowledged only once durable.
            await self.confirm_durable(state.tenant, state.session_id, turn.turn_id)
            raise AlreadyCommitted(value)
        if ok == 3:
            raise SessionUserMismatch()
        if ok == 4:
            raise SessionForgotten()
        # The log does not end where this state thinks: treat as a conflict.
        raise VersionConflict(-1)

    async def _commit_durably(self, keys: list[str], args: list[Any]) -> list[Any]:
        """The commit script, then the wait for ``self.ack``, on the connection that
        ran the script, in one round trip (``on_one_connection``). Returns the
        script's reply; raises DurabilityTimeout when the script committed
        but the wait came back short."""
        for _ in range(2):
            self._round_trips.inc()
            try:
                reply, waited = await on_one_connection(
                    self.redis, keys[0],
                    [("EVALSHA", self._commit.sha, len(keys), *keys, *args), self._wait_command()],
                )  # fmt: skip
            except REDIS_ERRORS as exc:
                raise L2Error(f"redis: {exc}") from exc
            if isinstance(reply, NoScriptError):
                # A restarted or failed-over server without the script: load it, again.
                try:
                    await self.redis.script_load(l2_scripts.COMMIT)
                except REDIS_ERRORS as exc:
                    raise L2Error(f"redis: {exc}") from exc
                continue
            if isinstance(reply, Exception):
                raise L2Error(f"redis: {reply}")
            if int(reply[0]) == 1:
                self._check_wait(waited)
            return list(reply)
        raise L2Error("redis: the commit script could not be loaded")

    def _wait_command(self) -> tuple[Any, ...]:
        if self.ack == "replica":
            return ("WAIT", self.ack_replicas, self.ack_timeout_ms)
        return ("WAITAOF", 1, 0, self.ack_timeout_ms)

    def _check_wait(self, waited: Any) -> None:
        if isinstance(waited, ResponseError):
            raise DurabilityMisconfigured(
                f"TIERMEM_ACK={self.ack}: redis refused the wait: {waited}"
            )
        if isinstance(waited, Exception):
            raise L2Error(f"redis: {waited}")
        if self.ack == "replica":
            got = int(waited)
            if got < self.ack_replicas:
                raise DurabilityTimeout(
                    f"the turn reached {got} of {self.ack_replicas} replicas within "
                    f"{self.ack_timeout_ms} ms; retry with the same turn_id"
                )
        elif int(waited[0]) < 1:
            raise DurabilityTimeout(
                f"the primary's AOF did not fsync the turn within {self.ack_timeout_ms} ms; "
                "retry with the same turn_id"
            )

    async def confirm_durable(self, tenant: str, session_id: str, turn_id: str) -> None:
        """Returns once a stored turn is as durable as ``self.ack`` says (at once
        with ``primary``); raises DurabilityTimeout otherwise. WAIT counts what its
        own connection wrote, so this connection writes first: it refreshes the
        turn record's TTL, a write the primary replicates and logs after the turn,
        so a replica (or the AOF) that has it has the turn."""
        if self.ack == "primary":
            return
        k = SessionKeys(tenant, session_id)
        self._round_trips.inc()
        try:
            touched, waited = await on_one_connection(
                self.redis, k.meta,
                [("PEXPIRE", k.turn(turn_id), self.turn_record_ttl_s * 1000), self._wait_command()],
            )  # fmt: skip
        except REDIS_ERRORS as exc:
            raise L2Error(f"redis: {exc}") from exc
        if isinstance(touched, Exception):
            raise L2Error(f"redis: {touched}")
        if int(touched) != 1:
            # No record, so nothing was written and the wait proves nothing.
            raise DurabilityTimeout("the turn's record is gone; retry with the same turn_id")
        self._check_wait(waited)

    async def committed_turn(self, tenant: str, session_id: str, turn_id: str) -> Turn | None:
        """The stored turn with this id, if it was committed (and is still kept).
        With ``ack`` other than ``primary`` a turn found is returned only once it
        is durable (``confirm_durable``): the caller may acknowledge it again."""
        k = SessionKeys(tenant, session_id)
        raw = await self._run(self._committed, [k.meta, k.log, k.turn(turn_id)], [])
        if not raw:
            return None
        turn = Turn.decode(raw)
        if turn.turn_id != turn_id:
            return None
        await self.confirm_durable(tenant, session_id, turn_id)
        return turn

    # --- tool steps of a turn in flight ------------------------------------------
    async def record_tool_step(
        self, tenant: str, session_id: str, turn_id: str, record: dict[str, Any]
    ) -> None:
        """Appends one record of a tool step (an intent before side-effecting
        calls run, or the step's results) to the turn's list: one round trip.
        Kept as long as the turn's idempotency record; the committed turn holds
        the same messages, so nothing reads the list once the turn is stored."""
        k = SessionKeys(tenant, session_id)
        await self._run(self._tool_step, [k.tool_steps(turn_id)],
                        [orjson.dumps(record), self.turn_record_ttl_s])  # fmt: skip

    async def tool_steps(self, tenant: str, session_id: str, turn_id: str) -> list[dict[str, Any]]:
        """The tool-step records of a turn, in the order they were written."""
        k = SessionKeys(tenant, session_id)
        self._round_trips.inc()
        try:
            raw = await self.redis.lrange(k.tool_steps(turn_id), 0, -1)
        except REDIS_ERRORS as exc:
            raise L2Error(f"redis: {exc}") from exc
        return [orjson.loads(r) for r in raw]

    async def read_turns(
        self, tenant: str, session_id: str, first: int, last: int, log_base: int
    ) -> list[Turn]:
        k = SessionKeys(tenant, session_id)
        self._round_trips.inc()
        try:
            raw = await self.redis.lrange(k.log, first - log_base, last - log_base)
        except REDIS_ERRORS as exc:
            raise L2Error(f"redis: {exc}") from exc
        return [Turn.decode(r) for r in raw]

    async def delete_session(self, tenant: str, session_id: str) -> int:
        """Deletes every key of the session but its forgotten marker; how many."""
        k = SessionKeys(tenant, session_id)
        self._round_trips.inc()
        try:
            keys = [key async for key in scan_keys(self.redis, f"{_glob_escape(k.base)}:*")]
            keys = [key for key in keys if _s(key) != k.forgotten]
            if keys:
                # One slot: a single DEL works on a cluster too.
                return int(await self.redis.delete(*keys))
        except REDIS_ERRORS as exc:
            raise L2Error(f"redis: {exc}") from exc
        return 0

    # --- the session index and forgetting -----------------------------------------
    async def index_session(
        self, tenant: str, session_id: str, user_id: str, created_at: float
    ) -> None:
        """A new session joins its tenant's and its user's index (its first commit)."""
        t = TenantKeys(tenant)
        # Longer than a session lives, renewed by each new session of the tenant:
        # an index outlives the sessions it lists unless the tenant starts none for
        # that long (then sessions it misses are still found by forgetting's scan).
        ttl = INDEX_TTL_SESSIONS * self.session_ttl_s
        await self._run(self._index, [t.sessions, t.user_sessions(user_id)],
                        [validate_id(session_id, "session_id"), created_at, ttl])  # fmt: skip

    async def list_sessions(
        self, tenant: str, user_id: str | None, before: float | None, limit: int
    ) -> tuple[list[tuple[str, float]], float | None]:
        """The tenant's (or user's) sessions, newest first: up to ``limit`` created
        before ``before``, and the cursor of the next page (None at the end).
        Sessions whose keys expired are dropped from the index as they are met."""
        t = TenantKeys(tenant)
        index = t.user_sessions(user_id) if user_id else t.sessions
        top = f"({before!r}" if before is not None else "+inf"
        found: list[tuple[str, float]] = []
        cursor = before
        try:
            while len(found) < limit:
                self._round_trips.inc()
                raw = await self.redis.zrevrangebyscore(
                    index, top, "-inf", start=0, num=limit, withscores=True
                )
                if not raw:
                    return found, None
                rows = cast("list[tuple[Any, float]]", raw)
                page = [(_s(m), float(score)) for m, score in rows]
                alive = [await self.redis.exists(SessionKeys(tenant, s).meta) for s, _ in page]
                gone = [s for (s, _), ok in zip(page, alive, strict=True) if not ok]
                if gone:
                    await self.redis.zrem(index, *gone)
                found += [p for p, ok in zip(page, alive, strict=True) if ok]
                cursor = page[-1][1]
                top = f"({cursor!r}"
                if len(raw) < limit:
                    return found[:limit], None
        except REDIS_ERRORS as exc:
            raise L2Error(f"redis: {exc}") from exc
        return found[:limit], (found[limit - 1][1] if len(found) >= limit else cursor)

    async def unindex_session(self, tenant: str, session_id: str, user_id: str | None) -> None:
        t = TenantKeys(tenant)
        self._round_trips.inc()
        try:
            await self.redis.zrem(t.sessions, session_id)
            if user_id:
                await self.redis.zrem(t.user_sessions(user_id), session_id)
        except REDIS_ERRORS as exc:
            raise L2Error(f"redis: {exc}") from exc

    async def user_sessions(self, tenant: str, user_id: str) -> list[str]:
        """Every indexed session of the user."""
        self._round_trips.inc()
        try:
            raw = await self.redis.zrange(TenantKeys(tenant).user_sessions(user_id), 0, -1)
        except REDIS_ERRORS as exc:
            raise L2Error(f"redis: {exc}") from exc
        return [_s(m) for m in raw]

    async def drop_user_index(self, tenant: str, user_id: str) -> None:
        self._round_trips.inc()
        try:
            await self.redis.delete(TenantKeys(tenant).user_sessions(user_id))
        except REDIS_ERRORS as exc:
            raise L2Error(f"redis: {exc}") from exc

    async def mark_forgotten(self, tenant: str, session_id: str, ttl_s: int) -> None:
        self._round_trips.inc()
        try:
            await self.redis.set(SessionKeys(tenant, session_id).forgotten, "1", ex=max(1, ttl_s))
        except REDIS_ERRORS as exc:
            raise L2Error(f"redis: {exc}") from exc

    async def publish_version(self, tenant: str, session_id: str, version: int) -> None:
        """What a commit publishes, sent alone (pods drop older L1 copies)."""
        self._round_trips.inc()
        try:
            meta = SessionKeys(tenant, session_id).meta
            await self.redis.publish(INVALIDATION_CHANNEL, f"{meta} {version}")
        except REDIS_ERRORS as exc:
            raise L2Error(f"redis: {exc}") from exc

    async def publish_ack(self, writer: str, meta_key: str, version: int, holder: str) -> None:
        """A holder's acknowledgement that it dropped its copy older than
        ``version`` (the writer waits for it before `done`). Off the turn path:
        the holder sends it from its invalidation listener."""
        self._round_trips.inc()
        try:
            await self.redis.publish(
                INVALIDATION_CHANNEL, f"{ACK_TAG} {writer} {meta_key} {version} {holder}"
            )
        except REDIS_ERRORS as exc:
            raise L2Error(f"redis: {exc}") from exc

    async def is_forgotten(self, tenant: str, session_id: str) -> bool:
        self._round_trips.inc()
        try:
            return bool(await self.redis.exists(SessionKeys(tenant, session_id).forgotten))
        except REDIS_ERRORS as exc:
            raise L2Error(f"redis: {exc}") from exc

    async def drop_cached(self, tenant: str, session_id: str, kind: str) -> int:
        """Deletes the session's cache entries of one kind (memory/cache.py); returns
        how many. A SCAN of the keyspace: for forgetting, which is rare."""
        pattern = f"{_glob_escape(CacheKeys(tenant, session_id).base)}:{kind}:*"
        self._round_trips.inc()
        try:
            keys = {key async for key in scan_keys(self.redis, pattern)}
            # One slot per session: each key its own DEL is cluster-safe.
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.delete(key)
                deleted = await pipe.execute() if keys else []
        except REDIS_ERRORS as exc:
            raise L2Error(f"redis: {exc}") from exc
        return sum(int(n) for key, n in zip(keys, deleted, strict=True)
                   if not key.endswith(b":lease"))  # fmt: skip

    # --- archive ------------------------------------------------------------------
    async def acquire_lease(self, tenant: str, session_id: str, holder: str, ttl_s: float) -> bool:
        k = SessionKeys(tenant, session_id)
        try:
            return bool(
                await self.redis.set(k.archive_lease, holder, nx=True, px=int(ttl_s * 1000))
            )
        except REDIS_ERRORS as exc:
            raise L2Error(f"redis: {exc}") from exc

    async def release_lease(self, tenant: str, session_id: str, holder: str) -> None:
        k = SessionKeys(tenant, session_id)
        # Delete only our own lease: it may have expired and been taken over.
        # On failure it expires on its own.
        with contextlib.suppress(*REDIS_ERRORS):
            await self.redis.eval(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then "
                "return redis.call('DEL', KEYS[1]) end return 0",
                1,
                k.archive_lease,
                holder,
            )

    async def cut_batch(
        self, tenant: str, session_id: str, batch_id: str, first: int, last: int
    ) -> tuple[SessionState | None, list[Turn], BatchRecord | None]:
        k = SessionKeys(tenant, session_id)
        meta_flat, raw_turns, batch_flat = await self._run(
            self._cut, [k.meta, k.log, k.batch(batch_id)], [first, last, time.time()]
        )
        if not meta_flat:
            return None, [], None
        state = SessionState.from_meta(tenant, session_id, _flat_to_dict(meta_flat))
        return state, [Turn.decode(r) for r in raw_turns], _batch(batch_id, batch_flat)

    async def note_batch_failure(
        self, tenant: str, session_id: str, batch_id: str, attempts: int, next_try_at: float
    ) -> None:
        k = SessionKeys(tenant, session_id)
        try:
            await self.redis.hset(
                k.batch(batch_id),
                mapping={"attempts": attempts, "next_try_at": repr(next_try_at)},
            )
        except REDIS_ERRORS as exc:
            raise L2Error(f"redis: {exc}") from exc

    async def advance_archive(
        self,
        tenant: str,
        session_id: str,
        batch_id: str,
        first: int,
        last: int,
        summary: str,
        confirmed_ttl_s: int = 86400,
    ) -> int | None:
        """Moves the archive cursor past ``last``. Returns the new version, or None
        if the cursor was no longer at ``first - 1`` (someone else archived)."""
        k = SessionKeys(tenant, session_id)
        ok, value = await self._run(
            self._advance,
            [k.meta, k.log, k.batch(batch_id)],
            [first - 1, last, summary, confirmed_ttl_s, time.time()],
        )
        return int(value) if int(ok) == 1 else None

    async def batch_record(self, tenant: str, session_id: str, batch_id: str) -> BatchRecord | None:
        k = SessionKeys(tenant, session_id)
        flat = await self.redis.hgetall(k.batch(batch_id))
        return _batch(batch_id, [x for kv in flat.items() for x in kv]) if flat else None

    async def scan_sessions(self) -> AsyncIterator[tuple[str, str, dict[str, str]]]:
        """Every session's (tenant, session, meta subset), for the idle sweeper.
        SCAN is O(keyspace) per sweep: fine at a sweep a minute (see README)."""
        async for raw in scan_keys(self.redis, META_SCAN_PATTERN):
            key = _s(raw)
            thread = key[key.index("{") + 1 : key.rindex("}")]
            try:
                tenant, session = split_thread_id(thread)
            except ValueError:
                continue
            try:
                values = await self.redis.hmget(
                    key, ["turn_count", "archived_upto", "updated_at", "version"]
                )
            except ResponseError:
                continue  # not one of ours (WRONGTYPE): never let it stop a sweep
            yield (
                tenant,
                session,
                {
                    "turn_count": _s(values[0] or b"0"),
                    "archived_upto": _s(values[1] or b"0"),
                    "updated_at": _s(values[2] or b"0"),
                    "version": _s(values[3] or b"0"),
                },
            )


def _batch(batch_id: str, flat: list[Any]) -> BatchRecord | None:
    if not flat:
        return None
    d = _flat_to_dict(flat)
    return BatchRecord(
        batch_id=batch_id,
        status=d.get("status", "pending"),
        first=int(d.get("first", "0")),
        last=int(d.get("last", "0")),
        attempts=int(d.get("attempts", "0")),
        next_try_at=float(d.get("next_try_at", "0") or 0),
    )


def _glob_escape(s: str) -> str:
    out = []
    for ch in s:
        if ch in "*?[]\\":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def new_turn_id() -> str:
    return uuid.uuid4().hex


__all__ = [
    "AckMode",
    "AlreadyCommitted",
    "BatchRecord",
    "CheckpointWrite",
    "DurabilityMisconfigured",
    "DurabilityTimeout",
    "L2Error",
    "L2Store",
    "SessionUserMismatch",
    "VersionConflict",
    "new_turn_id",
]
