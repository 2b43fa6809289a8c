"""The bare relay with the structure issue 10 asks of tiermem, and nothing else.

Same route, body, LLM request and SSE events as ``bench.bare_relay``, but each
turn runs through a LangGraph graph of three nodes (``prepare -> agent ->
commit``, each doing only the relay's own work: ``agent`` streams the LLM),
compiled with a ``context_schema`` whose context carries the turn's event sink,
in a task of its own that the response reads through a queue (so the turn would
outlive a client that leaves). No memory, no storage, no tools.

The runs are pooled the way tiermem's ``TurnRunner`` pools them (graph/builder.py),
with the same defaults: ``--warm-runs`` runs wait in ``prepare`` for a turn; the
turn's ``commit`` hands the turn back and goes to ``prepare`` again, where the
run waits for its next turn; a run retires after ``--run-turns`` turns, a
turn that finds no run waiting starts one, and a pooled run streams nothing
(``run_streaming_nothing``: its turns end through the context). ``--warm-runs
0`` makes each turn a run of its own, started by the turn (the graph relay
before tiermem pooled its runs).

What it costs over the bare relay is the floor the graph and the decoupled turn
set under tiermem's CPU and TTFT: ``bench/turn_overhead.py --graph-relay`` runs
it beside the other two.

Run: ``python -m bench.graph_relay --port P --llm-url http://127.0.0.1:Q/v1``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

import httpx2
import orjson
from fastapi import FastAPI
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import Command
from starlette.responses import StreamingResponse

from bench.bare_relay import TurnBody, chat_request, frame, relay_app, serve_relay
from graph.runs import run_streaming_nothing
from infra.settings import Settings

# tiermem's own defaults (TIERMEM_GRAPH_WARM_RUNS, TIERMEM_GRAPH_RUN_TURNS).
WARM_RUNS: int = Settings.model_fields["graph_warm_runs"].default
RUN_TURNS: int = Settings.model_fields["graph_run_turns"].default


class RelayState(TypedDict, total=False):
    session_id: str
    message: str
    turn_id: str
    reply: str
    usage: dict[str, Any]


Emit = Callable[[bytes | None], None]


def _no_turn(item: bytes | None) -> None:
    raise RuntimeError("a waiting graph-relay run emitted before it had a turn")


@dataclass(eq=False)
class RelayContext:
    emit: Emit
    http: httpx2.AsyncClient
    llm_url: str
    model: str
    started: float
    rec: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    # A pooled run's: the next turn's input comes on ``handoff``; ``end_turn``
    # (from ``commit``) says whether the run then waits for another turn.
    handoff: asyncio.Future[RelayState] | None = None
    end_turn: Callable[[], bool] | None = None

    def send(self, turn_id: str, event: str, data: dict[str, Any]) -> None:
        self.emit(frame(f"{turn_id}:{self.seq}", event, data))
        self.seq += 1


async def prepare(state: RelayState, runtime: Runtime[RelayContext]) -> dict[str, Any]:
    ctx = runtime.context
    update: dict[str, Any] = {"reply": ""}
    turn = state
    if ctx.handoff is not None:  # a pooled run: wait for its turn
        turn = await ctx.handoff
        ctx.handoff = None
        update.update(turn)
    ctx.send(turn["turn_id"], "meta", {"turn_id": turn["turn_id"],
                                       "session_id": turn["session_id"]})  # fmt: skip
    return update


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


async def commit(state: RelayState, runtime: Runtime[RelayContext]) -> Command[Any]:
    ctx = runtime.context
    ctx.send(state["turn_id"], "done", {"turn_id": state["turn_id"], "usage": state["usage"]})
    rec = ctx.rec
    rec["t_done"] = time.perf_counter() - ctx.started
    rec["prompt_tokens"] = state["usage"].get("prompt_tokens")
    again = ctx.end_turn is not None and ctx.end_turn()
    return Command(goto="prepare" if again else END)


def build_graph() -> Any:
    g = StateGraph(RelayState, context_schema=RelayContext)
    g.add_node("prepare", prepare)
    g.add_node("agent", agent)
    g.add_node("commit", commit, destinations=("prepare", END))
    g.add_edge(START, "prepare")
    g.add_edge("prepare", "agent")
    g.add_edge("agent", "commit")
    return g.compile(name="graph-relay")


@dataclass(eq=False)
class _Run:
    ctx: RelayContext
    task: asyncio.Task[Any]
    ended: asyncio.Future[None] | None = None  # the turn it serves now
    turns: int = 0


class RunPool:
    """Graph runs that serve turn after turn, as tiermem's ``TurnRunner`` pools
    them: at most ``warm_runs`` wait in ``prepare``; a run retires after
    ``run_turns`` turns; a turn that finds none waiting starts one."""

    def __init__(self, graph: Any, make_ctx: Callable[[], RelayContext], warm_runs: int,
                 run_turns: int) -> None:  # fmt: skip
        self.graph = graph
        self.make_ctx = make_ctx
        self.warm_runs = warm_runs
        self.run_turns = run_turns
        self.waiting: deque[_Run] = deque()

    def hand(self, state: RelayState, emit: Emit, started: float,
             rec: dict[str, Any]) -> asyncio.Future[None]:  # fmt: skip
        """Gives the turn (``state``) to a waiting run, or to a new one; the
        future resolves when the turn has ended (its ``done`` emitted), or fails
        with the run's error."""
        while self.waiting and self.waiting[0].task.done():
            self.waiting.popleft()
        run = self.waiting.popleft() if self.waiting else self._start()
        ctx = run.ctx
        ctx.emit, ctx.started, ctx.rec, ctx.seq = emit, started, rec, 0
        run.turns += 1
        run.ended = asyncio.get_running_loop().create_future()
        assert ctx.handoff is not None
        ctx.handoff.set_result(state)
        return run.ended

    def refill(self) -> None:
        """Starts runs until ``warm_runs`` wait (at the first turn and after each)."""
        while len(self.waiting) < self.warm_runs:
            self.waiting.append(self._start())

    def _start(self) -> _Run:
        ctx = self.make_ctx()
        ctx.handoff = asyncio.get_running_loop().create_future()
        # The task starts at the loop's next turn, after ``end_turn`` is set.
        config: RunnableConfig = {"recursion_limit": 3 * self.run_turns + 4}
        run = _Run(ctx, asyncio.create_task(run_streaming_nothing(self.graph, {}, ctx, config)))
        ctx.end_turn = lambda: self._turn_ended(run)
        run.task.add_done_callback(lambda t: self._run_ended(run, t))
        return run

    def _turn_ended(self, run: _Run) -> bool:
        ctx = run.ctx
        ctx.emit(None)  # the response's end
        assert run.ended is not None
        run.ended.set_result(None)
        if run.turns >= self.run_turns or len(self.waiting) >= self.warm_runs:
            return False
        ctx.emit = _no_turn
        ctx.handoff = asyncio.get_running_loop().create_future()
        self.waiting.append(run)
        return True

    @staticmethod
    def _run_ended(run: _Run, task: asyncio.Task[Any]) -> None:
        if run.ended is not None and not run.ended.done():
            # The run failed during its turn: the turn fails with it.
            err = None if task.cancelled() else task.exception()
            run.ended.set_exception(err or RuntimeError("the graph run ended before its turn"))
            run.ctx.emit(None)


def build(llm_url: str, warm_runs: int = WARM_RUNS, run_turns: int = RUN_TURNS) -> FastAPI:
    records: list[dict[str, Any]] = []
    app, state = relay_app(llm_url, records)
    graph = build_graph()
    tasks: set[asyncio.Task[Any]] = set()

    def new_ctx(emit: Emit = _no_turn, started: float = 0.0) -> RelayContext:
        return RelayContext(emit, state["http"], llm_url, state["model"], started)

    pool = RunPool(graph, new_ctx, warm_runs, run_turns)

    @app.post("/v1/sessions/{session_id}/turns")
    async def turn(session_id: str, body: TurnBody) -> StreamingResponse:
        started = time.perf_counter()
        turn_id = uuid.uuid4().hex
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        rec: dict[str, Any] = {"session": session_id, "l1_hit": None}
        inp: RelayState = {"session_id": session_id, "message": body.message,
                           "turn_id": turn_id}  # fmt: skip
        ended: asyncio.Future[Any]
        if warm_runs > 0:
            ended = pool.hand(inp, queue.put_nowait, started, rec)
        else:
            ctx = new_ctx(queue.put_nowait, started)
            ctx.rec = rec

            async def run() -> None:
                try:
                    await graph.ainvoke(inp, context=ctx, version="v2")
                finally:
                    queue.put_nowait(None)

            ended = asyncio.create_task(run())
            tasks.add(ended)
            ended.add_done_callback(tasks.discard)

        async def events() -> AsyncIterator[bytes]:
            while (item := await queue.get()) is not None:
                yield item
            await ended  # a failed run fails the response (the driver counts it)
            if warm_runs > 0:
                pool.refill()
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
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--warm-runs",
        type=int,
        default=WARM_RUNS,
        help="runs waiting for a turn (TIERMEM_GRAPH_WARM_RUNS); 0: a run per turn",
    )
    p.add_argument("--run-turns", type=int, default=RUN_TURNS,
                   help="turns a pooled run serves (TIERMEM_GRAPH_RUN_TURNS)")  # fmt: skip
    pool, rest = p.parse_known_args(argv)
    serve_relay(lambda url: build(url, pool.warm_runs, pool.run_turns), __doc__, rest)


if __name__ == "__main__":
    main()
