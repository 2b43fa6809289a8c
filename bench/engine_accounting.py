"""tiermem's expected prefix reuse against what the real engine caches.

Starts the embedded vLLM engine (infra/engine.py; `make install` prepares it), a
Redis and the real app pointed at the engine, and runs the twelve-turn session of
tests/engine/session_script.py (retrievals from L3 once a batch is archived) once
per accounting configuration:

- ``minilm/16``: what tiermem counted with before it knew the served model (the
  MiniLM tokenizer, 16-token blocks);
- ``model/32``: the served model's own tokenizer and the engine's block size (what
  ``tiermem serve`` does with the embedded engine).

Prints, per configuration, the sums over turns 2+ of ``expected_cacheable_tokens``
and of the engine's ``cached_tokens``, and per turn both figures.

Run: ``.venv/bin/python -m bench.engine_accounting``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import uuid
from pathlib import Path
from typing import Any

import httpx

from infra.engine import EmbeddedEngine, engine_status
from infra.settings import Settings
from tests.engine.session_script import SYSTEM_PROMPT, accounting, run_session
from tests.harness import AppServer, make_settings
from tests.servers.redis_server import RedisServer

CONFIGS: dict[str, dict[str, Any]] = {
    "minilm/16": {"tokenizer": "minilm", "kv_block_tokens": 16},
    "model/32": {"kv_block_tokens": 32},
}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    status = engine_status(Settings())
    if not status.usable:
        raise SystemExit(f"no embedded engine: {status.reason}")
    tmp = Path(tempfile.mkdtemp(prefix="tiermem-acct-"))
    redis = RedisServer(tmp / "redis").start()
    engine = EmbeddedEngine(status.python, status.model_dir, tmp / "engine", kv_cache_gib=1)
    results: dict[str, Any] = {}
    try:
        await engine.start()
        print(f"engine ready in {engine.start_s:.1f} s")
        for name, overrides in CONFIGS.items():
            cfg = {"tokenizer": str(status.model_dir), **overrides}
            settings = make_settings(
                tmp / name.replace("/", "-"), redis.url, llm_url=engine.url,
                llm_max_tokens=args.max_tokens, llm_temperature=0.0, archive_threshold=4,
                system_prompt=SYSTEM_PROMPT, **cfg,
            )  # fmt: skip
            async with AppServer(settings) as app, httpx.AsyncClient(timeout=300) as client:
                turns = await run_session(
                    client, app.url, f"acct-{uuid.uuid4().hex[:8]}", "priya", tag=name
                )
            expected, cached, err = accounting(turns)
            results[name] = {
                "expected": expected, "cached": cached, "error_pct": round(err, 1),
                "turns": [(t.turn, t.prompt_tokens, t.expected_cacheable_tokens,
                           t.cached_tokens, t.prefix_break, t.memories) for t in turns],
            }  # fmt: skip
            print(f"\n{name}: turns 2-12 expected {expected}, cached {cached} ({err:+.1f}%)")
            print("turn prompt expected cached break memories")
            for row in results[name]["turns"]:
                print(" ".join(str(x) for x in row))
    finally:
        await engine.stop()
        redis.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
