"""The peer users would pick instead of tiermem: LangGraph's memory chatbot as its
docs show it (``StateGraph(MessagesState)``, one ``chatbot`` node that sends the
whole message history to the model and appends the reply), compiled with
``AsyncPostgresSaver`` from ``langgraph-checkpoint-postgres`` on a psycopg pool.

It sits behind the same HTTP + SSE surface as tiermem (``POST
/v1/sessions/{id}/turns``, events ``meta``, ``token``, ``done``) and uses
tiermem's own LLM client, so what differs is how each keeps the conversation.
Tokens go out through LangGraph's stream writer (``stream_mode="custom"``);
``done`` is sent when the graph run has finished, i.e. after its checkpoints
are written, as tiermem sends ``done`` after its commit.

``GET /bench/turns`` and ``GET /bench/stats`` give the same per-turn records and
process figures as ``bench.tiermem_proc``.

Run: ``python -m bench.peer_app --port P --llm-url URL/v1 --dsn DSN``.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.config import get_stream_writer
from langgraph.graph import START, MessagesState, StateGraph
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel
from starlette.responses import StreamingResponse

from bench.common import add_probe_routes
from infra.llm import ChatMessage, LLMDone, LLMToken, OpenAICompatibleLLM, Role
from infra.settings import Settings

# The same system prompt as tiermem's default, so both send the same prefix.
SYSTEM_PROMPT = Settings.model_fields["system_prompt"].default


class TurnBody(BaseModel):
    user_id: str
    message: str


def frame(event_id: str, event: str, data: dict[str, Any]) -> bytes:
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (
        event_id.encode(), event.encode(), orjson.dumps(data),
    )  # fmt: skip


def _openai(m: AnyMessage) -> ChatMessage:
    roles: dict[str, Role] = {"human": "user", "ai": "assistant", "system": "system"}
    return {"role": roles.get(m.type, "user"), "content": str(m.content)}


def build_graph(llm: OpenAICompatibleLLM, saver: AsyncPostgresSaver) -> Any:
    async def chatbot(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        writer = get_stream_writer()
        thread = config["configurable"]["thread_id"]
        messages: list[ChatMessage] = [{"role": "system", "content": SYSTEM_PROMPT}]
        messages += [_openai(m) for m in state["messages"]]
        writer({"kind": "llm_request", "at": time.perf_counter()})
        pieces: list[str] = []
        wait = 0.0
        usage: dict[str, Any] = {}
        gen = llm.stream_chat(messages, session_key=thread)
        try:
            while True:
                t = time.perf_counter()
                try:
                    ev = await anext(gen)
                except StopAsyncIteration:
                    wait += time.perf_counter() - t
                    break
                wait += time.perf_counter() - t
                if isinstance(ev, LLMToken):
                    pieces.append(ev.text)
                    writer({"kind": "token", "text": ev.text})
                elif isinstance(ev, LLMDone) and ev.usage is not None:
                    usage = {"prompt_tokens": ev.usage.prompt_tokens,
                             "completion_tokens": ev.usage.completion_tokens}  # fmt: skip
        finally:
            await gen.aclose()
        writer({"kind": "llm_done", "wait": wait, "usage": usage})
        return {"messages": [AIMessage(content="".join(pieces))]}

    g = StateGraph(MessagesState)
    g.add_node("chatbot", chatbot)
    g.add_edge(START, "chatbot")
    return g.compile(checkpointer=saver)


def pool_for(dsn: str, max_size: int = 20) -> AsyncConnectionPool:
    # The settings LangGraph's docs give for AsyncPostgresSaver on a pool.
    return AsyncConnectionPool(
        dsn, open=False, min_size=min(4, max_size), max_size=max_size,
        kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
    )  # fmt: skip


def build(llm_url: str, dsn: str) -> FastAPI:
    records: list[dict[str, Any]] = []
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = pool_for(dsn)
        await pool.open()
        saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type]
        await saver.setup()
        llm = OpenAICompatibleLLM([llm_url], max_tokens=512)
        state["graph"] = build_graph(llm, saver)
        yield
        await llm.aclose()
        await pool.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/v1/sessions/{session_id}/turns")
    async def turn(session_id: str, body: TurnBody) -> StreamingResponse:
        started = time.perf_counter()
        turn_id = uuid.uuid4().hex
        config: RunnableConfig = {"configurable": {"thread_id": session_id}}

        async def events() -> AsyncIterator[bytes]:
            seq = 0
            rec: dict[str, Any] = {"session": session_id, "l1_hit": None}
            yield frame(f"{turn_id}:{seq}", "meta", {"turn_id": turn_id, "session_id": session_id})
            seq += 1
            usage: dict[str, Any] = {}
            async for chunk in state["graph"].astream(
                {"messages": [HumanMessage(content=body.message)]}, config, stream_mode="custom"
            ):
                kind = chunk["kind"]
                if kind == "token":
                    if "t_first_token" not in rec:
                        rec["t_first_token"] = time.perf_counter() - started
                    yield frame(f"{turn_id}:{seq}", "token", {"text": chunk["text"]})
                    seq += 1
                elif kind == "llm_request":
                    rec["t_llm_request"] = chunk["at"] - started
                elif kind == "llm_done":
                    rec["llm_wait"] = chunk["wait"]
                    rec["t_llm_done"] = time.perf_counter() - started
                    usage = chunk["usage"]
            # The run is over: its checkpoints are in PostgreSQL.
            rec["t_end"] = time.perf_counter() - started
            yield frame(f"{turn_id}:{seq}", "done", {"turn_id": turn_id, "usage": usage})
            rec["t_done"] = time.perf_counter() - started
            rec["own"] = rec["t_end"] - rec.get("llm_wait", 0.0)
            rec["after_llm"] = rec["t_end"] - rec.get("t_llm_done", rec["t_end"])
            rec["prompt_tokens"] = usage.get("prompt_tokens")
            records.append(rec)

        return StreamingResponse(
            events(), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )  # fmt: skip

    add_probe_routes(app, records)
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--llm-url", required=True, help="OpenAI-compatible base URL ending in /v1")
    p.add_argument("--dsn", required=True, help="PostgreSQL connection string")
    args = p.parse_args(argv)
    uvicorn.run(
        build(args.llm_url.rstrip("/"), args.dsn), host="127.0.0.1", port=args.port,
        loop="uvloop", http="httptools", log_level="warning", access_log=False,
    )  # fmt: skip


if __name__ == "__main__":
    main()
