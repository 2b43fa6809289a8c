"""Builds the turn graph and runs one turn."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph

from graph.events import TurnEvent
from graph.nodes import TurnDeps, TurnNodes
from graph.state import Handoff, TurnContext, TurnControl, TurnInput, TurnOutput, TurnState

log = logging.getLogger("tiermem.turn")

Graph = CompiledStateGraph[Any, Any, Any, Any]


def build_turn_graph(checkpointer: Any = None) -> Graph:
    """``prepare -> (retrieve)? -> agent <-> (tools)* -> commit -> (archive)?``

    Served without a LangGraph checkpointer on purpose: LangGraph would read a
    checkpoint before every run and write one after every step, round trips that
    L1 exists to avoid. The ``commit`` node writes the thread's checkpoint
    itself, with the graph's own channels and the saver's serde, in the script
    that appends the turn, so LangGraph tooling reads every turn and a graph
    compiled with ``RedisCheckpointSaver`` (``checkpointer``) resumes from it.

    Nodes that branch say where to go with a ``Command`` (destinations declared
    here, so the drawn graph shows every edge): a conditional edge would be one
    more runnable, with its own callbacks, on every turn.
    """
    nodes = TurnNodes()
    g = StateGraph(TurnState, context_schema=TurnContext, output_schema=TurnOutput)
    g.add_node("prepare", nodes.prepare, destinations=("retrieve", "agent", END))
    g.add_node("retrieve", nodes.retrieve)
    g.add_node("agent", nodes.agent, destinations=("tools", "commit"))
    g.add_node("tools", nodes.tools, destinations=("agent", "commit"))
    g.add_node("commit", nodes.commit, destinations=("archive", END))
    g.add_node("archive", nodes.archive)
    g.add_edge(START, "prepare")
    g.add_edge("retrieve", "agent")
    g.add_edge("archive", END)
    return g.compile(name="tiermem-turn", checkpointer=checkpointer)


# The input of a run started ahead of its turn: placeholders until ``prepare``
# gets the turn's own (a run that is never handed a turn writes nothing).
_WARM_INPUT: TurnState = {
    "tenant": "", "session_id": "", "user_id": "", "message": "", "turn_id": "",
    "retrieve": "never", "client_turn_id": False, "agent": "", "depth": 0,
}  # fmt: skip


@dataclass(eq=False)
class _WarmRun:
    ctx: TurnContext  # its ``handoff`` is what the run waits on
    task: asyncio.Task[dict[str, Any]]
    context: contextvars.Context


class TurnRunner:
    """Runs turns through the compiled graph, one at a time per session on a pod.

    Warm runs. Starting a LangGraph run (its config, callbacks, channels, the
    first step and the task of ``prepare``) took about 0.75 ms of the event
    loop at 200 sessions, between a request's arrival and its LLM call. So the
    runner keeps ``TIERMEM_GRAPH_WARM_RUNS`` runs started ahead of their turns:
    each has gone through that set-up and waits in ``prepare`` for a turn
    (``TurnContext.handoff``). A client turn takes one (under its session's
    lock, as any turn runs), hands it its input, its control and its task's
    context variables. The run is the same graph run with the same steps; only
    its start moved.

    The pool is topped up when a turn ends, not when one is taken: a set-up
    started at the handoff ran while the turn's LLM request was still being
    written (httpx yields to the loop several times on the way) and cost that
    request more than the warm run saved (measured at 200 sessions: median
    TTFT overhead +1.2-1.3 ms over the bare relay when topped up at the end,
    +2.0 when topped up once the request was under way). With a pool of 4, 9%
    of the turns at 200 sessions found none ready; those, turns that arrive
    in a burst larger than the pool, and turns ``agents__ask`` runs inside
    another turn's graph (LangGraph nests those in the parent's run through
    its context) start a run of their own, as every turn does with
    ``TIERMEM_GRAPH_WARM_RUNS=0``. Services fills the pool at start-up.
    """

    def __init__(self, deps: TurnDeps) -> None:
        self.deps = deps
        self.graph = build_turn_graph()
        self.warm_runs = deps.settings.graph_warm_runs
        self._warm: deque[_WarmRun] = deque()
        self._closed = False
        # Turns that got a warm run (the rest started their own).
        self.handoffs = 0

    def _config(self) -> RunnableConfig:
        # Each LLM step is two graph steps (agent, tools), plus the rest.
        return {"recursion_limit": 2 * self.deps.tools.max_steps + 8}

    async def run(
        self, inp: TurnInput, control: TurnControl, started: float | None = None
    ) -> dict[str, Any]:
        """Runs one turn; its client events go to ``control.emit`` as they
        happen, in order. Returns the graph's output (``TurnOutput``), with the
        turn's own phase timings.

        ``started`` is when the request arrived (perf_counter), for TTFT."""
        started = time.perf_counter() if started is None else started
        m = self.deps.metrics
        async with self.deps.sessions.turn_lock(
            inp.tenant, inp.session_id, on_wait=control.underway.set
        ):
            warm = self._take_warm() if inp.depth == 0 else None
            ctx = warm.ctx if warm is not None else TurnContext(self.deps, control, started)
            try:
                if warm is None:
                    final: dict[str, Any] = await self.graph.ainvoke(
                        inp.state(), context=ctx, config=self._config()
                    )
                else:
                    final = await self._hand(warm, inp, control, started)
            finally:
                await ctx.run.aclose()
                self.refill()
        # Every phase is known only once the graph is done (commit included).
        timings = final.get("timings") or {}
        for phase, secs in timings.items():
            m.phase_seconds.labels(phase).observe(secs)
        # What the service itself spends: every phase but the waits for the LLM
        # and for the tools themselves.
        m.overhead_seconds.observe(
            sum(v for k, v in timings.items() if k not in ("agent", "tool_run"))
        )
        return final

    async def _hand(
        self, warm: _WarmRun, inp: TurnInput, control: TurnControl, started: float
    ) -> dict[str, Any]:
        """Gives a warm run its turn and waits for it (a cancel of this task
        cancels the run, as it would a run of its own)."""
        self.handoffs += 1
        warm.ctx.control = control
        warm.ctx.started = started
        # The run's own task and the steps it starts from now on see the turn
        # task's variables; ``prepare``, whose task exists already, sets them itself.
        turn_vars = tuple(contextvars.copy_context().items())
        for var, value in turn_vars:
            warm.context.run(var.set, value)
        assert warm.ctx.handoff is not None
        warm.ctx.handoff.set_result(Handoff(inp.state(), turn_vars))
        return await warm.task

    @property
    def waiting(self) -> list[asyncio.Task[dict[str, Any]]]:
        """The warm runs' tasks, each waiting for a turn."""
        return [w.task for w in self._warm]

    def _take_warm(self) -> _WarmRun | None:
        while self._warm:
            warm = self._warm.popleft()
            if not warm.task.done():
                return warm
            # Ended before its turn came (it should not): say why, start anew.
            if not warm.task.cancelled() and warm.task.exception() is not None:
                log.warning("a warm graph run ended early: %r", warm.task.exception())
        return None

    def refill(self) -> None:
        """Starts warm runs up to ``warm_runs`` (at start-up, and as each turn ends)."""
        if self._closed:
            return
        while len(self._warm) < self.warm_runs:
            handoff: asyncio.Future[Handoff] = asyncio.get_running_loop().create_future()
            ctx = TurnContext(self.deps, TurnControl(emit=_before_handoff), 0.0, handoff=handoff)
            # An empty context: the run gets its turn's variables at the handoff.
            context = contextvars.Context()
            task = asyncio.create_task(
                self.graph.ainvoke(_WARM_INPUT, context=ctx, config=self._config()),
                context=context,
            )
            self._warm.append(_WarmRun(ctx, task, context))

    async def aclose(self) -> None:
        """Ends the warm runs (each still waiting for a turn: nothing to undo)."""
        self._closed = True
        warm = self.waiting
        self._warm.clear()
        for task in warm:
            task.cancel()
        await asyncio.gather(*warm, return_exceptions=True)


def _before_handoff(event: TurnEvent) -> None:
    raise RuntimeError(f"a warm run emitted {event.name!r} before it had a turn")
