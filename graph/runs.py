"""How a graph run is driven when nobody reads its output.

Its own module, light to import: bench/graph_relay.py (the floor under tiermem's
CPU, which must not carry tiermem's modules) drives its pooled runs through it too.
"""

from __future__ import annotations

from typing import Any

from langchain_core.runnables import RunnableConfig


async def run_streaming_nothing(graph: Any, inp: Any, context: Any, config: RunnableConfig) -> None:
    """A pooled run, start to end, streaming nothing: each turn's output goes to
    its caller through the context (``TurnContext.end_turn``), and a stream (what
    ``ainvoke`` asks for: every step's updates and values) would build and queue
    output after every step that nobody reads (a pooled turn's LangGraph CPU,
    idle: 616 instead of 759 us, bench/langgraph_run_cost.py)."""
    async for _ in graph.astream(inp, context=context, config=config, stream_mode=[]):
        pass
