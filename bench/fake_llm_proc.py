"""The benchmarks' LLM: ``tests.servers.fake_vllm.FakeVLLM`` in a process of its own,
plus two routes for the benchmark driver.

- ``GET /bench/ttft?clear=1``: the LLM's own time to first token per chat request
  (request received -> first content chunk), keyed by the ``[bench <marker>]`` the
  benchmark put in the last user message, so the driver can subtract it from the
  TTFT its client saw for the same turn.
- ``POST /bench/config``: change the first-token delay, token interval and reply
  length between phases (FakeVLLM reads them per request).

Run: ``python -m bench.fake_llm_proc --port P --first-token-delay-ms D
--token-interval-ms I --reply-tokens N``.
"""

from __future__ import annotations

import argparse

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench.common import MARKER_RE
from tests.servers.fake_vllm import FakeVLLM, last_user_message


def build(fake: FakeVLLM):  # -> Starlette
    app = fake.app()

    async def ttft(request: Request) -> Response:
        with fake._lock:
            requests = list(fake.requests)
            if request.query_params.get("clear"):
                fake.requests.clear()
        out: dict[str, float] = {}
        for rec in requests:
            if not rec.path.endswith("/chat/completions") or rec.first_token_at is None:
                continue
            m = MARKER_RE.search(last_user_message(rec.messages))
            if m:
                out[m.group(1)] = rec.first_token_at - rec.received_at
        return JSONResponse(out)

    async def config(request: Request) -> Response:
        body = await request.json()
        if "first_token_delay_ms" in body:
            fake.first_token_delay_s = float(body["first_token_delay_ms"]) / 1000.0
        if "token_interval_ms" in body:
            fake.token_interval_s = float(body["token_interval_ms"]) / 1000.0
        if "reply_tokens" in body:
            fake.reply_tokens = int(body["reply_tokens"])
        return JSONResponse(
            {"first_token_delay_ms": fake.first_token_delay_s * 1000,
             "token_interval_ms": fake.token_interval_s * 1000,
             "reply_tokens": fake.reply_tokens}
        )  # fmt: skip

    app.router.routes.append(Route("/bench/ttft", ttft, methods=["GET"]))
    app.router.routes.append(Route("/bench/config", config, methods=["POST"]))
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--first-token-delay-ms", type=float, default=100.0)
    p.add_argument("--token-interval-ms", type=float, default=20.0)
    p.add_argument("--reply-tokens", type=int, default=24)
    args = p.parse_args(argv)
    fake = FakeVLLM(
        first_token_delay_s=args.first_token_delay_ms / 1000.0,
        token_interval_s=args.token_interval_ms / 1000.0,
        reply_tokens=args.reply_tokens,
        # Large enough for a peer that sends the whole history every turn.
        max_model_len=1 << 22,
        num_blocks=1 << 16,
        port=args.port,
    )
    uvicorn.run(
        build(fake), host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
        log_level="warning", access_log=False,
    )  # fmt: skip


if __name__ == "__main__":
    main()
