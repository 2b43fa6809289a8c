"""The bare-proxy limit: the least a FastAPI SSE relay can cost, with no memory.

``POST /v1/sessions/{session_id}/turns`` with the same body as tiermem's, sent on
to the LLM as one system + one user message, the reply relayed token by token as
SSE events with the same names and framing as tiermem's (``meta``, ``token``,
``done``, each with an ``id:``). No session state, no storage, no graph: what is
left is HTTP in, HTTP out and JSON, the floor under any relay written this way.

Served by uvicorn with uvloop and httptools like tiermem. ``GET /bench/turns``
and ``GET /bench/stats`` give the same per-turn records and process figures as
``bench.tiermem_proc``, so the driver treats both alike.

Run: ``python -m bench.bare_relay --port P --llm-url http://127.0.0.1:Q/v1``.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import orjson
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.responses import StreamingResponse

from bench.common import add_probe_routes, serve

SYSTEM_PROMPT = "You are a helpful assistant."


class TurnBody(BaseModel):
    user_id: str
    message: str


def frame(event_id: str, event: str, data: dict[str, Any]) -> bytes:
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (
        event_id.encode(), event.encode(), orjson.dumps(data),
    )  # fmt: skip


def chat_request(model: str, message: str) -> dict[str, Any]:
    """The relay's LLM request: one system + one user message, streamed with usage."""
    return {
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                     {"role": "user", "content": message}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 512,
    }  # fmt: skip


def relay_app(llm_url: str, records: list[dict[str, Any]]) -> tuple[FastAPI, dict[str, Any]]:
    """The app a relay's turn route goes in: the LLM client and model name (in the
    returned state, once started), ``/healthz``, and the probe endpoints the
    driver reads (``records``: one per turn)."""
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["http"] = httpx2.AsyncClient(
            timeout=httpx2.Timeout(60.0),
            limits=httpx2.Limits(max_connections=1024, max_keepalive_connections=128),
        )
        state["model"] = (await state["http"].get(f"{llm_url}/models")).json()["data"][0]["id"]
        yield
        await state["http"].aclose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    add_probe_routes(app, records)
    return app, state


def build(llm_url: str) -> FastAPI:
    records: list[dict[str, Any]] = []
    app, state = relay_app(llm_url, records)

    @app.post("/v1/sessions/{session_id}/turns")
    async def turn(session_id: str, body: TurnBody) -> StreamingResponse:
        started = time.perf_counter()
        turn_id = uuid.uuid4().hex

        async def events() -> AsyncIterator[bytes]:
            seq = 0
            rec: dict[str, Any] = {"session": session_id, "l1_hit": None}
            yield frame(f"{turn_id}:{seq}", "meta", {"turn_id": turn_id, "session_id": session_id})
            seq += 1
            request = chat_request(state["model"], body.message)
            usage: dict[str, Any] | None = None
            wait = 0.0
            rec["t_llm_request"] = time.perf_counter() - started
            async with state["http"].stream(
                "POST", f"{llm_url}/chat/completions", json=request,
                headers={"X-Session-ID": session_id},
            ) as resp:  # fmt: skip
                lines = resp.aiter_lines()
                while True:
                    t = time.perf_counter()
                    try:
                        line = await anext(lines)
                    except StopAsyncIteration:
                        wait += time.perf_counter() - t
                        rec["t_llm_done"] = time.perf_counter() - started
                        break
                    wait += time.perf_counter() - t
                    if not line.startswith("data: "):
                        continue
                    payload = line[6:]
                    if payload == "[DONE]":
                        # Read on to the end of the body (not break): a response
                        # closed early cannot go back to the pool, and every
                        # request would pay for a new TCP connection.
                        continue
                    chunk = orjson.loads(payload)
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            if "t_first_token" not in rec:
                                rec["t_first_token"] = time.perf_counter() - started
                            yield frame(f"{turn_id}:{seq}", "token", {"text": text})
                            seq += 1
            yield frame(f"{turn_id}:{seq}", "done", {"turn_id": turn_id, "usage": usage or {}})
            rec["t_done"] = rec["t_end"] = time.perf_counter() - started
            rec["llm_wait"] = wait
            rec["own"] = rec["t_end"] - wait
            rec["after_llm"] = rec["t_end"] - rec.get("t_llm_done", rec["t_end"])
            rec["prompt_tokens"] = (usage or {}).get("prompt_tokens")
            records.append(rec)

        return StreamingResponse(
            events(), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )  # fmt: skip

    return app


def serve_relay(build_app: Callable[[str], FastAPI], doc: str | None,
                argv: list[str] | None = None) -> None:  # fmt: skip
    """``--port P --llm-url URL``: the relay ``build_app`` makes, under uvicorn
    with uvloop and httptools, like tiermem."""
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--llm-url", required=True, help="OpenAI-compatible base URL ending in /v1")
    args = p.parse_args(argv)
    serve(uvicorn.Config(
        build_app(args.llm_url.rstrip("/")), host="127.0.0.1", port=args.port, loop="uvloop",
        http="httptools", log_level="warning", access_log=False,
    ))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    serve_relay(build, __doc__, argv)


if __name__ == "__main__":
    main()
