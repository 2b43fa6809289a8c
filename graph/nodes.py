"""The nodes of the turn graph:

    prepare -> (retrieve)? -> agent -> commit -> (archive)?

Each node is a method of ``TurnNodes`` taking the state (data) and LangGraph's
``Runtime`` whose context (``TurnContext``) carries the collaborators, the
client's sink and the run's live objects. Nodes orchestrate: session state is
read and written only through the session facade (``memory.sessions``), client
events go out through ``TurnControl.emit`` as typed events the moment they exist.

The LLM request goes out as soon as the prompt is known: from ``prepare`` when
the turn retrieves nothing, else from ``agent`` once the memories are in; either
way ``agent`` owns the reply (``graph.reply``) and ``commit`` stores it, so a
client that leaves still gets its turn committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal, cast

from langgraph.runtime import Runtime
from langgraph.types import Command

from graph.checkpointer import RedisCheckpointSaver
from graph.events import Done, Error, Memory, Meta, Token
from graph.guard import check_message, needs_memory
from graph.reply import ReplyStream
from graph.state import PER_TURN_RESET, TurnContext, TurnState
from infra.errors import TiermemError
from infra.llm import ChatMessage, LLMClient
from infra.settings import Settings
from memory.archiver import Archiver
from memory.context import ContextBuilder, render_memories
from memory.l2_store import CheckpointWrite, L2Store
from memory.l3_store import L3Store, batch_id_for, memory_hit_json
from memory.metrics import Metrics
from memory.models import Message, SessionState, Turn
from memory.sessions import Sessions, retryable_in_place

log = logging.getLogger("tiermem.turn")

Rt = Runtime[TurnContext]


@dataclass
class TurnDeps:
    settings: Settings
    sessions: Sessions
    l2: L2Store
    l3: L3Store
    llm: LLMClient
    context: ContextBuilder
    archiver: Archiver
    metrics: Metrics
    checkpointer: RedisCheckpointSaver


def _since(t0: float) -> float:
    return time.perf_counter() - t0


class TurnNodes:
    # --- prepare ------------------------------------------------------------------
    async def prepare(
        self, state: TurnState, runtime: Rt
    ) -> Command[Literal["retrieve", "agent", "__end__"]]:
        """The session (L1, else L2), the input rules, and what the turn needs."""
        t0 = time.perf_counter()
        ctx = runtime.context
        d = ctx.deps
        tenant, session_id = state["tenant"], state["session_id"]
        # Defence in depth: the app checked already, before any I/O.
        check_message(state["message"], d.settings.max_message_chars)
        opened = await d.sessions.open(tenant, session_id, state["user_id"])
        session = ctx.run.session = opened.session
        retry_of: int | None = None
        if state.get("client_turn_id"):
            stored = await d.sessions.stored_turn(tenant, session_id, state["turn_id"])
            if stored is not None and not retryable_in_place(stored):
                _replay(ctx, state["turn_id"], session_id, stored)
                return Command(
                    update={**PER_TURN_RESET, "turn": stored.index, "l1_hit": opened.l1_hit,
                            "replayed": True, "status": stored.status,
                            "timings": {"prepare": _since(t0)}},
                    goto="__end__",
                )  # fmt: skip
            if stored is not None:
                retry_of = stored.index
        turn = retry_of or session.turn_count + 1
        ctx.control.emit(Meta(state["turn_id"], session_id, turn, opened.l1_hit, d.llm.is_dev,
                              model=d.llm.name))  # fmt: skip
        need = needs_memory(state["message"], state.get("retrieve", "auto"))
        update: TurnState = {**PER_TURN_RESET, "turn": turn, "l1_hit": opened.l1_hit,
                             "retry_of": retry_of, "need_memory": need}  # fmt: skip
        if need:
            update["timings"] = {"prepare": _since(t0)}
            return Command(update=update, goto="retrieve")
        # Nothing to retrieve: the prompt is known now, so the request goes out
        # now, before LangGraph's next step.
        load_s = _since(t0)
        plan_s = await _start_reply(ctx, state, session, None, retry_of)
        update["timings"] = {"prepare": load_s, "plan": plan_s}
        return Command(update=update, goto="agent")

    # --- retrieve -----------------------------------------------------------------
    async def retrieve(self, state: TurnState, runtime: Rt) -> dict[str, Any]:
        """L3 search for the user, through the L2 retrieval cache. Memory is a
        bonus for the turn: any failure skips it, with the reason logged."""
        t0 = time.perf_counter()
        ctx = runtime.context
        d = ctx.deps
        session = ctx.run.session
        assert session is not None
        tenant, session_id, message = state["tenant"], state["session_id"], state["message"]
        k = d.settings.retrieve_k
        # Cache generation: a new archived batch of this session invalidates it;
        # other sessions' batches show up when the short TTL runs out.
        generation = str(session.archived_upto)
        user = session.user_id or state["user_id"]
        hits = await d.l2.cached_retrieval(tenant, session_id, user, message, k, generation)
        source = "cache"
        if hits is None:
            source = "l3"
            try:
                found = await asyncio.wait_for(
                    d.l3.search(tenant, user, message, k), timeout=d.settings.retrieve_timeout_s
                )
            except (TimeoutError, TiermemError, ValueError) as exc:
                reason = getattr(exc, "code", None) or type(exc).__name__
                log.warning("retrieval skipped (%s): %s", reason, exc or "timeout")
                d.metrics.errors.labels("retrieve").inc()
                return {"memories": [], "memory_block": None,
                        "timings": {"retrieve": _since(t0)}}  # fmt: skip
            hits = [memory_hit_json(h) for h in found]
            await d.l2.store_retrieval(tenant, session_id, user, message, k, generation, hits)
        d.metrics.retrievals.labels(source).inc()
        if hits:
            ctx.control.emit(Memory(source, hits))
        return {"memories": hits, "memory_block": render_memories(hits) if hits else None,
                "timings": {"retrieve": _since(t0)}}  # fmt: skip

    # --- agent --------------------------------------------------------------------
    async def agent(self, state: TurnState, runtime: Rt) -> Command[Literal["commit"]]:
        """The reply: waits for the LLM stream (started here, or by prepare) to
        end or be cancelled. Issue 13 adds the loop: a reply with tool calls goes
        to a ``tools`` node that comes back here for the next LLM request."""
        t0 = time.perf_counter()
        ctx = runtime.context
        run = ctx.run
        timings: dict[str, float] = {}
        if run.reply is None:
            assert run.session is not None
            timings["plan"] = await _start_reply(
                ctx, state, run.session, state.get("memory_block"), state.get("retry_of")
            )
        assert run.reply is not None
        outcome = await run.reply.finish()
        messages: list[Message] = [{"role": "user", "content": state["message"]}]
        if outcome.text or outcome.status != "failed":
            messages.append({"role": "assistant", "content": outcome.text})
        done = outcome.done
        u = done.usage if done is not None else None
        plan = run.plan
        assert plan is not None
        usage: dict[str, Any] = {
            "prompt_tokens": u.prompt_tokens if u else plan.prompt_tokens,
            "completion_tokens": u.completion_tokens if u else len(outcome.text.split()),
            "cached_tokens": u.cached_tokens if u else None,
            "ttft_ms": round(outcome.ttft_ms, 2) if outcome.ttft_ms is not None else None,
            "replica": done.replica if done else None,
            "route_moved": bool(done and done.moved),
        }
        timings["agent"] = _since(t0)
        return Command(
            update={"messages": messages, "status": outcome.status, "error": outcome.error,
                    "usage": usage, "timings": timings},
            goto="commit",
        )  # fmt: skip

    # --- commit -------------------------------------------------------------------
    async def commit(self, state: TurnState, runtime: Rt) -> Command[Literal["archive", "__end__"]]:
        """The turn into L2 (one compare-and-set round trip, with its checkpoint),
        then L1; then ``done`` (or ``error``) to the client."""
        t0 = time.perf_counter()
        ctx = runtime.context
        d = ctx.deps
        run = ctx.run
        session, plan = run.session, run.plan
        assert session is not None and plan is not None
        status = state.get("status", "complete")
        account = await d.context.account_async(plan)
        usage = dict(state.get("usage") or {})
        moved = usage.pop("route_moved", False)
        usage.pop("replica", None)
        reason = "route_change" if moved and account.reason is None else account.reason
        usage.update(expected_cacheable_tokens=account.expected_cacheable, prefix_break=reason)
        interrupted_by = ctx.control.reason if status == "interrupted" else None
        if interrupted_by:
            usage["interrupted_by"] = interrupted_by
        messages = list(state.get("messages") or [])
        reply = "".join(str(m.get("content") or "") for m in messages[1:])
        turn = Turn(
            index=0, turn_id=state["turn_id"], messages=messages, status=status,
            memories=state.get("memory_block"), created_at=time.time(), usage=usage,
            memory_hits=state.get("memories") or None,
        )  # fmt: skip
        await d.context.turn_tokens_async(turn)  # stored with the turn: no recount on reload
        threshold = d.archiver.threshold

        def checkpoint_for(index: int, version: int, parent: str | None) -> CheckpointWrite:
            values = {**state, "turn": index, "version": version, "usage": usage,
                      "archive_batch": _due(d, session, index, threshold)}  # fmt: skip
            values.pop("timings", None)
            return d.checkpointer.encode_checkpoint(
                f"{session.tenant}:{session.session_id}", values, step=version, parent_id=parent,
                metadata={"source": "loop", "step": version, "turn": index},
            )  # fmt: skip

        committed = await d.sessions.commit(
            session, turn, user_id=state["user_id"],
            prefix_version=plan.meta_updates["prefix_version"], compaction=plan.compaction,
            retry_of=state.get("retry_of"),
            rendered=d.context.after_reply(plan, reply) if status != "failed" else None,
            checkpoint_for=checkpoint_for, l1_hit=bool(state.get("l1_hit")),
        )  # fmt: skip
        if committed.duplicate_of is not None:
            ctx.control.emit(Done(state["turn_id"], committed.duplicate_of, "duplicate", usage))
            return Command(
                update={"turn": committed.duplicate_of, "archive_batch": None,
                        "timings": {"commit": _since(t0)}},
                goto="__end__",
            )  # fmt: skip
        version = committed.version
        self._record_metrics(d.metrics, usage, reason)
        archive_batch = _due(d, session, turn.index, threshold)
        usage["archived_batch"] = _made_due(session, turn.index, threshold)
        fields = {"turn_id": turn.turn_id, "turn": turn.index, "version": version,
                  "status": status, "usage": usage}  # fmt: skip
        if interrupted_by:
            fields["interrupted_by"] = interrupted_by
        error = state.get("error")
        if status == "failed" and error:
            ctx.control.emit(Error(error["code"], error["message"], error["retryable"], fields))
        elif interrupted_by == "drain":
            ctx.control.emit(
                Error("draining", "the server is shutting down; retry this turn", True, fields)
            )
        else:
            ctx.control.emit(Done(turn.turn_id, turn.index, status, usage, version=version,
                                  interrupted_by=interrupted_by, error=error))  # fmt: skip
        d.metrics.turns.labels(status).inc()
        return Command(
            update={"turn": turn.index, "version": version, "usage": usage,
                    "archive_batch": archive_batch, "timings": {"commit": _since(t0)}},
            goto="archive" if archive_batch else "__end__",
        )  # fmt: skip

    @staticmethod
    def _record_metrics(m: Metrics, usage: dict[str, Any], reason: str | None) -> None:
        m.prompt_tokens.inc(usage.get("prompt_tokens") or 0)
        m.completion_tokens.inc(usage.get("completion_tokens") or 0)
        if usage.get("cached_tokens") is not None:
            m.cached_tokens.inc(usage["cached_tokens"])
        m.expected_cacheable_tokens.inc(usage.get("expected_cacheable_tokens") or 0)
        if reason:
            m.prefix_breaks.labels(reason).inc()

    # --- archive ------------------------------------------------------------------
    async def archive(self, state: TurnState, runtime: Rt) -> dict[str, Any]:
        # Off the critical path: `done` has gone out already; the archiver cuts,
        # summarises, embeds and upserts the batch in a background task.
        runtime.context.deps.archiver.schedule(state["tenant"], state["session_id"])
        return {}


async def _start_reply(
    ctx: TurnContext,
    state: TurnState,
    session: SessionState,
    memory_block: str | None,
    retry_of: int | None,
) -> float:
    """Plans the prompt and sends the LLM request; returns the planning time."""
    t0 = time.perf_counter()
    d = ctx.deps
    plan = await d.context.plan_async(session, state["message"], memory_block,
                                      exclude_turn=retry_of)  # fmt: skip
    ctx.run.plan = plan
    plan_s = _since(t0)
    messages = cast("list[ChatMessage]", plan.messages)
    ctx.run.reply = reply = ReplyStream(
        d.llm, messages, session_key=f"{state['tenant']}:{state['session_id']}",
        control=ctx.control, metrics=d.metrics, started=ctx.started,
    )  # fmt: skip
    await reply.start()
    return plan_s


def _due(d: TurnDeps, session: SessionState, index: int, threshold: int) -> str | None:
    """The batch this commit makes due, if its unarchived turns reach the threshold."""
    if index - session.archived_upto < threshold:
        return None
    return d.archiver.next_batch_id(session.tenant, session.session_id, session.archived_upto)


def _made_due(session: SessionState, index: int, threshold: int) -> str | None:
    """The batch this very commit completed (its last turn is this one), or None:
    reported once, not again on every turn while the archiver is behind. Batches
    are cut from the archive cursor in threshold steps, as the archiver cuts them."""
    pending = index - session.archived_upto
    if pending < threshold or pending % threshold:
        return None
    return batch_id_for(session.tenant, session.session_id, index - threshold + 1, index)


def _replay(ctx: TurnContext, turn_id: str, session_id: str, turn: Turn) -> None:
    """A finished turn asked for again (a retry, or Last-Event-ID): sent whole
    from L2, without the LLM and without writing anything."""
    emit = ctx.control.emit
    emit(Meta(turn_id, session_id, turn.index, replayed=True))
    if turn.memory_hits:
        emit(Memory("replay", turn.memory_hits))
    emit(Token(turn.assistant))
    emit(Done(turn_id, turn.index, turn.status, turn.usage or {}, replayed=True))
