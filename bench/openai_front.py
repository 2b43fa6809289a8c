"""What the OpenAI-compatible front costs in time to first token, next to the native API.

tiermem (``bench/tiermem_proc.py``: the real app under uvicorn, uvloop and
httptools, as ``tiermem serve`` runs it) and the fake OpenAI-compatible LLM
(``bench/fake_llm_proc.py``: fixed first-token delay) each run in a process of
their own. One client alternates, turn by turn, between two sessions of the same
conversation shape: one over the native API (``POST /v1/sessions/{id}/turns``,
SSE ``token`` events), one over ``POST /v1/chat/completions`` with
``X-Session-ID`` (streamed chunks; the client sends only its new message, as the
native client does). Both are read with the same raw httpx SSE reader, so the
client's own cost is the same; a third series reads the OpenAI front with the
official ``openai`` SDK (its parsing included), for reference.

Per turn the client's TTFT (request sent -> first text) minus the LLM's own TTFT
for that request (request received -> first content chunk, paired by the marker
each message ends with) is tiermem's overhead; the figure is the median
over the turns of each kind, and the OpenAI front's extra cost is the difference
of the medians (and the median of the per-round differences).

Run: ``python bench/openai_front.py [--turns 30]``. Results: a table on stdout
and ``bench/results/openai_front.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import openai
import orjson

from bench.common import (
    ServerProcess,
    Table,
    machine_info,
    machine_line,
    marker,
    ms,
    pct,
    start_redis,
    summary,
    user_message,
    with_marker,
    write_results,
)

KINDS = ("native", "openai", "openai_sdk")


async def native_ttft(client: httpx.AsyncClient, base: str, session: str, text: str) -> float:
    body = {"user_id": "bench-user", "message": text}
    t0 = time.perf_counter()
    first: float | None = None
    async with client.stream("POST", f"{base}/v1/sessions/{session}/turns", json=body) as r:
        assert r.status_code == 200, await r.aread()
        event = ""
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "token" and first is None:
                first = time.perf_counter() - t0
            elif line.startswith("data: ") and event == "error":
                raise RuntimeError(line)
    assert first is not None
    return first


async def openai_ttft(client: httpx.AsyncClient, base: str, session: str, text: str) -> float:
    body = {"model": "default", "stream": True, "messages": [{"role": "user", "content": text}]}
    headers = {"X-Session-ID": session, "X-User-ID": "bench-user"}
    t0 = time.perf_counter()
    first: float | None = None
    async with client.stream(
        "POST", f"{base}/v1/chat/completions", json=body, headers=headers
    ) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(line)
            choices = chunk.get("choices") or [{}]
            if first is None and choices[0].get("delta", {}).get("content"):
                first = time.perf_counter() - t0
    assert first is not None
    return first


async def sdk_ttft(oa: openai.AsyncOpenAI, session: str, text: str) -> float:
    headers = {"X-Session-ID": session, "X-User-ID": "bench-user"}
    t0 = time.perf_counter()
    first: float | None = None
    stream = await oa.chat.completions.create(
        model="default", stream=True, messages=[{"role": "user", "content": text}],
        extra_headers=headers,
    )  # fmt: skip
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
    assert first is not None
    return first


async def run(turns: int, warmup: int, work: Path, first_token_ms: float) -> dict[str, Any]:
    redis = start_redis(work / "redis")
    logs = work / "logs"
    llm = ServerProcess(
        "bench.fake_llm_proc",
        ["--first-token-delay-ms", str(first_token_ms), "--token-interval-ms", "2",
         "--reply-tokens", "24"],
        log_path=logs / "fake_llm.log", ready_path="/health",
    ).start()  # fmt: skip
    env = {
        "TIERMEM_LLM_URL": llm.url + "/v1", "TIERMEM_REDIS_URL": redis.url,
        "TIERMEM_DATA_DIR": str(work / "data"), "TIERMEM_MILVUS_URI": str(work / "milvus.db"),
        "TIERMEM_EMBEDDINGS": "hash", "TIERMEM_AUTH": "off", "TIERMEM_PREWARM": "false",
        "TIERMEM_ARCHIVE_THRESHOLD": "1000", "TIERMEM_LOG_LEVEL": "WARNING",
    }  # fmt: skip
    app = ServerProcess("bench.tiermem_proc", env=env, log_path=logs / "tiermem.log").start()
    samples: dict[str, list[float]] = {k: [] for k in KINDS}
    llm_ttft: dict[str, list[float]] = {k: [] for k in KINDS}
    overhead: dict[str, list[float]] = {k: [] for k in KINDS}
    try:
        async with (
            httpx.AsyncClient(timeout=60) as client,
            openai.AsyncOpenAI(base_url=app.url + "/v1", api_key="unused", max_retries=0) as oa,
        ):
            run_id = uuid.uuid4().hex[:6]
            sessions = {k: f"bench-{k.replace('_', '-')}-{run_id}" for k in KINDS}
            for turn in range(1, warmup + turns + 1):
                for i, kind in enumerate(KINDS):
                    session = sessions[kind]
                    text = with_marker(user_message(i, turn), session, turn)
                    if kind == "native":
                        t = await native_ttft(client, app.url, session, text)
                    elif kind == "openai":
                        t = await openai_ttft(client, app.url, session, text)
                    else:
                        t = await sdk_ttft(oa, session, text)
                    if turn > warmup:
                        samples[kind].append(t)
                own = (await client.get(f"{llm.url}/bench/ttft", params={"clear": 1})).json()
                if turn <= warmup:
                    continue
                for kind in KINDS:
                    theirs = own[marker(sessions[kind], turn)]
                    llm_ttft[kind].append(theirs)
                    overhead[kind].append(samples[kind][-1] - theirs)
    finally:
        app.stop()
        llm.stop()
        redis.stop()
    extra = [o - n for o, n in zip(overhead["openai"], overhead["native"], strict=True)]
    return {
        "turns": turns,
        "warmup": warmup,
        "first_token_delay_ms": first_token_ms,
        "client_ttft": {k: summary(v) for k, v in samples.items()},
        "llm_ttft": {k: summary(v) for k, v in llm_ttft.items()},
        "overhead": {k: summary(v) for k, v in overhead.items()},
        "openai_minus_native_median_s": pct(overhead["openai"], 50) - pct(overhead["native"], 50),
        "openai_minus_native_paired_median_s": pct(extra, 50),
        "raw_overhead_s": overhead,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--turns", type=int, default=30, help="measured turns per kind")
    p.add_argument("--warmup", type=int, default=3, help="turns per kind before measuring")
    p.add_argument("--first-token-delay-ms", type=float, default=50.0)
    args = p.parse_args(argv)
    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="tiermem-openai-bench-"))
    try:
        data = asyncio.run(run(args.turns, args.warmup, work, args.first_token_delay_ms))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    labels = {"native": "native API (httpx SSE)", "openai": "OpenAI front (httpx SSE)",
              "openai_sdk": "OpenAI front (openai SDK client)"}  # fmt: skip
    table = Table(
        f"Time to first token over the LLM's own, {args.turns} turns per kind, one session each",
        ["client", "client TTFT median (ms)", "LLM TTFT median (ms)", "overhead median (ms)",
         "overhead p90 (ms)"],
        note=(
            "OpenAI front minus native: "
            f"{ms(data['openai_minus_native_median_s'])} ms (difference of the medians), "
            f"{ms(data['openai_minus_native_paired_median_s'])} ms (median of per-turn "
            "differences). " + machine_line(info)
        ),
    )  # fmt: skip
    for kind in KINDS:
        table.rows.append([
            labels[kind], ms(data["client_ttft"][kind]["median"]),
            ms(data["llm_ttft"][kind]["median"]), ms(data["overhead"][kind]["median"]),
            ms(data["overhead"][kind]["p90"]),
        ])  # fmt: skip
    table.print()
    data["machine"] = info
    path = write_results("openai_front", data, [table], "# OpenAI-compatible front: TTFT")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
