"""The nodes of the turn graph:

    prepare -> (retrieve)? -> agent <-> (tools)* -> commit -> (archive)?

Each node is a method of ``TurnNodes`` taking the state (data) and LangGraph's
``Runtime`` whose context (``TurnContext``) carries the collaborators, the
client's sink and the run's live objects. Nodes orchestrate: session state is
read and written only through the session facade (``memory.sessions``), client
events go out through ``TurnControl.emit`` as typed events the moment they exist.

The LLM request goes out as soon as the prompt is known: from ``prepare`` when
the turn retrieves nothing, else from ``agent`` once the memories are in; either
way ``agent`` owns the reply (``graph.reply``) and ``commit`` stores it, so a
client that leaves still gets its turn committed.

The agent loop. A reply with tool calls goes to ``tools``, which runs them
(graph/tools.py), records the step in L2 and sends the next LLM request, then
hands back to ``agent``; at most ``TIERMEM_AGENT_MAX_STEPS`` requests, the last
with ``tool_choice`` "none". Every request of a turn carries its prefix's
``tools`` array unchanged; masking never edits it.

Tool steps are durable. Each step's results are written to L2 (one round
trip) before the next LLM request; a step with a side-effecting call (an MCP
tool not marked read-only or idempotent) also writes its intent before the
calls run. A retry of the turn (same ``turn_id``, or ``Last-Event-ID``) starts
from the recorded steps: recorded results are reused, and a call whose intent
was recorded without a result (a crash while it ran) is not run again: the
model gets an error result saying so. So no side-effecting call runs twice.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import orjson
from langgraph.graph import END
from langgraph.runtime import Runtime
from langgraph.types import Command, Overwrite

from graph.agents import AgentProfile, Agents
from graph.checkpointer import RedisCheckpointSaver
from graph.events import Done, Error, Memory, Meta, SkillUsed, Token, ToolCalled, ToolResult
from graph.guard import check_message, needs_memory
from graph.reply import ReplyOutcome, ReplyStream
from graph.state import PER_TURN_RESET, TurnContext, TurnOutput, TurnState
from graph.tools import Tooling, ToolOutcome, tool_message
from infra.errors import TiermemError
from infra.llm import ChatMessage, LLMClient, ToolCall, assistant_message
from infra.settings import Settings
from memory.archiver import Archiver
from memory.cache import Cache, Scope
from memory.context import ContextBuilder, render_memories
from memory.l2_store import CheckpointWrite, L2Store
from memory.l3_store import L3Store, batch_id_for, memory_hit_json
from memory.metrics import Metrics
from memory.models import Message, SessionState, Turn
from memory.sessions import Sessions, StorageUnavailable, retryable_in_place
from memory.skill_detector import SkillDetector
from memory.skills import framed_skills, skill_block

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
    tools: Tooling
    agents: Agents
    cache: Cache
    # Runs a turn of another agent for agents__ask: (the asking turn's state,
    # agent, question) -> (answer, child session id). Set by the app.
    ask_agent: Callable[[TurnState, str, str], Awaitable[tuple[str, str]]] | None = None
    # Picks skills whose bodies join the turn before the LLM call (None: off).
    skill_detector: SkillDetector | None = None


def _since(t0: float) -> float:
    return time.perf_counter() - t0


class TurnNodes:
    # --- prepare ------------------------------------------------------------------
    async def prepare(
        self, state: TurnState, runtime: Rt
    ) -> Command[Literal["retrieve", "agent", "prepare", "__end__"]]:
        """The session (L1, else L2), the input rules, and what the turn needs.

        In a run of the runner's pool (``handoff``, graph/builder.py) it first
        waits for the next turn: its input (which then joins the state) and the
        turn task's context variables."""
        ctx = runtime.context
        handoff = ctx.handoff
        if handoff is None:
            own = await self._prepare(state, runtime)
            return Command(update=own.update, goto=own.goto)
        handed = ctx.handed = await handoff
        for var, value in handed.context:
            var.set(value)
        cmd = await self._prepare(handed.state, runtime)
        update = {**handed.state, **(cmd.update or {})}
        if cmd.goto == END:
            return Command(update=update, goto=_ended(ctx, state, update))
        return Command(update=update, goto=cmd.goto)

    async def _prepare(
        self, state: TurnState, runtime: Rt
    ) -> Command[Literal["retrieve", "agent", "__end__"]]:
        t0 = time.perf_counter()
        ctx = runtime.context
        d = ctx.deps
        tenant, session_id = state["tenant"], state["session_id"]
        # Defence in depth: the app checked already, before any I/O.
        check_message(state["message"], d.settings.max_message_chars)
        opened = await d.sessions.open(tenant, session_id, state["user_id"])
        session = ctx.run.session = opened.session
        agent = ctx.run.agent = await _agent_of(ctx, session, state)
        retry_of: int | None = None
        if state.get("client_turn_id"):
            stored = await d.sessions.stored_turn(tenant, session_id, state["turn_id"])
            if stored is not None and not retryable_in_place(stored):
                _replay(ctx, state["turn_id"], session_id, stored)
                return Command(
                    update={**PER_TURN_RESET, "turn": stored.index, "l1_hit": opened.l1_hit,
                            "replayed": True, "status": stored.status,
                            "timings": _fresh({"prepare": _since(t0)})},
                    goto="__end__",
                )  # fmt: skip
            if stored is not None:
                retry_of = stored.index
            # A retry resumes after the tool steps the earlier attempt recorded.
            records = await d.sessions.tool_steps(tenant, session_id, state["turn_id"])
        else:
            records = []
        turn = retry_of or session.turn_count + 1
        ctx.control.emit(Meta(state["turn_id"], session_id, turn, opened.l1_hit, d.llm.is_dev,
                              model=d.llm.name, agent=agent.name))  # fmt: skip
        resumed = await _resume(ctx, state, records) if records else _Resumed()
        skills_block = await _detected_skills(ctx, state["message"], session, agent)
        need = needs_memory(state["message"], state.get("retrieve", "auto"))
        update: TurnState = {**PER_TURN_RESET, "turn": turn, "l1_hit": opened.l1_hit,
                             "retry_of": retry_of, "need_memory": need,
                             "messages": [{"role": "user", "content": state["message"]},
                                          *resumed.messages],
                             "step": resumed.steps, "tool_calls": resumed.log,
                             "agent": agent.name, "skills_block": skills_block}  # fmt: skip
        if need:
            ctx.control.underway.set()  # the L3 search comes first
            update["timings"] = _fresh({"prepare": _since(t0)})
            return Command(update=update, goto="retrieve")
        # Nothing to retrieve: the prompt is known now, so the request goes out
        # now, before LangGraph's next step.
        load_s = _since(t0)
        plan_s = await _start_reply(ctx, state, session, skills_block, retry_of,
                                    resumed.messages, resumed.steps + 1)  # fmt: skip
        update["timings"] = _fresh({"prepare": load_s, "plan": plan_s})
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
        generation = session.archived_upto
        user = session.user_id or state["user_id"]

        async def search() -> list[dict[str, Any]]:
            found = await asyncio.wait_for(
                d.l3.search(tenant, user, message, k), timeout=d.settings.retrieve_timeout_s
            )
            return [memory_hit_json(h) for h in found]

        try:
            # Per session (forgotten with it); a search that found nothing is
            # kept as a short-lived "empty" entry.
            got = await d.cache.fetch(
                "retrieval", Scope(tenant, session_id),
                {"user": user, "query": message, "k": k, "generation": generation},
                search, encode=orjson.dumps, decode=orjson.loads, empty=lambda h: not h,
            )  # fmt: skip
        except (TimeoutError, TiermemError, ValueError) as exc:
            reason = getattr(exc, "code", None) or type(exc).__name__
            log.warning("retrieval skipped (%s): %s", reason, exc or "timeout")
            d.metrics.errors.labels("retrieve").inc()
            return {"memories": [], "memory_block": None,
                    "timings": {"retrieve": _since(t0)}}  # fmt: skip
        hits = got.value or []
        source = "cache" if got.outcome == "hit" else "l3"
        d.metrics.retrievals.labels(source).inc()
        if hits:
            ctx.control.emit(Memory(source, hits))
        return {"memories": hits, "memory_block": render_memories(hits) if hits else None,
                "timings": {"retrieve": _since(t0)}}  # fmt: skip

    # --- agent --------------------------------------------------------------------
    async def agent(self, state: TurnState, runtime: Rt) -> Command[Literal["tools", "commit"]]:
        """One LLM reply: waits for the stream (started by prepare, tools, or
        here) to end or be cancelled. Calls go to ``tools``; text ends the turn."""
        t0 = time.perf_counter()
        ctx = runtime.context
        d = ctx.deps
        run = ctx.run
        timings: dict[str, float] = {}
        messages = list(state.get("messages") or [{"role": "user", "content": state["message"]}])
        step = int(state.get("step") or 0) + 1
        if run.reply is None:
            assert run.session is not None
            timings["plan"] = await _start_reply(
                ctx, state, run.session, _turn_block(state), state.get("retry_of"),
                messages[1:], step,
            )  # fmt: skip
        assert run.reply is not None and run.plan is not None
        outcome = await run.reply.finish()
        run.reply = None
        calls = outcome.tool_calls
        if calls and step >= d.tools.max_steps:
            # tool_choice "none" was not obeyed: calls at the last step never run,
            # and a call without a result must not enter the log.
            log.warning("the model called tools at its last step (%d); ignored", step)
            calls = ()
        if outcome.text or calls or outcome.status != "failed":
            messages.append(cast("Message", assistant_message(outcome.text, calls)))
        llm_steps = [*(state.get("llm_steps") or []), _step_tokens(outcome)]
        usage = _usage(state.get("usage") or {}, outcome, run.plan.prompt_tokens)
        timings["agent"] = (state.get("timings") or {}).get("agent", 0.0) + _since(t0)
        update: dict[str, Any] = {"messages": messages, "status": outcome.status,
                                  "error": outcome.error, "usage": usage, "step": step,
                                  "llm_steps": llm_steps, "timings": timings}  # fmt: skip
        if calls and not ctx.control.cancel.is_set():
            for call in calls:
                ctx.control.emit(ToolCalled(call.id, call.name, call.arguments))
            return Command(update=update, goto="tools")
        return Command(update=update, goto="commit")

    # --- tools --------------------------------------------------------------------
    async def tools(self, state: TurnState, runtime: Rt) -> Command[Literal["agent", "commit"]]:
        """Runs the last reply's calls, records the step, sends the next request."""
        t0 = time.perf_counter()
        ctx = runtime.context
        d = ctx.deps
        run = ctx.run
        tenant, session_id, turn_id = state["tenant"], state["session_id"], state["turn_id"]
        messages = list(state["messages"])
        assistant = messages[-1]
        calls = [_call_of(c) for c in assistant.get("tool_calls") or ()]
        toolset = run.toolset
        assert toolset is not None and run.session is not None
        step = int(state["step"])
        side_effects = any(
            (spec := toolset.get(c.name)) is None or spec.side_effecting for c in calls
        )
        user = run.session.user_id or state["user_id"]

        async def search(query: str, k: int) -> list[dict[str, Any]]:
            return [memory_hit_json(h) for h in await d.l3.search(tenant, user, query, k)]

        async def ask(agent: str, question: str) -> tuple[str, str]:
            if d.ask_agent is None:
                raise ValueError("agents__ask is not available here")
            return await d.ask_agent(state, agent, question)

        try:
            if side_effects:
                # Before anything runs: a crash from here on leaves a trace, and
                # the retry reports the call instead of running it again.
                intent = {"step": step, "assistant": assistant}
                await d.sessions.record_tool_step(tenant, session_id, turn_id, intent)
            t_run = time.perf_counter()
            outcomes = await d.tools.executor.run(
                calls, toolset, tenant=tenant, memory_search=search,
                mask=run.agent.tools if run.agent else None, ask=ask,
                skills_allowed=run.agent.skills if run.agent else None,
            )  # fmt: skip
            run_s = _since(t_run)
            results = [tool_message(o) for o in outcomes]
            await d.sessions.record_tool_step(
                tenant, session_id, turn_id,
                {"step": step, "assistant": assistant, "results": results,
                 "ok": [o.ok for o in outcomes]},
            )  # fmt: skip
        except StorageUnavailable as exc:
            # Not durable, so not continued: the turn fails, retryable, and the
            # unanswered calls leave the log (a retry decides again).
            log.warning("tool step %d not recorded (%s): the turn fails", step, exc)
            d.metrics.errors.labels("tool_record").inc()
            messages[-1] = cast("Message", assistant_message(str(assistant.get("content") or "")))
            if not messages[-1].get("content"):
                messages.pop()
            return Command(
                update={"messages": messages, "status": "failed",
                        "error": {"code": exc.code, "message": exc.message, "retryable": True},
                        "timings": {"tools": _since(t0)}},
                goto="commit",
            )  # fmt: skip
        tool_log = [*(state.get("tool_calls") or []), *_emit_results(ctx, outcomes)]
        for o in outcomes:
            d.metrics.tool_calls.labels(_source(o.call.name), "ok" if o.ok else "error").inc()
        messages.extend(results)
        update: dict[str, Any] = {"messages": messages, "tool_calls": tool_log}
        # "tool_run" is the tools' own time; "tools" what tiermem adds around it.
        prior = state.get("timings") or {}
        if ctx.control.cancel.is_set():
            # The client left (or the drain is out of time) while the tools ran:
            # stored as it is; a retry continues from the recorded step.
            update["status"] = "interrupted"
            goto: Literal["agent", "commit"] = "commit"
        else:
            await _send(ctx, state, messages[1:], step + 1)
            goto = "agent"
        update["timings"] = {"tools": prior.get("tools", 0.0) + _since(t0) - run_s,
                             "tool_run": prior.get("tool_run", 0.0) + run_s}  # fmt: skip
        return Command(update=update, goto=goto)

    # --- commit -------------------------------------------------------------------
    async def commit(
        self, state: TurnState, runtime: Rt
    ) -> Command[Literal["archive", "prepare", "__end__"]]:
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
        llm_steps = state.get("llm_steps") or []
        expected = account.expected_cacheable + _later_steps_cacheable(
            llm_steps, d.context.block_tokens
        )
        usage.update(expected_cacheable_tokens=expected, prefix_break=reason)
        if len(llm_steps) > 1:
            usage["llm_requests"] = len(llm_steps)
        if state.get("tool_calls"):
            usage["tool_calls"] = state["tool_calls"]
        interrupted_by = ctx.control.reason if status == "interrupted" else None
        if interrupted_by:
            usage["interrupted_by"] = interrupted_by
        messages = list(state.get("messages") or [])
        # The reply the next prompt will extend: the final plain assistant text,
        # after the tool steps the last request carried.
        final = messages[-1] if len(messages) > 1 else {}
        plain = final.get("role") == "assistant" and not final.get("tool_calls")
        reply = str(final.get("content") or "") if plain else ""
        steps = messages[1:-1] if plain else messages[1:]
        turn = Turn(
            index=0, turn_id=state["turn_id"], messages=messages, status=status,
            memories=_turn_block(state), created_at=time.time(), usage=usage,
            memory_hits=state.get("memories") or None,
        )  # fmt: skip
        # Stored with the turn: no recount on reload.
        await d.context.turn_tokens_async(turn, plan)
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
            agent=run.agent.name if run.agent else "",
            retry_of=state.get("retry_of"),
            rendered=d.context.after_reply(plan, reply, steps) if status != "failed" else None,
            checkpoint_for=checkpoint_for, l1_hit=bool(state.get("l1_hit")),
        )  # fmt: skip
        if committed.duplicate_of is not None:
            ctx.control.emit(Done(state["turn_id"], committed.duplicate_of, "duplicate", usage))
            dup: TurnState = {"turn": committed.duplicate_of, "archive_batch": None,
                              "timings": {"commit": _since(t0)}}  # fmt: skip
            return Command(update=dup, goto=_ended(ctx, state, dup))
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
        done: TurnState = {"turn": turn.index, "version": version, "usage": usage,
                           "archive_batch": archive_batch,
                           "timings": {"commit": _since(t0)}}  # fmt: skip
        return Command(update=done, goto="archive" if archive_batch else _ended(ctx, state, done))

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
    async def archive(
        self, state: TurnState, runtime: Rt
    ) -> Command[Literal["prepare", "__end__"]]:
        # Off the critical path: `done` has gone out already; the archiver cuts,
        # summarises, embeds and upserts the batch in a background task.
        runtime.context.deps.archiver.schedule(state["tenant"], state["session_id"])
        return Command(goto=_ended(runtime.context, state, {}))


def _fresh(timings: dict[str, float]) -> Any:
    """A turn's first timings: they replace the channel's (a pooled run's
    channel still holds its previous turn's) instead of merging into it."""
    return Overwrite(timings)


_OUTPUT_KEYS = tuple(TurnOutput.__annotations__)


def _ended(
    ctx: TurnContext, state: TurnState, update: Mapping[str, Any]
) -> Literal["prepare", "__end__"]:
    """Where the node that ends a turn goes: back to ``prepare``, to wait for
    the next turn, when the run is one of the runner's pool and stays in it;
    else to the end. Either way the turn's output goes to whoever waits for it
    (``TurnContext.end_turn``)."""
    out: dict[str, Any] = {k: update[k] if k in update else state.get(k) for k in _OUTPUT_KEYS}
    timings = update.get("timings")
    if isinstance(timings, Overwrite):
        out["timings"] = dict(timings.value)
    else:
        out["timings"] = {**(state.get("timings") or {}), **(timings or {})}
    return "prepare" if ctx.end_turn(out) else "__end__"


async def _start_reply(
    ctx: TurnContext,
    state: TurnState,
    session: SessionState,
    memory_block: str | None,
    retry_of: int | None,
    steps: list[Message] | None = None,
    request_no: int = 1,
) -> float:
    """Plans the prompt and sends the turn's first LLM request of this run (after
    any ``steps`` a retried turn resumes); returns the planning time."""
    t0 = time.perf_counter()
    d = ctx.deps
    agent = ctx.run.agent
    plan = await d.context.plan_async(session, state["message"], memory_block,
                                      exclude_turn=retry_of,
                                      agent=agent.name if agent else None)  # fmt: skip
    ctx.run.plan = plan
    ctx.run.toolset = d.tools.toolset_for(plan.tools)
    plan_s = _since(t0)
    await _send(ctx, state, steps or [], request_no)
    return plan_s


async def _send(ctx: TurnContext, state: TurnState, steps: list[Message], request_no: int) -> None:
    """Sends LLM request number ``request_no`` of the turn: the plan's messages,
    then the tool steps so far; always the plan's ``tools``, masked by
    ``tool_choice`` only."""
    d = ctx.deps
    run = ctx.run
    plan, toolset = run.plan, run.toolset
    assert plan is not None and toolset is not None
    agent = run.agent
    last = request_no >= d.tools.max_steps
    mask = agent.tools if agent else None
    choice = d.tools.policy.choice(state["tenant"], toolset, last_step=last, mask=mask)
    messages = cast("list[ChatMessage]", [*plan.messages, *steps])
    run.reply = reply = ReplyStream(
        d.llm, messages, session_key=f"{state['tenant']}:{state['session_id']}",
        control=ctx.control, metrics=d.metrics, started=ctx.started,
        tools=plan.tools, tool_choice=choice, first_step=run.requests == 0,
        max_tokens=agent.max_tokens if agent else None,
        temperature=agent.temperature if agent else None,
    )  # fmt: skip
    run.requests += 1
    await reply.start()
    ctx.control.underway.set()


def _turn_block(state: TurnState) -> str | None:
    """What joins the turn's user message: detected skills' bodies, then the
    retrieved memories (stored with the turn, so it renders the same later)."""
    parts = [b for b in (state.get("skills_block"), state.get("memory_block")) if b]
    return "\n\n".join(parts) if parts else None


def _skills_in_context(session: SessionState) -> set[str]:
    """Skills whose bodies the live context holds already (detected or loaded)."""
    names: set[str] = set()
    for turn in session.turns:
        texts = [turn.memories or ""]
        texts += [str(m.get("content") or "") for m in turn.messages if m.get("role") == "tool"]
        for text in texts:
            names.update(name for name, _ in framed_skills(text))
    return names


async def _detected_skills(
    ctx: TurnContext, message: str, session: SessionState, agent: AgentProfile
) -> str | None:
    """The bodies of the skills the detector picks for ``message`` (not those the
    live context has, nor those the agent lacks), as one block; a ``skill``
    event each. A detector that fails or is slow skips it (a bonus, like memory)."""
    d = ctx.deps
    registry = d.tools.skills
    if d.skill_detector is None or registry is None or not registry.skills:
        return None
    ctx.control.underway.set()  # detection (an embedding) comes before the request
    exclude = _skills_in_context(session)
    if agent.skills is not None:
        exclude |= {s.name for s in registry.skills if s.name not in agent.skills}
    try:
        found = await asyncio.wait_for(d.skill_detector.detect(message, exclude=exclude),
                                       timeout=d.settings.retrieve_timeout_s)  # fmt: skip
    except (TimeoutError, TiermemError, ValueError) as exc:
        log.warning("skill detection skipped (%s)", getattr(exc, "code", None) or exc or "timeout")
        d.metrics.errors.labels("skill_detect").inc()
        return None
    blocks = []
    for detection in found:
        skill = registry.get(detection.name)
        if skill is None:
            continue
        blocks.append(skill_block(skill.name, skill.version, skill.body))
        ctx.control.emit(SkillUsed(skill.name, skill.version, "detected"))
    return "\n\n".join(blocks) if blocks else None


async def _agent_of(ctx: TurnContext, session: SessionState, state: TurnState) -> AgentProfile:
    """The session's agent; on its first turn, the one asked for (a name, or
    "auto": the nearest description to the message), else the default."""
    d = ctx.deps
    if session.agent or session.turn_count:
        return d.agents.get(session.agent)
    asked = state.get("agent") or ""
    if asked == "auto":
        ctx.control.underway.set()  # routing embeds the message first
        return d.agents.get(await d.agents.route(state["message"], d.l3.embedder.embed))
    return d.agents.get(asked)


def _call_of(entry: dict[str, Any]) -> ToolCall:
    fn = entry.get("function") or {}
    return ToolCall(str(entry.get("id")), str(fn.get("name")), str(fn.get("arguments") or ""))


def _source(name: str) -> str:
    server, sep, _ = name.partition("__")
    if not sep:
        return "unknown"
    return "memory" if server == "memory" else "mcp"


def _emit_results(ctx: TurnContext, outcomes: list[ToolOutcome]) -> list[dict[str, Any]]:
    """The ``tool_result`` events of a step, in call order; returns its log entries."""
    cap = ctx.deps.tools.event_max_chars
    entries = []
    for o in outcomes:
        content = o.content
        ctx.control.emit(ToolResult(o.call.id, o.call.name, o.ok, content[:cap],
                                    truncated=len(content) > cap))  # fmt: skip
        if o.ok and o.skill is not None:
            ctx.control.emit(SkillUsed(o.skill[0], o.skill[1], "tool"))
        entry: dict[str, Any] = {"id": o.call.id, "name": o.call.name, "ok": o.ok}
        if o.session is not None:
            entry["session"] = o.session  # agents__ask: the child session of the answer
        entries.append(entry)
    return entries


@dataclass
class _Resumed:
    """The tool steps an earlier attempt of the turn recorded."""

    messages: list[Message] = field(default_factory=list)
    steps: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)


NOT_REPEATED = (
    "this call was started before an interruption and may have run; it is not run "
    "again. Check whether it took effect before calling it again."
)


async def _resume(ctx: TurnContext, state: TurnState, records: list[dict[str, Any]]) -> _Resumed:
    """The recorded steps as messages, their events sent again. A step whose
    intent was recorded without its results gets error results and is not run
    (those results are recorded, so a further retry reads the same)."""
    d = ctx.deps
    by_step: dict[int, dict[str, Any]] = {}
    for r in records:
        entry = by_step.setdefault(int(r["step"]), {"assistant": r["assistant"]})
        if r.get("results") is not None:
            entry["results"], entry["ok"] = r["results"], r["ok"]
    out = _Resumed()
    for step in sorted(by_step):
        entry = by_step[step]
        assistant = entry["assistant"]
        calls = [_call_of(c) for c in assistant.get("tool_calls") or ()]
        for call in calls:
            ctx.control.emit(ToolCalled(call.id, call.name, call.arguments))
        if "results" in entry:
            recorded = zip(calls, entry["results"], entry["ok"], strict=False)
            outcomes = [ToolOutcome(c, bool(ok), _result_text(m)) for c, m, ok in recorded]
        else:
            outcomes = [ToolOutcome(c, False, NOT_REPEATED, not_repeated=True) for c in calls]
            await d.sessions.record_tool_step(
                state["tenant"], state["session_id"], state["turn_id"],
                {"step": step, "assistant": assistant,
                 "results": [tool_message(o) for o in outcomes], "ok": [False] * len(calls)},
            )  # fmt: skip
            log.warning("turn %s: step %d was cut short; its calls are not run again",
                        state["turn_id"], step)  # fmt: skip
        out.messages.append(assistant)
        out.messages.extend(tool_message(o) for o in outcomes)
        out.log.extend(_emit_results(ctx, outcomes))
        out.steps = step
    return out


def _result_text(message: dict[str, Any]) -> str:
    content = str(message.get("content") or "")
    return content.removeprefix("ERROR: ")


def _step_tokens(outcome: ReplyOutcome) -> dict[str, Any]:
    u = outcome.done.usage if outcome.done is not None else None
    return {"prompt": u.prompt_tokens if u else None,
            "completion": u.completion_tokens if u else None,
            "cached": u.cached_tokens if u else None}  # fmt: skip


def _usage(prev: dict[str, Any], outcome: ReplyOutcome, plan_tokens: int) -> dict[str, Any]:
    """The turn's usage so far: tokens summed over its LLM requests; TTFT,
    replica and route of the first one."""
    done = outcome.done
    u = done.usage if done is not None else None
    first = not prev
    prompt = u.prompt_tokens if u else (plan_tokens if first else 0)
    completion = u.completion_tokens if u else len(outcome.text.split())
    cached = u.cached_tokens if u else None
    finish = done.finish_reason if done is not None else None
    if first:
        return {
            "finish_reason": finish,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "cached_tokens": cached,
            "ttft_ms": round(outcome.ttft_ms, 2) if outcome.ttft_ms is not None else None,
            "replica": done.replica if done else None,
            "route_moved": bool(done and done.moved),
        }
    usage = dict(prev)
    usage["finish_reason"] = finish  # the last request's: why the reply ended
    usage["prompt_tokens"] = (prev.get("prompt_tokens") or 0) + prompt
    usage["completion_tokens"] = (prev.get("completion_tokens") or 0) + completion
    if cached is not None or prev.get("cached_tokens") is not None:
        usage["cached_tokens"] = (prev.get("cached_tokens") or 0) + (cached or 0)
    return usage


def _later_steps_cacheable(llm_steps: list[dict[str, Any]], block: int) -> int:
    """Expected prefix reuse of a turn's later requests: each extends the one
    before with its reply and the tool results, so all of that earlier prompt
    and reply is reusable (whole blocks, never the last prompt token)."""
    total = 0
    for before, this in itertools.pairwise(llm_steps):
        if before.get("prompt") is None or this.get("prompt") is None:
            continue
        n = min(before["prompt"] + (before.get("completion") or 0), this["prompt"] - 1)
        total += max(0, n) // block * block
    return total


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
    from L2, without the LLM, the tools or writing anything: its tool calls and
    results, then its text."""
    emit = ctx.control.emit
    emit(Meta(turn_id, session_id, turn.index, replayed=True))
    if turn.memory_hits:
        emit(Memory("replay", turn.memory_hits))
    ok_of = {c.get("id"): bool(c.get("ok")) for c in (turn.usage or {}).get("tool_calls") or ()}
    cap = ctx.deps.tools.event_max_chars
    for m in turn.messages:
        if m.get("role") == "assistant":
            for entry in m.get("tool_calls") or ():
                call = _call_of(entry)
                emit(ToolCalled(call.id, call.name, call.arguments))
        elif m.get("role") == "tool":
            call_id = str(m.get("tool_call_id"))
            content = _result_text(m)
            emit(ToolResult(call_id, str(m.get("name") or ""), ok_of.get(call_id, True),
                            content[:cap], truncated=len(content) > cap))  # fmt: skip
    emit(Token(turn.assistant))
    emit(Done(turn_id, turn.index, turn.status, turn.usage or {}, replayed=True))
