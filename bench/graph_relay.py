"""The bare relay with the structure issue 10 asks of tiermem, and nothing else.

Same route, body, LLM request and SSE events as ``bench.bare_relay``, but each
turn is a LangGraph run of three nodes (``prepare -> agent -> commit``, each
doing only the relay's own work: ``agent`` streams the LLM), compiled with a
``context_schema`` whose context carries the turn's event sink, in a task of
its own that the response reads through a queue (so the turn would outlive a
client that leaves). No memory, no storage, no tools.

What it costs over the bare relay is the floor the graph and the decoupled turn
set under tiermem's CPU and TTFT: ``bench/turn_overhead.py --graph-relay`` runs
it beside the other two.

Run: ``python -m bench.graph_relay --port P --llm-url http://127.0.0.1:Q/v1``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

import httpx2
import orjson
from fastapi import FastAPI
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from starlette.responses import StreamingResponse

from bench.bare_relay import TurnBody, chat_request, frame, relay_app, serve_relay


class RelayState(TypedDict, total=False):
    session_id: str
    message: str
    turn_id: str
    reply: str
    usage: dict[str, Any]


@dataclass(eq=False)
class RelayContext:
    emit: Callable[[bytes | None], None]
    http: httpx2.AsyncClient
    llm_url: str
    model: str
    started: float
    rec: dict[str, Any] = field(default_factory=dict)
    seq: int = 0

    def send(self, turn_id: str, event: str, data: dict[str, Any]) -> None:
        self.emit(frame(f"{turn_id}:{self.seq}", event, data))
        self.seq += 1


async def prepare(state: RelayState, runtime: Runtime[RelayContext]) -> dict[str, Any]:
    ctx = runtime.context
    ctx.send(state["turn_id"], "meta", {"turn_id": state["turn_id"],
                                        "session_id": state["session_id"]})  # fmt: skip
    return {"reply": ""}


async def agent(state: RelayState, runtime: Runtime[RelayContext]) -> dict[str, Any]:
    ctx = runtime.context
    rec = ctx.rec
    request = chat_request(ctx.model, state["message"])
    usage: dict[str, Any] | None = None
    pieces: list[str] = []
    wait = 0.0
    rec["t_llm_request"] = time.perf_counter() - ctx.started
    # The bare relay's loop as it is there: shared through a generator, it would
    # put one more layer on the bare relay's own path, every token.
    async with ctx.http.stream(
        "POST", f"{ctx.llm_url}/chat/completions", json=request,
        headers={"X-Session-ID": state["session_id"]},
    ) as resp:  # fmt: skip
        lines = resp.aiter_lines()
        while True:
            t = time.perf_counter()
            try:
                line = await anext(lines)
            except StopAsyncIteration:
                wait += time.perf_counter() - t
                rec["t_llm_done"] = time.perf_counter() - ctx.started
                break
            wait += time.perf_counter() - t
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            if payload == "[DONE]":
                continue  # read to the end: the connection goes back to the pool
            chunk = orjson.loads(payload)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if "t_first_token" not in rec:
                        rec["t_first_token"] = time.perf_counter() - ctx.started
                    pieces.append(text)
                    ctx.send(state["turn_id"], "token", {"text": text})
    rec["llm_wait"] = wait
    return {"reply": "".join(pieces), "usage": usage or {}}


async def commit(state: RelayState, runtime: Runtime[RelayContext]) -> dict[str, Any]:
    ctx = runtime.context
    ctx.send(state["turn_id"], "done", {"turn_id": state["turn_id"], "usage": state["usage"]})
    rec = ctx.rec
    rec["t_done"] = time.perf_counter() - ctx.started
    rec["prompt_tokens"] = state["usage"].get("prompt_tokens")
    return {}


def build_graph() -> Any:
    g = StateGraph(RelayState, context_schema=RelayContext)
    g.add_node("prepare", prepare)
    g.add_node("agent", agent)
    g.add_node("commit", commit)
    g.add_edge(START, "prepare")
    g.add_edge("prepare", "agent")
    g.add_edge("agent", "commit")
    g.add_edge("commit", END)
    return g.compile(name="graph-relay")


def build(llm_url: str) -> FastAPI:
    records: list[dict[str, Any]] = []
    app, state = relay_app(llm_url, records)
    graph = build_graph()
    tasks: set[asyncio.Task[Any]] = set()

    @app.post("/v1/sessions/{session_id}/turns")
    async def turn(session_id: str, body: TurnBody) -> StreamingResponse:
        started = time.perf_counter()
        turn_id = uuid.uuid4().hex
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        ctx = RelayContext(queue.put_nowait, state["http"], llm_url, state["model"], started,
                           {"session": session_id, "l1_hit": None})  # fmt: skip

        async def run() -> None:
            try:
                await graph.ainvoke(
                    {"session_id": session_id, "message": body.message, "turn_id": turn_id},
                    context=ctx,
                )
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

        async def events() -> AsyncIterator[bytes]:
            while (item := await queue.get()) is not None:
                yield item
            await task  # a failed run fails the response (the driver counts it)
            rec = ctx.rec
            rec["t_end"] = time.perf_counter() - started
            rec["own"] = rec["t_end"] - rec.get("llm_wait", 0.0)
            rec["after_llm"] = rec["t_end"] - rec.get("t_llm_done", rec["t_end"])
            records.append(rec)

        return StreamingResponse(
            events(), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )  # fmt: skip

    return app


def main(argv: list[str] | None = None) -> None:
    serve_relay(build, __doc__, argv)


if __name__ == "__main__":
    main()
