"""Fault 3: Milvus unavailable while batches reach the archive threshold.

Milvus here is a real Milvus Lite gRPC server in a process of its own (``python
-m milvus_lite server``), which the app reaches as a remote Milvus
(``TIERMEM_MILVUS_URI=http://127.0.0.1:<port>``). Two outages:

- the network: a TCP proxy of the tests (tests/servers/tcp_proxy.py) between
  app and Milvus resets every connection and refuses new ones, then heals;
- the process: the Milvus server is ``kill -9``ed, then restarted on the same
  port and data.

What must hold (README, "Milvus unreachable"): chat is unaffected (every turn
completes, no extra latency beyond noise); due batches wait in their L2 outbox
record (``tm:{t:s}:batch:<id>``: pending, no TTL, attempts and next_try_at
growing with exponential backoff) with the archive cursor unmoved; once Milvus
answers again they drain, and L3 holds exactly one row per distinct batch id,
each turn archived once.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from infra.embeddings import HashingEmbedder
from infra.milvus import AsyncMilvus
from infra.settings import Settings
from memory.archiver import BACKOFF_BASE_S
from memory.keys import CacheKeys, SessionKeys
from memory.l2_store import BatchRecord
from memory.l3_store import L3Store, MemoryRecord, batch_id_for
from memory.models import SessionState
from memory.summaries import SUMMARY_PROMPT as SUMMARIZE_SYSTEM_PROMPT
from tests.fault_report import report_fault
from tests.harness import AppServer, TurnResult, make_settings, post_turn
from tests.servers.fake_vllm import FakeVLLM
from tests.servers.redis_server import RedisServer, free_port
from tests.servers.tcp_proxy import TcpProxy

THRESHOLD = 4
COLLECTION = "tiermem_memories"
TENANT = "default"


class MilvusLiteServer:
    """A Milvus Lite gRPC server as a process of its own, on a fixed 127.0.0.1 port,
    so it can be killed and started again on the same port and data."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> MilvusLiteServer:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.data_dir),
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            # The gRPC port is bound only after the database is open.
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"milvus lite server did not start: {self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def kill9(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        # SIGINT: the server's own clean shutdown (closes the database).
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def milvus_server(tmp_path: Path) -> Iterator[MilvusLiteServer]:
    server = MilvusLiteServer(tmp_path / "milvus-data", tmp_path / "milvus.log").start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis of this test's own: the sweeper scans every session in Redis, and
    must neither meet other tests' sessions nor archive them into this Milvus."""
    server = RedisServer(tmp_path / "redis").start()
    yield server.url
    server.stop()


@pytest.fixture
def fake_llm() -> Iterator[FakeVLLM]:
    llm = FakeVLLM(reply_tokens=12).start()
    yield llm
    llm.stop()


class Observer:
    """Reads L3 straight from the Milvus server (never through the proxy), with a
    client of its own: what is really stored, whatever the app believes."""

    def __init__(self, uri: str) -> None:
        self._executor = ThreadPoolExecutor(2, thread_name_prefix="observer")
        self._milvus = AsyncMilvus(uri, None, self._executor, timeout_s=5.0)
        self.store = L3Store(self._milvus, HashingEmbedder(), COLLECTION, 384)

    async def batches(self, session: str) -> list[MemoryRecord]:
        return await self.store.list_batches(TENANT, session)

    async def close(self) -> None:
        await self._milvus.close()
        self._executor.shutdown()


def _app_settings(tmp_path: Path, redis_url: str, milvus_uri: str, llm: FakeVLLM) -> Settings:
    return make_settings(
        tmp_path, redis_url, milvus_uri=milvus_uri, llm_url=llm.base_url,
        archive_threshold=THRESHOLD, retrieve_timeout_s=1.0,
    )  # fmt: skip


async def _timed_turn(
    c: httpx.AsyncClient, app: AppServer, session: str, user: str, i: int, retrieve: str = "never"
) -> tuple[TurnResult, float]:
    t0 = time.perf_counter()
    r = await post_turn(c, app.url, session, f"note {i} from {user}: nothing special", user=user,
                        retrieve=retrieve)  # fmt: skip
    return r, time.perf_counter() - t0


def _expected_batches(session: str, turns: int) -> set[str]:
    return {
        batch_id_for(TENANT, session, first, first + THRESHOLD - 1)
        for first in range(1, turns - THRESHOLD + 2, THRESHOLD)
    }


async def _outbox(redis_url: str, session: str) -> dict[str, dict[str, str]]:
    """Every outbox record of a session: batch id -> fields (+ its TTL)."""
    r = aioredis.from_url(redis_url, decode_responses=True)
    try:
        base = SessionKeys(TENANT, session).batch("")
        out: dict[str, dict[str, str]] = {}
        async for key in r.scan_iter(match=base + "*"):
            fields = {str(k): str(v) for k, v in (await r.hgetall(key)).items()}
            fields["ttl"] = str(await r.ttl(key))
            out[str(key)[len(base) :]] = fields
        return out
    finally:
        await r.aclose()


async def _summaries_cached(redis_url: str, session: str) -> int:
    r = aioredis.from_url(redis_url)
    try:
        pattern = f"{CacheKeys(TENANT, session).base}:summary:*"
        return len([k async for k in r.scan_iter(match=pattern)])
    finally:
        await r.aclose()


async def _wait_archiver_idle(app: AppServer, limit_s: float = 15.0) -> None:
    for _ in range(int(limit_s / 0.02)):
        if not app.services.archiver.pending_tasks:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("archive tasks did not settle")


async def _meta(app: AppServer, session: str) -> SessionState:
    meta = await app.services.l2.read_meta(TENANT, session)
    assert meta is not None, session
    return meta


async def _record(app: AppServer, session: str, first: int, last: int) -> BatchRecord:
    rec = await app.services.l2.batch_record(
        TENANT, session, batch_id_for(TENANT, session, first, last)
    )
    assert rec is not None, (session, first, last)
    return rec


def _turns_in_l3(batches: list[MemoryRecord], upto: int) -> dict[int, int]:
    """How often each user message 1..upto appears in the archived transcripts.

    A row is ``<summary>\n\n<transcript>``; only the transcript counts (the
    fake LLM's summary quotes the batch's first line)."""
    text = "\n".join(b.text[b.text.index(f"\n\n[turn {b.first_turn}] user:") :] for b in batches)
    return {i: text.count(f"] user: note {i} from ") for i in range(1, upto + 1)}


async def test_milvus_unreachable_batches_wait_in_l2_then_drain(
    tmp_path: Path, own_redis: str, milvus_server: MilvusLiteServer, fake_llm: FakeVLLM
) -> None:
    redis_url = own_redis
    run = uuid.uuid4().hex[:8]
    sessions = {f"mv-{run}-a": "ua", f"mv-{run}-b": "ub"}
    proxy = TcpProxy("127.0.0.1", milvus_server.port).start()
    observer = Observer(milvus_server.uri)
    settings = _app_settings(tmp_path, redis_url, f"http://127.0.0.1:{proxy.port}", fake_llm)
    up_lat: list[float] = []
    down_lat: list[float] = []
    acknowledged: dict[str, list[int]] = {s: [] for s in sessions}
    try:
        async with AppServer(settings) as app, httpx.AsyncClient(timeout=30) as c:
            svc = app.services
            # --- Milvus up: turns 1..5, the first batch of each session archived.
            for i in range(1, 6):
                for s, u in sessions.items():
                    r, dt = await _timed_turn(c, app, s, u, i)
                    assert r.done["status"] == "complete" and r.done["turn"] == i
                    acknowledged[s].append(r.done["turn"])
                    up_lat.append(dt)
            await _wait_archiver_idle(app)
            for s in sessions:
                assert (await _meta(app, s)).archived_upto == THRESHOLD

            # --- the outage: every connection reset, new ones refused.
            proxy.refuse()
            proxy.cut()
            down_at = time.monotonic()
            assert (await svc.ready())["milvus"] is False
            failed_at = time.time()
            # Turns 6..13: the batch 5..8 of each session comes due at turn 8.
            for i in range(6, 14):
                for s, u in sessions.items():
                    r, dt = await _timed_turn(c, app, s, u, i)
                    assert r.done["status"] == "complete" and r.done["turn"] == i, r.events[-1]
                    acknowledged[s].append(r.done["turn"])
                    down_lat.append(dt)
            # A turn that asks for long-term memory goes on without it.
            s0, u0 = next(iter(sessions.items()))
            r, dt = await _timed_turn(c, app, s0, u0, 14, retrieve="always")
            assert r.done["status"] == "complete" and r.done["turn"] == 14
            assert dt < settings.retrieve_timeout_s + 1.0
            acknowledged[s0].append(14)
            await _wait_archiver_idle(app)

            # Batches wait in L2: cursor unmoved, one pending outbox record each,
            # without TTL, summarised once (a retry spends no LLM tokens).
            for s in sessions:
                meta = await _meta(app, s)
                assert meta.archived_upto == THRESHOLD and meta.turn_count >= 13
                waiting = batch_id_for(TENANT, s, 5, 8)
                outbox = await _outbox(redis_url, s)
                assert outbox[waiting]["status"] == "pending"
                assert outbox[waiting]["ttl"] == "-1"
                assert int(outbox[waiting]["attempts"]) >= 1
                assert float(outbox[waiting]["next_try_at"]) > failed_at
                # Its summary waits in the summary cache (memory/cache.py), beside
                # the archived batch 1..4's.
                assert await _summaries_cached(redis_url, s) == 2
                assert batch_id_for(TENANT, s, 9, 12) not in outbox  # cut from the cursor
            # Nothing reached Milvus meanwhile (read past the proxy).
            for s in sessions:
                assert [(b.first_turn, b.last_turn) for b in await observer.batches(s)] == [(1, 4)]

            # Backoff grows: each forced attempt doubles the wait...
            for s in sessions:
                for _ in range(2):
                    before = await _record(app, s, 5, 8)
                    called = time.time()
                    assert await svc.archiver.archive_once(
                        TENANT, s, force=False, ignore_backoff=True
                    ) is None  # fmt: skip
                    after = await _record(app, s, 5, 8)
                    assert after.attempts == before.attempts + 1
                    expected = BACKOFF_BASE_S * 2 ** (after.attempts - 1)
                    assert expected - 0.05 <= after.next_try_at - called <= expected + 1.0
            # Every forced attempt took the summary from the cache, not the LLM.
            hits = svc.metrics.registry.get_sample_value(
                "tiermem_cache_hits_total", {"cache": "summary", "tier": "l2"}
            )
            assert hits is not None and hits >= 2 * len(sessions)
            # ... and the sweeper respects it: no attempt before next_try_at.
            attempts = {s: (await _record(app, s, 5, 8)).attempts for s in sessions}
            assert await svc.archiver.sweep_once() == 0
            # The backlog gauge counts the due batches L3 does not have yet.
            backlog = svc.metrics.registry
            assert (backlog.get_sample_value("tiermem_archive_backlog") or 0) >= len(sessions)
            for s in sessions:
                rec = await _record(app, s, 5, 8)
                assert rec.attempts == attempts[s] and rec.status == "pending"
                assert (await _meta(app, s)).archived_upto == THRESHOLD

            # --- Milvus back: the waiting batches drain (forced past their backoff,
            # as an operator would), then the sweep takes what is left.
            proxy.heal()
            healed_at = time.monotonic()
            deadline = healed_at + 15.0
            pending = set(sessions)
            while pending and time.monotonic() < deadline:
                for s in list(pending):
                    done = await svc.archiver.archive_once(
                        TENANT, s, force=False, ignore_backoff=True
                    )
                    if done is not None:
                        assert (done.first_turn, done.last_turn) == (5, 8)
                        pending.discard(s)
                if pending:
                    await asyncio.sleep(0.2)
            assert not pending, "batches did not drain after Milvus came back"
            swept = await svc.archiver.sweep_once()
            recovered_s = time.monotonic() - healed_at
            assert swept == len(sessions)  # batch 9..12 of each session
            assert await svc.archiver.sweep_once() == 0
            assert backlog.get_sample_value("tiermem_archive_backlog") == 0
            assert await svc.ready() == {"redis": True, "milvus": True, "draining": False}

            states = {s: (await c.get(f"{app.url}/v1/sessions/{s}")).json() for s in sessions}
            outboxes = {s: await _outbox(redis_url, s) for s in sessions}
            summaries = [
                r for r in fake_llm.chat_requests()
                if r.messages and r.messages[0].get("content") == SUMMARIZE_SYSTEM_PROMPT
            ]  # fmt: skip
        # --- what is stored, read past the app.
        lost = duplicated = 0
        expected_ids: set[str] = set()
        for s in sessions:
            count = states[s]["turn_count"]
            assert states[s]["archived_upto"] == 12
            expected = _expected_batches(s, count)
            expected_ids |= expected
            batches = await observer.batches(s)
            assert {b.batch_id for b in batches} == expected
            assert [(b.first_turn, b.last_turn) for b in batches] == [(1, 4), (5, 8), (9, 12)]
            for bid in expected:
                assert outboxes[s][bid]["status"] == "done" and int(outboxes[s][bid]["ttl"]) > 0
            seen = _turns_in_l3(batches, 12)
            tail = [t["turn"] for t in states[s]["unarchived_turns"]]
            assert tail == list(range(13, count + 1))
            for i in acknowledged[s]:
                n = seen.get(i, 0) + tail.count(i)
                lost += n == 0
                duplicated += max(0, n - 1)
        rows = await observer.store.count(TENANT)
        assert rows == len(expected_ids) == 6
        # Each batch was summarised once, however often its upsert was retried.
        assert len(summaries) == len(expected_ids)
    finally:
        await observer.close()
        proxy.stop()

    up_p50, down_p50 = statistics.median(up_lat), statistics.median(down_lat)
    report_fault(
        "milvus_unreachable",
        injected=1,
        acknowledged=sum(len(v) for v in acknowledged.values()),
        lost=lost,
        duplicated=duplicated,
        recover_s=recovered_s,
        outage_s=round(healed_at - down_at, 3),
        turn_p50_up_ms=round(up_p50 * 1000, 1),
        turn_p50_down_ms=round(down_p50 * 1000, 1),
        turn_max_down_ms=round(max(down_lat) * 1000, 1),
        l3_rows=rows,
        distinct_batches=len(expected_ids),
    )
    assert lost == 0 and duplicated == 0
    # Chat does not wait on Milvus: no turn pays for the outage.
    assert down_p50 <= 2 * up_p50 + 0.05, (up_p50, down_p50)
    assert max(down_lat) < 1.0


async def test_milvus_killed_and_restarted(
    tmp_path: Path, own_redis: str, milvus_server: MilvusLiteServer, fake_llm: FakeVLLM
) -> None:
    redis_url = own_redis
    session, user = f"mk-{uuid.uuid4().hex[:8]}", "uk"
    settings = _app_settings(tmp_path, redis_url, milvus_server.uri, fake_llm)
    acknowledged = 0
    async with AppServer(settings) as app, httpx.AsyncClient(timeout=30) as c:
        svc = app.services
        for i in range(1, 5):
            r, _ = await _timed_turn(c, app, session, user, i)
            assert r.done["status"] == "complete"
            acknowledged += 1
        await _wait_archiver_idle(app)
        assert (await _meta(app, session)).archived_upto == 4

        milvus_server.kill9()
        killed_at = time.monotonic()
        for i in range(5, 9):
            r, dt = await _timed_turn(c, app, session, user, i)
            assert r.done["status"] == "complete" and dt < 1.0
            acknowledged += 1
        await _wait_archiver_idle(app)
        assert (await _meta(app, session)).archived_upto == 4
        assert (await _record(app, session, 5, 8)).status == "pending"
        down = await c.get(f"{app.url}/v1/users/{user}/memories", params={"query": "note"})
        assert down.status_code == 503 and down.json()["error"]["code"] == "memory_unavailable"

        milvus_server.start()
        restarted_at = time.monotonic()
        for _ in range(75):
            if await svc.archiver.archive_once(TENANT, session, force=False, ignore_backoff=True):
                break
            await asyncio.sleep(0.2)
        recovered_s = time.monotonic() - restarted_at
        state = (await c.get(f"{app.url}/v1/sessions/{session}")).json()
        assert state["archived_upto"] == 8 and state["unarchived_turns"] == []
        # Asked before the observer opens its own client: that one loads the
        # collection on the server, which would hide what the app does alone.
        after = await c.get(f"{app.url}/v1/users/{user}/memories", params={"query": "note"})
        observer = Observer(milvus_server.uri)
        try:
            batches = await observer.batches(session)
        finally:
            await observer.close()
        # The batch archived before the kill survived it; the waiting one arrived once.
        assert [b.batch_id for b in batches] == [
            batch_id_for(TENANT, session, 1, 4), batch_id_for(TENANT, session, 5, 8)]  # fmt: skip
        seen = _turns_in_l3(batches, 8)
        report_fault(
            "milvus_killed",
            injected=1,
            acknowledged=acknowledged,
            lost=sum(n == 0 for n in seen.values()),
            duplicated=sum(max(0, n - 1) for n in seen.values()),
            recover_s=recovered_s,
            outage_s=round(restarted_at - killed_at, 3),
        )
        assert all(n == 1 for n in seen.values()), seen
        if after.status_code != 200 or len(after.json()["memories"]) != 2:
            raise AssertionError(f"{after.status_code}: {after.text[:300]}")
