"""Pooled graph runs (graph/builder.py): runs waiting in ``prepare`` for a turn,
each serving turn after turn. A turn handed to a pooled run must be the same turn
as one that starts its own run: its input in the state and the checkpoint, the
turn task's context variables (log fields) in every step, nothing of the run's
previous turn, a clean end at stop, a failure that ends the run with its turn.
Real Redis, the real services, the offline development LLM."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.services import Services
from graph.checkpointer import RedisCheckpointSaver
from graph.events import Done, Meta, Token, TurnEvent
from graph.guard import InputRejected
from graph.state import TurnControl, TurnInput
from infra.dev_llm import OfflineDevLLM
from tests.harness import make_settings

PROBE: contextvars.ContextVar[str | None] = contextvars.ContextVar("probe", default=None)


@pytest.fixture
async def services(tmp_path: Path, any_redis_url: str) -> AsyncIterator[Services]:
    s = Services(make_settings(tmp_path, any_redis_url, graph_warm_runs=2))
    await s.start()
    yield s
    await s.stop()


@contextlib.asynccontextmanager
async def _pool_of_one(tmp_path: Path, redis_url: str, **overrides: Any) -> AsyncIterator[Services]:
    """Services whose runner pools a single run: every turn is that run's."""
    s = Services(make_settings(tmp_path, redis_url, graph_warm_runs=1, **overrides))
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


def _input(session: str, message: str) -> TurnInput:
    return TurnInput(
        tenant="default", session_id=session, user_id="u1", message=message,
        turn_id=uuid.uuid4().hex, retrieve="never",
    )  # fmt: skip


async def _turn(
    services: Services, inp: TurnInput, probe: str | None
) -> tuple[dict[str, Any], list[tuple[str, str | None]]]:
    """Runs ``inp`` from a task of its own with PROBE set there (unless None), as
    the app runs a turn with its log fields set; returns the output and, per
    event, what PROBE read where the event was emitted."""
    seen: list[tuple[str, str | None]] = []

    def emit(event: TurnEvent) -> None:
        seen.append((event.name, PROBE.get()))

    async def run() -> dict[str, Any]:
        if probe is not None:
            PROBE.set(probe)
        return await services.runner.run(inp, TurnControl(emit=emit))

    return await asyncio.create_task(run()), seen


async def test_a_warm_run_commits_the_turn_it_was_handed(services: Services) -> None:
    assert len(services.runner.waiting) == 2  # filled at start-up
    before = services.runner.handoffs
    session = f"s-{uuid.uuid4().hex[:8]}"
    inp = _input(session, "what did we plan for Tuesday?")
    out, seen = await _turn(services, inp, "turn-1")
    assert services.runner.handoffs == before + 1
    assert out["turn"] == 1 and out["status"] == "complete"
    names = [name for name, _ in seen]
    assert names[0] == "meta" and names[-1] == "done" and "token" in names
    # The checkpoint holds the handed input, not the run's placeholders.
    saver = RedisCheckpointSaver(services.redis)
    config: Any = {"configurable": {"thread_id": f"default:{session}", "checkpoint_ns": ""}}
    tup = await saver.aget_tuple(config)
    assert tup is not None
    values = tup.checkpoint["channel_values"]
    given = inp.state()
    for key in ("tenant", "session_id", "user_id", "message", "turn_id", "retrieve"):
        assert values[key] == given[key], key
    assert values["session_id"] == session and values["agent"] == "default"
    stored = await services.l2.load("default", session)
    assert stored is not None and [t.user for t in stored.turns] == [inp.message]
    # The pool is topped up again once the turn has ended.
    assert len(services.runner.waiting) == 2


async def test_every_step_of_a_warm_run_sees_the_turn_tasks_context(services: Services) -> None:
    session = f"s-{uuid.uuid4().hex[:8]}"
    before = services.runner.handoffs
    for n in range(3):
        _, seen = await _turn(services, _input(session, f"question {n}"), f"turn-{n}")
        # meta (prepare), tokens (the LLM stream's task), done (commit): each
        # saw the variables of the task that ran the turn.
        assert {name for name, _ in seen} >= {"meta", "token", "done"}
        assert all(probe == f"turn-{n}" for _, probe in seen), seen
    assert services.runner.handoffs == before + 3


async def test_with_no_warm_run_ready_a_turn_starts_its_own(
    tmp_path: Path, any_redis_url: str
) -> None:
    s = Services(make_settings(tmp_path, any_redis_url, graph_warm_runs=0))
    await s.start()
    try:
        session = f"s-{uuid.uuid4().hex[:8]}"
        out, seen = await _turn(s, _input(session, "hello"), "cold")
        assert out["status"] == "complete" and s.runner.handoffs == 0
        assert not s.runner.waiting
        assert all(probe == "cold" for _, probe in seen)
    finally:
        await s.stop()


async def test_stop_ends_the_warm_runs(tmp_path: Path, any_redis_url: str) -> None:
    s = Services(make_settings(tmp_path, any_redis_url, graph_warm_runs=3))
    await s.start()
    tasks = s.runner.waiting
    assert len(tasks) == 3
    await s.stop()
    assert all(t.done() for t in tasks)
    assert not s.runner.waiting
    s.runner.refill()  # a turn ending after stop starts none
    assert not s.runner.waiting


async def test_a_turn_cancelled_while_it_runs_cancels_its_warm_run(services: Services) -> None:
    # A reply slow enough to be cut (the development LLM, a token every 50 ms).
    services.runner.deps.llm = OfflineDevLLM(token_delay_s=0.05)
    warm = services.runner.waiting[0]
    events: list[TurnEvent] = []
    got_token = asyncio.Event()

    def emit(event: TurnEvent) -> None:
        events.append(event)
        if isinstance(event, Token):
            got_token.set()

    session = f"s-{uuid.uuid4().hex[:8]}"
    task = asyncio.create_task(
        services.runner.run(_input(session, "a long one"), TurnControl(emit=emit))
    )
    await asyncio.wait_for(got_token.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert warm.cancelled()  # the run the turn was handed went with it
    assert isinstance(events[0], Meta) and not any(isinstance(e, Done) for e in events)


async def test_a_pooled_run_serves_turn_after_turn_from_a_clean_state(
    tmp_path: Path, any_redis_url: str
) -> None:
    async with _pool_of_one(tmp_path, any_redis_url) as s:
        (run,) = s.runner.waiting
        first = f"s-{uuid.uuid4().hex[:8]}"
        retrieving = TurnInput(**{**_input(first, "what did I say about Lisbon?").__dict__,
                                  "retrieve": "always"})  # fmt: skip
        out1, _ = await _turn(s, retrieving, "turn-1")
        assert "retrieve" in out1["timings"]
        second = f"s-{uuid.uuid4().hex[:8]}"
        # From a task that never set PROBE: the first turn's value must not show.
        out2, seen = await _turn(s, _input(second, "hello again"), None)
        # The one run served both turns, and waits for a third.
        assert s.runner.waiting == [run] and not run.done()
        assert s.runner.handoffs == 2
        # The second turn is its own: nothing of the first in its output or its state.
        assert out2["turn"] == 1 and out2["status"] == "complete"
        assert "retrieve" not in out2["timings"] and set(out2["timings"]) >= {"prepare", "commit"}
        assert seen and all(probe is None for _, probe in seen), seen
        saver = RedisCheckpointSaver(s.redis)
        config: Any = {"configurable": {"thread_id": f"default:{second}", "checkpoint_ns": ""}}
        tup = await saver.aget_tuple(config)
        assert tup is not None
        values = tup.checkpoint["channel_values"]
        assert values["session_id"] == second and values["message"] == "hello again"
        assert values["memories"] == [] and values["need_memory"] is False
        assert [m["content"] for m in values["messages"] if m["role"] == "user"] == ["hello again"]


async def test_a_pooled_run_retires_after_its_turns(tmp_path: Path, any_redis_url: str) -> None:
    async with _pool_of_one(tmp_path, any_redis_url, graph_run_turns=2) as s:
        (run,) = s.runner.waiting
        session = f"s-{uuid.uuid4().hex[:8]}"
        for n in range(2):
            out, _ = await _turn(s, _input(session, f"question {n}"), f"turn-{n}")
            assert out["turn"] == n + 1
        # Its second turn was its last: the run ended there, and another waits.
        await asyncio.wait_for(asyncio.shield(run), 30)  # a guard: it ends at once
        assert run.done() and not run.cancelled() and run.exception() is None
        (fresh,) = s.runner.waiting
        assert fresh is not run
        out, _ = await _turn(s, _input(session, "question 2"), "turn-2")
        assert out["turn"] == 3 and s.runner.waiting == [fresh]


async def test_a_step_that_fails_ends_its_run_with_the_turns_error(
    tmp_path: Path, any_redis_url: str
) -> None:
    async with _pool_of_one(tmp_path, any_redis_url) as s:
        (run,) = s.runner.waiting
        session = f"s-{uuid.uuid4().hex[:8]}"
        # Past the app's check, prepare's own refuses it: an error inside a step.
        too_long = _input(session, "x" * (s.settings.max_message_chars + 1))
        with pytest.raises(InputRejected) as refused:
            await asyncio.wait_for(_turn(s, too_long, "bad"), 30)  # a guard, not a wait
        assert refused.value.code == "message_too_long"
        assert run.done() and isinstance(run.exception(), InputRejected)
        # The next turn gets another run and completes.
        out, _ = await asyncio.wait_for(_turn(s, _input(session, "a fair question"), "ok"), 30)
        assert out["turn"] == 1 and out["status"] == "complete"
        assert s.runner.waiting and s.runner.waiting[0] is not run
