"""Prewarming (graph/prewarm.py) against fake vLLM replicas whose prefix-cache
simulator reports ``cached_tokens``: the stable prefix reaches every replica before
the first turn, a replica that appears later and a prefix that changes are warmed
too, and turn 1 of a new session then finds its prefix cached."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.mcp import MCPTool
from memory.context import KV_BLOCK_TOKENS
from tests.harness import AppServer, make_settings, post_turn
from tests.servers.fake_vllm import FakeVLLM, RecordedRequest


@pytest.fixture
def replicas() -> Iterator[tuple[FakeVLLM, FakeVLLM]]:
    a, b = FakeVLLM(reply_tokens=6).start(), FakeVLLM(reply_tokens=6).start()
    yield a, b
    a.stop()
    b.stop()


def warm_requests(llm: FakeVLLM) -> list[RecordedRequest]:
    return [r for r in llm.chat_requests() if r.body.get("max_tokens") == 1]


async def wait_for(predicate: Any, what: str, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def first_turn_cached(srv: AppServer) -> tuple[int, int]:
    async with httpx.AsyncClient(timeout=60) as client:
        r = await post_turn(client, srv.url, f"pw-{uuid.uuid4().hex[:8]}", "Hello there")
    usage = r.done["usage"]
    return usage["cached_tokens"] or 0, usage["prompt_tokens"]


async def test_every_replica_is_warm_before_the_first_turn(
    tmp_path: Path, redis_url: str, replicas: tuple[FakeVLLM, FakeVLLM]
) -> None:
    a, b = replicas
    settings = make_settings(tmp_path, redis_url, llm_url=f"{a.base_url},{b.base_url}",
                             prewarm=True)  # fmt: skip
    async with AppServer(settings) as srv:
        # Start waits for the first round: both are warm before any turn.
        (wa,), (wb,) = warm_requests(a), warm_requests(b)
        context = srv.services.runner.deps.context
        ((_, messages, tools),) = context.prefix_requests()
        for w in (wa, wb):
            assert w.messages == messages  # the system message only, as every turn sends it
            assert w.body["tools"] == list(tools) and w.body["tool_choice"] == "none"
            assert w.body["temperature"] == 0.0
        assert wa.raw_field("tools") == wb.raw_field("tools")
        warm_prompt = wa.prompt_tokens
        cached, prompt = await first_turn_cached(srv)
        # Turn 1 of a new session: the prefix's whole blocks were cached.
        assert cached >= warm_prompt // KV_BLOCK_TOKENS * KV_BLOCK_TOKENS - KV_BLOCK_TOKENS
        assert cached > 0
        print(f"\nprewarm on: turn 1 cached {cached} of {prompt} prompt tokens "
              f"(stable prefix {warm_prompt} tokens)")  # fmt: skip


async def test_without_prewarm_turn_one_computes_its_prefix(
    tmp_path: Path, redis_url: str, replicas: tuple[FakeVLLM, FakeVLLM]
) -> None:
    a, _ = replicas
    settings = make_settings(tmp_path, redis_url, llm_url=a.base_url, prewarm=False)
    async with AppServer(settings) as srv:
        assert warm_requests(a) == []
        cached, prompt = await first_turn_cached(srv)
        assert cached == 0
        print(f"\nprewarm off: turn 1 cached {cached} of {prompt} prompt tokens")


async def test_a_replica_that_appears_and_a_prefix_that_changes_are_warmed(
    tmp_path: Path, redis_url: str, replicas: tuple[FakeVLLM, FakeVLLM]
) -> None:
    a, b = replicas
    settings = make_settings(tmp_path, redis_url, llm_url=a.base_url, prewarm=True,
                             prewarm_check_s=0.2)  # fmt: skip
    async with AppServer(settings) as srv:
        assert len(warm_requests(a)) == 1 and warm_requests(b) == []
        llm: Any = srv.services.llm
        # What discovery does when a replica joins.
        llm.router.set_replicas([a.base_url, b.base_url])
        await wait_for(lambda: len(warm_requests(b)) == 1, "the new replica's prewarm")
        assert len(warm_requests(a)) == 1  # warm already: not sent again
        # An MCP server lists a tool: a new prefix, warmed on both at once.
        tooling = srv.services.tooling
        assert tooling is not None
        tool = MCPTool("web", "search", "Search the web.", {"type": "object"}, True, True)
        tooling.registry.set_server_tools("web", [tool])
        await wait_for(lambda: len(warm_requests(a)) == 2 and len(warm_requests(b)) == 2,
                       "the new prefix's prewarm")  # fmt: skip
        names = {t["function"]["name"] for t in warm_requests(b)[-1].body["tools"]}
        assert "web__search" in names
