"""What the fault tests share: a client workload that keeps sessions talking and
records every attempt, an audit of what L2 holds against what was acknowledged,
dedicated Redis servers to break, and the one-line figures each fault reports.

Words as the fault tests use them:

- *acknowledged*: the client received ``done`` for the turn (``status`` complete,
  or ``duplicate``, or a replay of the stored turn);
- *lost*: acknowledged, but its ``turn_id`` is not in the session's L2 log;
- *duplicated*: a ``turn_id``, or a user message (each is unique in a workload),
  stored more than once.

Every ``TurnWorkload`` turn carries a client ``turn_id``, and a failed attempt is
retried with the same id, as the README tells clients to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.redis_client import RedisLike
from memory.keys import SessionKeys
from memory.models import Turn
from tests.fault_report import report_fault
from tests.harness import parse_sse
from tests.servers.fake_vllm import FakeVLLM
from tests.servers.redis_server import RedisServer

TENANT = "default"


# --- one client attempt --------------------------------------------------------------
@dataclass
class Attempt:
    """One POST of a turn and how it ended."""

    session: str
    turn_id: str
    message: str
    started: float  # time.monotonic()
    ended: float = 0.0
    # "done", "error", "http_<status>", "broken" (stream ended without done/error),
    # or "exception" (the HTTP exchange itself failed).
    outcome: str = ""
    code: str | None = None
    retryable: bool | None = None
    turn: int | None = None
    status: str | None = None
    replayed: bool = False
    detail: str = ""

    @property
    def elapsed(self) -> float:
        return self.ended - self.started

    @property
    def acked(self) -> bool:
        return self.outcome == "done"

    def spans(self, t: float) -> bool:
        """Whether this attempt was in flight at monotonic time ``t``."""
        return self.started <= t <= self.ended


class TurnWorkload:
    """Sessions that each send turns one after another, retrying a failed turn with
    the same ``turn_id`` until it is acknowledged (or ``give_up_s`` passes).

    ``run(n)`` sends ``n`` more turns per session; ``run()`` goes until ``stop`` is
    set, and a session always finishes the turn it is on. Turn numbers go on
    across runs. With ``retry_errors=False`` each turn gets one attempt. Session i
    starts ``i * stagger_s`` after the first; ``padding`` makes each message about
    that many characters longer. Use it as an async context manager (it owns an
    httpx client)."""

    def __init__(
        self,
        base_url: str,
        sessions: list[str],
        *,
        user: str = "u1",
        retrieve: str = "never",
        retry_delay_s: float = 0.2,
        pace_s: float = 0.0,
        give_up_s: float = 60.0,
        request_timeout_s: float = 30.0,
        retry_errors: bool = True,
        stagger_s: float = 0.0,
        padding: int = 0,
    ) -> None:
        self.base_url = base_url
        self.padding = padding
        self.sessions = list(sessions)
        self.user = user
        self.retrieve = retrieve
        self.retry_delay_s = retry_delay_s
        self.pace_s = pace_s
        self.give_up_s = give_up_s
        self.retry_errors = retry_errors
        self.stagger_s = stagger_s
        self.stop = asyncio.Event()
        self.attempts: list[Attempt] = []
        self.turns: dict[str, list[tuple[str, str]]] = {s: [] for s in self.sessions}
        self.gave_up: list[tuple[str, str]] = []
        self._acked_changed = asyncio.Condition()
        limits = httpx.Limits(max_connections=len(self.sessions) * 2 + 10)
        self.client = httpx.AsyncClient(timeout=request_timeout_s, limits=limits)

    async def __aenter__(self) -> TurnWorkload:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    @staticmethod
    def turn_id(session: str, n: int) -> str:
        return f"{session}.t{n:03d}"

    def message(self, session: str, n: int) -> str:
        text = f"{session} says message number {n}, please note it."
        return text + " and so on" * (self.padding // 10) if self.padding else text

    # --- running --------------------------------------------------------------------
    async def run(self, turns_per_session: int | None = None) -> None:
        self.stop.clear()
        await asyncio.gather(
            *(
                self._session_loop(s, i * self.stagger_s, turns_per_session)
                for i, s in enumerate(self.sessions)
            )
        )

    async def _session_loop(self, session: str, start_after_s: float, limit: int | None) -> None:
        # Staggered starts keep the sessions out of step, so some turn is always
        # at some phase (generating, committing) when a fault hits.
        await asyncio.sleep(start_after_s)
        sent = 0
        while not self.stop.is_set() and (limit is None or sent < limit):
            sent += 1
            n = len(self.turns[session]) + 1
            turn_id, message = self.turn_id(session, n), self.message(session, n)
            self.turns[session].append((turn_id, message))
            await self.until_acked(session, turn_id, message)
            if self.pace_s:
                await asyncio.sleep(self.pace_s)

    async def until_acked(self, session: str, turn_id: str, message: str) -> Attempt:
        """Attempts the turn, then retries it (same id) until acknowledged, unless
        ``retry_errors`` is off; gives up after ``give_up_s``."""
        give_up_at = time.monotonic() + self.give_up_s
        while True:
            a = await self.attempt(session, turn_id, message)
            if a.acked or not self.retry_errors:
                return a
            if time.monotonic() > give_up_at:
                self.gave_up.append((session, turn_id))
                return a
            await asyncio.sleep(self.retry_delay_s)

    async def attempt(self, session: str, turn_id: str, message: str) -> Attempt:
        """One POST of the turn, read to its end; recorded in ``attempts``."""
        a = Attempt(session, turn_id, message, started=time.monotonic())
        body = {"user_id": self.user, "message": message, "turn_id": turn_id,
                "retrieve": self.retrieve}  # fmt: skip
        url = f"{self.base_url}/v1/sessions/{session}/turns"
        try:
            async with self.client.stream("POST", url, json=body) as resp:
                if resp.status_code != 200:
                    raw = await resp.aread()
                    a.outcome = f"http_{resp.status_code}"
                    a.code = _error_code(raw)
                    a.detail = raw[:300].decode(errors="replace")
                else:
                    lines = [line async for line in resp.aiter_lines()]
                    self._read_events(a, lines)
        except httpx.HTTPError as exc:
            a.outcome = "exception"
            a.detail = f"{type(exc).__name__}: {exc}"
        a.ended = time.monotonic()
        self.attempts.append(a)
        if a.acked:
            async with self._acked_changed:
                self._acked_changed.notify_all()
        return a

    @staticmethod
    def _read_events(a: Attempt, lines: list[str]) -> None:
        events, _ = parse_sse(lines)
        final = [e for e in events if e.event in ("done", "error")]
        if not final:
            a.outcome = "broken"
            a.detail = f"events: {[e.event for e in events]}"
            return
        ev = final[-1]
        a.outcome = ev.event
        a.status = ev.data.get("status")
        a.turn = ev.data.get("turn")
        a.replayed = bool(ev.data.get("replayed"))
        err = ev.data.get("error") or {}
        if ev.event == "error":
            a.code = err.get("code")
            # Storage and internal errors say ``retry``; LLM errors say error.retryable.
            a.retryable = bool(ev.data.get("retryable"))
            a.detail = str(err.get("message", ""))

    # --- views ----------------------------------------------------------------------
    def acked(self) -> list[Attempt]:
        return [a for a in self.attempts if a.acked]

    def acked_ids(self) -> set[str]:
        return {a.turn_id for a in self.attempts if a.acked}

    def failed(self) -> list[Attempt]:
        return [a for a in self.attempts if not a.acked]

    def in_flight_at(self, t: float) -> list[Attempt]:
        return [a for a in self.attempts if a.spans(t)]

    def first_ack_after(self, t: float) -> float | None:
        ends = [a.ended for a in self.attempts if a.acked and a.ended >= t]
        return min(ends) if ends else None

    def retried_ids(self) -> set[str]:
        """Turns that needed more than one attempt."""
        counts = Counter(a.turn_id for a in self.attempts)
        return {tid for tid, n in counts.items() if n > 1}

    async def wait_acked(self, n: int, within_s: float) -> None:
        """Until at least ``n`` turns were acknowledged in all; TimeoutError after
        ``within_s``."""
        async with self._acked_changed:
            await asyncio.wait_for(
                self._acked_changed.wait_for(lambda: len(self.acked_ids()) >= n), within_s
            )


def session_names(prefix: str, n: int) -> list[str]:
    """``n`` fresh session ids, unique to this run."""
    tag = uuid.uuid4().hex[:6]
    return [f"{prefix}-{tag}-{i}" for i in range(n)]


@contextlib.asynccontextmanager
async def running(workload: TurnWorkload) -> AsyncIterator[asyncio.Task[None]]:
    """Runs ``workload.run()`` in the background; on exit sets ``stop`` and waits
    for every session to finish the turn it is on."""
    task = asyncio.create_task(workload.run())
    try:
        yield task
    finally:
        workload.stop.set()
        await asyncio.wait_for(task, timeout=90)


def _error_code(raw: bytes) -> str | None:
    try:
        return str(json.loads(raw)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


# --- the audit: what L2 holds against what was acknowledged ---------------------------
# Settings under which the L2 log keeps every turn of a fault test: a turn leaves
# the log once archived *and* out of the live context, and a session that writes
# long enough (54 turns of a fast machine's 7 s failover test, 2026-12-04) would
# compact its context past archived turns. The audit reads the log alone.
KEEP_LOG_WHOLE: dict[str, Any] = {"context_budget_tokens": 1_000_000}


@dataclass
class Audit:
    acknowledged: int
    lost: list[str]
    duplicated: list[str]
    misnumbered: list[str]  # acked with turn N, stored under another index
    gaps: list[str]  # sessions whose stored indices are not 1..n in order
    trimmed: list[str]  # sessions whose log no longer starts at turn 1
    stored: dict[str, Turn] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"acked={self.acknowledged} lost={self.lost} duplicated={self.duplicated} "
            f"misnumbered={self.misnumbered} gaps={self.gaps} trimmed={self.trimmed}"
        )


async def read_log(redis: RedisLike, session: str, tenant: str = TENANT) -> tuple[int, list[Turn]]:
    """(log_base, every turn in the session's L2 log)."""
    k = SessionKeys(tenant, session)
    base = await redis.hget(k.meta, "log_base")
    raw = await redis.lrange(k.log, 0, -1)
    return int(base or 1), [Turn.decode(r) for r in raw]


async def audit(redis: RedisLike, workload: TurnWorkload, tenant: str = TENANT) -> Audit:
    stored: dict[str, Turn] = {}
    ids: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    gaps: list[str] = []
    trimmed: list[str] = []
    for session in workload.sessions:
        base, turns = await read_log(redis, session, tenant)
        if base != 1:
            trimmed.append(session)
        if [t.index for t in turns] != list(range(base, base + len(turns))):
            gaps.append(f"{session}: {[t.index for t in turns]}")
        for t in turns:
            ids[t.turn_id] += 1
            messages[t.user] += 1
            stored[t.turn_id] = t
    acked = workload.acked()
    acked_ids = {a.turn_id for a in acked}
    misnumbered = sorted(
        f"{a.turn_id}: told {a.turn}, stored {stored[a.turn_id].index}"
        for a in acked
        if a.turn_id in stored and a.turn is not None and a.turn != stored[a.turn_id].index
    )
    duplicated = sorted(
        [f"turn_id {i} x{n}" for i, n in ids.items() if n > 1]
        + [f"message {m!r} x{n}" for m, n in messages.items() if n > 1]
    )
    return Audit(
        acknowledged=len(acked_ids),
        lost=sorted(acked_ids - set(stored)),
        duplicated=duplicated,
        misnumbered=misnumbered,
        gaps=gaps,
        trimmed=trimmed,
        stored=stored,
    )


# --- figures ----------------------------------------------------------------------------
ReportFn = Callable[..., dict[str, Any]]


@pytest.fixture
def fault_report() -> ReportFn:
    """``report(fault=..., injected=..., acknowledged=..., lost=..., duplicated=...,
    recover_s=..., **extra)``: see ``tests.fault_report.report_fault``."""
    return report_fault


# --- servers to break -----------------------------------------------------------------
@pytest.fixture(scope="module")
def fault_llm() -> Iterator[FakeVLLM]:
    """A fake vLLM with short, slightly paced replies: turns overlap the faults."""
    llm = FakeVLLM(reply_tokens=8, token_interval_s=0.01).start()
    yield llm
    llm.stop()


RedisFactory = Callable[..., RedisServer]


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[RedisFactory]:
    """``make(name, extra_args=None)``: a started redis-server of this test's own (AOF
    on, ``appendfsync always``), stopped (SIGCONT first) at teardown. It blocks
    while the server starts: call it before the app runs, or via asyncio.to_thread."""
    servers: list[RedisServer] = []

    def make(name: str = "redis", extra_args: list[str] | None = None) -> RedisServer:
        server = RedisServer(tmp_path / name, extra_args=extra_args)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


def attempt_rows(attempts: list[Attempt]) -> list[dict[str, Any]]:
    """Attempts as dicts, for assertion messages."""
    return [asdict(a) | {"elapsed": round(a.elapsed, 3)} for a in attempts]
