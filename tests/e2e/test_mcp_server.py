"""tiermem's MCP server at /mcp, end to end: the real app under uvicorn on
127.0.0.1 (embedded-free: the suite's Redis, Milvus Lite, the development LLM),
reached with the official SDK's client (2026-07-28, stateless, and the legacy
initialize handshake) and with raw HTTP, as an older client would.

- tools/list, search_memories after turns were archived (the same hits as the
  REST search), get_session (the same body as GET /v1/sessions/{id});
- 401 in the app's error shape for no key, a wrong key and a revoked one, 403 for
  a foreign Origin, before the MCP layer; the tenant comes from the key only;
- bad arguments are isError results with a clear message, decided before Redis
  or Milvus are asked; a backing service that is down is an isError result that
  says so (retryable), and the server goes on answering.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult

from tests.harness import AppServer, l2_round_trips, make_settings, post_turn
from tests.security import write_keys
from tests.servers.redis_server import RedisServer, free_port

THRESHOLD = 2
DEADLINE_S = 90.0
JSON_AND_SSE = "application/json, text/event-stream"


@dataclass
class Tenant:
    name: str
    key: str
    user: str
    session: str
    secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@dataclass
class World:
    srv: AppServer
    a: Tenant
    b: Tenant
    revoked_key: str

    @property
    def mcp(self) -> str:
        return f"{self.srv.url}/mcp"


async def _until(what: str, check: Any, deadline_s: float = DEADLINE_S) -> Any:
    """Polls ``check()`` until it returns something truthy, or fails saying ``what``."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> AsyncIterator[World]:
    root = tmp_path_factory.mktemp("mcp")
    run = uuid.uuid4().hex[:6]
    a = Tenant(
        f"ta{run}",
        "key-a-" + uuid.uuid4().hex,
        "alice",
        f"sa-{run}",
        f"ALPHA{uuid.uuid4().hex[:8]}",
    )
    b = Tenant(
        f"tb{run}", "key-b-" + uuid.uuid4().hex, "bob", f"sb-{run}", f"BRAVO{uuid.uuid4().hex[:8]}"
    )
    revoked = "key-r-" + uuid.uuid4().hex
    write_keys(root / "keys.json", [(a.key, a.name), (b.key, b.name), (revoked, a.name, True)])
    settings = make_settings(
        root, redis_url, auth="on", api_keys_file=root / "keys.json", archive_threshold=THRESHOLD
    )
    async with AppServer(settings) as srv, httpx.AsyncClient(timeout=60) as c:
        for t in (a, b):
            for i in range(THRESHOLD + 1):
                msg = f"Remember: my locker code is {t.secret}-{i}. I keep a sailboat in Brest."
                r = await post_turn(c, srv.url, t.session, msg, user=t.user, headers=t.headers)
                assert r.status_code == 200 and r.done["status"] == "complete", r.body

        for t in (a, b):

            async def archived(t: Tenant = t) -> bool:
                meta = await srv.services.l2.read_meta(t.name, t.session)
                return meta is not None and meta.archived_upto >= THRESHOLD

            await _until(f"{t.name}'s first batch archived", archived)

            async def searchable(t: Tenant = t) -> bool:
                r = await c.get(
                    f"{srv.url}/v1/users/{t.user}/memories",
                    params={"query": t.secret, "k": 5},
                    headers=t.headers,
                )
                return r.status_code == 200 and bool(r.json()["memories"])

            await _until(f"{t.name}'s batch searchable", searchable)
        yield World(srv, a, b, revoked)


@asynccontextmanager
async def mcp_client(
    url: str, headers: dict[str, str] | None = None, mode: str = "auto"
) -> AsyncIterator[Client]:
    """The SDK's client over Streamable HTTP, with these headers on every request."""
    async with (
        httpx2.AsyncClient(headers=headers or {}, timeout=60) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode) as client,
    ):
        yield client


def _error(result: CallToolResult) -> dict[str, Any]:
    assert result.is_error, result
    assert result.structured_content is not None
    return result.structured_content


def _parse_reply(r: httpx.Response) -> dict[str, Any]:
    """One JSON-RPC reply, as JSON or as the first SSE ``message`` event."""
    assert r.status_code == 200, (r.status_code, r.text)
    ctype = r.headers["content-type"]
    if ctype.startswith("application/json"):
        body: dict[str, Any] = r.json()
        return body
    assert ctype.startswith("text/event-stream"), ctype
    for block in r.text.replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].strip() for line in block.split("\n") if line.startswith("data:")]
        if data:
            reply: dict[str, Any] = json.loads("\n".join(data))
            if "id" in reply:
                return reply
    raise AssertionError(f"no JSON-RPC reply in {r.text!r}")


def _rpc(method: str, params: dict[str, Any] | None = None, id_: int | None = 1) -> dict[str, Any]:
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        body["params"] = params
    if id_ is not None:
        body["id"] = id_
    return body


# --- the tools -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_lists_the_tools(world: World, mode: str) -> None:
    async with mcp_client(world.mcp, world.a.headers, mode=mode) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        version = client.protocol_version
    # auto: the stateless 2026-07-28 revision; legacy: the initialize handshake.
    assert version == ("2026-07-28" if mode == "auto" else "2025-11-25")
    assert set(tools) == {"search_memories", "get_session"}
    search = tools["search_memories"].input_schema
    assert search["required"] == ["user_id", "query"]
    assert search["properties"]["k"]["maximum"] == 50
    assert search["properties"]["query"]["maxLength"] == 4000
    assert tools["get_session"].input_schema["required"] == ["session_id"]
    assert tools["get_session"].annotations is not None
    assert tools["get_session"].annotations.read_only_hint is True


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_search_memories_gives_the_rest_routes_hits(world: World, mode: str) -> None:
    a = world.a
    async with httpx.AsyncClient(timeout=60) as c:
        rest = await c.get(
            f"{world.srv.url}/v1/users/{a.user}/memories",
            params={"query": a.secret, "k": 3},
            headers=a.headers,
        )
    assert rest.status_code == 200
    async with mcp_client(world.mcp, a.headers, mode=mode) as client:
        result = await client.call_tool(
            "search_memories", {"user_id": a.user, "query": a.secret, "k": 3}
        )
    assert not result.is_error, result.content
    assert result.structured_content == rest.json()
    memories = result.structured_content["memories"]
    assert memories and memories[0]["session_id"] == a.session
    assert any(a.secret in m["text"] for m in memories)
    # The text content is the same body, for clients that read only text.
    assert json.loads(result.content[0].text) == rest.json()  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_get_session_gives_the_rest_routes_body(world: World, mode: str) -> None:
    a = world.a
    async with httpx.AsyncClient(timeout=60) as c:
        rest = await c.get(f"{world.srv.url}/v1/sessions/{a.session}", headers=a.headers)
    assert rest.status_code == 200
    async with mcp_client(world.mcp, a.headers, mode=mode) as client:
        result = await client.call_tool("get_session", {"session_id": a.session})
        missing = await client.call_tool("get_session", {"session_id": "no-such-session"})
    assert not result.is_error, result.content
    assert result.structured_content == rest.json()
    body = result.structured_content
    assert body["turn_count"] == THRESHOLD + 1 and body["archived_upto"] == THRESHOLD
    assert a.secret in json.dumps(body["unarchived_turns"])
    assert _error(missing)["error"]["code"] == "session_not_found"
    assert _error(missing)["retryable"] is False


# --- keys, tenants, origins ----------------------------------------------------------------
async def test_no_wrong_or_revoked_key_is_401_before_mcp(world: World) -> None:
    init = _rpc(
        "initialize",
        {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"},
        },
    )
    base = {"Accept": JSON_AND_SSE}
    async with httpx.AsyncClient(timeout=60) as c:
        for headers in (
            {},
            {"Authorization": "Bearer wrong-" + uuid.uuid4().hex},
            {"Authorization": f"Bearer {world.revoked_key}"},
            {"Authorization": world.a.key},  # no scheme
        ):
            r = await c.post(world.mcp, json=init, headers={**base, **headers})
            assert r.status_code == 401, (headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.headers["content-type"].startswith("application/json")
            body = r.json()
            assert body["error"]["code"] == "unauthorized", body
            assert set(body) == {"error"} and body["error"]["message"]
            assert "mcp-session-id" not in r.headers
        # Every method, not only POST.
        r = await c.get(world.mcp, headers=base)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    # The SDK's client cannot get in without a key either (its task group may
    # wrap the MCPError in an ExceptionGroup).
    refused = False
    try:
        async with mcp_client(world.mcp) as client:
            await client.list_tools()
    except* MCPError:
        refused = True
    assert refused


async def test_a_foreign_origin_is_403_and_local_ones_pass(world: World) -> None:
    tools_list = _rpc("tools/list")
    base = {"Accept": JSON_AND_SSE, "MCP-Protocol-Version": "2025-06-18", **world.a.headers}
    async with httpx.AsyncClient(timeout=60) as c:
        for origin in (
            "http://evil.example",
            "https://localhost.evil.example:443",
            "null",
            "http://127.0.0.1.nip.io:8000",
        ):
            r = await c.post(world.mcp, json=tools_list, headers={**base, "Origin": origin})
            assert r.status_code == 403, (origin, r.text)
            assert r.json()["error"]["code"] == "origin_not_allowed"
        # A bad Origin is refused even without a key: it is checked first.
        r = await c.post(
            world.mcp,
            json=tools_list,
            headers={"Accept": JSON_AND_SSE, "Origin": "http://evil.example"},
        )
        assert r.status_code == 403
        for origin in ("http://localhost:5173", "http://127.0.0.1", "http://LOCALHOST:3000"):
            r = await c.post(world.mcp, json=tools_list, headers={**base, "Origin": origin})
            names = {t["name"] for t in _parse_reply(r)["result"]["tools"]}
            assert names == {"search_memories", "get_session"}, origin


async def test_a_tenant_never_reads_another_tenants_data(world: World) -> None:
    a, b = world.a, world.b
    async with mcp_client(world.mcp, b.headers) as client:
        session = await client.call_tool("get_session", {"session_id": a.session})
        hits = await client.call_tool(
            "search_memories", {"user_id": a.user, "query": a.secret, "k": 50}
        )
        own = await client.call_tool(
            "search_memories", {"user_id": b.user, "query": a.secret, "k": 50}
        )
        # No argument can name a tenant.
        forged = await client.call_tool(
            "search_memories", {"user_id": a.user, "query": a.secret, "tenant": a.name}
        )
    assert _error(session)["error"]["code"] == "session_not_found"
    assert not hits.is_error and hits.structured_content == {"user_id": a.user, "memories": []}
    assert not own.is_error
    assert own.structured_content is not None
    assert own.structured_content["memories"], "B's own batch is found"
    assert a.secret not in json.dumps(own.structured_content)
    assert all(m["session_id"] == b.session for m in own.structured_content["memories"])
    assert _error(forged)["error"]["code"] == "invalid_argument"


# --- arguments -----------------------------------------------------------------------------
BAD_SEARCHES: list[tuple[dict[str, Any], str, str]] = [
    ({"user_id": "bad id{", "query": "boat"}, "invalid_id", "user_id must match"),
    ({"user_id": "u" * 129, "query": "boat"}, "invalid_id", "user_id must match"),
    ({"user_id": 7, "query": "boat"}, "invalid_argument", "user_id must be a string"),
    ({"user_id": "alice", "query": ""}, "empty_query", "query must not be empty"),
    ({"user_id": "alice", "query": "   "}, "empty_query", "query must not be empty"),
    ({"user_id": "alice", "query": "x" * 4001}, "query_too_long", "the limit is 4000"),
    ({"user_id": "alice", "query": "a\x00b"}, "invalid_query", "NUL"),
    ({"user_id": "alice", "query": ["boat"]}, "invalid_argument", "query must be a string"),
    ({"user_id": "alice", "query": "boat", "k": 0}, "invalid_argument", "k must be an integer"),
    ({"user_id": "alice", "query": "boat", "k": 51}, "invalid_argument", "in 1..50"),
    ({"user_id": "alice", "query": "boat", "k": "5"}, "invalid_argument", "k must be"),
    ({"user_id": "alice", "query": "boat", "k": True}, "invalid_argument", "k must be"),
    ({"user_id": "alice", "query": "boat", "k": 2.5}, "invalid_argument", "k must be"),
    ({"user_id": "alice"}, "invalid_argument", "missing required argument(s) query"),
    ({"query": "boat", "top_k": 3}, "invalid_argument", "unknown argument(s) top_k"),
]
BAD_SESSIONS: list[tuple[dict[str, Any], str, str]] = [
    ({"session_id": "../etc"}, "invalid_id", "session_id must match"),
    ({"session_id": "a:b"}, "invalid_id", "session_id must match"),
    ({"session_id": ""}, "invalid_id", "session_id must match"),
    ({"session_id": 12}, "invalid_argument", "session_id must be a string"),
    ({}, "invalid_argument", "missing required argument(s) session_id"),
]


async def _check_bad_arguments(client: Client) -> None:
    cases = [("search_memories", *c) for c in BAD_SEARCHES]
    cases += [("get_session", *c) for c in BAD_SESSIONS]
    for tool, args, code, words in cases:
        result = await client.call_tool(tool, args)
        error = _error(result)
        assert error["error"]["code"] == code, (tool, args, error)
        assert words in error["error"]["message"], (tool, args, error)
        assert error["retryable"] is False
        text = result.content[0].text  # type: ignore[union-attr]
        assert text.startswith(f"{code}: ") and words in text, text


async def test_bad_arguments_are_tool_errors_that_never_reach_redis(world: World) -> None:
    async with mcp_client(world.mcp, world.a.headers) as client:
        before = l2_round_trips(world.srv.services)
        await _check_bad_arguments(client)
        assert l2_round_trips(world.srv.services) == before
        with pytest.raises(MCPError, match="unknown tool"):
            await client.call_tool("forget_memories", {"user_id": "alice"})
        # A good call still works after all that.
        ok = await client.call_tool("get_session", {"session_id": world.a.session})
    assert not ok.is_error


async def test_older_client_with_the_initialize_handshake(world: World) -> None:
    """What a 2025-06-18 client sends, by hand: initialize, initialized, then calls
    with the negotiated version header; answered statelessly (no session id)."""
    headers = {"Accept": JSON_AND_SSE, **world.a.headers}
    async with httpx.AsyncClient(timeout=60) as c:
        r = await c.post(
            world.mcp,
            headers=headers,
            json=_rpc(
                "initialize",
                {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "old-client", "version": "1.0"},
                },
            ),
        )
        init = _parse_reply(r)["result"]
        assert init["protocolVersion"] == "2025-06-18"
        assert init["serverInfo"]["name"] == "tiermem"
        assert "tools" in init["capabilities"]
        # Stateless: any pod may answer the next request, so no session to pin.
        assert "mcp-session-id" not in r.headers

        headers["MCP-Protocol-Version"] = "2025-06-18"
        r = await c.post(
            world.mcp, headers=headers, json=_rpc("notifications/initialized", id_=None)
        )
        assert r.status_code == 202, r.text

        r = await c.post(world.mcp, headers=headers, json=_rpc("tools/list", id_=2))
        reply = _parse_reply(r)
        assert reply["id"] == 2
        assert {t["name"] for t in reply["result"]["tools"]} == {"search_memories", "get_session"}

        r = await c.post(
            world.mcp,
            headers=headers,
            json=_rpc(
                "tools/call",
                {"name": "get_session", "arguments": {"session_id": world.a.session}},
                id_=3,
            ),
        )
        result = _parse_reply(r)["result"]
        assert result.get("isError") is not True
        assert result["structuredContent"]["session_id"] == world.a.session

        r = await c.post(
            world.mcp,
            headers=headers,
            json=_rpc(
                "tools/call",
                {"name": "search_memories", "arguments": {"user_id": "x{", "query": "q"}},
                id_=4,
            ),
        )
        result = _parse_reply(r)["result"]
        assert result["isError"] is True
        assert result["structuredContent"]["error"]["code"] == "invalid_id"


async def test_the_body_limit_still_applies_to_mcp(world: World) -> None:
    limit = world.srv.settings.max_body_bytes
    huge = _rpc(
        "tools/call",
        {"name": "search_memories", "arguments": {"user_id": "alice", "query": "x" * (limit + 1)}},
    )
    async with httpx.AsyncClient(timeout=60) as c:
        r = await c.post(world.mcp, json=huge, headers={"Accept": JSON_AND_SSE, **world.a.headers})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large"


# --- backing services down -----------------------------------------------------------------
async def test_down_services_are_retryable_tool_errors(tmp_path: Path) -> None:
    """Auth off (the default tenant), Milvus unreachable from the start, and Redis
    stopped halfway: each failure is an isError result naming the service as
    unavailable and retryable; arguments are still refused first; and the server
    keeps answering."""
    redis = RedisServer(tmp_path / "redis").start()
    try:
        settings = make_settings(
            tmp_path,
            redis.url,
            milvus_uri=f"http://127.0.0.1:{free_port()}",
            milvus_timeout_s=1.0,
            redis_socket_timeout_s=1.0,
        )
        session = "down-" + uuid.uuid4().hex[:8]
        async with AppServer(settings) as srv, httpx.AsyncClient(timeout=60) as c:
            r = await post_turn(c, srv.url, session, "hello while Milvus is away")
            assert r.status_code == 200 and r.done["status"] == "complete", r.body
            rest = (await c.get(f"{srv.url}/v1/sessions/{session}")).json()
            async with mcp_client(f"{srv.url}/mcp") as client:
                # TIERMEM_AUTH=off: no key needed, the default tenant's session.
                ok = await client.call_tool("get_session", {"session_id": session})
                assert not ok.is_error and ok.structured_content == rest

                milvus = await client.call_tool(
                    "search_memories", {"user_id": "u1", "query": "hello", "k": 3}
                )
                error = _error(milvus)
                assert error["error"]["code"] == "memory_unavailable", error
                assert error["retryable"] is True
                text = milvus.content[0].text  # type: ignore[union-attr]
                assert "unavailable" in text and "retryable" in text

                redis.stop()
                gone = await client.call_tool("get_session", {"session_id": session})
                error = _error(gone)
                assert error["error"]["code"] == "storage_unavailable", error
                assert error["retryable"] is True
                assert "retryable" in gone.content[0].text  # type: ignore[union-attr]

                # Bad arguments are refused before either service is asked:
                # the codes are the arguments', not *_unavailable.
                await _check_bad_arguments(client)

                # The server is still up and serving.
                tools = await client.list_tools()
                assert {t.name for t in tools.tools} == {"search_memories", "get_session"}
            # Redis back (same port) for a clean shutdown.
            redis = RedisServer(tmp_path / "redis", port=redis.port).start()
    finally:
        redis.stop()
