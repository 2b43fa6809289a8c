"""The turn graph as LangGraph sees it: serialisable state after every step, a
checkpoint of the graph's own channels at commit, and a graph that resumes a
thread from it. Real Redis, the real services, the offline development LLM."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, get_type_hints

import pytest
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from app.services import Services
from graph.builder import build_turn_graph
from graph.checkpointer import RedisCheckpointSaver
from graph.events import Done, Meta, Token, TurnEvent
from graph.state import TurnContext, TurnControl, TurnInput, TurnState
from tests.harness import make_settings


@pytest.fixture
async def services(tmp_path: Path, any_redis_url: str) -> AsyncIterator[Services]:
    s = Services(make_settings(tmp_path, any_redis_url, archive_threshold=100))
    await s.start()
    yield s
    await s.stop()


def _input(session: str, message: str, turn_id: str | None = None) -> TurnInput:
    return TurnInput(
        tenant="default", session_id=session, user_id="u1", message=message,
        turn_id=turn_id or uuid.uuid4().hex, retrieve="never",
    )  # fmt: skip


def _context(services: Services, events: list[TurnEvent]) -> TurnContext:
    return TurnContext(services.runner.deps, TurnControl(emit=events.append), time.perf_counter())


async def test_state_round_trips_through_langgraphs_serde_after_every_step(
    services: Services,
) -> None:
    serde = JsonPlusSerializer()
    graph = services.runner.graph
    session = f"s-{uuid.uuid4().hex[:8]}"
    for n, retrieve in enumerate(("never", "always")):
        events: list[TurnEvent] = []
        inp = _input(session, f"question {n}, do you remember?")
        inp = TurnInput(**{**inp.__dict__, "retrieve": retrieve})
        steps = 0
        async with services.sessions.turn_lock("default", session):
            async for values in graph.astream(
                inp.state(), context=_context(services, events), stream_mode="values"
            ):
                steps += 1
                back = serde.loads_typed(serde.dumps_typed(values))
                assert back == values, f"step {steps} does not round-trip"
                # Nothing live in the state: plain JSON-able values only.
                _assert_plain(values)
        assert steps >= 4  # input, prepare, (retrieve), agent, commit
        assert isinstance(events[0], Meta) and isinstance(events[-1], Done)
        assert any(isinstance(e, Token) for e in events)


def _assert_plain(value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str)
            _assert_plain(v)
    elif isinstance(value, list):
        for v in value:
            _assert_plain(v)
    else:
        assert value is None or isinstance(value, str | int | float | bool), type(value)


async def test_commit_checkpoint_holds_the_graphs_channels_and_a_graph_resumes_from_it(
    services: Services,
) -> None:
    session = f"s-{uuid.uuid4().hex[:8]}"
    thread = f"default:{session}"
    events: list[TurnEvent] = []
    out = await services.runner.run(_input(session, "first question"), TurnControl(events.append))
    assert out["turn"] == 1
    saver = RedisCheckpointSaver(services.redis)
    config: Any = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    tup = await saver.aget_tuple(config)
    assert tup is not None
    values = tup.checkpoint["channel_values"]
    channels = set(get_type_hints(TurnState, include_extras=True))
    # Only the graph's own channels, and the turn as committed.
    assert set(values) <= channels
    assert values["turn"] == 1 and values["version"] == 1
    assert values["message"] == "first question"
    assert values["messages"][0] == {"role": "user", "content": "first question"}
    assert values["messages"][1]["role"] == "assistant"
    assert tup.metadata["turn"] == 1

    # The same graph compiled with the saver reads the thread and continues it.
    resumable = build_turn_graph(checkpointer=saver)
    state = await resumable.aget_state(config)
    assert state.values["turn"] == 1 and state.values["status"] == "complete"
    more: list[TurnEvent] = []
    async with services.sessions.turn_lock("default", session):
        final = await resumable.ainvoke(
            _input(session, "second question").state(), config, context=_context(services, more)
        )
    assert final["turn"] == 2 and final["status"] == "complete"
    done = [e for e in more if isinstance(e, Done)]
    assert done and done[-1].turn == 2
    stored = await services.l2.load("default", session)
    assert stored is not None and stored.turn_count == 2
    assert [t.user for t in stored.turns] == ["first question", "second question"]
