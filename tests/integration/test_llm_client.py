"""The LLM clients against real HTTP servers: FakeVLLM replicas on 127.0.0.1.

Covers streaming and usage (cached_tokens from the fake's prefix-cache
simulator), failures turning into LLMError within the configured timeouts,
upstream cancellation when the consumer stops, routing over several replicas,
the offline development LLM, build_llm, and the fake server's own protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from types import MappingProxyType
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from infra.chat_template import render_chat
from infra.dev_llm import (
    DEV_MARKER,
    OfflineDevLLM,
    extractive_summary,
    render_prompt,
    tool_calls_text,
)
from infra.llm import (
    ChatMessage,
    InvalidToolArguments,
    LLMDone,
    LLMError,
    LLMResult,
    LLMToken,
    OpenAICompatibleLLM,
    ToolCall,
    ToolChoice,
    assistant_message,
    build_llm,
    collect,
    named_tool_choice,
)
from infra.settings import Settings
from infra.tokenizer import default_tokenizer
from tests.servers.fake_vllm import FakeToolCall, FakeVLLM, RecordedRequest, ScriptedReply

BLOCK = 16


@pytest.fixture
def fake() -> Iterator[FakeVLLM]:
    server = FakeVLLM(reply_tokens=30).start()
    yield server
    server.stop()


@pytest.fixture
async def llm(fake: FakeVLLM) -> AsyncIterator[OpenAICompatibleLLM]:
    client = OpenAICompatibleLLM(
        [fake.base_url], first_token_timeout_s=2.0, read_timeout_s=1.0, connect_timeout_s=1.0
    )
    yield client
    await client.aclose()


def conversation(user: str) -> list[ChatMessage]:
    return [
        {"role": "system", "content": "You are a careful assistant. " * 8},
        {"role": "user", "content": user},
    ]


async def run(
    llm: OpenAICompatibleLLM, messages: Sequence[ChatMessage], session: str = "t:s", **kw: Any
) -> tuple[str, LLMDone]:
    text, done = await collect(llm.stream_chat(messages, session_key=session, **kw))
    assert done is not None
    return text, done


async def wait_for(fake: FakeVLLM, predicate: Callable[[], bool], within_s: float = 2.0) -> bool:
    return await asyncio.to_thread(fake.wait_for, predicate, within_s)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# --- streaming and usage --------------------------------------------------------------


async def test_streams_tokens_and_usage(fake: FakeVLLM, llm: OpenAICompatibleLLM) -> None:
    messages = conversation("Hello there, how are you?")
    events = [ev async for ev in llm.stream_chat(messages, session_key="t:s")]
    tokens = [ev for ev in events if isinstance(ev, LLMToken)]
    assert len(tokens) > 5
    assert all(isinstance(ev, LLMToken) for ev in events[:-1])
    done = events[-1]
    assert isinstance(done, LLMDone)
    text = "".join(t.text for t in tokens)
    assert text.startswith("Re: Hello there")
    tok = default_tokenizer()
    assert done.usage is not None
    assert done.usage.prompt_tokens == tok.count(render_chat(messages, add_generation_prompt=True))
    assert done.usage.completion_tokens == tok.count(text)
    assert done.usage.cached_tokens == 0
    assert done.finish_reason == "stop"
    assert done.replica == fake.base_url
    assert done.moved is False
    assert 0 < done.ttft_ms < 2000
    # "default" model: the client asked the replica what it serves.
    assert fake.chat_requests()[-1].body["model"] == "fake-model"


async def test_second_turn_reports_cached_prompt_and_reply(llm: OpenAICompatibleLLM) -> None:
    first = conversation("Remember that my cat is called Miso.")
    reply, done1 = await run(llm, first)
    second: list[ChatMessage] = [
        *first,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "Ok?"},
    ]
    _, done2 = await run(llm, second)
    assert done1.usage is not None and done2.usage is not None
    # Cached: full blocks of prompt 1 + reply 1 minus its last token, and at
    # most prompt 2 - 1 tokens, in whole blocks.
    computed = done1.usage.prompt_tokens + done1.usage.completion_tokens - 1
    expected = min(computed // BLOCK, (done2.usage.prompt_tokens - 1) // BLOCK) * BLOCK
    assert expected > done1.usage.prompt_tokens - BLOCK
    assert done2.usage.cached_tokens == expected


async def test_a_rewritten_prefix_breaks_the_cache(llm: OpenAICompatibleLLM) -> None:
    messages = conversation("A question about prefixes.")
    await run(llm, messages)
    changed: list[ChatMessage] = [
        {"role": "system", "content": f"Now: 12:00. {messages[0].get('content')}"},
        messages[1],
    ]
    _, done = await run(llm, changed)
    assert done.usage is not None and done.usage.cached_tokens == 0


async def test_cached_tokens_none_when_server_does_not_report(
    fake: FakeVLLM, llm: OpenAICompatibleLLM
) -> None:
    fake.report_cached_tokens = False
    _, done = await run(llm, conversation("hi"))
    assert done.usage is not None
    assert done.usage.cached_tokens is None
    assert done.usage.prompt_tokens > 0


async def test_session_header_auth_and_body(fake: FakeVLLM) -> None:
    client = OpenAICompatibleLLM(
        [fake.base_url], model="my-model", api_key="sk-test", max_tokens=77, temperature=0.1
    )
    try:
        await run(client, conversation("hi"), session="acme:chat-42")
    finally:
        await client.aclose()
    rec = fake.chat_requests()[-1]
    assert rec.session_id == "acme:chat-42"
    assert rec.headers["authorization"] == "Bearer sk-test"
    assert rec.body["model"] == "my-model"
    assert rec.body["stream"] is True
    assert rec.body["stream_options"] == {"include_usage": True}
    assert rec.body["max_tokens"] == 77
    assert rec.body["temperature"] == 0.1


async def test_max_tokens_cuts_the_reply(fake: FakeVLLM, llm: OpenAICompatibleLLM) -> None:
    fake.reply_tokens = 200
    text, done = await collect(
        llm.stream_chat(conversation("long"), session_key="t:s", max_tokens=10)
    )
    assert done is not None and done.usage is not None
    assert done.finish_reason == "length"
    assert 0 < done.usage.completion_tokens <= 10
    assert done.usage.completion_tokens == default_tokenizer().count(text)


async def test_complete_returns_text_and_usage(fake: FakeVLLM, llm: OpenAICompatibleLLM) -> None:
    result = await llm.complete(conversation("summarise"), session_key="t:s")
    assert result.text.startswith("Re: summarise")
    assert result.tool_calls == ()
    assert result.finish_reason == "stop"
    usage = result.usage
    assert usage is not None and usage.completion_tokens == default_tokenizer().count(result.text)


# --- failures -------------------------------------------------------------------------


async def test_http_500_is_an_llm_error(fake: FakeVLLM, llm: OpenAICompatibleLLM) -> None:
    fake.inject("http_500")
    with pytest.raises(LLMError) as info:
        await run(llm, conversation("hi"))
    err = info.value
    assert (err.kind, err.status, err.retryable) == ("http", 500, True)
    assert "injected failure" in err.message
    assert err.replica == fake.base_url
    # The failure was one-shot: the next request works.
    _, done = await run(llm, conversation("hi"))
    assert done.finish_reason == "stop"


async def test_http_400_is_not_retryable(fake: FakeVLLM, llm: OpenAICompatibleLLM) -> None:
    fake.max_model_len = 20
    with pytest.raises(LLMError) as info:
        await run(llm, conversation("hi"))
    assert (info.value.kind, info.value.status, info.value.retryable) == ("http", 400, False)
    assert "maximum context length" in info.value.message


async def test_hang_before_first_token_times_out(fake: FakeVLLM) -> None:
    client = OpenAICompatibleLLM([fake.base_url], first_token_timeout_s=0.4, read_timeout_s=5.0)
    fake.inject("hang")
    started = time.monotonic()
    try:
        with pytest.raises(LLMError) as info:
            await run(client, conversation("hi"))
    finally:
        await client.aclose()
    elapsed = time.monotonic() - started
    assert info.value.kind == "timeout"
    assert info.value.retryable is True
    assert "first token" in info.value.message
    assert 0.35 < elapsed < 1.5
    rec = fake.chat_requests()[-1]
    assert rec.failure == "hang"
    assert await wait_for(fake, lambda: rec.disconnected_at is not None)


async def test_stall_between_tokens_times_out(fake: FakeVLLM) -> None:
    client = OpenAICompatibleLLM([fake.base_url], first_token_timeout_s=5.0, read_timeout_s=0.2)
    fake.token_interval_s = 0.6
    got: list[str] = []
    started = time.monotonic()
    try:
        with pytest.raises(LLMError) as info:
            async for ev in client.stream_chat(conversation("hi"), session_key="t:s"):
                if isinstance(ev, LLMToken):
                    got.append(ev.text)
    finally:
        await client.aclose()
    assert info.value.kind == "timeout"
    assert info.value.retryable is False  # tokens were already relayed
    assert len(got) == 1
    assert time.monotonic() - started < 1.5


async def test_time_the_consumer_spends_between_tokens_is_not_a_stall(fake: FakeVLLM) -> None:
    # Only reads are timed: a consumer slower than read_timeout (a slow client
    # it relays to) gets every token, and no cancellation lands in its own awaits.
    client = OpenAICompatibleLLM([fake.base_url], first_token_timeout_s=5.0, read_timeout_s=0.2)
    fake.token_interval_s = 0.0
    got: list[str] = []
    done: LLMDone | None = None
    try:
        async for ev in client.stream_chat(conversation("hi"), session_key="t:s"):
            if isinstance(ev, LLMToken):
                got.append(ev.text)
                if len(got) <= 2:
                    await asyncio.sleep(0.5)
            elif isinstance(ev, LLMDone):
                done = ev
    finally:
        await client.aclose()
    assert done is not None and done.finish_reason == "stop"
    assert len(got) > 2


async def test_connection_dropped_mid_stream(fake: FakeVLLM, llm: OpenAICompatibleLLM) -> None:
    fake.inject("drop", after_chunks=3)
    got: list[str] = []
    with pytest.raises(LLMError) as info:
        async for ev in llm.stream_chat(conversation("hi"), session_key="t:s"):
            if isinstance(ev, LLMToken):
                got.append(ev.text)
    assert info.value.kind == "protocol"
    assert info.value.retryable is False
    assert len(got) == 3


async def test_drop_before_any_token_is_retryable(fake: FakeVLLM, llm: OpenAICompatibleLLM) -> None:
    fake.inject("drop", after_chunks=0)
    with pytest.raises(LLMError) as info:
        await run(llm, conversation("hi"))
    assert (info.value.kind, info.value.retryable) == ("protocol", True)


async def test_unreachable_replica_is_a_connect_error() -> None:
    url = closed_port_url()
    client = OpenAICompatibleLLM([url], connect_timeout_s=1.0)
    try:
        with pytest.raises(LLMError) as info:
            await run(client, conversation("hi"))
        assert (info.value.kind, info.value.retryable) == ("connect", True)
        assert url in info.value.message
        assert not client.router.is_healthy(url)
        assert client.router.in_flight(url) == 0
        assert await client.health() is False
    finally:
        await client.aclose()


async def test_no_replicas_yet_is_a_connect_error() -> None:
    client = OpenAICompatibleLLM([])
    try:
        with pytest.raises(LLMError) as info:
            await run(client, conversation("hi"))
        assert info.value.kind == "connect"
    finally:
        await client.aclose()


# --- cancellation -----------------------------------------------------------------------


async def test_consumer_closing_the_stream_closes_upstream(fake: FakeVLLM) -> None:
    fake.token_interval_s = 0.05
    fake.reply_tokens = 100
    client = OpenAICompatibleLLM([fake.base_url])
    try:
        stream = client.stream_chat(conversation("hi"), session_key="t:s")
        async with contextlib.aclosing(stream):
            async for ev in stream:
                if isinstance(ev, LLMToken):
                    break
        closed_at = time.monotonic()
        rec = fake.chat_requests()[-1]
        assert await wait_for(fake, lambda: rec.disconnected_at is not None, within_s=1.0)
        assert rec.disconnected_at is not None
        assert rec.disconnected_at - closed_at < 1.0
        assert rec.chunks_sent < 10  # the fake stopped generating
        assert client.router.in_flight(fake.base_url) == 0
    finally:
        await client.aclose()


async def test_cancelled_consumer_task_closes_upstream(fake: FakeVLLM) -> None:
    fake.token_interval_s = 0.05
    fake.reply_tokens = 100
    client = OpenAICompatibleLLM([fake.base_url])
    first = asyncio.Event()

    async def consume() -> None:
        async for ev in client.stream_chat(conversation("hi"), session_key="t:s"):
            if isinstance(ev, LLMToken):
                first.set()

    task = asyncio.create_task(consume())
    try:
        await asyncio.wait_for(first.wait(), 2.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        rec = fake.chat_requests()[-1]
        assert await wait_for(fake, lambda: rec.disconnected_at is not None, within_s=1.0)
    finally:
        await client.aclose()


# --- several replicas ---------------------------------------------------------------------


@pytest.fixture
def replicas() -> Iterator[list[FakeVLLM]]:
    servers = [FakeVLLM(reply_tokens=12).start() for _ in range(3)]
    yield servers
    for s in servers:
        s.stop()


def requests_by_session(servers: list[FakeVLLM]) -> dict[str, set[int]]:
    seen: dict[str, set[int]] = {}
    for i, server in enumerate(servers):
        for rec in server.chat_requests():
            assert rec.session_id is not None
            seen.setdefault(rec.session_id, set()).add(i)
    return seen


async def test_sessions_stick_to_one_replica_and_stay_warm(replicas: list[FakeVLLM]) -> None:
    client = OpenAICompatibleLLM([s.base_url for s in replicas])
    sessions = [f"t:s{i}" for i in range(12)]
    histories = {s: conversation(f"I am {s}") for s in sessions}
    try:
        for turn in range(3):
            for s in sessions:
                reply, done = await run(client, histories[s], session=s)
                assert done.moved is False
                assert done.usage is not None
                if turn > 0:
                    assert done.usage.cached_tokens is not None
                    # all but the last partial block of the previous turn and the new message
                    assert done.usage.cached_tokens >= done.usage.prompt_tokens - 4 * BLOCK
                histories[s] = [
                    *histories[s],
                    {"role": "assistant", "content": reply},
                    {"role": "user", "content": f"turn {turn}"},
                ]
    finally:
        await client.aclose()
    placement = requests_by_session(replicas)
    assert all(len(servers) == 1 for servers in placement.values())
    assert len({next(iter(v)) for v in placement.values()}) > 1  # spread over replicas


async def test_unreachable_replica_fails_over(replicas: list[FakeVLLM]) -> None:
    dead = closed_port_url()
    urls = [dead, *(s.base_url for s in replicas)]
    client = OpenAICompatibleLLM(urls, connect_timeout_s=1.0)
    try:
        session = next(
            f"t:s{i}" for i in range(1000) if client.router.pick(f"t:s{i}").replica == dead
        )
        _, done = await run(client, conversation("hi"), session=session)
        assert done.replica != dead
        assert done.moved is True
        assert not client.router.is_healthy(dead)
        # While it is marked unhealthy the session goes straight to its next replica.
        _, again = await run(client, conversation("hi"), session=session)
        assert again.replica == done.replica
        assert await client.health() is True
    finally:
        await client.aclose()


# --- the offline development LLM ---------------------------------------------------------


async def test_dev_llm_says_what_it_is_and_answers_the_last_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="infra.dev_llm"):
        dev = OfflineDevLLM()
    assert any("TIERMEM_LLM_URL" in r.getMessage() for r in caplog.records)
    assert dev.is_dev is True
    one = conversation("What is the weather in Lyon?")
    events = [ev async for ev in dev.stream_chat(one, session_key="t:s")]
    assert len(events) > 10
    text = "".join(ev.text for ev in events if isinstance(ev, LLMToken))
    done = events[-1]
    assert isinstance(done, LLMDone)
    assert DEV_MARKER in text
    assert "What is the weather in Lyon?" in text
    assert "user message 1 " in text
    tok = default_tokenizer()
    assert done.usage is not None
    assert done.usage.prompt_tokens == tok.count(render_chat(one, add_generation_prompt=True))
    assert done.usage.completion_tokens == tok.count(text)
    assert done.usage.cached_tokens is None
    two: list[ChatMessage] = [
        *one,
        {"role": "assistant", "content": text},
        {"role": "user", "content": "And Nice?"},
    ]
    text2 = (await dev.complete(two, session_key="t:s")).text
    assert "And Nice?" in text2 and "user message 2 " in text2
    again = await dev.complete(one, session_key="t:s")
    assert again.text == text  # deterministic
    assert again.usage == done.usage and again.finish_reason == "stop"
    assert await dev.health() is True


async def test_dev_llm_respects_max_tokens_and_delay() -> None:
    dev = OfflineDevLLM(token_delay_s=0.01)
    started = time.monotonic()
    events = [
        ev async for ev in dev.stream_chat(conversation("x"), session_key="t:s", max_tokens=12)
    ]
    elapsed = time.monotonic() - started
    done = events[-1]
    assert isinstance(done, LLMDone) and done.usage is not None
    assert done.finish_reason == "length"
    text = "".join(ev.text for ev in events if isinstance(ev, LLMToken))
    assert 0 < done.usage.completion_tokens == default_tokenizer().count(text) <= 12
    assert len(events) >= 3
    assert elapsed >= 0.01 * (len(events) - 1)


async def test_dev_llm_summarises_extractively() -> None:
    dev = OfflineDevLLM()
    batch = (
        "user: My name is Ada. I live in Paris and like tea.\n"
        f"assistant: {DEV_MARKER} You said something.\n"
        "user: I am allergic to peanuts! Please remember it."
    )
    messages: list[ChatMessage] = [
        {"role": "system", "content": "You keep notes. SUMMARIZE the conversation below."},
        {"role": "user", "content": batch},
    ]
    result = await dev.complete(messages, session_key="t:s")
    assert result.text == "user: My name is Ada. user: I am allergic to peanuts!"
    assert result.usage is not None and result.usage.completion_tokens > 0
    # The same words with tools offered are an agent turn, not a summary request.
    tools = [{"type": "function", "function": {"name": "noop", "parameters": {}}}]
    agent = await dev.complete(messages, session_key="t:s", tools=tools)
    assert DEV_MARKER in agent.text
    assert extractive_summary([{"role": "user", "content": "x. " * 2000}]).count("x.") == 1
    assert len(extractive_summary([{"role": "user", "content": "y y.\n" * 2000}])) <= 1500


# --- tools and tool calls -------------------------------------------------------------

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "search_memory",
            "description": "Search what the user said earlier. Ünïcode stays as it is.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                "required": ["query"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer", "minimum": 1},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "options": {
                        "type": "object",
                        "properties": {"hourly": {"type": "boolean"}},
                        "required": ["hourly"],
                    },
                },
                "required": ["city", "days", "unit", "options"],
            },
        },
    },
]


async def stream_events(
    llm: OpenAICompatibleLLM | OfflineDevLLM, messages: Sequence[ChatMessage], **kw: Any
) -> tuple[list[LLMToken], LLMDone]:
    events = [ev async for ev in llm.stream_chat(messages, session_key="t:s", **kw)]
    done = events[-1]
    assert isinstance(done, LLMDone)
    assert all(isinstance(ev, LLMToken) for ev in events[:-1])
    return [ev for ev in events if isinstance(ev, LLMToken)], done


def sent_calls(rec: RecordedRequest) -> tuple[ToolCall, ...]:
    return tuple(
        ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"])
        for c in rec.tool_calls_sent
    )


async def test_tools_and_tool_choice_reach_the_server_byte_identical(
    fake: FakeVLLM, llm: OpenAICompatibleLLM
) -> None:
    choice = named_tool_choice("get_weather")
    first = conversation("Weather in Lyon?")
    await run(llm, first, tools=TOOLS, tool_choice=choice)
    second: list[ChatMessage] = [
        *first,
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "more"},
    ]
    # The same definitions as other containers: the bytes must not change.
    frozen = tuple(MappingProxyType(t) for t in TOOLS)
    await run(llm, second, tools=frozen, tool_choice=choice)
    recs = fake.chat_requests()
    assert len(recs) == 2
    for rec in recs:
        assert rec.raw_field("tools") == orjson.dumps(TOOLS)
        assert rec.raw_field("tool_choice") == orjson.dumps(choice)
        assert rec.body["tools"] == TOOLS  # in the request's field, in the caller's order
        assert "search_memory" not in str(rec.messages)  # not as text in the prompt
    assert recs[0].raw_field("messages") != recs[1].raw_field("messages")


async def test_a_request_without_tools_has_no_tools_key(
    fake: FakeVLLM, llm: OpenAICompatibleLLM
) -> None:
    await run(llm, conversation("no tools"))
    await run(llm, conversation("empty tools"), tools=[], tool_choice="auto")
    await run(llm, conversation("tools, no choice"), tools=TOOLS)
    plain, empty, no_choice = fake.chat_requests()
    for rec in (plain, empty):
        assert "tools" not in rec.body and "tool_choice" not in rec.body
        assert rec.raw_field("tools") is None
    assert no_choice.body["tools"] == TOOLS and "tool_choice" not in no_choice.body


async def test_fragmented_tool_call_deltas_are_assembled(
    fake: FakeVLLM, llm: OpenAICompatibleLLM
) -> None:
    arguments = '{"city": "Lyon", "days": 3, "unit": "celsius", "options": {"hourly": true}}'
    fake.script(ScriptedReply(tool_calls=(FakeToolCall("get_weather", arguments),)))
    tokens, done = await stream_events(llm, conversation("weather?"), tools=TOOLS)
    rec = fake.chat_requests()[-1]
    assert tokens == []  # tool calls never arrive as text
    assert rec.chunks_sent > len(arguments) // 3  # it really came in fragments
    assert done.tool_calls == sent_calls(rec)
    (call,) = done.tool_calls
    assert call.id.startswith("chatcmpl-tool-") and call.name == "get_weather"
    assert call.arguments == arguments
    assert call.parsed_arguments()["options"] == {"hourly": True}
    assert done.finish_reason == "tool_calls"
    assert done.usage is not None and done.usage.completion_tokens == rec.completion_tokens > 0
    assert done.ttft_ms > 0


async def test_two_tool_calls_at_once(fake: FakeVLLM, llm: OpenAICompatibleLLM) -> None:
    a = FakeToolCall("search_memory", '{"query": "cat name", "limit": 2}')
    b = FakeToolCall("get_weather", '{"city": "Nice"}', id="call_fixed")
    fake.script(ScriptedReply(tool_calls=(a, b), fragment_chars=2, interleave=True))
    _, done = await stream_events(llm, conversation("both"), tools=TOOLS)
    rec = fake.chat_requests()[-1]
    assert [c.name for c in done.tool_calls] == ["search_memory", "get_weather"]
    assert done.tool_calls == sent_calls(rec)
    assert done.tool_calls[1].id == "call_fixed"
    assert done.tool_calls[0].parsed_arguments() == {"query": "cat name", "limit": 2}
    assert done.tool_calls[1].parsed_arguments() == {"city": "Nice"}


async def test_text_then_tool_call_and_complete(fake: FakeVLLM, llm: OpenAICompatibleLLM) -> None:
    call = FakeToolCall("search_memory", '{"query": "tea"}')
    fake.script(ScriptedReply(text="Let me look that up.", tool_calls=(call,)))
    tokens, done = await stream_events(llm, conversation("tea?"), tools=TOOLS)
    assert "".join(t.text for t in tokens) == "Let me look that up."
    assert len(tokens) == 5  # text still streams word by word
    assert [c.name for c in done.tool_calls] == ["search_memory"]
    fake.script(ScriptedReply(text="Checking.", tool_calls=(call,)))
    result = await llm.complete(conversation("tea?"), session_key="t:s", tools=TOOLS)
    assert isinstance(result, LLMResult)
    assert result.text == "Checking."
    assert result.tool_calls == sent_calls(fake.chat_requests()[-1])
    assert result.finish_reason == "tool_calls"
    assert result.usage is not None and result.usage.prompt_tokens > 0
    message = result.to_message()
    assert message["content"] == "Checking."
    assert message["tool_calls"] == [c.to_message_dict() for c in result.tool_calls]


async def test_content_and_tool_calls_in_one_delta_without_ids(
    fake: FakeVLLM, llm: OpenAICompatibleLLM
) -> None:
    deltas: tuple[dict[str, Any], ...] = (
        {"content": "On it.", "tool_calls": [
            {"index": 0, "type": "function", "function": {"name": "get_", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": '{"ci'}}]},
        {"tool_calls": [{"index": 1, "function": {"name": "search_memory"}},
                        {"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": '{"query": "x"}'}}]},
    )  # fmt: skip
    fake.script(ScriptedReply(deltas=deltas, finish_reason="tool_calls"))
    tokens, done = await stream_events(llm, conversation("go"), tools=TOOLS)
    assert [t.text for t in tokens] == ["On it."]
    assert done.tool_calls == (
        ToolCall("call_0", "get_weather", '{"city": "Oslo"}'),
        ToolCall("call_1", "search_memory", '{"query": "x"}'),
    )
    assert done.finish_reason == "tool_calls"


async def test_call_rule_and_the_loop_back_with_tool_results(
    fake: FakeVLLM, llm: OpenAICompatibleLLM
) -> None:
    ask = conversation('CALL search_memory {"query": "cat"}\nCALL get_weather\nThanks.')
    _, done = await run(llm, ask, tools=TOOLS)
    assert [(c.name, c.arguments) for c in done.tool_calls] == [
        ("search_memory", '{"query": "cat"}'),
        ("get_weather", "{}"),
    ]
    assert done.finish_reason == "tool_calls"
    first = fake.chat_requests()[-1]
    # The agent appends the call and the results; the next reply is text.
    results: list[ChatMessage] = [
        {"role": "tool", "tool_call_id": c.id, "content": f"result of {c.name}"}
        for c in done.tool_calls
    ]
    history = [*ask, assistant_message("", done.tool_calls), *results]
    text, again = await collect(llm.stream_chat(history, session_key="t:s", tools=TOOLS))
    assert again is not None and again.tool_calls == () and again.finish_reason == "stop"
    assert text.startswith("Re: CALL")
    # The calls as generated are the calls as re-sent: the prefix cache holds.
    second = fake.chat_requests()[-1]
    assert second.body["messages"][2]["content"] is None
    assert again.usage is not None and again.usage.cached_tokens is not None
    computed = first.prompt_tokens + first.completion_tokens - 1
    expected = min(computed // BLOCK, (second.prompt_tokens - 1) // BLOCK) * BLOCK
    assert expected > first.prompt_tokens - BLOCK
    assert again.usage.cached_tokens == expected
    # Without tools, or with tool_choice "none", the rule does not apply.
    _, plain = await run(llm, ask)
    _, none = await run(llm, ask, tools=TOOLS, tool_choice="none")
    assert plain.tool_calls == () and none.tool_calls == ()
    assert plain.finish_reason == none.finish_reason == "stop"


async def test_tool_definitions_are_part_of_the_cached_prefix(
    fake: FakeVLLM, llm: OpenAICompatibleLLM
) -> None:
    messages = conversation("prefix with tools")
    _, done = await run(llm, messages, tools=TOOLS)
    _, same = await run(llm, messages, tools=TOOLS)
    _, reordered = await run(llm, messages, tools=TOOLS[::-1])
    assert done.usage is not None and same.usage is not None and reordered.usage is not None
    p = same.usage.prompt_tokens
    assert p > default_tokenizer().count(render_chat(messages, add_generation_prompt=True))
    assert same.usage.cached_tokens == (p - 1) // BLOCK * BLOCK
    # Another order is another prefix from the first tool on: only what comes
    # before it (system prompt, the opening of the tools block) still hits.
    tok = default_tokenizer()
    a, b = (tok.encode(render_prompt(messages, tools)) for tools in (TOOLS, TOOLS[::-1]))
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert shared > tok.count(render_chat(messages[:1]))
    assert reordered.usage.cached_tokens == shared // BLOCK * BLOCK < same.usage.cached_tokens


async def test_a_tool_call_longer_than_the_first_token_timeout_streams_on(
    fake: FakeVLLM,
) -> None:
    client = OpenAICompatibleLLM([fake.base_url], first_token_timeout_s=0.3, read_timeout_s=0.5)
    fake.token_interval_s = 0.05
    fake.script(ScriptedReply(tool_calls=(FakeToolCall("f", '{"text": "' + "a" * 30 + '"}'),)))
    started = time.monotonic()
    try:
        _, done = await run(client, conversation("slow"), tools=TOOLS)
    finally:
        await client.aclose()
    assert time.monotonic() - started > 0.5  # past the first-token deadline, yet no timeout
    assert done.tool_calls[0].parsed_arguments() == {"text": "a" * 30}


async def test_a_stream_dropped_during_a_tool_call_is_retryable(
    fake: FakeVLLM, llm: OpenAICompatibleLLM
) -> None:
    fake.inject("drop", after_chunks=3)
    fake.script(ScriptedReply(tool_calls=(FakeToolCall("f", '{"a": "bcdefgh"}'),)))
    with pytest.raises(LLMError) as info:
        await run(llm, conversation("drop"), tools=TOOLS)
    # Tool-call fragments are never relayed: the user saw nothing yet.
    assert (info.value.kind, info.value.retryable) == ("protocol", True)


@pytest.mark.parametrize(
    ("delta", "message"),
    [
        ({"tool_calls": "broken"}, "not a list"),
        ({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}, "no function name"),
    ],
)
async def test_malformed_tool_calls_are_protocol_errors(
    fake: FakeVLLM, llm: OpenAICompatibleLLM, delta: dict[str, Any], message: str
) -> None:
    fake.script(ScriptedReply(deltas=(delta,), finish_reason="tool_calls"))
    with pytest.raises(LLMError) as info:
        await run(llm, conversation("bad"), tools=TOOLS)
    assert (info.value.kind, info.value.retryable) == ("protocol", True)
    assert "malformed tool call" in info.value.message and message in info.value.message


async def test_broken_arguments_from_the_model_surface_on_parsing(
    fake: FakeVLLM, llm: OpenAICompatibleLLM
) -> None:
    _, done = await run(llm, conversation('CALL get_weather {"city": '), tools=TOOLS)
    (call,) = done.tool_calls
    assert call.arguments == '{"city":'
    with pytest.raises(InvalidToolArguments, match="get_weather"):
        call.parsed_arguments()


@pytest.mark.parametrize(
    ("tools", "choice", "message"),
    [
        (None, "required", "needs tools"),
        (TOOLS, named_tool_choice("not_offered"), "not among the tools"),
        (TOOLS, "sometimes", "not one of"),
        (TOOLS, {"type": "function"}, "is not"),
    ],
)
async def test_impossible_tool_choice_fails_before_any_request(
    fake: FakeVLLM, llm: OpenAICompatibleLLM, tools: Any, choice: Any, message: str
) -> None:
    dev = OfflineDevLLM()
    for client in (llm, dev):
        with pytest.raises(ValueError, match=message):
            await client.complete(
                conversation("x"), session_key="t:s", tools=tools, tool_choice=choice
            )
    assert fake.chat_requests() == []


async def test_temperature_per_request(fake: FakeVLLM, llm: OpenAICompatibleLLM) -> None:
    await run(llm, conversation("cold"), temperature=0.0)
    await run(llm, conversation("default"))
    cold, default = fake.chat_requests()
    assert cold.body["temperature"] == 0.0 and default.body["temperature"] == 0.7


def test_fake_non_streaming_tool_calls(fake: FakeVLLM) -> None:
    with httpx.Client(base_url=fake.base_url) as http:
        body = {"messages": conversation("CALL get_weather {}"), "tools": TOOLS}
        r = http.post("/chat/completions", json=body).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == fake.chat_requests()[-1].tool_calls_sent
    assert choice["message"]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": "{}",
    }


def test_fake_streams_interleaved_tool_call_fragments(fake: FakeVLLM) -> None:
    calls = (FakeToolCall("search_memory", '{"query": "q"}'), FakeToolCall("get_weather", "{}"))
    fake.script(ScriptedReply(tool_calls=calls, fragment_chars=4))
    body = {
        "messages": conversation("x"),
        "tools": TOOLS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with (
        httpx.Client(base_url=fake.base_url) as http,
        http.stream("POST", "/chat/completions", json=body) as r,
    ):
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [orjson.loads(line) for line in lines[:-1]]
    fragments = [
        f for c in chunks for choice in c["choices"] for f in choice["delta"].get("tool_calls", ())
    ]
    # Each call opens with its id, type and name, then its arguments in pieces.
    assert [f["index"] for f in fragments] == [0, 1, 0, 1, 0, 0, 0]
    assert fragments[0]["id"].startswith("chatcmpl-tool-") and fragments[0]["type"] == "function"
    assert fragments[1]["function"] == {"name": "get_weather", "arguments": ""}
    assert [f["function"]["arguments"] for f in fragments[2:]] == [
        '{"qu',
        "{}",
        'ery"',
        ': "q',
        '"}',
    ]
    assert "id" not in fragments[2] and "name" not in fragments[2]["function"]
    finishes = [choice["finish_reason"] for c in chunks for choice in c["choices"]]
    assert finishes[-1] == "tool_calls" and set(finishes[:-1]) == {None}
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] > 0


# --- the development LLM with tools ---------------------------------------------------


async def test_dev_llm_with_tool_choice_required_calls_the_first_tool() -> None:
    dev = OfflineDevLLM()
    messages = conversation("  What did I say about tea?  ")
    tokens, done = await stream_events(dev, messages, tools=TOOLS, tool_choice="required")
    assert tokens == []
    assert done.finish_reason == "tool_calls"
    (call,) = done.tool_calls
    assert call.name == "search_memory"
    assert call.parsed_arguments() == {"query": "What did I say about tea?"}
    tok = default_tokenizer()
    assert done.usage is not None
    assert done.usage.prompt_tokens == tok.count(render_prompt(messages, TOOLS))
    assert done.usage.prompt_tokens > tok.count(render_chat(messages, add_generation_prompt=True))
    assert done.usage.completion_tokens > 0


async def test_dev_llm_named_tool_choice_fills_the_schema() -> None:
    dev = OfflineDevLLM()
    result = await dev.complete(
        conversation("Lyon"),
        session_key="t:s",
        tools=TOOLS,
        tool_choice=named_tool_choice("get_weather"),
    )
    assert result.text == "" and result.finish_reason == "tool_calls"
    (call,) = result.tool_calls
    assert call.name == "get_weather"
    assert call.parsed_arguments() == {
        "city": "Lyon",
        "days": 1,
        "unit": "celsius",
        "options": {"hourly": False},
    }


async def test_dev_llm_answers_in_text_unless_made_to_call() -> None:
    dev = OfflineDevLLM()
    choices: tuple[ToolChoice | None, ...] = (None, "auto", "none")
    for choice in choices:
        result = await dev.complete(
            conversation("hello"),
            session_key="t:s",
            tools=TOOLS,
            tool_choice=choice,
        )
        assert result.tool_calls == () and DEV_MARKER in result.text


async def test_dev_llm_counts_and_answers_a_history_with_tool_calls() -> None:
    dev = OfflineDevLLM()
    call = ToolCall("call_dev_0", "search_memory", '{"query": "tea"}')
    history: list[ChatMessage] = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What do I drink?"},
        assistant_message("", [call]),
        {"role": "tool", "tool_call_id": call.id, "content": "The user likes green tea."},
    ]
    tokens, done = await stream_events(dev, history, tools=TOOLS)
    text = "".join(t.text for t in tokens)
    assert DEV_MARKER in text and "What do I drink?" in text
    assert "\u201cThe user likes green tea.\u201d" in text
    tok = default_tokenizer()
    assert done.usage is not None
    rendered = render_prompt(history, TOOLS)
    assert done.usage.prompt_tokens == tok.count(rendered)
    assert tool_calls_text([call.to_message_dict()]) in rendered
    assert "search_memory" in tool_calls_text([call.to_message_dict()])
    assert rendered.startswith(render_chat(history[:1])[: -len("<|im_end|>\n")])


# --- build_llm ----------------------------------------------------------------------------


async def test_build_llm_picks_the_implementation(fake: FakeVLLM) -> None:
    dev = build_llm(Settings())
    assert isinstance(dev, OfflineDevLLM)
    real = build_llm(Settings(llm_url=f"{fake.base_url}/, http://127.0.0.1:1/v1"))
    try:
        assert isinstance(real, OpenAICompatibleLLM)
        assert real.is_dev is False
        assert real.router.replicas == [fake.base_url, "http://127.0.0.1:1/v1"]
    finally:
        await real.aclose()


# --- the fake server's own protocol --------------------------------------------------------


def test_fake_tokenize_models_health(fake: FakeVLLM) -> None:
    tok = default_tokenizer()
    with httpx.Client(base_url=fake.root_url) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/v1/models").json()["data"][0]["id"] == "fake-model"
        r = http.post("/tokenize", json={"prompt": "Hello world"}).json()
        assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"])
        messages = conversation("hi")
        r = http.post("/tokenize", json={"messages": messages}).json()
        assert r["count"] == tok.count(render_chat(messages, add_generation_prompt=True))
        assert http.post("/tokenize", json={"nothing": 1}).status_code == 400


def test_fake_embeddings_are_deterministic_unit_vectors(fake: FakeVLLM) -> None:
    with httpx.Client(base_url=fake.base_url) as http:
        a = http.post("/embeddings", json={"input": ["alpha", "beta"], "model": "m"}).json()
        b = http.post("/embeddings", json={"input": "alpha"}).json()
    va, vb = a["data"][0]["embedding"], a["data"][1]["embedding"]
    assert len(va) == 384
    assert va == b["data"][0]["embedding"]
    assert va != vb
    assert abs(sum(x * x for x in va) - 1.0) < 1e-6


def test_fake_non_streaming_chat(fake: FakeVLLM) -> None:
    with httpx.Client(base_url=fake.base_url) as http:
        body = {"model": "fake-model", "messages": conversation("plain please")}
        r = http.post("/chat/completions", json=body).json()
        r2 = http.post("/chat/completions", json=body).json()
    assert r["object"] == "chat.completion"
    assert r["choices"][0]["message"]["content"].startswith("Re: plain please")
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # Same prompt again: all but the block holding the last prompt token.
    p = r2["usage"]["prompt_tokens"]
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == (p - 1) // BLOCK * BLOCK


async def test_fake_metrics_use_vllm_names(fake: FakeVLLM, llm: OpenAICompatibleLLM) -> None:
    messages = conversation("metrics")
    reply, _ = await run(llm, messages)
    _, done = await run(llm, [*messages, {"role": "assistant", "content": reply}])
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{fake.root_url}/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    queries = families["vllm:prefix_cache_queries"]
    hits = families["vllm:prefix_cache_hits"]
    assert queries.type == "counter" and hits.type == "counter"
    samples = {s.name: s.value for f in (queries, hits) for s in f.samples}
    recs: list[RecordedRequest] = fake.chat_requests()
    assert samples["vllm:prefix_cache_queries_total"] == sum(r.prompt_tokens for r in recs)
    assert done.usage is not None
    assert samples["vllm:prefix_cache_hits_total"] == done.usage.cached_tokens
    ttft = families["vllm:time_to_first_token_seconds"]
    count = next(s.value for s in ttft.samples if s.name.endswith("_count"))
    assert count == 2


def test_fake_runs_as_a_subprocess() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tests.servers.fake_vllm", "--port", str(port),
           "--first-token-delay-ms", "5", "--token-interval-ms", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "fake vLLM subprocess did not start"
            time.sleep(0.05)
        body = {"messages": conversation("sub"), "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data:")]
        assert lines[-1] == "data: [DONE]"
        assert len(lines) > 5
    finally:
        proc.terminate()
        proc.wait(10)


# --- the stream's bytes as the network cuts them ---------------------------------------


async def test_a_stream_cut_anywhere_reads_the_same() -> None:
    """A real HTTP server on 127.0.0.1 writes an SSE reply in pieces that cut
    lines, events and a UTF-8 character apart, with CRLF line ends, a comment,
    and several events in one write: the client reads the same tokens, usage
    and finish as from whole lines."""
    tokens = ["Gr", "üß", " Gott", " — ", "été", "!"]
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
    events += [{"choices": [{"index": 0, "delta": {"content": t}}]} for t in tokens]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 6}})
    body = b": keep-alive comment\r\n\r\n"
    body += b"".join(b"data: " + orjson.dumps(e) + b"\r\n\r\n" for e in events)
    body += b"data: [DONE]\r\n\r\n"
    # Cut points: inside "data:", inside a JSON string, between the two bytes
    # of "ü", between the CR and the LF; the rest in 7-byte pieces.
    cuts = sorted({3, body.index("ü".encode()) + 1, body.index(b"\r\n") + 1,
                   *range(40, len(body), 7)})  # fmt: skip
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    assert "ü".encode() not in pieces and len(pieces) > 20

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\r\n", b""):
            pass  # the request's headers; the body (its Content-Length) is not needed
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")  # fmt: skip
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.001)  # a write of its own on the wire
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = OpenAICompatibleLLM(
        [f"http://127.0.0.1:{port}/v1"], model="m", first_token_timeout_s=5.0,
        read_timeout_s=5.0, connect_timeout_s=2.0,
    )  # fmt: skip
    try:
        got = [ev async for ev in client.stream_chat(conversation("hi"), session_key="t:s")]
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
    assert [e.text for e in got if isinstance(e, LLMToken)] == tokens
    done = got[-1]
    assert isinstance(done, LLMDone) and done.finish_reason == "stop"
    assert done.usage is not None and done.usage.completion_tokens == 6
