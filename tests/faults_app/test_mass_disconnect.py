"""Fault 5: 200 clients leave mid-stream at the same moment.

Real uvicorn (the app, in this process, so its tasks can be inspected), real
httpx clients, real Redis, and a fake vLLM that streams slowly and records when
each upstream request was closed. What must hold (README, "Client disconnects
mid-stream"):

- every upstream LLM request is closed within 1 s of its client leaving;
- 5 s later no turn task is left: ``Services.turn_tasks`` is empty and no task
  started for the turns (turn producers, ASGI request cycles) is still pending;
- each partial turn is stored exactly once, with ``status: interrupted`` and the
  text generated before the client left.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from memory.keys import SessionKeys
from memory.models import Turn
from tests.fault_report import report_fault
from tests.harness import AppServer, make_settings, parse_sse
from tests.servers.fake_vllm import FakeVLLM, RecordedRequest

N_CLIENTS = 200
# Slow enough that no reply can finish before its client leaves (a reply is a
# few hundred pieces), fast enough that every client sees tokens within seconds.
TOKEN_INTERVAL_S = 0.2
REPLY_TOKENS = 400
CANCEL_WITHIN_S = 1.0
NO_TASKS_AFTER_S = 5.0
# Everyone must be streaming before the mass disconnect; on 2 busy cores 200
# turns reach their first tokens in a few seconds.
ALL_STREAMING_WITHIN_S = 30.0


@pytest.fixture(scope="module")
def slow_llm() -> Iterator[FakeVLLM]:
    llm = FakeVLLM(token_interval_s=TOKEN_INTERVAL_S, reply_tokens=REPLY_TOKENS).start()
    yield llm
    llm.stop()


@pytest.fixture
async def app(tmp_path: Path, redis_url: str, slow_llm: FakeVLLM) -> AsyncIterator[AppServer]:
    slow_llm.reset()
    settings = make_settings(
        tmp_path, redis_url, llm_url=slow_llm.base_url, archive_threshold=100,
        llm_first_token_timeout_s=30.0, llm_read_timeout_s=30.0, heartbeat_s=5.0,
    )  # fmt: skip
    async with AppServer(settings) as srv:
        yield srv


@dataclass
class Client:
    session: str
    turn_id: str
    message: str
    wait_tokens: int
    lines: list[str]
    # When it began to close its connection: the upstream cancel is timed from here.
    left_at: float = 0.0

    @property
    def partial(self) -> str:
        events, _ = parse_sse(self.lines)
        return "".join(e.data["text"] for e in events if e.event == "token")


async def _stream_then_leave(
    http: httpx.AsyncClient,
    base: str,
    client: Client,
    n_clients: int,
    streaming: list[int],
    everyone_streaming: asyncio.Event,
) -> None:
    """Reads until ``wait_tokens`` tokens arrived, waits for all the others to get
    there too, then closes its connection without reading the rest."""
    body = {"user_id": "u1", "message": client.message, "turn_id": client.turn_id,
            "retrieve": "never"}  # fmt: skip
    async with http.stream("POST", f"{base}/v1/sessions/{client.session}/turns", json=body) as r:
        assert r.status_code == 200, await r.aread()
        # Lines are pulled by hand and the iterator kept: leaving an ``async for``
        # early lets the garbage collector close the generator, and with it the
        # connection, at a moment the test does not control.
        lines = r.aiter_lines()
        tokens = 0
        while tokens < client.wait_tokens or client.lines[-1] != "":
            try:
                line = await anext(lines)
            except StopAsyncIteration:
                raise AssertionError(f"stream ended early: {client.lines[-3:]}") from None
            client.lines.append(line)
            tokens += line == "event: token"
        streaming[0] += 1
        if streaming[0] == n_clients:
            everyone_streaming.set()
        await everyone_streaming.wait()
        client.left_at = time.monotonic()


async def _stored_turns(redis_url: str, session: str) -> list[Turn]:
    r = aioredis.from_url(redis_url)
    try:
        raw = await r.lrange(SessionKeys("default", session).log, 0, -1)
    finally:
        await r.aclose()
    return [Turn.decode(x) for x in raw]


def _pending_tasks(baseline: set[asyncio.Task[object]]) -> list[str]:
    me = asyncio.current_task()
    return sorted(
        f"{t.get_name()}:{getattr(t.get_coro(), '__qualname__', '?')}"
        for t in asyncio.all_tasks()
        if t not in baseline and t is not me and not t.done()
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "n_clients",
    [
        N_CLIENTS,
    ],
)
async def test_clients_leave_mid_stream(
    app: AppServer, slow_llm: FakeVLLM, redis_url: str, n_clients: int
) -> None:
    run = uuid.uuid4().hex[:8]
    clients = [
        Client(
            session=f"md-{run}-{i}",
            turn_id=f"md-{run}-t{i}",
            message=f"client {i} wants a very long story",
            wait_tokens=1 + i % 3,
            lines=[],
        )
        for i in range(n_clients)
    ]
    baseline = set(asyncio.all_tasks())
    streaming = [0]
    everyone_streaming = asyncio.Event()
    limits = httpx.Limits(max_connections=n_clients + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        runs = [
            asyncio.create_task(
                _stream_then_leave(http, app.url, c, n_clients, streaming, everyone_streaming),
                name=f"test-client-{i}",
            )
            for i, c in enumerate(clients)
        ]
        baseline |= set(runs)
        try:
            await asyncio.wait_for(asyncio.gather(*runs), ALL_STREAMING_WITHIN_S)
        except TimeoutError:
            pytest.fail(f"only {streaming[0]}/{n_clients} clients got tokens in time")
        finally:
            # One failed client must not leave the others running past the test.
            for run_task in runs:
                run_task.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
    last_close = max(c.left_at for c in clients)

    # 1. Every upstream request is closed within 1 s of its client leaving.
    by_session: dict[str, list[RecordedRequest]] = {}
    deadline = time.monotonic() + CANCEL_WITHIN_S + 2.0
    while True:
        reqs = slow_llm.chat_requests()
        # Both marks: the fake LLM notes the disconnect first and the end of its
        # handler a moment later, after cancelling its producer.
        settled = all(r.disconnected_at is not None and r.finished_at is not None for r in reqs)
        if settled or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    for req in slow_llm.chat_requests():
        session = (req.session_id or "").partition(":")[2]
        by_session.setdefault(session, []).append(req)
    assert sorted(by_session) == sorted(c.session for c in clients)
    assert all(len(v) == 1 for v in by_session.values()), "one upstream request per turn"
    never_closed = [s for s, (req,) in by_session.items() if req.disconnected_at is None]
    assert never_closed == [], f"{len(never_closed)} upstream requests never closed"
    lags = [(by_session[c.session][0].disconnected_at or 0.0) - c.left_at for c in clients]
    assert max(lags) < CANCEL_WITHIN_S, f"slowest upstream cancel {max(lags):.3f}s"
    unfinished = [s for s, (req,) in by_session.items() if req.finished_at is None]
    assert unfinished == []

    # 2. No task left behind after 5 s, but the runner's warm runs: a bounded
    # pool of runs waiting for the next turns (graph/builder.py), each a task
    # of its own and the task of the `prepare` step it waits in.
    while True:
        warm = app.services.runner.waiting
        assert len(warm) <= app.settings.graph_warm_runs
        leftovers = _pending_tasks(baseline | set(warm))
        steps = [t for t in leftovers if t.endswith(":RunnableCallable.ainvoke")]
        if len(steps) <= len(warm):
            leftovers = [t for t in leftovers if t not in steps]
        if (not app.services.turn_tasks and not leftovers) or (
            time.monotonic() - last_close > NO_TASKS_AFTER_S
        ):
            break
        await asyncio.sleep(0.05)
    settled_s = time.monotonic() - last_close
    assert not app.services.turn_tasks, f"{len(app.services.turn_tasks)} turn tasks left"
    assert leftovers == [], leftovers[:10]
    assert not app.services.controls

    # 3. Each partial turn stored exactly once, as interrupted, with what was sent.
    lost = duplicated = wrong = 0
    for c in clients:
        stored = await _stored_turns(redis_url, c.session)
        mine = [t for t in stored if t.turn_id == c.turn_id]
        lost += not mine
        duplicated += max(0, len(mine) - 1) + sum(t.turn_id != c.turn_id for t in stored)
        if len(stored) != 1:
            continue
        t = stored[0]
        partial = c.partial
        if not (
            t.index == 1
            and t.status == "interrupted"
            and t.user == c.message
            and partial
            and t.assistant.startswith(partial)
        ):
            wrong += 1
    report_fault(
        "client_mass_disconnect",
        injected=n_clients,
        acknowledged=0,
        lost=lost,
        duplicated=duplicated,
        recover_s=settled_s,
        upstream_cancel_max_s=round(max(lags), 3),
        upstream_cancel_p50_s=round(statistics.median(lags), 3),
        stored_interrupted=n_clients - lost - wrong,
    )
    assert lost == 0 and duplicated == 0
    assert wrong == 0, f"{wrong} turns not stored as interrupted with the partial reply"
