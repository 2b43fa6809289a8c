"""The cache layer in the app, end to end: the real app on a real Redis and Milvus
Lite, a fake OpenAI-compatible LLM (which counts the requests it gets), a real MCP
server over stdio, the official ``openai`` SDK for the stateless front.

Response cache (stateless /v1/chat/completions), summary cache (a crashed and
retried archive), embedding cache, tool-result cache, retrieval cache, switches.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis.asyncio as aioredis

from memory.summaries import SUMMARY_PROMPT
from tests.harness import AppServer, make_settings, post_turn
from tests.security import write_keys
from tests.servers.fake_vllm import FakeVLLM
from tests.servers.mcp_servers import stdio_command

pytestmark = pytest.mark.timeout(240)

KEY_A, KEY_B = "ca-" + uuid.uuid4().hex, "cb-" + uuid.uuid4().hex
TENANT_A, TENANT_B = "ca" + uuid.uuid4().hex[:8], "cb" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeVLLM]:
    # Slow enough that 100 concurrent requests overlap the first one's reply.
    llm = FakeVLLM(reply_tokens=12, first_token_delay_s=0.3, token_interval_s=0.01).start()
    yield llm
    llm.stop()


def settings_for(root: Path, redis_url: str, llm: FakeVLLM, **overrides: Any) -> Any:
    root.mkdir(parents=True, exist_ok=True)
    keys = root / "keys.json"
    write_keys(keys, [(KEY_A, TENANT_A), (KEY_B, TENANT_B)])
    return make_settings(root, redis_url, llm_url=llm.base_url, auth="on",
                         api_keys_file=keys, **overrides)  # fmt: skip


@pytest.fixture
async def app(tmp_path: Path, redis_url: str, fake_llm: FakeVLLM) -> AsyncIterator[AppServer]:
    async with AppServer(settings_for(tmp_path, redis_url, fake_llm)) as srv:
        yield srv


def client(app: AppServer, key: str = KEY_A) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{app.url}/v1", api_key=key, max_retries=0, timeout=120)


def question() -> list[dict[str, str]]:
    """A conversation no other test sends (the cache is shared by the suite's Redis)."""
    asked = f"What is the capital of France? ({uuid.uuid4().hex})"
    return [{"role": "system", "content": "You answer in one sentence."},
            {"role": "user", "content": asked}]  # fmt: skip


def llm_calls(llm: FakeVLLM, messages: list[dict[str, str]]) -> int:
    return sum(1 for r in llm.chat_requests() if r.messages == messages)


async def ask(app: AppServer, messages: list[dict[str, str]], key: str = KEY_A,
              **options: Any) -> tuple[str, str]:  # fmt: skip
    """(reply text, X-Tiermem-Cache) of one non-streaming stateless request."""
    async with client(app, key) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="default",
            messages=messages,
            **options,  # type: ignore[arg-type]
        )
        completion = raw.parse()
    return str(completion.choices[0].message.content), raw.headers["x-tiermem-cache"]


def metric(app: AppServer, name: str, **labels: str) -> float:
    value = app.services.metrics.registry.get_sample_value(name, labels)
    return float(value or 0.0)


# --- LLM responses ----------------------------------------------------------------------


async def test_100_concurrent_equal_requests_make_one_llm_call(
    app: AppServer, fake_llm: FakeVLLM
) -> None:
    messages = question()
    answers = await asyncio.gather(*(ask(app, messages, temperature=0) for _ in range(100)))
    assert llm_calls(fake_llm, messages) == 1
    texts = {text for text, _ in answers}
    assert len(texts) == 1 and texts != {""}
    outcomes = sorted(outcome for _, outcome in answers)
    assert outcomes == ["hit"] * 99 + ["miss"], outcomes
    assert metric(app, "tiermem_cache_hits_total", cache="response", tier="flight") >= 99


async def test_a_hit_streams_back_in_the_same_format(app: AppServer, fake_llm: FakeVLLM) -> None:
    messages = question()

    async def stream() -> tuple[list[str], str, Any]:
        async with client(app) as c:
            raw = await c.chat.completions.with_raw_response.create(
                model="default", messages=messages, temperature=0.2, stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True},
            )  # fmt: skip
            pieces, usage, finish = [], None, None
            async for chunk in raw.parse():
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.delta.content:
                        pieces.append(choice.delta.content)
                    finish = choice.finish_reason or finish
            assert finish == "stop"
            return pieces, raw.headers["x-tiermem-cache"], usage

    first, first_outcome, first_usage = await stream()
    again, again_outcome, again_usage = await stream()
    assert (first_outcome, again_outcome) == ("miss", "hit")
    # The same reply in the same format (its text ready at once: fewer chunks).
    assert "".join(again) == "".join(first) and again
    assert again_usage is not None and again_usage.prompt_tokens == first_usage.prompt_tokens
    assert llm_calls(fake_llm, messages) == 1
    # The streamed reply is the non-streamed request's too: one key.
    text, outcome = await ask(app, messages, temperature=0.2)
    assert (text, outcome) == ("".join(first), "hit")


async def test_tenant_b_never_gets_tenant_a_s_reply(app: AppServer, fake_llm: FakeVLLM) -> None:
    messages = question()
    assert (await ask(app, messages, KEY_A, temperature=0))[1] == "miss"
    assert (await ask(app, messages, KEY_B, temperature=0))[1] == "miss"
    assert (await ask(app, messages, KEY_B, temperature=0))[1] == "hit"
    assert llm_calls(fake_llm, messages) == 2


async def test_an_llm_error_is_not_cached(app: AppServer, fake_llm: FakeVLLM) -> None:
    messages = question()
    fake_llm.inject("http_500", times=1)
    with pytest.raises(openai.APIStatusError):
        await ask(app, messages, temperature=0)
    # A stream cut after some text: its partial reply is not cached either.
    fake_llm.inject("drop", times=1, after_chunks=3)
    async with client(app) as c:
        stream = await c.chat.completions.create(
            model="default", messages=messages, temperature=0, stream=True,  # type: ignore[arg-type]
        )  # fmt: skip
        with pytest.raises(openai.APIError):
            async for _chunk in stream:
                pass
    assert (await ask(app, messages, temperature=0))[1] == "miss"
    assert (await ask(app, messages, temperature=0))[1] == "hit"
    assert llm_calls(fake_llm, messages) == 3


async def test_sampled_tools_and_no_cache_requests_bypass(
    app: AppServer, fake_llm: FakeVLLM
) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"temperature": 0.9}, "nondeterministic"),
        ({}, "nondeterministic"),  # the model's default temperature: sampled
        ({"temperature": 0, "tools": [tool]}, "side_effects"),
        ({"temperature": 0, "extra_headers": {"Cache-Control": "no-cache"}}, "no_cache"),
    ]
    for options, reason in cases:
        messages = question()
        before = metric(app, "tiermem_cache_bypass_total", cache="response", reason=reason)
        for _ in range(2):
            assert (await ask(app, messages, **options))[1] == "bypass"
        assert llm_calls(fake_llm, messages) == 2, options
        after = metric(app, "tiermem_cache_bypass_total", cache="response", reason=reason)
        assert after - before == 2, (options, reason)


@pytest.mark.parametrize(
    ("overrides", "reason"), [({"cache": "off"}, "off"), ({"cache_response": False}, "kind_off")]
)
async def test_switches_turn_the_response_cache_off(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM, overrides: dict[str, Any], reason: str
) -> None:
    async with AppServer(settings_for(tmp_path, redis_url, fake_llm, **overrides)) as app:
        messages = question()
        for _ in range(2):
            assert (await ask(app, messages, temperature=0))[1] == "bypass"
        assert llm_calls(fake_llm, messages) == 2
        assert metric(app, "tiermem_cache_bypass_total", cache="response", reason=reason) == 2


async def test_a_new_model_misses(tmp_path: Path, redis_url: str, fake_llm: FakeVLLM) -> None:
    messages = question()
    async with AppServer(settings_for(tmp_path, redis_url, fake_llm, llm_model="m1")) as app:
        assert (await ask(app, messages, temperature=0))[1] == "miss"
        assert (await ask(app, messages, temperature=0))[1] == "hit"
    async with AppServer(settings_for(tmp_path / "m2", redis_url, fake_llm,
                                      llm_model="m2")) as app:  # fmt: skip
        assert (await ask(app, messages, temperature=0))[1] == "miss"


# --- summaries, embeddings, retrievals, tools ------------------------------------------


def summary_requests(llm: FakeVLLM) -> int:
    return sum(1 for r in llm.chat_requests() if r.messages[0]["content"] == SUMMARY_PROMPT)


async def test_a_crashed_and_retried_archive_reuses_its_cached_summary(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    from app.services import Services

    crashes = {"left": 1}

    async def crash(batch_id: str) -> None:
        if crashes["left"]:
            crashes["left"] -= 1
            raise RuntimeError("simulated crash between the L3 upsert and the L2 cursor move")

    settings = settings_for(tmp_path, redis_url, fake_llm, archive_threshold=2)
    services = Services(settings, archive_after_upsert=crash)
    sid = f"sum-{uuid.uuid4().hex[:8]}"
    before = summary_requests(fake_llm)
    async with AppServer(settings, services) as app, httpx.AsyncClient(timeout=120) as c:
        for text in ("I grow tomatoes on my balcony.", "They are the San Marzano kind."):
            r = await post_turn(c, app.url, sid, text, user="gardener",
                                headers={"Authorization": f"Bearer {KEY_A}"})  # fmt: skip
            assert r.status_code == 200
        archiver = services.archiver
        deadline = asyncio.get_running_loop().time() + 60
        while crashes["left"] or archiver.pending_tasks:
            assert asyncio.get_running_loop().time() < deadline, "the archive never ran"
            await asyncio.sleep(0.05)
        assert summary_requests(fake_llm) - before == 1
        meta = await services.l2.read_meta(TENANT_A, sid)
        assert meta is not None and meta.archived_upto == 0  # the crash kept the cursor
        # The sweeper's retry: the summary comes from the cache, not the LLM.
        result = await archiver.archive_once(TENANT_A, sid, force=False, ignore_backoff=True)
        assert result is not None and (result.first_turn, result.last_turn) == (1, 2)
        assert summary_requests(fake_llm) - before == 1, "the retried archive paid the LLM again"
        assert metric(app, "tiermem_cache_hits_total", cache="summary", tier="l2") == 1


async def test_embeddings_are_computed_once_per_text(app: AppServer) -> None:
    embedder = app.services.embedder
    texts = [f"a sentence about kites {uuid.uuid4().hex}", f"and one about owls {uuid.uuid4().hex}"]
    inner_calls: list[list[str]] = []
    inner = embedder.inner  # type: ignore[attr-defined]
    original = inner.embed

    async def counting(batch: list[str]) -> list[list[float]]:
        inner_calls.append(list(batch))
        result: list[list[float]] = await original(batch)
        return result

    inner.embed = counting
    try:
        first = await embedder.embed(texts)
        again = await embedder.embed([texts[1], texts[0], texts[1]])
    finally:
        inner.embed = original
    assert inner_calls == [texts]  # the second batch never reached the model
    assert again[1] == pytest.approx(first[0], abs=1e-6)
    assert again[0] == pytest.approx(first[1], abs=1e-6) and again[2] == again[0]
    assert metric(app, "tiermem_cache_hits_total", cache="embedding", tier="l1") >= 3


async def test_a_cacheable_mcp_tool_runs_once_per_arguments(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    count_file = tmp_path / "count.txt"
    command, args = stdio_command("local")
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"local": {
        "command": command, "args": args, "env": {"MCP_COUNT_FILE": str(count_file)},
        "cache": {"count": 60},
    }}}))  # fmt: skip
    settings = settings_for(tmp_path, redis_url, fake_llm, mcp_config=config)
    async with AppServer(settings) as app:
        assert app.services.mcp is not None
        assert await app.services.mcp.wait_connected("local", 60), app.services.mcp.status()
        results = []
        async with httpx.AsyncClient(timeout=120) as c:
            for key in (KEY_A, KEY_A, KEY_B):
                sid = f"tool-{uuid.uuid4().hex[:8]}"
                r = await post_turn(c, app.url, sid, 'Count.\nCALL local__count {"hold_s": 0}',
                                    headers={"Authorization": f"Bearer {key}"})  # fmt: skip
                (result,) = [e.data for e in r.events if e.event == "tool_result"]
                results.append(result)
        # Tenant A's second call came from the cache; tenant B ran its own.
        assert [r["content"] for r in results] == ["1", "1", "2"], results
        assert all(r["ok"] for r in results)
        assert len(count_file.read_text().splitlines()) == 2


async def test_retrievals_are_cached_per_session_with_an_empty_marker(
    app: AppServer, redis_url: str
) -> None:
    sid = f"rt-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(timeout=120) as c:
        for _ in range(2):
            r = await post_turn(c, app.url, sid, "Do you remember my dog's name?",
                                user="nobody-" + sid, retrieve="always",
                                headers={"Authorization": f"Bearer {KEY_A}"})  # fmt: skip
            assert r.status_code == 200
    # Nothing to find: the first search stored the "empty" marker, the second hit it.
    assert metric(app, "tiermem_retrievals_total", source="l3") >= 1
    assert metric(app, "tiermem_cache_hits_total", cache="retrieval", tier="l2") >= 1
    redis = aioredis.from_url(redis_url)
    try:
        pattern = f"tm:{{{TENANT_A}:{sid}}}:c:retrieval:*"
        keys = [k async for k in redis.scan_iter(match=pattern)]
        assert len(keys) == 1
        ttl = await redis.pttl(keys[0])
        assert 0 < ttl <= app.settings.cache_empty_ttl_s * 1100
    finally:
        await redis.aclose()
