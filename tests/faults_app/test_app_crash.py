"""Fault 4: the app process is ``kill -9``ed while a client streams a turn.

``tiermem serve`` runs as a real subprocess on a shared Redis and data dir; the
client streams a turn with an id of its own choosing, the process dies under
it, and a second process (a fresh ``tiermem serve`` on the same Redis and data,
as the pod that takes over) answers the client's retry. Three kill points:

- mid-stream, tokens sent but nothing stored: the retry (``Last-Event-ID``)
  runs the turn in full, once;
- after ``done``: the turn is stored; the retry (same ``turn_id``) is a replay
  of the stored turn, without calling the LLM;
- the moment the LLM finished, racing the commit: either answer is right, as
  long as it matches what is stored (both happen, from run to run).

The client resumes with ``Last-Event-ID: <turn_id>:<seq>`` of the last event it
got, or resends its ``turn_id`` (second case).

Every time: the turn is stored at most once, and the session goes on with the
next index.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from memory.keys import SessionKeys
from memory.models import Turn
from tests.fault_report import report_fault
from tests.harness import ServeProcess, SSEEvent, TurnResult, parse_sse, post_turn
from tests.servers.fake_vllm import FakeVLLM

TOKEN_INTERVAL_S = 0.03
REPLY_TOKENS = 30


@pytest.fixture
def fake_llm() -> Iterator[FakeVLLM]:
    llm = FakeVLLM(reply_tokens=REPLY_TOKENS).start()
    yield llm
    llm.stop()


class Pods:
    """One ``tiermem serve`` at a time on the same Redis and data dir: ``kill9``
    ends the current one, ``replace`` starts the one that takes over."""

    def __init__(self, tmp_path: Path, redis_url: str, llm: FakeVLLM) -> None:
        self.env = {
            "TIERMEM_REDIS_URL": redis_url,
            "TIERMEM_DATA_DIR": str(tmp_path / "data"),
            "TIERMEM_AUTH": "off",
            "TIERMEM_EMBEDDINGS": "hash",
            "TIERMEM_LLM_URL": llm.base_url,
            "TIERMEM_LOG_FORMAT": "json",
        }
        self.log = tmp_path / "serve.log"
        self.current: ServeProcess | None = None
        self.kills = 0

    @property
    def url(self) -> str:
        assert self.current is not None
        return self.current.url

    def replace(self) -> None:
        self.current = ServeProcess(self.env, self.log).start()

    def kill9(self) -> None:
        assert self.current is not None and self.current.proc is not None
        self.current.kill9()
        self.kills += 1

    def stop(self) -> int | None:
        if self.current is None or self.current.proc is None:
            return None
        if self.current.proc.poll() is not None:
            return self.current.proc.returncode
        return self.current.terminate()


async def _stream_until_killed(
    c: httpx.AsyncClient,
    pods: Pods,
    session: str,
    message: str,
    turn_id: str,
    kill_when: Callable[[list[SSEEvent]], bool],
) -> tuple[list[SSEEvent], bool]:
    """Streams a turn and kills the serving process as soon as ``kill_when`` holds
    for the events received so far. Returns the events and whether the stream
    broke (it must: the process is gone)."""
    lines: list[str] = []
    broke = False
    body = {"user_id": "u1", "message": message, "turn_id": turn_id, "retrieve": "never"}
    try:
        async with c.stream("POST", f"{pods.url}/v1/sessions/{session}/turns", json=body) as r:
            assert r.status_code == 200
            killed = False
            async for line in r.aiter_lines():
                lines.append(line)
                if line == "" and not killed and kill_when(parse_sse(lines)[0]):
                    pods.kill9()
                    killed = True
    except (httpx.RemoteProtocolError, httpx.ReadError):
        broke = True
    return parse_sse(lines)[0], broke


async def _log(redis_url: str, session: str) -> list[Turn]:
    r = aioredis.from_url(redis_url)
    try:
        raw = await r.lrange(SessionKeys("default", session).log, 0, -1)
    finally:
        await r.aclose()
    return [Turn.decode(x) for x in raw]


def _text(events: list[SSEEvent]) -> str:
    return "".join(e.data["text"] for e in events if e.event == "token")


@pytest.mark.slow
async def test_app_killed_mid_stream_retry_on_a_new_process(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    session = f"ak-{uuid.uuid4().hex[:8]}"
    pods = Pods(tmp_path, redis_url, fake_llm)
    acknowledged: dict[str, int] = {}  # turn_id -> index, for turns whose `done` arrived
    recover: list[float] = []
    outcomes: list[str] = []

    def slow(on: bool) -> None:
        fake_llm.token_interval_s = TOKEN_INTERVAL_S if on else 0.0

    async def retry(message: str, seen: list[SSEEvent], turn_id: str) -> TurnResult:
        """The client's retry, on the process that took over: ``Last-Event-ID`` of
        the last event it got, or the turn id it chose if it got none."""
        pods.replace()
        slow(False)
        async with httpx.AsyncClient(timeout=30) as c2:
            if seen and seen[-1].id:
                # The client chose this turn's id, so it sends it back with the
                # event id (README: Last-Event-ID alone is for server-issued ids).
                r = await post_turn(c2, pods.url, session, message, retrieve="never",
                                    turn_id=turn_id,
                                    headers={"Last-Event-ID": seen[-1].id})  # fmt: skip
            else:
                r = await post_turn(c2, pods.url, session, message, retrieve="never",
                                    turn_id=turn_id)  # fmt: skip
        recover.append(time.monotonic() - killed_at)
        assert r.status_code == 200 and r.final.event == "done", r.events[-1:]
        acknowledged[r.done["turn_id"]] = r.done["turn"]
        return r

    try:
        pods.replace()
        async with httpx.AsyncClient(timeout=30) as c:
            first = await post_turn(c, pods.url, session, "message one", retrieve="never")
            assert first.done["turn"] == 1
            acknowledged[first.done["turn_id"]] = 1

            # 1. Killed mid-stream: tokens sent, nothing stored yet.
            slow(True)
            calls = len(fake_llm.chat_requests())
            events, broke = await _stream_until_killed(
                c, pods, session, "message two", "turn-two",
                lambda ev: sum(e.event == "token" for e in ev) >= 3,
            )  # fmt: skip
            killed_at = time.monotonic()
            assert broke and not [e for e in events if e.event in ("done", "error")]
            assert events[0].data["turn"] == 2
            r = await retry("message two", events, "turn-two")
            assert r.done["turn_id"] == "turn-two" and r.done["turn"] == 2
            assert not r.done.get("replayed"), "nothing was stored: the turn runs again"
            assert r.done["status"] == "complete"
            assert len(fake_llm.chat_requests()) == calls + 2
            outcomes.append("rerun")

            # 2. Killed after `done`: stored; the retry is a replay.
            slow(True)
            events, broke = await _stream_until_killed(
                c, pods, session, "message three", "turn-three",
                lambda ev: ev[-1].event == "done",
            )  # fmt: skip
            killed_at = time.monotonic()
            done3 = events[-1].data
            assert done3["turn"] == 3 and done3["status"] == "complete"
            acknowledged["turn-three"] = 3
            calls = len(fake_llm.chat_requests())
            r = await retry("message three", [], "turn-three")
            assert r.done["replayed"] is True and r.done["turn"] == 3
            assert r.text == _text(events)
            assert len(fake_llm.chat_requests()) == calls, "a replay never calls the LLM"
            outcomes.append("replay")

            # 3. Killed the moment the LLM finished, racing the commit.
            slow(True)
            before = len(fake_llm.chat_requests())

            async def kill_when_llm_done() -> None:
                # Polled every millisecond: the kill lands within the few ms the
                # app takes to commit once the LLM stream has ended.
                while True:
                    reqs = fake_llm.chat_requests()[before:]
                    if reqs and reqs[0].finished_at is not None:
                        pods.kill9()
                        return
                    await asyncio.sleep(0.001)

            killer = asyncio.create_task(kill_when_llm_done())
            try:
                events, broke = await _stream_until_killed(
                    c, pods, session, "message four", "turn-four", lambda ev: False
                )
                killed_at = time.monotonic()
                await asyncio.wait_for(killer, 5)
            finally:
                killer.cancel()
            stored = {t.turn_id: t for t in await _log(redis_url, session)}
            got_done = any(e.event == "done" for e in events)
            if got_done:
                acknowledged["turn-four"] = 4
            calls = len(fake_llm.chat_requests())
            r = await retry("message four", events, "turn-four")
            assert r.done["turn"] == 4 and r.done["turn_id"] == "turn-four"
            if "turn-four" in stored:
                # Committed before the kill: replayed as stored, never run twice.
                assert r.done["replayed"] is True
                assert r.text == stored["turn-four"].assistant
                assert len(fake_llm.chat_requests()) == calls
                outcomes.append("replay")
            else:
                assert not got_done, "`done` was sent for a turn that is not stored"
                assert not r.done.get("replayed")
                assert len(fake_llm.chat_requests()) == calls + 1
                outcomes.append("rerun")

            # The session goes on where it was.
            async with httpx.AsyncClient(timeout=30) as c2:
                nxt = await post_turn(c2, pods.url, session, "message five", retrieve="never")
            assert nxt.done["turn"] == 5
            acknowledged[nxt.done["turn_id"]] = 5
            state = (await c.get(f"{pods.url}/v1/sessions/{session}")).json()
    finally:
        exit_code = pods.stop()
        slow(False)
    assert exit_code == 0

    log = await _log(redis_url, session)
    assert state["turn_count"] == 5
    assert [t.index for t in log] == [1, 2, 3, 4, 5]
    words = ("one", "two", "three", "four", "five")
    assert [t.user for t in log] == [f"message {w}" for w in words]
    assert all(t.status == "complete" for t in log)
    ids = [t.turn_id for t in log]
    lost = sum(
        not any(t.turn_id == tid and t.index == idx for t in log)
        for tid, idx in acknowledged.items()
    )
    duplicated = len(ids) - len(set(ids)) + len(log) - len({t.user for t in log})
    report_fault(
        "app_kill9_mid_stream",
        injected=pods.kills,
        acknowledged=len(acknowledged),
        lost=lost,
        duplicated=duplicated,
        recover_s=max(recover),
        outcomes=outcomes,
    )
    assert lost == 0 and duplicated == 0
    assert ids[1:4] == ["turn-two", "turn-three", "turn-four"]
