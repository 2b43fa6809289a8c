"""Builds the turn graph and runs one turn as a stream of client events."""

from __future__ import annotations

import time
from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph

from graph.nodes import TurnDeps, TurnNodes
from graph.state import TurnControl, TurnInput, TurnOutput, TurnState


def build_turn_graph(deps: TurnDeps) -> CompiledStateGraph[Any, Any, Any, Any]:
    """``load_state -> input_guard -> (retrieve)? -> respond -> commit -> (archive)?``

    Compiled without a LangGraph checkpointer on purpose: LangGraph would read a
    checkpoint before every run and write one after, two Redis round trips that
    L1 exists to avoid. The ``commit`` node writes the thread's checkpoint itself,
    in ``RedisCheckpointSaver``'s format and in the same Lua script that appends
    the turn, so LangGraph tooling still reads every turn's checkpoint.
    """
    nodes = TurnNodes(deps)
    g = StateGraph(TurnState, output_schema=TurnOutput)
    # Nodes that branch say where to go with a Command (destinations declared
    # here, so the drawn graph shows every edge): a conditional edge would be
    # one more runnable, with its own callbacks, on every turn.
    g.add_node("load_state", nodes.load_state, destinations=("input_guard", END))
    g.add_node("input_guard", nodes.input_guard, destinations=("retrieve", "respond"))
    g.add_node("retrieve", nodes.retrieve)
    g.add_node("respond", nodes.respond)
    g.add_node("commit", nodes.commit, destinations=("archive", END))
    g.add_node("archive", nodes.archive)
    g.add_edge(START, "load_state")
    g.add_edge("retrieve", "respond")
    g.add_edge("respond", "commit")
    g.add_edge("archive", END)
    return g.compile(name="tiermem-turn")


class TurnRunner:
    """Runs turns through the compiled graph, one session at a time per pod."""

    def __init__(self, deps: TurnDeps) -> None:
        self.deps = deps
        self.graph = build_turn_graph(deps)
        self.last_timings: dict[str, float] = {}

    async def run(
        self, inp: TurnInput, control: TurnControl, started: float | None = None
    ) -> dict[str, Any]:
        """Runs one turn; its client events go to ``control.emit`` as they
        happen, in order. Returns the graph's final state.

        ``started`` is when the request arrived (perf_counter), for TTFT."""
        started = time.perf_counter() if started is None else started
        m = self.deps.metrics
        async with self.deps.l1.session_turn(inp.tenant, inp.session_id):
            state: TurnState = {"input": inp, "control": control, "started": started}
            final: dict[str, Any] = await self.graph.ainvoke(state)
            # Every phase is known only once the graph is done (commit included).
            timings = final.get("timings") or {}
            for phase, secs in timings.items():
                m.phase_seconds.labels(phase).observe(secs)
            overhead = sum(v for k, v in timings.items() if k != "respond")
            m.overhead_seconds.observe(overhead)
            self.last_timings = timings
            return final
