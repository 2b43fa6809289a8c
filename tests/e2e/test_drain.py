"""SIGTERM to a real `tiermem serve` process with 50 open streams."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import httpx

from tests.harness import ServeProcess, parse_sse
from tests.servers.fake_vllm import FakeVLLM

STREAMS = 50


def _env(tmp_path: Path, redis_url: str, llm: FakeVLLM, drain_s: float) -> dict[str, str]:
    return {
        "TIERMEM_REDIS_URL": redis_url,
        "TIERMEM_DATA_DIR": str(tmp_path / "data"),
        "TIERMEM_AUTH": "off",
        "TIERMEM_EMBEDDINGS": "hash",
        "TIERMEM_LLM_URL": llm.base_url,
        "TIERMEM_DRAIN_TIMEOUT_S": str(drain_s),
        "TIERMEM_LOG_FORMAT": "json",
    }


async def _open_streams(url: str, sessions: list[str], started: asyncio.Event) -> list[list[str]]:
    firsts = 0

    async def one(client: httpx.AsyncClient, session: str) -> list[str]:
        nonlocal firsts
        lines: list[str] = []
        async with client.stream(
            "POST",
            f"{url}/v1/sessions/{session}/turns",
            json={"user_id": "u1", "message": "tell me a story"},
        ) as r:
            assert r.status_code == 200
            seen_token = False
            async for line in r.aiter_lines():
                lines.append(line)
                if line == "event: token" and not seen_token:
                    seen_token = True
                    firsts += 1
                    if firsts == len(sessions):
                        started.set()
        return lines

    limits = httpx.Limits(max_connections=STREAMS + 10)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(*(one(client, s) for s in sessions))


async def _drain(
    tmp_path: Path, redis_url: str, drain_s: float, token_interval_s: float, reply_tokens: int
) -> tuple[list[list[str]], int, float, dict]:
    llm = FakeVLLM(token_interval_s=token_interval_s, reply_tokens=reply_tokens).start()
    proc = ServeProcess(_env(tmp_path, redis_url, llm, drain_s), tmp_path / "serve.log").start()
    sessions = [f"d-{uuid.uuid4().hex[:10]}" for _ in range(STREAMS)]
    try:
        started = asyncio.Event()
        streams = asyncio.create_task(_open_streams(proc.url, sessions, started))
        await asyncio.wait_for(started.wait(), timeout=60)
        assert proc.proc is not None
        t0 = time.monotonic()
        proc.proc.send_signal(15)
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient(timeout=10) as c:
            ready = await c.get(f"{proc.url}/readyz")
            refused = await c.post(
                f"{proc.url}/v1/sessions/new-one/turns", json={"user_id": "u1", "message": "hi"}
            )
        checks = {
            "readyz": ready.status_code,
            "new_turn": refused.status_code,
            "retry_after": refused.headers.get("retry-after"),
            "code": refused.json()["error"]["code"],
        }
        results = await asyncio.wait_for(streams, timeout=60)
        rc = await asyncio.to_thread(proc.proc.wait, 60)
        return results, rc, time.monotonic() - t0, checks
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.kill9()
        llm.stop()


async def test_sigterm_lets_50_streams_finish(tmp_path: Path, redis_url: str) -> None:
    results, rc, took, checks = await _drain(
        tmp_path, redis_url, drain_s=20, token_interval_s=0.05, reply_tokens=40
    )
    assert checks == {"readyz": 503, "new_turn": 503, "retry_after": "2", "code": "draining"}
    assert rc == 0
    for lines in results:
        events, _ = parse_sse(lines)
        assert events[-1].event == "done"
        assert events[-1].data["status"] == "complete"
    print(f"drain with {STREAMS} open streams took {took:.2f}s")


async def test_drain_deadline_ends_streams_with_retryable_error(
    tmp_path: Path, redis_url: str
) -> None:
    results, rc, took, checks = await _drain(
        tmp_path, redis_url, drain_s=1.0, token_interval_s=0.1, reply_tokens=400
    )
    assert checks["readyz"] == 503 and checks["new_turn"] == 503
    assert rc == 0
    assert took < 1.0 + 8
    for lines in results:
        events, _ = parse_sse(lines)
        final = events[-1]
        assert final.event == "error"
        # One error shape everywhere: {"error": {code, message}, "retryable"}.
        assert final.data["retryable"] is True and "retry" not in final.data
        assert final.data["error"]["code"] == "draining"
        assert final.data["status"] == "interrupted"  # stored, marked, retryable


async def test_a_turn_cut_by_the_drain_completes_in_place_on_retry(
    tmp_path: Path, redis_url: str
) -> None:
    """The drain told these clients to retry: the same turn runs again in place
    (same index, complete), on a fresh process. (A turn the client walked away
    from is replayed as stored instead: tests/e2e/test_turn_paths.py.)"""
    results, rc, _took, _checks = await _drain(
        tmp_path, redis_url, drain_s=1.0, token_interval_s=0.1, reply_tokens=400
    )
    assert rc == 0
    cut = []
    for lines in results:
        events, _ = parse_sse(lines)
        meta, final = events[0], events[-1]
        assert final.event == "error" and final.data["interrupted_by"] == "drain"
        cut.append((meta.data["session_id"], meta.data["turn_id"], final.data["turn"], final.id))
    llm = FakeVLLM(token_interval_s=0.0, reply_tokens=5).start()
    proc = ServeProcess(_env(tmp_path, redis_url, llm, 20), tmp_path / "serve2.log").start()
    try:
        async with httpx.AsyncClient(timeout=60) as c:
            for session, turn_id, index, last_id in cut[:10]:
                async with c.stream(
                    "POST",
                    f"{proc.url}/v1/sessions/{session}/turns",
                    json={"user_id": "u1", "message": "tell me a story"},
                    headers={"Last-Event-ID": last_id},
                ) as r:
                    lines = [line async for line in r.aiter_lines()]
                events, _ = parse_sse(lines)
                done = events[-1]
                assert done.event == "done", lines
                assert done.data["turn"] == index and done.data["status"] == "complete"
                assert not done.data.get("replayed")
                assert events[0].data["turn_id"] == turn_id
                state = (await c.get(f"{proc.url}/v1/sessions/{session}")).json()
                assert state["turn_count"] == index
                assert state["unarchived_turns"][-1]["status"] == "complete"
    finally:
        proc.terminate()
        llm.stop()
