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
from graph.runs import run_streaming_nothing
from graph.state import (
    Handoff,
    TurnContext,
    TurnControl,
    TurnInput,
    TurnOutput,
    TurnRun,
    TurnState,
)

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

    The node that ends a turn (``commit``, ``archive``, or ``prepare`` on a
    replay) goes back to ``prepare`` instead of the end when the run is one of
    the runner's pool (``TurnRunner``): there it waits for the next turn.
    """
    nodes = TurnNodes()
    g = StateGraph(TurnState, context_schema=TurnContext, output_schema=TurnOutput)
    g.add_node("prepare", nodes.prepare, destinations=("retrieve", "agent", "prepare", END))
    g.add_node("retrieve", nodes.retrieve)
    g.add_node("agent", nodes.agent, destinations=("tools", "commit"))
    g.add_node("tools", nodes.tools, destinations=("agent", "commit"))
    g.add_node("commit", nodes.commit, destinations=("archive", "prepare", END))
    g.add_node("archive", nodes.archive, destinations=("prepare", END))
    g.add_edge(START, "prepare")
    g.add_edge("retrieve", "agent")
    return g.compile(name="tiermem-turn", checkpointer=checkpointer)


# The input of a pooled run: placeholders until ``prepare`` gets a turn's own
# (a run that is never handed a turn writes nothing).
_WARM_INPUT: TurnState = {
    "tenant": "", "session_id": "", "user_id": "", "message": "", "turn_id": "",
    "retrieve": "never", "client_turn_id": False, "agent": "", "depth": 0,
}  # fmt: skip


@dataclass(eq=False)
class _PooledRun:
    ctx: TurnContext  # its ``handoff`` is what the run waits on
    task: asyncio.Task[None]
    context: contextvars.Context
    turns: int = 0  # turns handed to it so far


class TurnRunner:
    """Runs turns through the compiled graph, one at a time per session on a pod.

    Pooled runs. Starting a LangGraph run (its config, callback managers,
    channels, the first step and its task) costs about 0.3 ms of CPU on an idle
    loop and took 0.76 ms of the event loop at 200 sessions, between a
    request's arrival and its LLM call. So a client turn is handed to a run of
    the runner's pool: a run that waits in ``prepare`` for its next turn
    (``TurnContext.handoff``). It gets the turn's input, its control and its
    task's context variables, and runs the turn's steps as any run would; the
    node that ends the turn hands over the turn's output
    (``TurnContext.end_turn``) and goes back to ``prepare``, where the run
    waits for another turn. The run's set-up is so paid once per
    ``TIERMEM_GRAPH_RUN_TURNS`` turns instead of once per turn (a 3-node run
    that does nothing: 0.85 ms of CPU a turn as a run of its own, 0.55 ms when
    one run serves turn after turn, bench/langgraph_run_cost.py).

    - ``TIERMEM_GRAPH_WARM_RUNS`` runs wait at most (started at start-up, and
      topped up as turns end). A turn that finds none waiting starts a run and
      hands itself to it; when that turn ends, the run joins the pool if it
      has room, else ends. Topping up at the handoff instead put a run's
      set-up between a turn and its LLM request's write (measured at 200
      sessions: +2.0 ms median TTFT overhead instead of +1.2).
    - A run retires after ``TIERMEM_GRAPH_RUN_TURNS`` turns: LangGraph keeps
      the id of every task a run has run (about 0.75 KB a turn), so a
      run must not live for ever.
    - Each step a turn runs counts against the run's recursion limit, which
      is a turn's worth (two steps per LLM step, plus the rest) times the
      turns a run may serve.
    - A turn cancelled while it runs cancels its run, and a run whose step
      fails ends with its turn's error: the next turn gets another run.
    - Turns ``agents__ask`` runs inside another turn's graph (LangGraph nests
      those in the parent's run through its context) run as runs of their
      own, start to end. With ``TIERMEM_GRAPH_WARM_RUNS=0`` every turn is a
      run of its own too, traced as one (a pooled run is one LangGraph run
      over many turns, for tracing tools).
    """

    def __init__(self, deps: TurnDeps) -> None:
        self.deps = deps
        self.graph = build_turn_graph()
        self.warm_runs = deps.settings.graph_warm_runs
        self.run_turns = deps.settings.graph_run_turns
        self._warm: deque[_PooledRun] = deque()
        self._closed = False
        # Turns handed to a run that was waiting (the rest started one).
        self.handoffs = 0

    def _turn_steps(self) -> int:
        # Each LLM step is two graph steps (agent, tools), plus the rest.
        return 2 * self.deps.tools.max_steps + 8

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
            try:
                if inp.depth == 0 and self.warm_runs > 0:
                    final = await self._hand(self._take_warm() or self._start(), inp, control,
                                             started)  # fmt: skip
                else:
                    ctx = TurnContext(self.deps, control, started)
                    try:
                        # version="v2": the final values only (v1 also
                        # streams every step's updates, to look for interrupts).
                        out = await self.graph.ainvoke(
                            inp.state(), context=ctx,
                            config={"recursion_limit": self._turn_steps()}, version="v2",
                        )  # fmt: skip
                        final = out.value
                    finally:
                        await ctx.run.aclose()
            finally:
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
        self, pooled: _PooledRun, inp: TurnInput, control: TurnControl, started: float
    ) -> dict[str, Any]:
        """Gives a pooled run its turn and waits for the turn's end (a cancel of
        this task cancels the run, as it would a run of its own)."""
        ctx = pooled.ctx
        pooled.turns += 1
        ctx.control = control
        ctx.started = started
        run = ctx.run = TurnRun()
        # The run's own task and the steps it starts from now on see the turn
        # task's variables; ``prepare``, whose task exists already, sets them itself.
        turn_vars = _turn_variables(pooled.context)
        for var, value in turn_vars:
            pooled.context.run(var.set, value)
        ended: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        assert ctx.handoff is not None and not ctx.handoff.done()
        ctx.handoff.set_result(Handoff(inp.state(), turn_vars, ended))
        try:
            await asyncio.wait((ended, pooled.task), return_when=asyncio.FIRST_COMPLETED)
            if not ended.done():
                # The run ended without ending the turn: a step failed (its
                # error is the turn's), or it was cancelled.
                pooled.task.result()
                raise RuntimeError("the turn's graph run ended before the turn did")
            return ended.result()
        except asyncio.CancelledError:
            # The turn's cancel is its run's, and ends once the run has.
            pooled.task.cancel()
            await asyncio.gather(pooled.task, return_exceptions=True)
            raise
        finally:
            await run.aclose()

    def _turn_ended(self, pooled: _PooledRun) -> bool:
        """A pooled run's turn has ended (called from its last node): True if
        the run waits for another turn, False if it ends now."""
        ctx = pooled.ctx
        if self._closed or pooled.turns >= self.run_turns or len(self._warm) >= self.warm_runs:
            return False
        ctx.control = TurnControl(emit=_before_handoff)
        ctx.handoff = asyncio.get_running_loop().create_future()
        self._warm.append(pooled)
        return True

    @property
    def waiting(self) -> list[asyncio.Task[None]]:
        """The pooled runs' tasks, each waiting for a turn."""
        return [w.task for w in self._warm]

    def _take_warm(self) -> _PooledRun | None:
        while self._warm:
            pooled = self._warm.popleft()
            if not pooled.task.done():
                self.handoffs += 1
                return pooled
            # Ended before its turn came (it should not): say why, start anew.
            if not pooled.task.cancelled() and pooled.task.exception() is not None:
                log.warning("a waiting graph run ended early: %r", pooled.task.exception())
        return None

    def _start(self) -> _PooledRun:
        """A new run, waiting in ``prepare`` for its first turn."""
        handoff: asyncio.Future[Handoff] = asyncio.get_running_loop().create_future()
        ctx = TurnContext(self.deps, TurnControl(emit=_before_handoff), 0.0, handoff=handoff)
        # An empty context: the run gets each turn's variables at its handoff.
        context = contextvars.Context()
        config: RunnableConfig = {"recursion_limit": self._turn_steps() * self.run_turns + 2}
        task = asyncio.create_task(
            run_streaming_nothing(self.graph, _WARM_INPUT, ctx, config), context=context
        )
        pooled = _PooledRun(ctx, task, context)
        ctx.turn_ended = lambda _output: self._turn_ended(pooled)
        return pooled

    def refill(self) -> None:
        """Starts runs until ``warm_runs`` wait (at start-up, and as each turn ends)."""
        if self._closed:
            return
        while len(self._warm) < self.warm_runs:
            self._warm.append(self._start())

    async def aclose(self) -> None:
        """Ends the waiting runs (each waits for a turn: nothing to undo); a
        run serving a turn now ends with it."""
        self._closed = True
        warm = self.waiting
        self._warm.clear()
        for task in warm:
            task.cancel()
        await asyncio.gather(*warm, return_exceptions=True)


def _turn_variables(
    run_context: contextvars.Context,
) -> tuple[tuple[contextvars.ContextVar[Any], Any], ...]:
    """The calling turn task's context variables, and, for each one a previous
    turn of the run set that this turn's task has not, its default: a pooled
    run logs no earlier turn's session."""
    mine = contextvars.copy_context()
    out = list(mine.items())
    for var in run_context:
        if var not in mine:
            try:
                out.append((var, contextvars.Context().run(var.get)))
            except LookupError:  # no default to go back to
                continue
    return tuple(out)


def _before_handoff(event: TurnEvent) -> None:
    raise RuntimeError(f"a warm run emitted {event.name!r} before it had a turn")
