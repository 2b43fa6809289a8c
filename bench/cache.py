"""What the response cache saves: latency of a hit against a miss, LLM calls saved on
a replay, and the stampede collapse.

The app runs in this process (a real uvicorn server on 127.0.0.1) against its own
redis-server and the fake OpenAI-compatible LLM (``tests/servers/fake_vllm.py``,
set to 300 ms to the first token and 20 ms per token, about what a small model on a
GPU gives). Requests go to the stateless ``/v1/chat/completions`` with
``temperature: 0``, through the official ``openai`` SDK, streaming, one client per
figure:

- **hit vs miss**: ``--questions`` distinct questions asked once (misses), then again
  (hits): medians of the time to the first content chunk and to the end;
- **replay**: a conversation of ``--questions`` deterministic questions, each request
  resending the history so far (as an OpenAI client without a session does), run
  ``--replays`` times: LLM calls made against requests sent;
- **stampede**: ``--stampede`` concurrent identical requests of a new question:
  LLM calls made, and the slowest request's time.

Run: ``python bench/cache.py [--questions 20] [--replays 3] [--stampede 200]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from tests.harness import AppServer, make_settings  # noqa: E402
from tests.servers.fake_vllm import FakeVLLM  # noqa: E402
from tests.servers.redis_server import RedisServer  # noqa: E402


async def timed(client: openai.AsyncOpenAI, messages: list[dict[str, str]]) -> dict[str, Any]:
    """One streamed request: time to the first content, to the end, the text, the outcome."""
    t0 = time.perf_counter()
    raw = await client.chat.completions.with_raw_response.create(
        model="default", messages=messages, temperature=0, stream=True,  # type: ignore[arg-type]
    )  # fmt: skip
    first: float | None = None
    parts = []
    stream = raw.parse()
    assert isinstance(stream, openai.AsyncStream)  # stream=True
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                first = first if first is not None else time.perf_counter() - t0
                parts.append(choice.delta.content)
    return {"ttft_ms": (first or 0.0) * 1e3, "total_ms": (time.perf_counter() - t0) * 1e3,
            "text": "".join(parts), "cache": raw.headers.get("x-tiermem-cache")}  # fmt: skip


def calls(llm: FakeVLLM) -> int:
    return len(llm.chat_requests())


async def run(questions: int, replays: int, stampede: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tiermem-cache-bench-"))
    redis = RedisServer(work / "redis").start()
    llm = FakeVLLM(reply_tokens=24, first_token_delay_s=0.3, token_interval_s=0.02).start()
    settings = make_settings(work / "data", redis.url, llm_url=llm.base_url,
                             archive_threshold=1000, log_level="WARNING")  # fmt: skip
    out: dict[str, Any] = {}
    try:
        async with AppServer(settings) as app:
            client = openai.AsyncOpenAI(base_url=f"{app.url}/v1", api_key="-", max_retries=0,
                                        timeout=120)  # fmt: skip
            await timed(client, [{"role": "user", "content": "warm up"}])
            asked = [[{"role": "user", "content": f"Question {i}: {uuid.uuid4().hex}?"}]
                     for i in range(questions)]  # fmt: skip
            misses = [await timed(client, m) for m in asked]
            hits = [await timed(client, m) for m in asked]
            assert all(r["cache"] == "miss" for r in misses), [r["cache"] for r in misses]
            assert all(r["cache"] == "hit" for r in hits), [r["cache"] for r in hits]
            assert [r["text"] for r in hits] == [r["text"] for r in misses]
            for name, rows in (("miss", misses), ("hit", hits)):
                out[name] = {k: statistics.median(r[k] for r in rows)
                             for k in ("ttft_ms", "total_ms")}  # fmt: skip

            # A replayed conversation: each request resends the history so far.
            before, sent = calls(llm), 0
            tag = uuid.uuid4().hex
            for _ in range(replays):
                history: list[dict[str, str]] = []
                for i in range(questions):
                    history.append({"role": "user", "content": f"[{tag}] Step {i}: and then?"})
                    r = await timed(client, history)
                    sent += 1
                    history.append({"role": "assistant", "content": r["text"]})
            out["replay"] = {"requests": sent, "llm_calls": calls(llm) - before}

            # The stampede: many equal requests of a question nobody asked yet.
            before = calls(llm)
            question = [{"role": "user", "content": f"Stampede {uuid.uuid4().hex}?"}]
            t0 = time.perf_counter()
            rows = await asyncio.gather(*(timed(client, question) for _ in range(stampede)))
            out["stampede"] = {
                "requests": stampede, "llm_calls": calls(llm) - before,
                "slowest_ms": (time.perf_counter() - t0) * 1e3,
                "outcomes": {o: sum(1 for r in rows if r["cache"] == o)
                             for o in ("miss", "hit", "bypass")},
            }  # fmt: skip
            await client.close()
    finally:
        llm.stop()
        redis.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--replays", type=int, default=3)
    parser.add_argument("--stampede", type=int, default=200)
    args = parser.parse_args()
    f = asyncio.run(run(args.questions, args.replays, args.stampede))
    miss, hit = f["miss"], f["hit"]
    print(f"{'':<8}{'first content ms':>18}{'whole reply ms':>16}   (medians of one run)")
    for name in ("miss", "hit"):
        print(f"{name:<8}{f[name]['ttft_ms']:>18.1f}{f[name]['total_ms']:>16.1f}")
    print(f"a hit: first content {miss['ttft_ms'] / hit['ttft_ms']:.0f}x sooner, whole reply "
          f"{miss['total_ms'] / hit['total_ms']:.0f}x sooner")  # fmt: skip
    r = f["replay"]
    print(f"replay: {r['requests']} requests, {r['llm_calls']} LLM calls "
          f"({r['requests'] - r['llm_calls']} saved)")  # fmt: skip
    s = f["stampede"]
    print(f"stampede: {s['requests']} concurrent equal requests -> {s['llm_calls']} LLM call(s), "
          f"slowest {s['slowest_ms']:.0f} ms, outcomes {s['outcomes']}")  # fmt: skip
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "cache.json").write_text(json.dumps(f, indent=2))


if __name__ == "__main__":
    main()
