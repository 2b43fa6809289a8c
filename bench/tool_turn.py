"""What a tool step costs tiermem, and what the prefix cache keeps across it.

The app runs in this process (a real uvicorn server on 127.0.0.1) against its own
redis-server, the fake OpenAI-compatible LLM (``tests/servers/fake_vllm.py``,
whose prefix-cache simulator reports ``cached_tokens``) and a real stdio MCP
server (``tests/servers/mcp_servers.py``). Turns run one at a time, each in a
fresh session, in three kinds:

- ``plain``: no tool call (one LLM request);
- ``read-only tool``: one call of ``local__echo`` (annotated read-only);
- ``side-effecting tool``: one call of ``local__count`` (no annotations: its intent
  is recorded before it runs).

Per kind it prints the medians of:

- the service's own time per turn (``tiermem_overhead_seconds``: every phase but
  the waits for the LLM and for the tool itself), read per turn from the
  histogram's sum;
- L2 round trips per turn (``tiermem_l2_round_trips_total``), so the difference
  to ``plain`` is the round trips of one tool step;
- for the tool turns, the second LLM request's ``cached_tokens`` over its prompt
  tokens (the simulator's figure), and the whole blocks of the first request's
  prompt, which is the least it must reuse.

Run: ``python bench/tool_turn.py [--turns 30]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from memory.context import KV_BLOCK_TOKENS  # noqa: E402
from tests.harness import AppServer, l2_round_trips, make_settings, post_turn  # noqa: E402
from tests.servers.fake_vllm import FakeVLLM  # noqa: E402
from tests.servers.mcp_servers import stdio_command  # noqa: E402
from tests.servers.redis_server import RedisServer  # noqa: E402

KINDS = {
    "plain": "Tell me something about sailing.",
    "read-only tool": 'CALL local__echo {"text": "the forecast says 12 knots"}',
    "side-effecting tool": "CALL local__count {}",
}


def overhead_sum(app: AppServer) -> float:
    for metric in app.services.metrics.overhead_seconds.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                return float(sample.value)
    return 0.0


async def run(turns: int) -> dict[str, dict[str, float]]:
    work = Path(tempfile.mkdtemp(prefix="tiermem-tool-bench-"))
    redis = RedisServer(work / "redis").start()
    llm = FakeVLLM(reply_tokens=12).start()
    command, args = stdio_command("local")
    config = work / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"local": {
        "command": command, "args": args, "env": {"MCP_COUNT_FILE": str(work / "count.txt")},
    }}}))  # fmt: skip
    settings = make_settings(work / "data", redis.url, llm_url=llm.base_url, mcp_config=config,
                             archive_threshold=1000, log_level="WARNING")  # fmt: skip
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in KINDS}
    try:
        async with AppServer(settings) as app, httpx.AsyncClient(timeout=60) as client:
            assert app.services.mcp is not None
            assert await app.services.mcp.wait_connected("local", 60)
            for i in range(turns + 3):  # the first three warm up
                for kind, message in KINDS.items():
                    before_s, before_rt = overhead_sum(app), l2_round_trips(app.services)
                    n_requests = len(llm.chat_requests())
                    sid = f"bench-{uuid.uuid4().hex[:10]}"
                    r = await post_turn(client, app.url, sid, message)
                    assert r.done["status"] == "complete", r.events[-1]
                    if i < 3:
                        continue
                    got = samples[kind]
                    got.setdefault("overhead_ms", []).append((overhead_sum(app) - before_s) * 1e3)
                    got.setdefault("l2_round_trips", []).append(
                        l2_round_trips(app.services) - before_rt
                    )
                    requests = llm.chat_requests()[n_requests:]
                    if len(requests) == 2:
                        first, second = requests
                        least = first.prompt_tokens // KV_BLOCK_TOKENS * KV_BLOCK_TOKENS
                        got.setdefault("second_prompt_tokens", []).append(second.prompt_tokens)
                        got.setdefault("second_cached_tokens", []).append(second.cached_tokens or 0)
                        got.setdefault("least_reusable", []).append(least)
    finally:
        llm.stop()
        redis.stop()
    return {k: {m: statistics.median(v) for m, v in got.items()} for k, got in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=30, help="turns per kind (after warm-up)")
    args = parser.parse_args()
    figures = asyncio.run(run(args.turns))
    plain = figures["plain"]
    print(f"{'kind':<22}{'overhead ms':>13}{'L2 trips':>10}{'2nd req cached/prompt':>24}")
    for kind, f in figures.items():
        reuse = ""
        if "second_prompt_tokens" in f:
            reuse = (f"{f['second_cached_tokens']:.0f}/{f['second_prompt_tokens']:.0f}"
                     f" (>= {f['least_reusable']:.0f})")  # fmt: skip
        print(f"{kind:<22}{f['overhead_ms']:>13.2f}{f['l2_round_trips']:>10.0f}{reuse:>24}")
    for kind in ("read-only tool", "side-effecting tool"):
        f = figures[kind]
        print(f"{kind}: +{f['overhead_ms'] - plain['overhead_ms']:.2f} ms service time, "
              f"+{f['l2_round_trips'] - plain['l2_round_trips']:.0f} L2 round trips "
              "over a plain turn (medians of one run)")  # fmt: skip
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
