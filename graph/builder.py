"""Builds the turn graph and runs one turn."""

from __future__ import annotations

import time
from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph

from graph.nodes import TurnDeps, TurnNodes
from graph.state import TurnContext, TurnControl, TurnInput, TurnOutput, TurnState

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


class TurnRunner:
    """Runs turns through the compiled graph, one at a time per session on a pod."""

    def __init__(self, deps: TurnDeps) -> None:
        self.deps = deps
        self.graph = build_turn_graph()

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
            ctx = TurnContext(self.deps, control, started)
            try:
                # Each LLM step is two graph steps (agent, tools), plus the rest.
                limit = 2 * self.deps.tools.max_steps + 8
                final: dict[str, Any] = await self.graph.ainvoke(
                    inp.state(), context=ctx, config={"recursion_limit": limit}
                )
            finally:
                await ctx.run.aclose()
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
