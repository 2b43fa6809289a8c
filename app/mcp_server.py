"""tiermem as an MCP server at ``/mcp``: the official SDK (``mcp`` 2.x), Streamable HTTP.

Tools (read-only, each within the caller's tenant):

- ``search_memories {user_id, query, k}``: the hits ``GET /v1/users/{user_id}/memories``
  gives (the route's own function is called), ``{"user_id", "memories": [...]}``.
- ``get_session {session_id}``: the body of ``GET /v1/sessions/{session_id}``.
- ``forget_memories`` is not here yet: it comes with its own issue (a write, so it
  needs its own idempotency and audit story).

Stateless, so any pod answers any request: the 2026-07-28 revision is stateless by
design (one POST, one JSON-RPC exchange, no ``initialize``, no session header;
the SDK serves it from ``mcp.server._streamable_http_modern``), and older clients
that do the ``initialize`` handshake (2024-11-05 .. 2025-11-25) are served by the
SDK's legacy transport in stateless mode: no ``Mcp-Session-Id`` is issued, each
POST is a fresh transport. Replies are JSON (``json_response=True``): the tools are
short reads, so no stream needs holding open.

In front of the SDK, ``McpGate`` (plain ASGI, so nothing is buffered):

1. ``Origin`` (the DNS-rebinding protection the MCP spec asks for): a request
   without one (a non-browser client) passes; one that matches none of
   ``settings.mcp_allowed_origins`` (fnmatch patterns, compared lowercased) is
   refused with 403 ``origin_not_allowed``. The SDK's own Host/Origin check is
   off: it would refuse any Host but localhost behind an Ingress.
2. The same Bearer API keys as the REST API (``app.auth``): no key, an unknown
   or a revoked one is 401 in the app's error shape with ``WWW-Authenticate:
   Bearer``, before the SDK sees the request. With ``TIERMEM_AUTH=off`` every
   request is the default tenant.
3. The tenant rides in the request's ASGI scope (``TENANT_SCOPE_KEY``); the SDK
   hands each handler the Starlette ``Request`` it built from that scope
   (``ServerRequestContext.request``), and the handlers read the tenant there and
   nowhere else. A contextvar would not do: the SDK runs legacy-era handlers in
   tasks of its session manager's task group, started with the app, not in the
   request's task.

Arguments are checked here before anything is asked of Redis or Milvus: ids as
``memory.keys.ID_PATTERN``, the query as the REST route (1..4000 characters, then
``graph.guard.check_message``), ``k`` an integer in 1..50, no unknown arguments. A
refused argument, a missing session, or a backing service that is down
(``L3Unavailable``, ``L2Error``: ``retryable``) is a tool result with
``isError: true``, a sentence in ``content`` and ``{"error": {"code", "message"},
"retryable"}`` in ``structuredContent``; never a failed request or a crash.

The SDK's ``MCPServer`` (the old FastMCP) is not used: its constructor calls
``logging.basicConfig`` (a Rich handler on the root logger, where logging is not
configured yet), and its pydantic argument errors are not the app's codes. The
low-level ``mcp.server.lowlevel.Server`` with two hand-written tool schemas gives
the same wire behaviour with neither.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import mcp_types as types
import orjson
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from starlette.datastructures import Headers
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from app.auth import AuthError
from app.errors import error_body, error_response
from app.logging_setup import tenant_var
from app.routes import memories as memories_route
from app.routes import sessions as sessions_route
from app.services import Services
from graph.guard import check_message
from infra.errors import TiermemError
from memory.keys import ID_PATTERN, validate_id

log = logging.getLogger("tiermem.mcp")

MCP_PATH: Final = "/mcp"
TENANT_SCOPE_KEY: Final = "tiermem.tenant"
# As the REST route: Query(max_length=4000), k in 1..50 (default 5).
QUERY_MAX_CHARS: Final = 4000
K_MIN: Final = 1
K_MAX: Final = 50
K_DEFAULT: Final = 5

_ID_SCHEMA: Final[dict[str, Any]] = {
    "type": "string",
    "pattern": ID_PATTERN,
    "minLength": 1,
    "maxLength": 128,
}
_READ_ONLY: Final = types.ToolAnnotations(
    read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)
TOOLS: Final = (
    types.Tool(
        name="search_memories",
        title="Search long-term memories",
        description=(
            "Search a user's long-term memories (summaries of archived conversation "
            "batches), best match first. Returns {user_id, memories: [{batch_id, "
            "session_id, first_turn, last_turn, text, score, matches}]}."
        ),
        input_schema={
            "type": "object",
            "properties": {
                "user_id": {**_ID_SCHEMA, "description": "The user whose memories to search."},
                "query": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": QUERY_MAX_CHARS,
                    "description": "What to look for, in plain words.",
                },
                "k": {
                    "type": "integer",
                    "minimum": K_MIN,
                    "maximum": K_MAX,
                    "default": K_DEFAULT,
                    "description": "How many memories to return at most.",
                },
            },
            "required": ["user_id", "query"],
            "additionalProperties": False,
        },
        annotations=_READ_ONLY,
    ),
    types.Tool(
        name="get_session",
        title="Read a session",
        description=(
            "A session as stored: counters, version, running summary and its "
            "unarchived turns (the same body as GET /v1/sessions/{session_id})."
        ),
        input_schema={
            "type": "object",
            "properties": {"session_id": {**_ID_SCHEMA, "description": "The session's id."}},
            "required": ["session_id"],
            "additionalProperties": False,
        },
        annotations=_READ_ONLY,
    ),
)
_TOOL_NAMES: Final = frozenset(t.name for t in TOOLS)


class ToolArgumentError(TiermemError):
    """An argument a tool refuses; retrying it unchanged fails again."""

    code = "invalid_argument"
    http_status = 422


# --- the tools ---------------------------------------------------------------------------
def _arguments(
    raw: dict[str, Any] | None, allowed: Sequence[str], required: Sequence[str]
) -> dict[str, Any]:
    args = dict(raw or {})
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ToolArgumentError(
            f"unknown argument(s) {', '.join(unknown)}; this tool takes {', '.join(allowed)}"
        )
    missing = [name for name in required if name not in args]
    if missing:
        raise ToolArgumentError(f"missing required argument(s) {', '.join(missing)}")
    return args


def _id(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ToolArgumentError(f"{name} must be a string")
    return validate_id(value, name)


def _query(value: object, max_chars: int) -> str:
    if not isinstance(value, str):
        raise ToolArgumentError("query must be a string")
    limit = min(QUERY_MAX_CHARS, max_chars)
    if len(value) > limit:
        raise ToolArgumentError(
            f"query has {len(value)} characters; the limit is {limit}", code="query_too_long"
        )
    try:
        return check_message(value, max_chars)
    except TiermemError as exc:
        # check_message speaks of "message"; here it is the query.
        raise ToolArgumentError(
            "query " + exc.message.removeprefix("message "),
            code=exc.code.replace("message", "query"),
        ) from exc


def _k(value: object) -> int:
    # A JSON integer; 5.0 from a client that only has floats is the same number.
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not K_MIN <= value <= K_MAX:
        raise ToolArgumentError(f"k must be an integer in {K_MIN}..{K_MAX}")
    return value


def _ok(body: dict[str, Any]) -> types.CallToolResult:
    text = orjson.dumps(body).decode()
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)], structured_content=body
    )


def _failed(code: str, message: str, retryable: bool) -> types.CallToolResult:
    if retryable:
        text = f"{code}: {message} (unavailable now; retryable: call again later)"
    else:
        text = f"{code}: {message}"
    body = {**error_body(code, message), "retryable": retryable}
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)],
        structured_content=body,
        is_error=True,
    )


def _request_tenant(ctx: ServerRequestContext[Any, Any]) -> str | None:
    """The tenant ``McpGate`` put in this request's scope (None: not through the gate)."""
    request = ctx.request
    scope = getattr(request, "scope", None)
    tenant = scope.get(TENANT_SCOPE_KEY) if isinstance(scope, dict) else None
    return tenant if isinstance(tenant, str) else None


def build_server(services: Services) -> Server[Any]:
    """The MCP server (SDK low-level ``Server``) with tiermem's tools."""

    async def list_tools(
        _ctx: ServerRequestContext[Any, Any], _params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=list(TOOLS))

    async def search_memories(tenant: str, raw: dict[str, Any] | None) -> dict[str, Any]:
        args = _arguments(raw, ("user_id", "query", "k"), ("user_id", "query"))
        user_id = _id(args["user_id"], "user_id")
        query = _query(args["query"], services.settings.max_message_chars)
        k = _k(args.get("k", K_DEFAULT))
        body: dict[str, Any] = await memories_route.search_memories(
            user_id, tenant, services, query, k
        )
        return body

    async def get_session(tenant: str, raw: dict[str, Any] | None) -> dict[str, Any]:
        args = _arguments(raw, ("session_id",), ("session_id",))
        session_id = _id(args["session_id"], "session_id")
        body: dict[str, Any] = await sessions_route.get_session(session_id, tenant, services)
        return body

    handlers = {"search_memories": search_memories, "get_session": get_session}

    async def call_tool(
        ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        if params.name not in _TOOL_NAMES:
            raise MCPError(
                code=types.INVALID_PARAMS,
                message=f"unknown tool {params.name!r}; tools: {', '.join(sorted(_TOOL_NAMES))}",
            )
        tenant = _request_tenant(ctx)
        if tenant is None:
            # Fail closed: only a request that passed the gate has a tenant.
            return _failed("unauthorized", "no authenticated tenant for this request", False)
        token = tenant_var.set(tenant)
        try:
            return _ok(await handlers[params.name](tenant, params.arguments))
        except TiermemError as exc:
            if exc.retryable:
                log.warning("mcp tool %s: %s (%s)", params.name, exc.code, exc.message)
            return _failed(exc.code, exc.message, exc.retryable)
        except Exception:
            log.exception("mcp tool %s failed", params.name)
            return _failed("internal_error", "internal error; retry", True)
        finally:
            tenant_var.reset(token)

    return Server(
        "tiermem",
        version="0.1.0",
        title="tiermem",
        instructions=(
            "Long-term memory of a tiermem service: search a user's archived "
            "conversations (search_memories) and read a session (get_session)."
        ),
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


# --- the HTTP side -----------------------------------------------------------------------
def origin_allowed(origin: str, patterns: Sequence[str]) -> bool:
    """Whether a browser ``Origin`` matches one of the allowlist's fnmatch patterns
    (``*`` any run of characters, ``?`` one; compared lowercased). A ``[`` is taken
    literally, so an IPv6 origin such as ``http://[::1]:*`` is not a character class."""
    value = origin.strip().lower()
    return any(fnmatch.fnmatchcase(value, p.strip().lower().replace("[", "[[]")) for p in patterns)


class McpGate:
    """Origin check, then the API key, then the SDK's Streamable HTTP handler."""

    def __init__(
        self,
        services: Services,
        handler: Callable[[Scope, Receive, Send], Awaitable[None]],
        allowed_origins: Sequence[str],
    ) -> None:
        self.services = services
        self.handler = handler
        self.allowed_origins = tuple(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # pragma: no cover - routes only see http here
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is not None and not origin_allowed(origin, self.allowed_origins):
            log.warning("mcp: refused a request from origin %r", origin[:200])
            response = error_response(
                403,
                "origin_not_allowed",
                "this Origin may not call /mcp (TIERMEM_MCP_ALLOWED_ORIGINS)",
            )
            await response(scope, receive, send)
            return
        auth = self.services.auth
        if auth is None:
            tenant = self.services.settings.default_tenant
        else:
            try:
                tenant = auth.tenant_for(headers.get("authorization"))
            except AuthError as exc:
                response = error_response(exc.http_status, exc.code, exc.message, exc.headers)
                await response(scope, receive, send)
                return
        await self.handler({**scope, TENANT_SCOPE_KEY: tenant}, receive, send)


class McpApp:
    """What app/main.py mounts: ``route`` (``asgi`` at ``MCP_PATH``, every method; a
    Route and not a Mount, which would answer ``/mcp`` with a redirect to ``/mcp/``),
    and ``lifespan()`` in the app's lifespan: the SDK's session manager must be
    running for any request to be served."""

    def __init__(self, services: Services) -> None:
        settings = services.settings
        self.server = build_server(services)
        self.session_manager = StreamableHTTPSessionManager(
            app=self.server,
            stateless=True,
            json_response=True,
            # Origin is checked by McpGate against the app's allowlist; the SDK's
            # Host check would refuse every Host but localhost (an Ingress's).
            security_settings=TransportSecuritySettings(enable_dns_rebinding_protection=False),
            # BodySizeLimit (app/limits.py) already holds every body to this.
            max_request_body_size=settings.max_body_bytes,
        )
        origins = settings.mcp_allowed_origins
        self.asgi = McpGate(services, self.session_manager.handle_request, origins)
        self.route = Route(MCP_PATH, self.asgi, include_in_schema=False)

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        async with self.session_manager.run():
            yield
