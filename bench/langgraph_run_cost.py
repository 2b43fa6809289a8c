"""What LangGraph itself costs a turn, on an idle event loop: the floor under issue 10's CPU target.

Each turn below does no work of its own (three nodes that return a small update),
so what is measured is the machinery around the work, in CPU microseconds per turn
(``time.process_time``, median of ``--repeats`` batches of ``--turns`` turns, under
uvloop as the servers run):

- **plain**: the three node functions awaited one after the other;
- **own task**: the same in a task of its own, as a turn decoupled from its response runs;
- **LangGraph, relay state**: a compiled ``StateGraph`` (``prepare -> agent -> commit``,
  ``context_schema``), the state of ``bench/graph_relay.py`` (5 channels);
- **LangGraph, tiermem's state**: the same graph over ``graph.state.TurnState`` (27
  channels) with ``TurnOutput`` as its output schema, as tiermem compiles it;
- **LangGraph, 5 nodes**: ``prepare -> retrieve -> agent -> commit -> archive`` over
  tiermem's state (a turn that retrieves and archives); the difference from 3 nodes,
  halved, is one more step;
- **LangGraph, one run for many turns**: the 3-node graph with an edge from ``commit``
  back to ``prepare``, which waits for the next turn: the per-run set-up (config,
  callbacks, channels, the loop) paid once instead of per turn; run with ``ainvoke``,
  which streams every step's updates and values to find the last;
- **the same, streaming nothing**: ``astream(stream_mode=[])``, the way tiermem's pooled
  runs go (``graph.runs.run_streaming_nothing``), whose turns end through the
  context, not the run's output.

Under load each of these costs more (a busy process runs colder caches):
``bench/turn_overhead.py --graph-relay`` measures the same structure at 200 sessions.

    .venv/bin/python bench/langgraph_run_cost.py [--turns 3000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import Command

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Table, machine_info, machine_line, write_results
from bench.graph_relay import RelayState
from graph.runs import run_streaming_nothing
from graph.state import TurnOutput, TurnState


@dataclass(eq=False)
class Ctx:
    """The runtime context: what a looping run takes its next turn from."""

    turns: asyncio.Queue[dict[str, Any] | None] | None = None
    done: asyncio.Queue[dict[str, Any]] | None = None


RELAY_INPUT = {"session_id": "s", "message": "hello", "turn_id": "t1"}
TURN_INPUT: TurnState = {
    "tenant": "t", "session_id": "s", "user_id": "u", "message": "hello", "turn_id": "t1",
    "retrieve": "never", "client_turn_id": False, "agent": "", "depth": 0,
}  # fmt: skip
MESSAGES = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]


async def relay_prepare(state: RelayState, runtime: Runtime[Ctx]) -> dict[str, Any]:
    return {"reply": ""}


async def relay_agent(state: RelayState, runtime: Runtime[Ctx]) -> dict[str, Any]:
    return {"reply": "hi", "usage": {"prompt_tokens": 3}}


async def relay_commit(state: RelayState, runtime: Runtime[Ctx]) -> dict[str, Any]:
    return {}


async def turn_prepare(state: TurnState, runtime: Runtime[Ctx]) -> dict[str, Any]:
    return {"turn": 1, "l1_hit": True, "messages": MESSAGES[:1], "timings": {"prepare": 0.0}}


async def turn_retrieve(state: TurnState, runtime: Runtime[Ctx]) -> dict[str, Any]:
    return {"memories": [], "memory_block": None, "timings": {"retrieve": 0.0}}


async def turn_agent(state: TurnState, runtime: Runtime[Ctx]) -> dict[str, Any]:
    return {"messages": MESSAGES, "status": "complete", "usage": {"prompt_tokens": 3},
            "step": 1, "timings": {"agent": 0.0}}  # fmt: skip


async def turn_commit(state: TurnState, runtime: Runtime[Ctx]) -> dict[str, Any]:
    return {"version": 2, "timings": {"commit": 0.0}}


async def turn_archive(state: TurnState, runtime: Runtime[Ctx]) -> dict[str, Any]:
    return {"archive_batch": None}


def chain(schema: Any, nodes: list[tuple[str, Any]], output: Any = None) -> Any:
    g = StateGraph(schema, context_schema=Ctx, output_schema=output or schema)
    for name, fn in nodes:
        g.add_node(name, fn)
    names = [n for n, _ in nodes]
    for a, b in zip([START, *names], [*names, END], strict=True):
        g.add_edge(a, b)
    return g.compile()


async def looping_prepare(state: TurnState, runtime: Runtime[Ctx]) -> Command[Any]:
    assert runtime.context.turns is not None
    nxt = await runtime.context.turns.get()
    if nxt is None:
        return Command(goto=END)
    return Command(goto="agent", update={**nxt, **await turn_prepare(state, runtime)})


async def looping_commit(state: TurnState, runtime: Runtime[Ctx]) -> dict[str, Any]:
    assert runtime.context.done is not None
    runtime.context.done.put_nowait({"version": 2})
    return await turn_commit(state, runtime)


def looping_graph() -> Any:
    g = StateGraph(TurnState, context_schema=Ctx, output_schema=TurnOutput)
    g.add_node("prepare", looping_prepare, destinations=("agent", END))
    g.add_node("agent", turn_agent)
    g.add_node("commit", looping_commit)
    g.add_edge(START, "prepare")
    g.add_edge("agent", "commit")
    g.add_edge("commit", "prepare")
    return g.compile()


async def plain_turn() -> None:
    rt: Runtime[Ctx] = Runtime(context=Ctx())
    state: dict[str, Any] = dict(TURN_INPUT)
    for fn in (turn_prepare, turn_agent, turn_commit):
        state.update(await fn(state, rt))  # type: ignore[arg-type]


async def per_turn_us(turn: Callable[[], Awaitable[Any]], turns: int, repeats: int) -> float:
    """CPU microseconds per turn: the median over ``repeats`` batches."""
    for _ in range(min(300, turns)):
        await turn()
    batches = []
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(turns):
            await turn()
        batches.append((time.process_time() - t0) / turns * 1e6)
    return statistics.median(batches)


async def looping_us(turns: int, repeats: int, stream: bool = True) -> float:
    graph = looping_graph()
    batches = []
    for i in range(repeats + 1):
        ctx = Ctx(asyncio.Queue(), asyncio.Queue())
        assert ctx.turns is not None and ctx.done is not None
        t0 = time.process_time()
        config: RunnableConfig = {"recursion_limit": 4 * turns + 8}
        run = asyncio.create_task(
            graph.ainvoke({}, context=ctx, config=config)
            if stream
            else run_streaming_nothing(graph, {}, ctx, config)
        )
        for _ in range(turns):
            ctx.turns.put_nowait(dict(TURN_INPUT))
            await ctx.done.get()
        ctx.turns.put_nowait(None)
        await run
        if i:  # the first batch is warm-up
            batches.append((time.process_time() - t0) / turns * 1e6)
    return statistics.median(batches)


async def measure(turns: int, repeats: int) -> dict[str, float]:
    relay = chain(RelayState, [("prepare", relay_prepare), ("agent", relay_agent),
                               ("commit", relay_commit)])  # fmt: skip
    three = chain(TurnState, [("prepare", turn_prepare), ("agent", turn_agent),
                              ("commit", turn_commit)], TurnOutput)  # fmt: skip
    five = chain(TurnState, [("prepare", turn_prepare), ("retrieve", turn_retrieve),
                             ("agent", turn_agent), ("commit", turn_commit),
                             ("archive", turn_archive)], TurnOutput)  # fmt: skip

    async def own_task() -> None:
        await asyncio.create_task(plain_turn())

    return {
        "plain": await per_turn_us(plain_turn, turns, repeats),
        "own task": await per_turn_us(own_task, turns, repeats),
        "LangGraph, relay state (5 channels)": await per_turn_us(
            lambda: relay.ainvoke(RELAY_INPUT, context=Ctx()), turns, repeats
        ),
        "LangGraph, tiermem's state (27 channels)": await per_turn_us(
            lambda: three.ainvoke(TURN_INPUT, context=Ctx()), turns, repeats
        ),
        "LangGraph, 5 nodes, tiermem's state": await per_turn_us(
            lambda: five.ainvoke(TURN_INPUT, context=Ctx()), turns, repeats
        ),
        "LangGraph, one run for many turns": await looping_us(turns, repeats),
        "LangGraph, one run for many turns, streaming nothing": await looping_us(
            turns, repeats, stream=False
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=3000, help="turns per batch")
    ap.add_argument("--repeats", type=int, default=5, help="batches per figure (median)")
    ap.add_argument("--name", default="langgraph_run_cost")
    args = ap.parse_args()
    info = machine_info()
    figures = uvloop.run(measure(args.turns, args.repeats))
    three = figures["LangGraph, tiermem's state (27 channels)"]
    step = (figures["LangGraph, 5 nodes, tiermem's state"] - three) / 2
    rows = [[k, f"{v:,.0f}"] for k, v in figures.items()]
    rows.append(["one more step (5 vs 3 nodes, / 2)", f"{step:,.0f}"])
    table = Table(
        "LangGraph's own CPU per turn, three nodes that do nothing (idle loop)",
        ["turn as", "CPU µs / turn"],
        rows,
        note=f"Median of {args.repeats} batches of {args.turns} turns, uvloop, one process. "
        "Compare with the bare relay's whole turn (bench/turn_overhead.py, CPU ms / turn).",
    )
    table.print()
    header = machine_line(info)
    write_results(args.name, {"machine": info, "figures": figures, "step": step}, [table], header)


if __name__ == "__main__":
    main()
