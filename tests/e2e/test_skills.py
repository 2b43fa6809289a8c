"""Agent Skills end to end: real skill folders, the real app, a fake OpenAI-compatible
LLM that calls tools by rule (lines ``CALL <tool> <json>``)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.auth import hash_key
from tests.harness import AppServer, TurnResult, make_settings, post_turn
from tests.servers.fake_vllm import FakeVLLM

DATA = Path(__file__).resolve().parent.parent / "data" / "skills"


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeVLLM]:
    llm = FakeVLLM(reply_tokens=6).start()
    yield llm
    llm.stop()


def skills_folder(
    tmp_path: Path, names: tuple[str, ...] = ("recipe-scaling", "unit-conversion")
) -> Path:
    root = tmp_path / "skills"
    for name in names:
        shutil.copytree(DATA / name, root / name)
    (root / "recipe-scaling" / "references").mkdir(exist_ok=True)
    (root / "recipe-scaling" / "references" / "eggs.md").write_text("One large egg: 50 g.\n")
    (root / "broken").mkdir()
    (root / "broken" / "SKILL.md").write_text("no front matter here\n")
    return root


async def start(tmp_path: Path, redis_url: str, llm: FakeVLLM, **overrides: Any) -> AppServer:
    llm.reset()
    settings = make_settings(tmp_path, redis_url, llm_url=llm.base_url,
                             skills_dir=skills_folder(tmp_path), **overrides)  # fmt: skip
    return await AppServer(settings).start()


async def turn(app: AppServer, message: str, sid: str | None = None, **extra: Any) -> TurnResult:
    async with httpx.AsyncClient(timeout=120) as client:
        return await post_turn(client, app.url, sid or f"sk-{uuid.uuid4().hex[:8]}", message,
                               **extra)  # fmt: skip


def call(tool: str, **arguments: Any) -> str:
    return f"CALL {tool} {json.dumps(arguments)}"


async def test_the_catalog_is_in_the_prefix_and_the_list_route_says_so(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"sha256": hash_key("k1"), "tenant": "acme"}]}))
    app = await start(tmp_path, redis_url, fake_llm, auth="on", api_keys_file=keys)
    try:
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{app.url}/v1/skills")).status_code == 401
            listed = (await client.get(f"{app.url}/v1/skills",
                                       headers={"Authorization": "Bearer k1"})).json()  # fmt: skip
        # The broken skill is refused, the valid ones load, in canonical order.
        assert [s["name"] for s in listed["skills"]] == ["recipe-scaling", "unit-conversion"]
        assert all(len(s["version"]) == 12 for s in listed["skills"])
        assert listed["prefix_version"] == app.services.context.current_version()
        await turn(app, "hello", headers={"Authorization": "Bearer k1"})
        system = fake_llm.chat_requests()[-1].messages[0]["content"]
        assert "# Skills\n- recipe-scaling: Scale a recipe" in system
        assert "- unit-conversion:" in system
        assert "Factor = wanted servings" not in system  # bodies never in the prefix
        names = {t["function"]["name"] for t in fake_llm.chat_requests()[-1].body["tools"]}
        assert {"skills__load", "skills__read"} <= names
    finally:
        await app.stop()


async def test_the_model_loads_a_skill_and_reads_its_files(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    # The detector off: the message names the skill, and this is about the tool.
    app = await start(tmp_path, redis_url, fake_llm, skills_max_active=0)
    try:
        r = await turn(app, call("skills__load", name="recipe-scaling"))
        (result,) = [e.data for e in r.events if e.event == "tool_result"]
        (used,) = [e.data for e in r.events if e.event == "skill"]
        version = app.services.skills.get("recipe-scaling").version  # type: ignore[union-attr]
        assert used == {"name": "recipe-scaling", "version": version, "how": "tool"}
        names = [e.event for e in r.events]
        assert names.index("tool_result") < names.index("skill") < names.index("token")
        assert result["ok"] is True
        first, second = fake_llm.chat_requests()[-2:]
        # The body is appended to the log as the tool result; the prefix is untouched.
        (tool,) = [m for m in second.messages if m["role"] == "tool"]
        assert tool["content"].startswith(f'<skill name="recipe-scaling" version="{version}">')
        assert "Factor = wanted servings" in tool["content"]
        assert second.messages[0] == first.messages[0]
        # Its files, and nothing outside its folder.
        reads = "\n".join([
            call("skills__read", name="recipe-scaling", path="references/eggs.md"),
            call("skills__read", name="recipe-scaling", path="../unit-conversion/SKILL.md"),
            call("skills__read", name="recipe-scaling", path="/etc/passwd"),
            call("skills__load", name="no-such-skill"),
        ])  # fmt: skip
        r2 = await turn(app, reads)
        ok, up, absolute, missing = [e.data for e in r2.events if e.event == "tool_result"]
        assert ok["ok"] is True and "50 g" in ok["content"]
        assert [up["ok"], absolute["ok"], missing["ok"]] == [False, False, False]
        assert "no skill named" in missing["content"]
    finally:
        await app.stop()


async def test_an_agent_offers_only_its_skills(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    agents = tmp_path / "agents.yaml"
    agents.write_text(yaml.safe_dump({"agents": [
        {"name": "cook", "description": "Cooking.", "system_prompt": "You cook.",
         "skills": ["recipe-scaling"]},
        {"name": "plain", "description": "Anything else.", "system_prompt": "You help.",
         "skills": []},
    ]}))  # fmt: skip
    app = await start(tmp_path, redis_url, fake_llm, agents_file=agents)
    try:
        await turn(app, "hi", agent="cook")
        cook_system = fake_llm.chat_requests()[-1].messages[0]["content"]
        assert "- recipe-scaling:" in cook_system and "unit-conversion" not in cook_system
        r = await turn(app, call("skills__load", name="recipe-scaling"), agent="plain")
        (refused,) = [e.data for e in r.events if e.event == "tool_result"]
        assert refused["ok"] is False
        plain_system = fake_llm.chat_requests()[-1].messages[0]["content"]
        assert "# Skills" not in plain_system
    finally:
        await app.stop()


async def test_a_new_skill_reaches_new_sessions_without_a_restart(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    app = await start(tmp_path, redis_url, fake_llm, config_reload_s=0.2)
    try:
        live = f"sk-{uuid.uuid4().hex[:8]}"
        await turn(app, "hello", live)
        before = fake_llm.chat_requests()[-1].messages[0]["content"]
        shutil.copytree(DATA / "email-tone", tmp_path / "skills" / "email-tone")
        deadline = time.monotonic() + 30
        while app.services.skills.get("email-tone") is None:
            assert time.monotonic() < deadline, "the new skill was never loaded"
            await asyncio.sleep(0.1)
        await turn(app, "hello")
        assert "- email-tone:" in fake_llm.chat_requests()[-1].messages[0]["content"]
        await turn(app, "again", live)
        assert fake_llm.chat_requests()[-1].messages[0]["content"] == before
    finally:
        await app.stop()


async def test_the_detector_appends_a_body_once_per_live_context(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    app = await start(tmp_path, redis_url, fake_llm)
    try:
        live = f"sk-{uuid.uuid4().hex[:8]}"
        message = ("Please scale this recipe up: double the servings and adjust the "
                   "ingredient quantities and the baking tin.")  # fmt: skip
        r = await turn(app, message, live, retrieve="never")
        (used,) = [e.data for e in r.events if e.event == "skill"]
        assert used["name"] == "recipe-scaling" and used["how"] == "detected"
        names = [e.event for e in r.events]
        assert names.index("skill") < names.index("token")
        request = fake_llm.chat_requests()[-1]
        user = request.messages[-1]["content"]
        # In the turn's own user message, before it; never in the system prompt.
        assert user.startswith('<skill name="recipe-scaling"') and user.endswith(message)
        assert "Factor = wanted servings" not in request.messages[0]["content"]
        # The next turn of the same session has the body already: not again.
        again = await turn(app, message + " Thanks!", live, retrieve="never")
        assert [e for e in again.events if e.event == "skill"] == []
        assert fake_llm.chat_requests()[-1].messages[-1]["content"] == message + " Thanks!"
        # Small talk picks nothing.
        hello = await turn(app, "Hi, how are you today?", retrieve="never")
        assert [e for e in hello.events if e.event == "skill"] == []
    finally:
        await app.stop()
