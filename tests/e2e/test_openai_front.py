"""The OpenAI-compatible API end to end: the official ``openai`` SDK and LangChain's
``ChatOpenAI`` against the real app (a real uvicorn server, real Redis, Milvus
Lite) in front of a fake OpenAI-compatible LLM that reports ``cached_tokens``
from its prefix-cache simulator, and against a real ``tiermem serve``.

With a session (``X-Session-ID``) each request is one turn that tiermem stores;
without one the request goes to the LLM as it is and nothing is stored.
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
import orjson
import pytest
import redis.asyncio as aioredis
import yaml
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

from tests.harness import AppServer, ServeProcess, make_settings, post_turn
from tests.security import write_keys
from tests.servers.fake_vllm import FakeVLLM

pytestmark = pytest.mark.timeout(240)

KEY = "oa-" + uuid.uuid4().hex
TENANT = "oa" + uuid.uuid4().hex[:8]
# A tenant of its own for the stateless proxy, so "nothing stored" is checked on
# a key space no other test writes.
PROXY_KEY = "px-" + uuid.uuid4().hex
PROXY_TENANT = "px" + uuid.uuid4().hex[:8]
SUPPORT = "You are the support agent of a bookshop."
AGENTS = {
    "agents": [
        {"name": "support", "description": "Orders, deliveries and returns of books.",
         "system_prompt": SUPPORT},
        {"name": "chef", "description": "Cooking and recipes.",
         "system_prompt": "You are a chef.", "max_tokens": 6},
    ],
    "default": "support",
}  # fmt: skip
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def fake_llm() -> Iterator[FakeVLLM]:
    llm = FakeVLLM(reply_tokens=24).start()
    yield llm
    llm.stop()


@pytest.fixture(scope="module")
async def app(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, fake_llm: FakeVLLM
) -> AsyncIterator[AppServer]:
    root = tmp_path_factory.mktemp("openai-front")
    keys = root / "keys.json"
    write_keys(keys, [(KEY, TENANT), (PROXY_KEY, PROXY_TENANT)])
    agents = root / "agents.yaml"
    agents.write_text(yaml.safe_dump(AGENTS))
    settings = make_settings(root, redis_url, llm_url=fake_llm.base_url, auth="on",
                             api_keys_file=keys, agents_file=agents, archive_threshold=100,
                             max_message_chars=2000)  # fmt: skip
    async with AppServer(settings) as srv:
        yield srv


def client(app: AppServer | ServeProcess, key: str = KEY, **options: Any) -> Any:
    """The official SDK's async client on the app. Typed ``Any``: these tests send
    what clients send (and what they should not), not the SDK's TypedDicts."""
    return openai.AsyncOpenAI(base_url=app.url + "/v1", api_key=key, **options)


def error_of(exc: pytest.ExceptionInfo[openai.APIError]) -> dict[str, Any]:
    """The ``error`` object of an error response, as the SDK read it."""
    body = exc.value.body
    assert isinstance(body, dict)
    return body


def sid() -> str:
    return "oa-" + uuid.uuid4().hex[:10]


def session_headers(session: str, user: str = "alice", **extra: str) -> dict[str, str]:
    return {"X-Session-ID": session, "X-User-ID": user, **extra}


async def get_session(app: AppServer, session: str, key: str = KEY) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.get(f"{app.url}/v1/sessions/{session}",
                        headers={"Authorization": f"Bearer {key}"})  # fmt: skip
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def stored_messages(session: dict[str, Any]) -> list[tuple[str, str]]:
    return [(t["user"], t["assistant"]) for t in session["unarchived_turns"]]


async def raw_post(
    app: AppServer, body: Any, headers: dict[str, str] | None = None, key: str | None = KEY
) -> httpx.Response:
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    async with httpx.AsyncClient(timeout=60) as c:
        return await c.post(
            f"{app.url}/v1/chat/completions", content=content,
            headers={"Content-Type": "application/json", **auth, **(headers or {})},
        )  # fmt: skip


async def raw_stream(
    app: AppServer, body: dict[str, Any], headers: dict[str, str]
) -> tuple[httpx.Response, list[str]]:
    """A streamed completion's ``data:`` payloads, exactly as sent."""
    async with (
        httpx.AsyncClient(timeout=60) as c,
        c.stream(
            "POST",
            f"{app.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}", **headers},
        ) as r,  # fmt: skip
    ):
        lines = [line async for line in r.aiter_lines()]
    return r, [line[6:] for line in lines if line.startswith("data: ")]


# --- models -----------------------------------------------------------------------------


async def test_models_are_the_agent_profiles(app: AppServer) -> None:
    async with client(app) as oa:
        models = await oa.models.list()
        assert [m.id for m in models.data] == ["support", "chef"]
        assert all(m.object == "model" and m.owned_by == "tiermem" for m in models.data)
        assert all(isinstance(m.created, int) and m.created > 0 for m in models.data)
        assert (await oa.models.retrieve("chef")).id == "chef"
        with pytest.raises(openai.NotFoundError) as info:
            await oa.models.retrieve("gpt-4o")
    assert info.value.code == "model_not_found"


# --- a session: only the new message ------------------------------------------------------


async def test_the_sdk_holds_a_session_streaming_and_not(
    app: AppServer, fake_llm: FakeVLLM
) -> None:
    session = sid()
    headers = session_headers(session)
    async with client(app) as oa:
        first = await oa.chat.completions.create(
            model="support", messages=[{"role": "user", "content": "Hello, I am Alice."}],
            extra_headers=headers,
        )  # fmt: skip
        assert first.object == "chat.completion"
        assert first.model == "support"
        assert first.choices[0].finish_reason == "stop"
        assert first.choices[0].message.role == "assistant"
        assert first.choices[0].message.content.startswith("Re: Hello, I am Alice.")
        usage = first.usage
        assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert usage.prompt_tokens_details is not None
        assert isinstance(usage.prompt_tokens_details.cached_tokens, int)
        extension = first.model_extra["tiermem"]
        assert extension["session_id"] == session and extension["turn"] == 1

        stream = await oa.chat.completions.create(
            model="support", messages=[{"role": "user", "content": "What can you do for me?"}],
            stream=True, stream_options={"include_usage": True}, extra_headers=headers,
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert len({c.id for c in chunks}) == 1
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.startswith("Re: What can you do for me?")
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        # The second turn's prompt starts with the first's: the LLM served it
        # from its prefix cache, and the client sees the count.
        details = chunks[-1].usage.prompt_tokens_details
        assert details is not None and details.cached_tokens
        assert details.cached_tokens == fake_llm.chat_requests()[-1].cached_tokens

        third = await oa.chat.completions.create(
            model="support", messages=[{"role": "user", "content": "Thanks, bye."}],
            extra_headers=headers,
        )  # fmt: skip
        assert third.model_extra["tiermem"]["turn"] == 3
    stored = await get_session(app, session)
    assert stored["turn_count"] == 3 and stored["user_id"] == "alice"
    assert [u for u, _ in stored_messages(stored)] == [
        "Hello, I am Alice.", "What can you do for me?", "Thanks, bye."
    ]  # fmt: skip
    assert stored_messages(stored)[1][1] == text
    # Each turn's prompt held the earlier turns: tiermem kept the history.
    last_prompt = fake_llm.chat_requests()[-1].messages
    assert [m["content"] for m in last_prompt if m["role"] == "user"][-3:] == [
        "Hello, I am Alice.", "What can you do for me?", "Thanks, bye."
    ]  # fmt: skip
    assert last_prompt[0]["role"] == "system" and SUPPORT in last_prompt[0]["content"]


async def test_the_stream_is_openai_s_wire_format(app: AppServer) -> None:
    session = sid()
    body = {"model": "support", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Tell me about delivery times."}],
            "top_p": 0.5, "seed": 7}  # fmt: skip
    r, payloads = await raw_stream(app, body, session_headers(session))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-session-id"] == session and r.headers["x-turn-id"]
    assert r.headers["x-tiermem-ignored"] == "seed, top_p"
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["id"] == f"chatcmpl-{r.headers['x-turn-id']}"
    contents = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
    assert contents and all(contents)
    final, usage = chunks[-2], chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop" and final["choices"][0]["delta"] == {}
    assert final["tiermem"]["turn_id"] == r.headers["x-turn-id"]
    assert final["tiermem"]["status"] == "complete" and final["tiermem"]["replayed"] is False
    assert usage["choices"] == [] and set(usage["usage"]) == {
        "prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"
    }  # fmt: skip
    # Without include_usage no usage chunk.
    body2 = {**body, "stream_options": None, "messages": [{"role": "user", "content": "More?"}]}
    _, payloads2 = await raw_stream(app, body2, session_headers(session))
    assert payloads2[-1] == "[DONE]"
    assert all("usage" not in json.loads(p) for p in payloads2[:-1])


# --- a session: the whole history every time ----------------------------------------------


async def test_a_client_resending_the_whole_history_stores_each_turn_once(
    app: AppServer, fake_llm: FakeVLLM
) -> None:
    session = sid()
    history: list[dict[str, Any]] = [{"role": "system", "content": "You are a pirate."}]
    replies = []
    async with client(app) as oa:
        for n, text in enumerate(["I want to return a book.", "It arrived torn.", "Order 42."]):
            history.append({"role": "user", "content": text})
            raw = await oa.chat.completions.with_raw_response.create(
                model="support", messages=history, extra_headers=session_headers(session),
                stream=n == 1,  # the second turn streams
            )  # fmt: skip
            assert raw.headers["x-tiermem-ignored"] == "messages.system"
            parsed = raw.parse()
            if n == 1:
                reply = "".join(
                    [c.choices[0].delta.content or "" async for c in parsed if c.choices]
                )
            else:
                reply = parsed.choices[0].message.content
            replies.append(reply)
            history.append({"role": "assistant", "content": reply})
            # The client's system message never reaches the LLM: the agent's does.
            prompt = fake_llm.chat_requests()[-1].messages
            assert "pirate" not in json.dumps(prompt) and SUPPORT in prompt[0]["content"]
    stored = await get_session(app, session)
    assert stored["turn_count"] == 3
    assert stored_messages(stored) == [
        (history[1]["content"], replies[0]), (history[3]["content"], replies[1]),
        (history[5]["content"], replies[2]),
    ]  # fmt: skip
    # Each turn's prompt holds each earlier message once.
    prompt = fake_llm.chat_requests()[-1].messages
    assert [m["content"] for m in prompt[1:]] == [m["content"] for m in history[1:-1]]


async def test_a_trimmed_window_of_the_history_is_recognised(app: AppServer) -> None:
    session = sid()
    history: list[dict[str, Any]] = []
    async with client(app) as oa:
        for text in ["one", "two", "three", "four"]:
            history.append({"role": "user", "content": text})
            # Only the last three messages, as a client with a small window sends them;
            # whitespace the client changed does not matter.
            window = [{**m, "content": " " + str(m["content"]) + "\n"} for m in history[-3:]]
            window[-1] = history[-1]
            r = await oa.chat.completions.create(
                model="support", messages=window, extra_headers=session_headers(session)
            )
            history.append({"role": "assistant", "content": r.choices[0].message.content})
    assert (await get_session(app, session))["turn_count"] == 4


async def test_an_edited_or_foreign_history_is_a_conflict(
    app: AppServer, fake_llm: FakeVLLM
) -> None:
    session = sid()
    headers = session_headers(session)
    async with client(app) as oa:
        first = await oa.chat.completions.create(
            model="support", messages=[{"role": "user", "content": "My order is late."}],
            extra_headers=headers,
        )  # fmt: skip
        answer = first.choices[0].message.content
        calls = len(fake_llm.chat_requests())
        edited = [
            {"role": "user", "content": "My order is late."},
            {"role": "assistant", "content": answer + " And I promise a refund."},
            {"role": "user", "content": "So, the refund?"},
        ]
        with pytest.raises(openai.ConflictError) as info:
            await oa.chat.completions.create(model="support", messages=edited,
                                             extra_headers=headers)  # fmt: skip
        error = error_of(info)
        assert info.value.code == "history_conflict"
        assert error["type"] == "invalid_request_error" and error["param"] == "messages"
        assert "messages[1] (assistant)" in error["message"] and "turn 1" in error["message"]
        assert info.value.response.headers["x-should-retry"] == "false"
        # More history than the session ever had (here: a new session).
        with pytest.raises(openai.ConflictError) as info:
            await oa.chat.completions.create(
                model="support", messages=edited, extra_headers=session_headers(sid())
            )
        assert "before the session's first turn" in error_of(info)["message"]
    # Refused before anything ran: the SDK did not retry (x-should-retry), the
    # LLM was not called, the session is as it was.
    assert len(fake_llm.chat_requests()) == calls
    assert (await get_session(app, session))["turn_count"] == 1


# --- retries ------------------------------------------------------------------------------


async def test_retries_are_replayed_not_run_twice(app: AppServer, fake_llm: FakeVLLM) -> None:
    session = sid()
    headers = session_headers(session)
    async with client(app) as oa:
        turn_id = "my-turn-" + uuid.uuid4().hex[:8]
        msg = [{"role": "user", "content": "Where is my parcel?"}]
        kwargs: dict[str, Any] = {"model": "support", "messages": msg}
        first = await oa.chat.completions.create(
            **kwargs, extra_headers={**headers, "X-Turn-ID": turn_id}
        )
        calls = len(fake_llm.chat_requests())
        again = await oa.chat.completions.create(
            **kwargs, extra_headers={**headers, "X-Turn-ID": turn_id}
        )
        assert again.choices[0].message.content == first.choices[0].message.content
        assert again.model_extra["tiermem"]["replayed"] is True
        assert again.id == first.id == f"chatcmpl-{turn_id}"
        # metadata.turn_id is the same id.
        meta = await oa.chat.completions.create(**kwargs, extra_headers=headers,
                                                metadata={"turn_id": turn_id})  # fmt: skip
        assert meta.model_extra["tiermem"]["replayed"] is True
        # A client that lost the reply and resends its history without it: the
        # same turn again, replayed (no X-Turn-ID needed).
        second = await oa.chat.completions.create(
            model="support", extra_headers=headers,
            messages=[*msg, {"role": "assistant", "content": first.choices[0].message.content},
                      {"role": "user", "content": "And when does it arrive?"}],
        )  # fmt: skip
        calls = len(fake_llm.chat_requests())
        lost = await oa.chat.completions.create(
            model="support", extra_headers=headers,
            messages=[*msg, {"role": "assistant", "content": first.choices[0].message.content},
                      {"role": "user", "content": "And when does it arrive?"}],
            stream=True,
        )  # fmt: skip
        # (That is the same history as the request before: the session now holds
        # its reply too, so this one is that turn asked again.)
        text = "".join([c.choices[0].delta.content or "" async for c in lost if c.choices])
        assert text == second.choices[0].message.content
    assert len(fake_llm.chat_requests()) == calls
    assert (await get_session(app, session))["turn_count"] == 2


async def test_the_sdk_retry_of_a_failed_turn_runs_it_again_in_place(
    app: AppServer, fake_llm: FakeVLLM
) -> None:
    session = sid()
    fake_llm.inject("http_500", times=1)
    async with client(app, max_retries=2) as oa:
        r = await oa.chat.completions.with_raw_response.create(
            model="support", messages=[{"role": "user", "content": "Is my refund done?"}],
            extra_headers=session_headers(session),
        )  # fmt: skip
    # The first attempt failed (502, stored failed, retryable); the SDK retried it
    # and the retry completed the same turn.
    assert r.retries_taken == 1
    assert r.parse().choices[0].message.content.startswith("Re: Is my refund done?")
    stored = await get_session(app, session)
    assert stored["turn_count"] == 1
    assert [t["status"] for t in stored["unarchived_turns"]] == ["complete"]


# --- without a session: a stateless proxy -------------------------------------------------


async def proxy_keys(redis_url: str) -> list[bytes]:
    r = aioredis.from_url(redis_url)
    try:
        return [k async for k in r.scan_iter(match=f"tm:{{{PROXY_TENANT}:*")]
    finally:
        await r.aclose()


async def test_without_a_session_the_request_goes_to_the_llm_as_it_is(
    app: AppServer, fake_llm: FakeVLLM, redis_url: str
) -> None:
    messages = [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": 'CALL get_weather {"city": "Oslo"}'},
    ]
    async with client(app, key=PROXY_KEY) as oa:
        r = await oa.chat.completions.create(
            model="support", messages=messages, tools=[WEATHER_TOOL], temperature=0.25,
            max_tokens=50,
        )  # fmt: skip
        request = fake_llm.chat_requests()[-1]
        assert request.messages == messages  # the client's messages, untouched
        assert request.body["tools"] == [WEATHER_TOOL]
        assert request.body["temperature"] == 0.25 and request.body["max_tokens"] == 50
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Oslo"}
        assert r.usage is not None and r.usage.prompt_tokens == request.prompt_tokens
        # The client runs its tool and sends the result: text comes back, streamed.
        follow = [
            *messages,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
        ]
        stream = await oa.chat.completions.create(
            model="support", messages=follow, tools=[WEATHER_TOOL], stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [c async for c in stream]
        assert fake_llm.chat_requests()[-1].messages[-1]["content"] == "Sunny, 21 C"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        # Tool calls stream as OpenAI's deltas too.
        stream = await oa.chat.completions.create(
            model="support", messages=messages, tools=[WEATHER_TOOL], stream=True
        )
        deltas = [c.choices[0].delta for c in [c async for c in stream] if c.choices]
        calls = [t for d in deltas for t in d.tool_calls or ()]
        assert [(t.index, t.function.name) for t in calls] == [(0, "get_weather")]
        # The LLM's own finish_reason comes through: here its max_tokens cut the reply.
        cut = await oa.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "Tell me a long story."}],
            max_completion_tokens=3,
        )  # fmt: skip
        assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens <= 3
    assert await proxy_keys(redis_url) == []  # nothing stored


# --- errors -------------------------------------------------------------------------------


async def test_errors_come_in_openai_s_shape(app: AppServer, fake_llm: FakeVLLM) -> None:
    session = sid()
    calls = len(fake_llm.chat_requests())
    user = [{"role": "user", "content": "hi"}]
    async with client(app, max_retries=0) as oa:
        with pytest.raises(openai.BadRequestError) as bad:
            await oa.chat.completions.create(model="support", messages=[])
        assert error_of(bad)["type"] == "invalid_request_error"
        assert error_of(bad)["param"] == "messages"
        with pytest.raises(openai.BadRequestError) as bad:
            await oa.chat.completions.create(
                model="support", messages=[{"role": "wizard", "content": "x"}]
            )
        assert error_of(bad)["param"] == "messages[0].role"
        with pytest.raises(openai.NotFoundError) as missing:
            await oa.chat.completions.create(model="gpt-4o", messages=user)
        assert missing.value.code == "model_not_found" and error_of(missing)["param"] == "model"
        with pytest.raises(openai.BadRequestError) as bad:
            await oa.chat.completions.create(
                model="support", messages=user, extra_headers={"X-Session-ID": session}
            )
        assert bad.value.code == "user_required" and error_of(bad)["param"] == "user"
        cases: list[tuple[dict[str, Any], str, str]] = [
            ({"messages": [*user, {"role": "assistant", "content": "yo"}]},
             "last_message_not_user", "messages[1].role"),
            ({"messages": user, "tools": [WEATHER_TOOL]}, "tools_not_supported", "tools"),
            ({"messages": [{"role": "user", "content": "x" * 2001}]}, "message_too_long",
             "messages[0].content"),
            ({"messages": [{"role": "user", "content": "  "}]}, "empty_message",
             "messages[0].content"),
            ({"messages": user, "user": "bad user!"}, "invalid_id", "user"),
        ]  # fmt: skip
        for extra, code, param in cases:
            body = {"model": "support", "user": "alice", **extra}
            with pytest.raises(openai.BadRequestError) as bad:
                await oa.chat.completions.create(**body, extra_headers={"X-Session-ID": session})
            assert (bad.value.code, error_of(bad)["param"]) == (code, param)
        with pytest.raises(openai.BadRequestError) as bad:  # stateless: per message too
            await oa.chat.completions.create(
                model="support", messages=[{"role": "user", "content": "x" * 2001}]
            )
        assert bad.value.code == "message_too_long"
        with pytest.raises(openai.BadRequestError) as bad:
            await oa.chat.completions.create(model="support", messages=user, n=2)
        assert error_of(bad)["param"] == "n"
        with pytest.raises(openai.BadRequestError) as bad:
            await oa.chat.completions.create(model="support", messages=user,
                                             tool_choice="required")  # fmt: skip
        assert bad.value.code == "invalid_tool_choice"
    async with client(app, key="not-a-key", max_retries=0) as oa:
        with pytest.raises(openai.AuthenticationError) as denied:
            await oa.chat.completions.create(model="support", messages=user)
        assert error_of(denied)["type"] == "authentication_error"
        assert denied.value.code == "unauthorized"
        with pytest.raises(openai.AuthenticationError):
            await oa.models.list()
    r = await raw_post(app, b'{"model": "support", "messages": [', key=KEY)
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "the body is not valid JSON",
                                  "type": "invalid_request_error", "param": None,
                                  "code": "invalid_json"}}  # fmt: skip
    r = await raw_post(app, [1, 2])
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = await raw_post(app, {"model": "support", "messages": user}, key=None)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    # Nothing of it reached the LLM; the native route keeps tiermem's own shape.
    assert len(fake_llm.chat_requests()) == calls
    async with httpx.AsyncClient(timeout=30) as c:
        native = await c.post(f"{app.url}/v1/sessions/{session}/turns", json={"user_id": "u"},
                              headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert native.status_code == 422 and set(native.json()["error"]) == {"code", "message"}


async def test_a_draining_pod_and_a_failing_llm_answer_with_retryable_errors(
    app: AppServer, fake_llm: FakeVLLM
) -> None:
    user = [{"role": "user", "content": "hello there"}]
    async with client(app, max_retries=0) as oa:
        app.services.draining = True
        try:
            with pytest.raises(openai.InternalServerError) as down:
                await oa.chat.completions.create(model="support", messages=user)
        finally:
            app.services.draining = False
        assert down.value.status_code == 503 and down.value.code == "draining"
        assert down.value.response.headers["retry-after"] == "2"
        # The LLM fails before any text: with a session the turn is stored failed
        # and the answer is a 502 the SDK may retry; without one, the same.
        for headers in (session_headers(sid()), {}):
            fake_llm.inject("http_500", times=1)
            with pytest.raises(openai.InternalServerError) as failed:
                await oa.chat.completions.create(model="support", messages=user,
                                                 stream=True, extra_headers=headers)  # fmt: skip
            assert failed.value.status_code == 502 and failed.value.code == "llm_http"
            assert failed.value.response.headers["x-should-retry"] == "true"
        # After some text, the stream ends with an error chunk, which the SDK raises.
        fake_llm.inject("drop", times=1, after_chunks=2)
        session = sid()
        stream = await oa.chat.completions.create(
            model="support", messages=user, stream=True, extra_headers=session_headers(session)
        )
        got = []
        with pytest.raises(openai.APIError) as cut:
            async for chunk in stream:
                got.append(chunk)
        assert cut.value.code == "llm_protocol" and got
    stored = await get_session(app, session)
    assert [t["status"] for t in stored["unarchived_turns"]] == ["interrupted"]


# --- LangChain ----------------------------------------------------------------------------


async def test_langchain_chat_openai_holds_a_session(app: AppServer, fake_llm: FakeVLLM) -> None:
    session = sid()
    chat = ChatOpenAI(
        base_url=app.url + "/v1", api_key=KEY, model="support",  # type: ignore[arg-type]
        default_headers=session_headers(session, user="bob"), max_retries=0,
    )  # fmt: skip
    history = [SystemMessage("You are helpful."), HumanMessage("I ordered three books.")]
    first = await chat.ainvoke(history)
    assert isinstance(first, AIMessage)
    assert str(first.content).startswith("Re: I ordered three books.")
    assert first.usage_metadata is not None and first.usage_metadata["input_tokens"] > 0
    history += [first, HumanMessage("One is missing.")]
    pieces = [chunk async for chunk in chat.astream(history)]
    streamed = "".join(str(p.content) for p in pieces)
    assert streamed.startswith("Re: One is missing.")
    history += [AIMessage(streamed), HumanMessage("Can you check?")]
    third = await asyncio.to_thread(chat.invoke, history)  # the sync client too
    assert str(third.content).startswith("Re: Can you check?")
    stored = await get_session(app, session)
    assert stored["turn_count"] == 3 and stored["user_id"] == "bob"
    assert [u for u, _ in stored_messages(stored)] == [
        "I ordered three books.", "One is missing.", "Can you check?"
    ]  # fmt: skip


# --- against a real `tiermem serve` --------------------------------------------------------


async def test_the_sdk_against_a_real_tiermem_serve(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM
) -> None:
    keys = tmp_path / "keys.json"
    write_keys(keys, [(KEY, TENANT)])
    serve = ServeProcess(
        {"TIERMEM_LLM_URL": fake_llm.base_url, "TIERMEM_REDIS_URL": redis_url,
         "TIERMEM_DATA_DIR": str(tmp_path / "data"), "TIERMEM_EMBEDDINGS": "hash",
         "TIERMEM_MILVUS_URI": str(tmp_path / "milvus.db"), "TIERMEM_API_KEYS_FILE": str(keys),
         "TIERMEM_RATE_TURNS_PER_MINUTE": "3", "TIERMEM_LOG_FORMAT": "text"},
        tmp_path / "serve.log",
    )  # fmt: skip
    await asyncio.to_thread(serve.start)
    try:
        session = sid()
        async with client(serve, max_retries=0) as oa:
            assert [m.id for m in (await oa.models.list()).data] == ["default"]
            history: list[dict[str, Any]] = []
            for n, text in enumerate(["Hi, this is Carol.", "Please note my address."]):
                history.append({"role": "user", "content": text})
                stream = await oa.chat.completions.create(
                    model="default", messages=history, stream=True,
                    stream_options={"include_usage": True},
                    extra_headers=session_headers(session, user="carol"),
                )  # fmt: skip
                chunks = [c async for c in stream]
                reply = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                assert reply.startswith(f"Re: {text}")
                usage = chunks[-1].usage
                assert usage is not None and usage.completion_tokens > 0
                if n == 1:
                    assert usage.prompt_tokens_details.cached_tokens
                history.append({"role": "assistant", "content": reply})
            stateless = await oa.chat.completions.create(
                model="default", messages=[{"role": "user", "content": "One-off question."}]
            )
            assert stateless.choices[0].message.content.startswith("Re: One-off question.")
            # The tenant's limit (3 a minute) counts stateless requests too.
            with pytest.raises(openai.RateLimitError) as limited:
                await oa.chat.completions.create(
                    model="default", messages=[{"role": "user", "content": "Another."}]
                )
            assert limited.value.code == "rate_limited"
            assert int(limited.value.response.headers["retry-after"]) >= 1
        async with httpx.AsyncClient(timeout=30) as c:
            r = await c.get(f"{serve.url}/v1/sessions/{session}",
                            headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.json()["turn_count"] == 2
    finally:
        assert await asyncio.to_thread(serve.terminate) == 0


# --- the native route is unchanged beside it ------------------------------------------------


async def test_a_session_started_natively_continues_over_the_openai_api(app: AppServer) -> None:
    session = sid()
    async with httpx.AsyncClient(timeout=60) as c:
        native = await post_turn(c, app.url, session, "Native hello.", user="dora",
                                 headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert native.done["status"] == "complete"
    async with client(app) as oa:
        r = await oa.chat.completions.create(
            model="chef",  # the session's agent stays the one of its first turn
            messages=[{"role": "user", "content": "Native hello."},
                      {"role": "assistant", "content": native.text},
                      {"role": "user", "content": "Now over OpenAI."}],
            extra_headers=session_headers(session, user="dora"),
        )  # fmt: skip
        assert r.model == "support"
        # "auto" lets tiermem pick the agent of a new session (by the first message).
        auto = await oa.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "How long to boil an egg?"}],
            extra_headers=session_headers(sid()),
        )  # fmt: skip
        assert auto.model in ("support", "chef")
        with pytest.raises(openai.ConflictError) as other:  # another user's session
            await oa.chat.completions.create(
                model="support",
                messages=[{"role": "user", "content": "mine?"}],
                extra_headers=session_headers(session, user="eve"),
            )
        assert other.value.code == "session_user_mismatch"
    assert (await get_session(app, session))["turn_count"] == 2
