"""Agent profiles end to end: the real app with an agents file, a fake
OpenAI-compatible LLM (it calls tools by rule: lines ``CALL <tool> <json>``), real
Redis and Milvus Lite."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from graph.agents import AgentsConfigError, load_agents
from tests.harness import AppServer, TurnResult, make_settings, post_turn
from tests.servers.fake_vllm import FakeVLLM

SUPPORT = "You are the support agent of a bookshop. Answer about orders and returns."
CHEF = "You are a chef. Answer cooking questions with exact times and amounts."
AGENTS = {
    "agents": [
        {"name": "support", "description": "Orders, deliveries, refunds and returns of books.",
         "system_prompt": SUPPORT, "tools": ["memory__*", "agents__*"]},
        {"name": "chef", "description": "Cooking, recipes, baking, boiling eggs, kitchen times.",
         "system_prompt": CHEF, "tools": ["agents__*"], "temperature": 0.1, "max_tokens": 40},
    ],
    "default": "support",
}  # fmt: skip


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeVLLM]:
    llm = FakeVLLM(reply_tokens=6).start()
    yield llm
    llm.stop()


def write_agents(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


async def start(tmp_path: Path, redis_url: str, llm: FakeVLLM, **overrides: Any) -> AppServer:
    llm.reset()
    agents = write_agents(tmp_path / "agents.yaml", AGENTS)
    settings = make_settings(tmp_path, redis_url, llm_url=llm.base_url, agents_file=agents,
                             archive_threshold=100, **overrides)  # fmt: skip
    return await AppServer(settings).start()


async def turn(app: AppServer, sid: str, message: str, **extra: Any) -> TurnResult:
    async with httpx.AsyncClient(timeout=120) as client:
        return await post_turn(client, app.url, sid, message, **extra)


def sid() -> str:
    return f"ag-{uuid.uuid4().hex[:8]}"


def system_of(request: Any) -> str:
    return str(request.messages[0]["content"])


async def test_a_session_gets_its_agent_on_turn_one_and_keeps_it(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    app = await start(tmp_path, redis_url, fake_llm)
    try:
        async with httpx.AsyncClient() as client:
            listed = (await client.get(f"{app.url}/v1/agents")).json()
        assert [a["name"] for a in listed["agents"]] == ["support", "chef"]
        assert listed["default"] == "support"
        assert len({a["prefix_version"] for a in listed["agents"]}) == 2
        s = sid()
        first = await turn(app, s, "How do I poach an egg?", agent="chef")
        assert first.events[0].data["agent"] == "chef"
        second = await turn(app, s, "And my refund?", agent="support")
        assert second.events[0].data["agent"] == "chef"  # fixed at turn 1
        r1, r2 = fake_llm.chat_requests()
        assert system_of(r1).startswith(CHEF) and system_of(r2).startswith(CHEF)
        # The chef's generation settings.
        assert r1.body["temperature"] == 0.1 and r1.body["max_tokens"] == 40
        # Every agent offers the same tools; the mask is in tool_choice and at execution.
        assert r1.raw_field("tools") is not None
        default = await turn(app, sid(), "Where is my parcel?")
        assert default.events[0].data["agent"] == "support"
        assert system_of(fake_llm.chat_requests()[-1]).startswith(SUPPORT)
        assert fake_llm.chat_requests()[-1].raw_field("tools") == r1.raw_field("tools")
    finally:
        await app.stop()


async def test_auto_routes_by_the_description_and_unknown_agents_are_refused(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    app = await start(tmp_path, redis_url, fake_llm)
    try:
        cooking = await turn(app, sid(), "How long should I boil an egg for baking?", agent="auto")
        books = await turn(app, sid(), "My book order has not arrived, I want a refund",
                           agent="auto")  # fmt: skip
        assert cooking.events[0].data["agent"] == "chef"
        assert books.events[0].data["agent"] == "support"
        n = len(fake_llm.chat_requests())
        bad = await turn(app, sid(), "hello", agent="nobody")
        assert bad.status_code == 422 and bad.body is not None
        assert bad.body["error"]["code"] == "unknown_agent"
        assert len(fake_llm.chat_requests()) == n  # refused before the LLM
    finally:
        await app.stop()


async def test_an_agent_asks_another_in_a_child_session(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    app = await start(tmp_path, redis_url, fake_llm)
    try:
        s = sid()
        ask = {"agent": "chef", "question": "How long to boil an egg?"}
        r = await turn(app, s, f"CALL agents__ask {json.dumps(ask)}", agent="support")
        (result,) = [e.data for e in r.events if e.event == "tool_result"]
        assert result["ok"] is True and result["content"]
        (logged,) = r.done["usage"]["tool_calls"]
        assert logged["session"] == f"{s}.chef"
        # The chef's turn ran with the chef's prefix, in its own stored session.
        chef_requests = [q for q in fake_llm.chat_requests() if system_of(q).startswith(CHEF)]
        assert len(chef_requests) == 1
        assert chef_requests[0].messages[-1]["content"] == "How long to boil an egg?"
        async with httpx.AsyncClient() as client:
            child = (await client.get(f"{app.url}/v1/sessions/{s}.chef")).json()
        assert child["turn_count"] == 1
        # The chef may not search memory (its mask): refused, not run.
        r2 = await turn(app, sid(), 'CALL memory__search {"query": "eggs"}', agent="chef")
        (refused,) = [e.data for e in r2.events if e.event == "tool_result"]
        assert refused["ok"] is False and "not available" in refused["content"]
    finally:
        await app.stop()


async def test_asking_is_bounded_in_depth(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    app = await start(tmp_path, redis_url, fake_llm, agent_max_depth=0)
    try:
        ask = {"agent": "chef", "question": "Eggs?"}
        r = await turn(app, sid(), f"CALL agents__ask {json.dumps(ask)}")
        (result,) = [e.data for e in r.events if e.event == "tool_result"]
        assert result["ok"] is False and "at most 0 deep" in result["content"]
        assert r.done["status"] == "complete"
    finally:
        await app.stop()


async def test_editing_the_agents_file_reaches_new_sessions_without_a_restart(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    app = await start(tmp_path, redis_url, fake_llm, config_reload_s=0.2)
    try:
        live = sid()
        await turn(app, live, "Where is my order?")
        edited = json.loads(json.dumps(AGENTS))
        edited["agents"][0]["system_prompt"] = SUPPORT + " Always sign as Ada."
        # A broken file first: logged, the agents stay as they were.
        (tmp_path / "agents.yaml").write_text("agents: [ {name: BAD} ]")
        await asyncio.sleep(1.0)
        assert app.services.agents.profiles["support"].system_prompt == SUPPORT
        write_agents(tmp_path / "agents.yaml", edited)
        deadline = time.monotonic() + 30
        while "Ada" not in app.services.agents.profiles["support"].system_prompt:
            assert time.monotonic() < deadline, "the edited agents file was never reloaded"
            await asyncio.sleep(0.1)
        await turn(app, sid(), "Where is my order?")
        assert "Ada" in system_of(fake_llm.chat_requests()[-1])
        # The live session keeps its prefix until it compacts.
        await turn(app, live, "And now?")
        assert "Ada" not in system_of(fake_llm.chat_requests()[-1])
    finally:
        await app.stop()


def test_a_broken_agents_file_says_what_is_wrong(tmp_path: Path) -> None:
    cases = {
        "agents: []": "at least one agent",
        "agents: [{name: Bad, description: d, system_prompt: p}]": "must match",
        "agents: [{name: a, description: '', system_prompt: p}]": "description",
        "agents: [{name: a, description: d, system_prompt: p, colour: red}]": "unknown key",
        "agents: [{name: a, description: d, system_prompt: p, tools: [1]}]": "tools",
        "agents: [{name: a, description: d, system_prompt: p, temperature: 5}]": "temperature",
        "agents: [{name: a, description: d, system_prompt: p}]\ndefault: b": "default",
        "agents: [{name: a, description: d, system_prompt: p},"
        " {name: a, description: d, system_prompt: p}]": "twice",
        "agents: [": "not valid YAML",
    }
    for n, (text, rule) in enumerate(cases.items()):
        path = tmp_path / f"agents{n}.yaml"
        path.write_text(text)
        with pytest.raises(AgentsConfigError, match=rule) as info:
            load_agents(path)
        assert str(path) in str(info.value)


async def test_a_chain_of_asks_stops_at_the_depth_bound(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    """support asks chef, whose question makes it ask support again: with a depth
    bound of 1 the first ask runs, the nested one is refused inside the chef's turn."""
    app = await start(tmp_path, redis_url, fake_llm, agent_max_depth=1)
    try:
        inner = {"agent": "support", "question": "And the refund?"}
        outer = {"agent": "chef", "question": f"CALL agents__ask {json.dumps(inner)}"}
        s = sid()
        r = await turn(app, s, f"CALL agents__ask {json.dumps(outer)}", agent="support")
        (result,) = [e.data for e in r.events if e.event == "tool_result"]
        assert result["ok"] is True  # the chef answered, after its own ask was refused
        async with httpx.AsyncClient() as client:
            child = (await client.get(f"{app.url}/v1/sessions/{s}.chef/turns")).json()
        (chef_turn,) = child["turns"]
        (refused,) = [m for m in chef_turn["messages"] if m["role"] == "tool"]
        assert "at most 1 deep" in refused["content"]
        # No grandchild session was made.
        async with httpx.AsyncClient() as client:
            missing = await client.get(f"{app.url}/v1/sessions/{s}.chef.support")
        assert missing.status_code == 404
    finally:
        await app.stop()
