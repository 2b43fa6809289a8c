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
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from infra.chat_template import render_chat
from infra.dev_llm import DEV_MARKER, OfflineDevLLM, extractive_summary
from infra.llm import (
    SUMMARIZE_SYSTEM_PROMPT,
    LLMDone,
    LLMError,
    LLMToken,
    OpenAICompatibleLLM,
    build_llm,
    collect,
)
from infra.settings import Settings
from infra.tokenizer import default_tokenizer
from tests.servers.fake_vllm import FakeVLLM, RecordedRequest

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


def conversation(user: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are a careful assistant. " * 8},
        {"role": "user", "content": user},
    ]


async def run(
    llm: OpenAICompatibleLLM, messages: list[dict[str, str]], session: str = "t:s"
) -> tuple[str, LLMDone]:
    text, done = await collect(llm.stream_chat(messages, session_key=session))
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
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "Ok?"}]
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
    changed = [{"role": "system", "content": "Now: 12:00. " + messages[0]["content"]}, messages[1]]
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
    text, usage = await llm.complete(conversation("summarise"), session_key="t:s")
    assert text.startswith("Re: summarise")
    assert usage is not None and usage.completion_tokens == default_tokenizer().count(text)


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
    two = [*one, {"role": "assistant", "content": text}, {"role": "user", "content": "And Nice?"}]
    text2, _ = await dev.complete(two, session_key="t:s")
    assert "And Nice?" in text2 and "user message 2 " in text2
    again, _ = await dev.complete(one, session_key="t:s")
    assert again == text  # deterministic
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
    messages = [
        {"role": "system", "content": SUMMARIZE_SYSTEM_PROMPT},
        {"role": "user", "content": batch},
    ]
    summary, usage = await dev.complete(messages, session_key="t:s")
    assert summary == "user: My name is Ada. user: I am allergic to peanuts!"
    assert usage is not None and usage.completion_tokens > 0
    assert extractive_summary([{"role": "user", "content": "x. " * 2000}]).count("x.") == 1
    assert len(extractive_summary([{"role": "user", "content": "y y.\n" * 2000}])) <= 1500


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
