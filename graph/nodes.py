"""The nodes of the turn graph:

    load_state -> input_guard -> (retrieve)? -> respond -> commit -> (archive)?

Each node is a method of ``TurnNodes``, which holds the collaborators (L1, L2,
L3, LLM, context builder, archiver, metrics). Events for the client (``meta``,
``memory``, ``token``, ``done``, ``error``) go out through the turn's
``TurnControl.emit`` as they happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

from langgraph.types import Command

from graph.guard import check_message, needs_memory
from graph.state import TurnState
from infra.llm import LLMClient, LLMDone, LLMError, LLMToken
from infra.settings import Settings
from memory.archiver import Archiver
from memory.context import ContextBuilder, render_memories
from memory.l1_pool import L1Pool
from memory.l2_store import AlreadyCommitted, L2Error, L2Store, VersionConflict
from memory.l3_store import L3Store, L3Unavailable
from memory.metrics import Metrics
from memory.models import SessionState, Turn

log = logging.getLogger("tiermem.turn")

COMMIT_CONFLICT_RETRIES = 5


class StorageUnavailable(Exception):
    """L2 could not be reached within the turn's deadline."""


@dataclass
class TurnDeps:
    settings: Settings
    l1: L1Pool
    l2: L2Store
    l3: L3Store
    llm: LLMClient
    context: ContextBuilder
    archiver: Archiver
    metrics: Metrics


def _emit(state: TurnState, event: str, data: dict[str, Any]) -> None:
    state["control"].emit({"event": event, "data": data})


def _timed(state: TurnState, phase: str, started: float) -> dict[str, float]:
    timings = dict(state.get("timings") or {})
    timings[phase] = time.perf_counter() - started
    return timings


class TurnNodes:
    def __init__(self, deps: TurnDeps) -> None:
        self.d = deps

    # --- load_state -------------------------------------------------------------
    async def load_state(self, state: TurnState) -> Command[Literal["input_guard", "__end__"]]:
        t0 = time.perf_counter()
        inp = state["input"]
        session = self.d.l1.get(inp.tenant, inp.session_id)
        hit = session is not None
        self.d.metrics.l1_lookups.labels("hit" if hit else "miss").inc()
        if session is None:
            session = await self._load_from_l2(inp.tenant, inp.session_id)
            if session is None:
                now = time.time()
                session = SessionState(
                    tenant=inp.tenant, session_id=inp.session_id, user_id=inp.user_id,
                    created_at=now, updated_at=now,
                )  # fmt: skip
            self.d.l1.put(session)
        retry_of: int | None = None
        if inp.client_turn_id:
            stored = await self._stored_turn(inp.tenant, inp.session_id, inp.turn_id)
            if stored is not None and stored.status != "failed":
                _replay(state, inp.turn_id, inp.session_id, stored)
                return Command(
                    update={"session": session, "l1_hit": hit, "replayed": True,
                            "timings": _timed(state, "load", t0)},
                    goto="__end__",
                )  # fmt: skip
            if stored is not None:
                retry_of = stored.index
        _emit(
            state,
            "meta",
            {"turn_id": inp.turn_id, "session_id": inp.session_id,
             "turn": retry_of or session.turn_count + 1, "l1_hit": hit,
             "dev_llm": self.d.llm.is_dev},
        )  # fmt: skip
        return Command(
            update={"session": session, "l1_hit": hit, "retry_of": retry_of,
                    "timings": _timed(state, "load", t0)},
            goto="input_guard",
        )  # fmt: skip

    async def _stored_turn(self, tenant: str, session_id: str, turn_id: str) -> Turn | None:
        try:
            return await self.d.l2.committed_turn(tenant, session_id, turn_id)
        except L2Error as exc:
            raise StorageUnavailable(str(exc)) from exc

    async def _load_from_l2(self, tenant: str, session_id: str) -> SessionState | None:
        try:
            return await self.d.l2.load(tenant, session_id)
        except L2Error as exc:
            raise StorageUnavailable(str(exc)) from exc

    # --- input_guard --------------------------------------------------------------
    async def input_guard(self, state: TurnState) -> Command[Literal["retrieve", "respond"]]:
        t0 = time.perf_counter()
        inp = state["input"]
        check_message(inp.message, self.d.settings.max_message_chars)
        need = needs_memory(inp.message, inp.retrieve)
        return Command(
            update={"need_memory": need, "timings": _timed(state, "guard", t0)},
            goto="retrieve" if need else "respond",
        )

    # --- retrieve ---------------------------------------------------------------------
    async def retrieve(self, state: TurnState) -> dict[str, Any]:
        t0 = time.perf_counter()
        inp = state["input"]
        session = state["session"]
        k = self.d.settings.retrieve_k
        # Cache generation: a new archived batch of this session invalidates it;
        # other sessions' batches show up when the short TTL runs out.
        generation = str(session.archived_upto)
        user = session.user_id or inp.user_id
        hits = await self.d.l2.cached_retrieval(
            inp.tenant, inp.session_id, user, inp.message, k, generation
        )
        source = "cache"
        if hits is None:
            source = "l3"
            try:
                found = await asyncio.wait_for(
                    self.d.l3.search(inp.tenant, user, inp.message, k),
                    timeout=self.d.settings.retrieve_timeout_s,
                )
            except (TimeoutError, L3Unavailable) as exc:
                # Memory is a bonus for this turn, never a reason to fail it.
                log.warning("retrieval skipped: %s", exc or "timeout")
                self.d.metrics.errors.labels("retrieve").inc()
                return {"memories": [], "memory_block": None,
                        "timings": _timed(state, "retrieve", t0)}  # fmt: skip
            hits = [
                {"batch_id": h.batch_id, "session_id": h.session_id, "first_turn": h.first_turn,
                 "last_turn": h.last_turn, "text": h.text, "score": round(h.score, 4)}
                for h in found
            ]  # fmt: skip
            await self.d.l2.store_retrieval(
                inp.tenant, inp.session_id, user, inp.message, k, generation, hits
            )
        self.d.metrics.retrievals.labels(source).inc()
        block = render_memories(hits) if hits else None
        if hits:
            _emit(state, "memory", {"source": source, "memories": hits})
        return {"memories": hits, "memory_block": block, "timings": _timed(state, "retrieve", t0)}

    # --- respond ------------------------------------------------------------------------
    async def respond(self, state: TurnState) -> dict[str, Any]:
        t0 = time.perf_counter()
        inp = state["input"]
        control = state["control"]
        session = state["session"]
        plan = self.d.context.plan(
            session, inp.message, state.get("memory_block"), exclude_turn=state.get("retry_of")
        )
        plan_s = time.perf_counter() - t0
        pieces: list[str] = []
        got: dict[str, Any] = {"done": None, "ttft_ms": None}
        error: dict[str, Any] | None = None
        status = "complete"
        emit = control.emit
        metrics = self.d.metrics
        started = state["started"]

        async def consume() -> None:
            stream = self.d.llm.stream_chat(plan.messages, session_key=session_key(inp))
            try:
                async for ev in stream:
                    if isinstance(ev, LLMToken):
                        if got["ttft_ms"] is None:
                            first_s = time.perf_counter() - started
                            got["ttft_ms"] = first_s * 1000
                            metrics.ttft_seconds.observe(first_s)
                        pieces.append(ev.text)
                        emit({"event": "token", "data": {"text": ev.text}})
                    elif isinstance(ev, LLMDone):
                        got["done"] = ev
            finally:
                # Closes the upstream response: vLLM aborts a request whose
                # connection goes away.
                await stream.aclose()

        # One task for the whole stream, raced once against the cancel event
        # (client gone, drain deadline): nothing extra per token.
        task = asyncio.create_task(consume())
        waiter = asyncio.create_task(control.cancel.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                status = "interrupted"
            else:
                task.result()
        except LLMError as exc:
            status = "failed" if not pieces else "interrupted"
            error = {"code": f"llm_{exc.kind}", "message": str(exc), "retryable": True}
            metrics.errors.labels(f"llm_{exc.kind}").inc()
            log.warning("LLM failed: %s", exc)
        finally:
            waiter.cancel()
            if not task.done():  # the node itself was cancelled
                task.cancel()
        done: LLMDone | None = got["done"]
        ttft_ms: float | None = got["ttft_ms"]
        usage = done.usage if done is not None else None
        llm_usage = {
            "prompt_tokens": usage.prompt_tokens if usage else plan.prompt_tokens,
            "completion_tokens": usage.completion_tokens if usage else len(pieces),
            "cached_tokens": usage.cached_tokens if usage else None,
        }
        return {
            "plan": plan,
            "reply": "".join(pieces),
            "status": status,
            "error": error,
            "llm_usage": llm_usage,
            "ttft_ms": ttft_ms,
            "replica": done.replica if done else None,
            "route_moved": bool(done and done.moved),
            # "plan" (building the prompt) is a part of "respond" the service
            # itself spends, so it counts as overhead; the rest is the LLM's.
            "timings": {**_timed(state, "respond", t0), "plan": plan_s},
        }

    # --- commit ---------------------------------------------------------------------------
    async def commit(self, state: TurnState) -> Command[Literal["archive", "__end__"]]:
        t0 = time.perf_counter()
        inp = state["input"]
        session = state["session"]
        plan = state["plan"]
        reply = state.get("reply", "")
        status = state.get("status", "complete")
        now = time.time()
        usage = dict(state.get("llm_usage") or {})
        account = plan.account
        reason = (
            "route_change"
            if state.get("route_moved") and account.reason is None
            else (account.reason)
        )
        ttft = state.get("ttft_ms")
        usage.update(
            ttft_ms=round(ttft, 2) if ttft is not None else None,
            expected_cacheable_tokens=account.expected_cacheable,
            prefix_break=reason,
        )
        turn = Turn(
            index=0, turn_id=inp.turn_id, user=inp.message, assistant=reply, status=status,
            memories=state.get("memory_block"), created_at=now, usage=usage,
        )  # fmt: skip
        self.d.context.turn_tokens(turn)  # stored with the turn: no recount on reload
        meta = dict(plan.meta_updates)
        meta["updated_at"] = repr(now)
        meta["user_id"] = session.user_id or inp.user_id
        if session.version == 0:
            meta["created_at"] = repr(session.created_at or now)
        try:
            version = await self._commit_with_retry(session, turn, meta, state.get("retry_of"))
        except AlreadyCommitted as dup:
            # Another pod stored this turn_id while we generated: keep theirs
            # (at most once), tell the client which turn it is.
            self.d.l1.drop(inp.tenant, inp.session_id)
            _emit(state, "done", {"turn_id": inp.turn_id, "turn": dup.index,
                                  "status": "duplicate", "usage": usage})  # fmt: skip
            return Command(
                update={"committed": turn, "archive_batch": None,
                        "timings": _timed(state, "commit", t0)},
                goto="__end__",
            )  # fmt: skip
        # Apply the committed turn to L1.
        replaced = bool(session.turns and session.turns[-1].index == turn.index)
        if replaced:
            session.turns[-1] = turn
        else:
            session.turns.append(turn)
        session.version = version
        session.turn_count = turn.index
        session.user_id = meta["user_id"]
        session.updated_at = now
        session.prefix_version = plan.meta_updates["prefix_version"]
        if plan.compaction is not None:
            session.context_start, session.context_summary = plan.compaction
            session.turns = [t for t in session.turns if t.index >= session.context_start]
        session.last_rendered = (
            self.d.context.after_reply(plan, reply) if status != "failed" else None
        )
        self.d.l1.put(session)
        self._record_metrics(state, usage, reason)
        archive_batch = None
        if session.unarchived >= self.d.archiver.threshold:
            archive_batch = self.d.archiver.next_batch_id(
                inp.tenant, inp.session_id, session.archived_upto
            )
        usage["archived_batch"] = archive_batch
        drained = status == "interrupted" and state["control"].reason == "drain"
        event = "done" if status != "failed" and not drained else "error"
        payload: dict[str, Any] = {
            "turn_id": inp.turn_id, "turn": turn.index, "version": version, "status": status,
            "usage": usage,
        }  # fmt: skip
        if state.get("error"):
            payload["error"] = state["error"]
        elif drained:
            payload["error"] = {
                "code": "draining",
                "retryable": True,
                "message": "the server is shutting down; retry this turn",
            }
            payload["retry"] = True
        if status == "interrupted" and state["control"].reason:
            payload["interrupted_by"] = state["control"].reason
        _emit(state, event, payload)
        self.d.metrics.turns.labels(status).inc()
        return Command(
            update={
                "committed": turn,
                "version": version,
                "archive_batch": archive_batch,
                "timings": _timed(state, "commit", t0),
            },
            goto="archive" if archive_batch else "__end__",
        )

    async def _commit_with_retry(
        self, session: SessionState, turn: Turn, meta: dict[str, str], retry_of: int | None
    ) -> int:
        deadline = time.monotonic() + self.d.settings.commit_deadline_s
        conflicts = 0
        delay = 0.05
        while True:
            replace = (
                retry_of is not None
                and session.turn_count == retry_of
                and bool(
                    session.turns
                    and session.turns[-1].index == retry_of
                    and session.turns[-1].status == "failed"
                )
            )
            turn.index = retry_of if replace and retry_of is not None else session.turn_count + 1
            try:
                return await self.d.l2.commit(
                    session, turn, replace_last=replace, meta_updates=meta
                )
            except VersionConflict:
                # Someone else committed (another pod, or the archiver): reload and
                # append after their turn. The reply stands; only its index moves.
                conflicts += 1
                if conflicts > COMMIT_CONFLICT_RETRIES:
                    raise
                fresh = await self._load_from_l2(session.tenant, session.session_id)
                if fresh is None:
                    # L2 lost the session (a Redis without persistence restarted,
                    # a failover to a replica that had not synced): what it held
                    # is gone, but the session goes on from an empty state rather
                    # than failing forever against a version L2 no longer has.
                    log.error("session vanished from L2; starting it again")
                    self.d.metrics.errors.labels("session_vanished").inc()
                    now = time.time()
                    fresh = SessionState(
                        tenant=session.tenant, session_id=session.session_id,
                        user_id=session.user_id, created_at=now, updated_at=now,
                    )  # fmt: skip
                _refresh(session, fresh)
            except L2Error as exc:
                # Redis down or restarting: keep trying until the deadline, so a
                # short outage still completes the turn.
                if time.monotonic() + delay > deadline:
                    self.d.l1.drop(session.tenant, session.session_id)
                    raise StorageUnavailable(str(exc)) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _record_metrics(self, state: TurnState, usage: dict[str, Any], reason: str | None) -> None:
        m = self.d.metrics
        m.prompt_tokens.inc(usage.get("prompt_tokens") or 0)
        m.completion_tokens.inc(usage.get("completion_tokens") or 0)
        if usage.get("cached_tokens") is not None:
            m.cached_tokens.inc(usage["cached_tokens"])
        m.expected_cacheable_tokens.inc(usage.get("expected_cacheable_tokens") or 0)
        if reason:
            m.prefix_breaks.labels(reason).inc()

    # --- archive --------------------------------------------------------------------------
    async def archive(self, state: TurnState) -> dict[str, Any]:
        # Off the critical path: `done` has gone out already; the batch is cut,
        # summarised, embedded and upserted by a background task.
        inp = state["input"]
        self.d.archiver.schedule(inp.tenant, inp.session_id)
        return {}


def _replay(state: TurnState, turn_id: str, session_id: str, turn: Turn) -> None:
    """A finished turn asked for again (a retry, or Last-Event-ID): sent whole
    from L2, without the LLM and without writing anything."""
    _emit(state, "meta", {"turn_id": turn_id, "session_id": session_id, "turn": turn.index,
                          "replayed": True})  # fmt: skip
    if turn.memories:
        _emit(state, "memory", {"source": "replay", "block": turn.memories})
    _emit(state, "token", {"text": turn.assistant})
    _emit(state, "done", {"turn_id": turn_id, "turn": turn.index, "status": turn.status,
                          "replayed": True, "usage": turn.usage or {}})  # fmt: skip


def session_key(inp: Any) -> str:
    return f"{inp.tenant}:{inp.session_id}"


def _refresh(session: SessionState, fresh: SessionState) -> None:
    """Copies a freshly loaded state into the L1 object the turn holds."""
    last_rendered = session.last_rendered
    for name in SessionState.__slots__:
        setattr(session, name, getattr(fresh, name))
    session.last_rendered = last_rendered
