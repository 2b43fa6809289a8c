"""The MCP client connections of a pod: one long-lived connection per configured server.

It knows servers, tools and calls, nothing of turns, graphs or prompts (graph/tools.py
builds the tool registry and the executor on top of it).

Config (:func:`load_mcp_config`): the common JSON format,
``{"mcpServers": {"<name>": {"command": "...", "args": [...], "env": {...}}}}`` for
stdio servers and ``{"mcpServers": {"<name>": {"url": "http://.../mcp", "headers":
{...}}}}`` for Streamable HTTP servers (the object without the ``mcpServers`` wrapper is
accepted too). A ``"type"`` key (``stdio``, ``http``, ``streamable-http``) is checked
against the rest; ``"cache": {"<tool>": <ttl_s>}`` (tiermem's own) names the tools
whose results may be cached, and for how long; other keys other tools write
(``disabled``, ``cwd``, ...) are ignored with a warning. A stdio child gets the
SDK's safe default environment (PATH, HOME, USER, LOGNAME, SHELL, TERM) plus its
``env``, not the pod's whole environment.

Connections (:class:`MCPConnections`). Each server has a supervisor task that opens
an ``mcp.Client`` (SDK 2.x) over its transport, negotiates the protocol revision
(``mode="auto"``: ``server/discover`` at 2026-07-28, falling back to the
``initialize`` handshake for 2025-era servers), lists the tools, and keeps the
connection until it is lost; then it reconnects with exponential backoff
(``backoff_initial_s`` doubling up to ``backoff_max_s``, times a random 0.5-1.0
jitter; the backoff resets once a connection has stayed up ``STABLE_AFTER_S``). The
first failure of a run of failures is logged as a warning, the retries after it at
info. A server that is down never makes ``start`` or anything else raise: its calls
fail with ``MCPCallError(kind="down")`` until it is back.

One connection per server, reused by every call. All calls go through the same
``ClientSession``; its JSON-RPC dispatcher correlates concurrent requests by id, so
calls run concurrently on one connection.

- stdio: one supervised child process per server, for the life of the connection.
  The child's stdout closing (it exited, crashed, was ``kill -9``-ed) ends the
  session's read loop at once, which fails every in-flight call with
  ``kind="crashed"`` (promptly, not after its deadline) and wakes the supervisor,
  which starts a new child after the backoff. The child's stderr is read without
  blocking the loop, logged at info (``mcp[<server>] ...``), and its last lines are
  kept for ``last_error``. ``aclose`` (and every reconnect) ends the child the SDK's
  way: stdin closed, 2 s grace, SIGTERM to its process group, 2 s, SIGKILL, so no
  child outlives the connections. (The SDK starts it in a session of its own, so
  there is no parent-death signal: if the pod itself is killed -9 the child sees
  EOF on stdin, which ends any well-behaved MCP server.)
- Streamable HTTP: the 2026-07-28 revision is stateless: no ``initialize``, no
  ``Mcp-Session-Id``; every request is a self-contained POST. So "the connection"
  is one ``Client`` over one ``StreamableHTTPTransport`` with one ``httpx2``
  connection pool (keep-alive), created on connect and shared by all calls, plus
  the negotiated version from one ``server/discover`` probe. (Against a 2025-era
  server the same ``Client`` holds its ``Mcp-Session-Id`` session.) There is no
  standing stream whose end would say a server went away: a request that cannot
  reach the server (refused, reset) fails the transport, which fails every
  in-flight call with ``kind="down"`` and makes the supervisor reconnect with
  backoff; a server that is down at start is retried the same way. A fresh pool per
  connection, so no dead keep-alive socket survives a server restart.

Tool lists. Listed (all pages, sorted by name) on every (re)connect, and again when
the server says the list changed: ``notifications/tools/list_changed`` on a
handshake-era connection; at 2026-07-28 change events only reach a client that asked
for them on a ``subscriptions/listen`` stream, so one such stream (a long POST whose
SSE response carries the events, or a long request over stdio) is kept open per
connection when the server advertises ``tools.listChanged``, and re-opened (with a
re-list, since events may have been missed) when it drops. Where that cannot work (a
server that does not advertise it, a JSON-response-only server, a replica behind a
load balancer that publishes changes on its own replica only), the list is refreshed
every ``refresh_s`` seconds (default 60) as well. When a list differs from the one
before (the first listing included), ``on_tools_changed(server, tools)`` is called.
``tools()`` keeps the last list of a server that went down, so the list stays fixed.

Deadlines. ``call(..., timeout_s=)`` is the request's read timeout in the SDK: when
it elapses the request is abandoned *and cancelled* on the server
(``notifications/cancelled`` over stdio; the POST is aborted over HTTP, which is the
2026 cancellation signal), and the call fails with ``kind="timeout"``; the
connection stays usable. A backstop deadline ``timeout_s + 1`` covers a write that
could not even be sent.

Nothing here blocks the event loop: children are spawned and their pipes read through
asyncio, HTTP is async, and ``jsonschema`` (which the SDK imports lazily on the first
result it validates) is imported with this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import random
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import IO, Any, Literal

import anyio
import httpx2
import jsonschema  # noqa: F401  imported here, not lazily on the event loop by the SDK
import mcp_types as types
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ListenNotSupportedError, SubscriptionLost
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError

from infra.errors import Misconfigured, Unavailable

logger = logging.getLogger(__name__)

SERVER_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,48}$")
TOOL_NAME_SEPARATOR = "__"


def _version() -> str:
    try:
        return importlib.metadata.version("tiermem")
    except importlib.metadata.PackageNotFoundError:
        return "0"


CLIENT_INFO = types.Implementation(name="tiermem", version=_version())

# A connection that stayed up this long resets the reconnect backoff.
STABLE_AFTER_S = 10.0
# The backstop past a call's own deadline (the SDK's timer starts once the request
# is written; this one also covers a write that could not be made).
CALL_DEADLINE_GRACE_S = 1.0
# HTTP: the read timeout of one response (a listen stream gets a ping every 15 s).
HTTP_READ_TIMEOUT_S = 300.0
# Pages of tools/list followed at most (a paginator that never ends cannot hang us).
MAX_LIST_PAGES = 100
# stderr lines of a stdio child kept for last_error, and the longest kept line.
STDERR_TAIL_LINES = 20
STDERR_LINE_MAX = 2000
# After a stdio child is gone, how long its stderr may take to reach EOF.
STDERR_DRAIN_S = 1.0

CallErrorKind = Literal["down", "timeout", "crashed", "protocol", "unknown_tool"]
Transport = Literal["stdio", "http"]


class MCPConfigError(Misconfigured):
    """The MCP config file (or a server in it) is not valid."""

    code = "mcp_misconfigured"
    default_message = "the MCP server configuration is not valid"


class MCPCallError(Unavailable):
    """A tool call that got no result from its server.

    ``kind``: ``down`` (not connected, or unreachable), ``timeout`` (past its
    deadline; cancelled on the server), ``crashed`` (the stdio child died under the
    call), ``protocol`` (the server answered with a JSON-RPC error or something the
    SDK refused), ``unknown_tool`` (no such server, or a tool its list does not have).
    ``down``, ``timeout`` and ``crashed`` are retryable; a side-effecting tool that
    timed out or crashed may have run, so whether to retry is the caller's call.
    """

    default_message = "the MCP tool call failed"

    def __init__(self, message: str, *, kind: CallErrorKind) -> None:
        super().__init__(
            message,
            code=f"mcp_{kind}",
            retryable=kind in ("down", "timeout", "crashed"),
            http_status=504 if kind == "timeout" else 503,
        )
        self.kind: CallErrorKind = kind


def _frozen(mapping: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class MCPServerConfig:
    """One server: ``command`` (stdio) or ``url`` (Streamable HTTP), never both."""

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # tiermem's own key: {"<tool>": <TTL in seconds>} for the tools whose results
    # may be cached (memory/cache.py). Only these; errors never.
    cache: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "env", _frozen(self.env))
        object.__setattr__(self, "headers", _frozen(self.headers))
        object.__setattr__(self, "cache", MappingProxyType(dict(self.cache)))
        problem = _name_problem(self.name)
        if problem is not None:
            raise MCPConfigError(f"MCP server {self.name!r}: {problem}")
        if (self.command is None) == (self.url is None):
            raise MCPConfigError(f"MCP server {self.name!r}: give exactly one of command and url")

    @property
    def transport(self) -> Transport:
        return "stdio" if self.command is not None else "http"


@dataclass(frozen=True)
class MCPTool:
    """One tool of one server, as its server lists it.

    ``read_only`` / ``idempotent``: the tool's ``readOnlyHint`` / ``idempotentHint``
    annotations (hints from the server; absent means False, as MCP says)."""

    server: str
    name: str
    description: str
    input_schema: dict[str, Any]
    read_only: bool
    idempotent: bool


@dataclass(frozen=True)
class MCPCallResult:
    """What a tool returned. ``content``: the text of its content blocks joined with
    newlines (an image, audio or binary resource appears as a short description such
    as ``[image image/png, 1234 bytes]``); ``structured``: its structured content;
    ``ok``: not ``isError``."""

    ok: bool
    content: str
    structured: Any | None = None


# --- config --------------------------------------------------------------------------

_STDIO_KEYS = frozenset({"command", "args", "env"})
_HTTP_KEYS = frozenset({"url", "headers"})
_TYPES: Mapping[str, Transport] = MappingProxyType(
    {"stdio": "stdio", "http": "http", "streamable-http": "http", "streamableHttp": "http"}
)


def _name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not SERVER_NAME_RE.fullmatch(name):
        return "a server name is 1-48 letters, digits, '_' or '-'"
    if TOOL_NAME_SEPARATOR in name:
        return f"a server name must not contain {TOOL_NAME_SEPARATOR!r} (the tool name separator)"
    return None


def _str_map(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"{what!r} must be an object of strings")
    return dict(value)


def _cache_ttls(value: object) -> dict[str, float]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k and isinstance(v, int | float) and not isinstance(v, bool)
        and 0 < v <= 30 * 86400
        for k, v in value.items()
    ):  # fmt: skip
        raise ValueError(
            "'cache' must be an object of tool names to TTLs in seconds (over 0, at most 30 days)"
        )
    return {k: float(v) for k, v in value.items()}


def _parse_server(name: str, raw: object) -> MCPServerConfig:
    problem = _name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    if not isinstance(raw, dict):
        raise ValueError("a server must be a JSON object")
    has_command, has_url = "command" in raw, "url" in raw
    if has_command == has_url:
        raise ValueError("give exactly one of 'command' (stdio) and 'url' (Streamable HTTP)")
    transport: Transport = "stdio" if has_command else "http"
    declared = raw.get("type")
    if declared is not None:
        if declared == "sse":
            raise ValueError("the legacy SSE transport is not supported; use Streamable HTTP")
        if not isinstance(declared, str) or _TYPES.get(declared) != transport:
            raise ValueError(f"'type' {declared!r} does not match a server with {transport} keys")
    own, other = (_STDIO_KEYS, _HTTP_KEYS) if transport == "stdio" else (_HTTP_KEYS, _STDIO_KEYS)
    misplaced = sorted(other & raw.keys())
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)} not allowed on a {transport} server")
    cache = _cache_ttls(raw.get("cache", {}))
    ignored = sorted(raw.keys() - own - {"type", "cache"})
    if ignored:
        logger.warning("MCP server %r: ignoring keys %s", name, ", ".join(ignored))
    if transport == "stdio":
        command = raw["command"]
        if not isinstance(command, str) or not command.strip():
            raise ValueError("'command' must be a non-empty string")
        args = raw.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ValueError("'args' must be a list of strings")
        return MCPServerConfig(
            name=name, command=command, args=tuple(args), env=_str_map(raw.get("env", {}), "env"),
            cache=cache,
        )  # fmt: skip
    url = raw["url"]
    if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
        raise ValueError("'url' must be an http:// or https:// URL")
    return MCPServerConfig(
        name=name, url=url, headers=_str_map(raw.get("headers", {}), "headers"), cache=cache
    )


def load_mcp_config(path: Path) -> list[MCPServerConfig]:
    """The servers of an MCP config file, in file order. Raises MCPConfigError naming the
    file (and the server) on any mistake."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MCPConfigError(f"{path}: MCP config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MCPConfigError(f"{path}: cannot read the MCP config: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MCPConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MCPConfigError(f"{path}: the MCP config must be a JSON object")
    servers = data.get("mcpServers", data)
    if not isinstance(servers, dict):
        raise MCPConfigError(f"{path}: 'mcpServers' must be a JSON object")
    configs: list[MCPServerConfig] = []
    for name, raw in servers.items():
        try:
            configs.append(_parse_server(name, raw))
        except (ValueError, MCPConfigError) as exc:
            detail = exc.message if isinstance(exc, MCPConfigError) else str(exc)
            raise MCPConfigError(f"{path}: MCP server {name!r}: {detail}") from None
    return configs


# --- results -------------------------------------------------------------------------


def _b64_size(data: str) -> int:
    data = data.strip()
    return max(0, len(data) * 3 // 4 - data[-2:].count("="))


def _block_text(block: types.ContentBlock) -> str:
    if isinstance(block, types.TextContent):
        return block.text
    if isinstance(block, types.ImageContent | types.AudioContent):
        return f"[{block.type} {block.mime_type}, {_b64_size(block.data)} bytes]"
    if isinstance(block, types.ResourceLink):
        return f"[resource link {block.uri}]"
    if isinstance(block, types.EmbeddedResource):
        resource = block.resource
        if isinstance(resource, types.TextResourceContents):
            return resource.text
        mime = resource.mime_type or "application/octet-stream"
        return f"[resource {resource.uri} {mime}, {_b64_size(resource.blob)} bytes]"
    return f"[{getattr(block, 'type', 'unknown')} content]"


def _call_result(result: types.CallToolResult) -> MCPCallResult:
    return MCPCallResult(
        ok=not result.is_error,
        content="\n".join(_block_text(b) for b in result.content),
        structured=result.structured_content,
    )


def _tool(server: str, tool: types.Tool) -> MCPTool:
    hints = tool.annotations
    return MCPTool(
        server=server,
        name=tool.name,
        description=tool.description or "",
        input_schema=json.loads(json.dumps(tool.input_schema)),
        read_only=bool(hints is not None and hints.read_only_hint),
        idempotent=bool(hints is not None and hints.idempotent_hint),
    )


def _describe(exc: BaseException) -> str:
    """One line for a failure: the first leaf of an exception group, with its type."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, MCPError):
        return f"MCP error {exc.code}: {exc.error.message}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- transports ----------------------------------------------------------------------


class _WatchedReadStream:
    """The transport's read stream, telling ``closed`` when it ends or is closed (which
    is when the session's read loop ends and its in-flight requests fail)."""

    def __init__(self, inner: Any, on_closed: Callable[[], None]) -> None:
        self._inner = inner
        self._on_closed = on_closed

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> Any:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_closed()
            raise

    async def aclose(self) -> None:
        self._on_closed()
        await self._inner.aclose()

    def __aiter__(self) -> _WatchedReadStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> _WatchedReadStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Transport:
    """An SDK ``Transport`` (an async context manager yielding the stream pair) around
    the stdio or Streamable HTTP client, whose ``closed`` event fires when the
    connection ends: before the session fails its in-flight requests, the server is
    marked not connected, so whoever sees such a failure sees that state too."""

    def __init__(self, conn: _Server, connect_timeout_s: float) -> None:
        self._conn = conn
        self._connect_timeout_s = connect_timeout_s
        self._stack = AsyncExitStack()
        self.closed = anyio.Event()
        self._stderr_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> tuple[Any, Any]:
        try:
            if self._conn.config.transport == "stdio":
                read, write = await self._enter_stdio()
            else:
                read, write = await self._enter_http()
        except BaseException:
            await self._aclose()
            raise
        return _WatchedReadStream(read, self._mark_closed), write

    def _mark_closed(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self._conn.mark_lost()

    async def _enter_stdio(self) -> tuple[Any, Any]:
        cfg = self._conn.config
        assert cfg.command is not None
        params = StdioServerParameters(command=cfg.command, args=list(cfg.args), env=dict(cfg.env))
        read_fd, write_fd = os.pipe()
        errlog = os.fdopen(write_fd, "w", encoding="utf-8", errors="replace")
        try:
            self._stderr_task = asyncio.create_task(
                _pump_stderr(read_fd, self._conn), name=f"mcp-stderr-{cfg.name}"
            )
        except BaseException:
            os.close(read_fd)
            errlog.close()
            raise
        try:
            # The child is spawned (or not) once this returns; its copy of the pipe is
            # all that must stay open for its stderr to reach EOF when it exits.
            return await self._stack.enter_async_context(stdio_client(params, errlog=errlog))
        finally:
            errlog.close()

    async def _enter_http(self) -> tuple[Any, Any]:
        cfg = self._conn.config
        assert cfg.url is not None
        http = httpx2.AsyncClient(
            headers=dict(cfg.headers),
            timeout=httpx2.Timeout(30.0, connect=self._connect_timeout_s, read=HTTP_READ_TIMEOUT_S),
        )
        await self._stack.enter_async_context(http)
        return await self._stack.enter_async_context(
            streamable_http_client(cfg.url, http_client=http)
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._mark_closed()
        try:
            await self._stack.__aexit__(exc_type, exc, tb)
        finally:
            await self._stop_stderr()
        return None

    async def _aclose(self) -> None:
        self._mark_closed()
        try:
            await self._stack.aclose()
        finally:
            await self._stop_stderr()

    async def _stop_stderr(self) -> None:
        task, self._stderr_task = self._stderr_task, None
        if task is None:
            return
        # The child is gone: its last words may still be in the pipe.
        with anyio.CancelScope(shield=True):
            done, _ = await asyncio.wait({task}, timeout=STDERR_DRAIN_S)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def _pump_stderr(read_fd: int, conn: _Server) -> None:
    """Log a stdio child's stderr line by line (asyncio pipe: never blocks the loop)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    pipe: IO[bytes] = os.fdopen(read_fd, "rb", buffering=0)
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
    except BaseException:
        pipe.close()
        raise
    buffer = b""
    try:
        while chunk := await reader.read(65536):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            if len(buffer) > STDERR_LINE_MAX:
                lines.append(buffer)
                buffer = b""
            for line in lines:
                conn.stderr_line(line.decode("utf-8", "replace"))
        if buffer:
            conn.stderr_line(buffer.decode("utf-8", "replace"))
    finally:
        transport.close()


# --- connections ---------------------------------------------------------------------


class _Server:
    """The state of one server's connection (owned by its supervisor task)."""

    def __init__(self, config: MCPServerConfig) -> None:
        self.config = config
        self.client: Client | None = None
        self.protocol_version: str | None = None
        self.tools: tuple[MCPTool, ...] | None = None
        self.connections = 0
        self.failures = 0
        self.last_error: str | None = None
        self.connected = asyncio.Event()
        self.attempted = asyncio.Event()
        self.relist = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)

    @property
    def name(self) -> str:
        return self.config.name

    def mark_lost(self) -> None:
        self.client = None
        self.connected.clear()

    def stderr_line(self, line: str) -> None:
        line = line.rstrip()[:STDERR_LINE_MAX]
        if line:
            self.stderr_tail.append(line)
            logger.info("mcp[%s] %s", self.name, line)

    def last_stderr(self) -> str | None:
        return self.stderr_tail[-1] if self.stderr_tail else None


class MCPConnections:
    """The MCP client connections of a pod (see the module docstring)."""

    def __init__(
        self,
        configs: Sequence[MCPServerConfig],
        *,
        connect_timeout_s: float = 10.0,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 10.0,
        refresh_s: float = 60.0,
        on_tools_changed: Callable[[str, tuple[MCPTool, ...]], None] | None = None,
    ) -> None:
        names = [c.name for c in configs]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise MCPConfigError(f"MCP servers configured twice: {', '.join(duplicated)}")
        if connect_timeout_s <= 0 or backoff_initial_s <= 0 or refresh_s <= 0:
            raise ValueError("connect_timeout_s, backoff_initial_s and refresh_s must be > 0")
        self._servers: dict[str, _Server] = {c.name: _Server(c) for c in configs}
        self._connect_timeout_s = connect_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = max(backoff_max_s, backoff_initial_s)
        self._refresh_s = refresh_s
        self._on_tools_changed = on_tools_changed
        self._started = False
        self._closing = False

    # --- lifecycle ---

    async def start(self, wait_s: float | None = None) -> None:
        """Open every server in the background; wait up to ``wait_s`` (default
        ``connect_timeout_s``) for the first attempt of each. Never raises because a
        server is down: it keeps being retried."""
        if self._closing:
            raise RuntimeError("MCPConnections is closed")
        if not self._started:
            self._started = True
            for s in self._servers.values():
                s.task = asyncio.create_task(self._supervise(s), name=f"mcp-{s.name}")
        waits = [asyncio.ensure_future(s.attempted.wait()) for s in self._servers.values()]
        if not waits:
            return
        try:
            await asyncio.wait(waits, timeout=self._connect_timeout_s if wait_s is None else wait_s)
        finally:
            for w in waits:
                w.cancel()

    async def aclose(self) -> None:
        """Close every session and end every stdio child (waits until they are gone)."""
        self._closing = True
        tasks = [s.task for s in self._servers.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> MCPConnections:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- what callers see ---

    def cache_ttl(self, server: str, tool: str) -> float | None:
        """How long ``tool``'s results may be cached (None: not cacheable)."""
        s = self._servers.get(server)
        return s.config.cache.get(tool) if s is not None else None

    def tools(self) -> dict[str, tuple[MCPTool, ...]]:
        """The tools of each server listed at least once (kept while it is down)."""
        return {name: s.tools for name, s in self._servers.items() if s.tools is not None}

    def status(self) -> dict[str, dict[str, Any]]:
        """Per server: connected, transport, restarts (reconnections after the first
        connection), failures (attempts and connections that failed since the last one
        that stayed up ``STABLE_AFTER_S``: the backoff step), last_error (the latest,
        kept after a recovery), protocol_version, tools (how many; None if never listed)."""
        return {
            name: {
                "connected": s.client is not None,
                "transport": s.config.transport,
                "restarts": max(0, s.connections - 1),
                "failures": s.failures,
                "last_error": s.last_error,
                "protocol_version": s.protocol_version,
                "tools": None if s.tools is None else len(s.tools),
            }
            for name, s in self._servers.items()
        }

    async def wait_connected(self, server: str, within_s: float) -> bool:
        """Whether ``server`` is (or gets) connected within ``within_s`` seconds."""
        s = self._servers.get(server)
        if s is None:
            return False
        if s.client is not None:
            return True
        try:
            async with asyncio.timeout(within_s):
                await s.connected.wait()
        except TimeoutError:
            return False
        return s.client is not None

    async def call(
        self, server: str, tool: str, arguments: dict[str, Any], *, timeout_s: float
    ) -> MCPCallResult:
        """Call ``tool`` on ``server`` within ``timeout_s``. Raises MCPCallError."""
        s = self._servers.get(server)
        if s is None:
            raise MCPCallError(f"no MCP server named {server!r}", kind="unknown_tool")
        if s.tools is not None and all(t.name != tool for t in s.tools):
            raise MCPCallError(f"MCP server {server!r} has no tool {tool!r}", kind="unknown_tool")
        client = s.client
        if client is None:
            why = f" ({s.last_error})" if s.last_error else ""
            raise MCPCallError(f"MCP server {server!r} is not connected{why}", kind="down")
        label = f"{server}/{tool}"
        try:
            async with asyncio.timeout(timeout_s + CALL_DEADLINE_GRACE_S):
                result = await client.call_tool(tool, arguments, read_timeout_seconds=timeout_s)
        except MCPError as exc:
            if exc.code == REQUEST_TIMEOUT:
                raise MCPCallError(
                    f"{label} did not answer within {timeout_s:g} s (cancelled)", kind="timeout"
                ) from None
            if exc.code == CONNECTION_CLOSED:
                if s.config.transport == "stdio" and not self._closing:
                    last = s.last_stderr()
                    said = f"; its last stderr line: {last}" if last else ""
                    raise MCPCallError(
                        f"{label}: the MCP server process ended during the call{said}",
                        kind="crashed",
                    ) from None
                raise MCPCallError(
                    f"{label}: lost the connection to the MCP server", kind="down"
                ) from None
            raise MCPCallError(f"{label}: {_describe(exc)}", kind="protocol") from None
        except TimeoutError:
            raise MCPCallError(
                f"{label} did not answer within {timeout_s:g} s", kind="timeout"
            ) from None
        except (ValidationError, RuntimeError) as exc:
            # RuntimeError: structured content that breaks the tool's output schema,
            # or a result shape this client cannot take (input_required, claimed).
            raise MCPCallError(f"{label}: {_describe(exc)}", kind="protocol") from None
        except (httpx2.HTTPError, OSError, anyio.BrokenResourceError) as exc:
            raise MCPCallError(f"{label}: {_describe(exc)}", kind="down") from None
        return _call_result(result)

    # --- supervision ---

    async def _supervise(self, s: _Server) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            started = loop.time()
            connections_before = s.connections
            try:
                await self._connect(s)
                s.last_error = self._lost_reason(s)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                # Failures surface as exception groups from the SDK's task groups.
                if self._closing or not isinstance(exc, Exception | BaseExceptionGroup):
                    raise
                s.last_error = _describe(exc)
            finally:
                s.mark_lost()
                s.attempted.set()
            if self._closing:
                return
            was_connected = s.connections > connections_before
            if was_connected and loop.time() - started >= STABLE_AFTER_S:
                s.failures = 0
            delay = min(self._backoff_max_s, self._backoff_initial_s * 2 ** min(s.failures, 30))
            delay *= random.uniform(0.5, 1.0)
            level = logging.WARNING if was_connected or s.failures == 0 else logging.INFO
            logger.log(
                level,
                "MCP server %r %s: %s; retrying in %.2f s",
                s.name,
                "lost its connection" if was_connected else "could not be connected",
                s.last_error,
                delay,
            )
            s.failures += 1
            await asyncio.sleep(delay)

    def _lost_reason(self, s: _Server) -> str:
        if s.config.transport == "stdio":
            last = s.last_stderr()
            return "the server process closed the connection" + (
                f" (last stderr line: {last})" if last else ""
            )
        return "the connection to the server was lost"

    async def _connect(self, s: _Server) -> None:
        """One connection: open, list, serve until it ends (returns) or fails (raises)."""
        transport = _Transport(s, self._connect_timeout_s)

        async def on_message(message: types.ServerNotification | Exception) -> None:
            if isinstance(message, types.ToolListChangedNotification):
                s.relist.set()
            elif isinstance(message, Exception):
                logger.debug("MCP server %r transport: %s", s.name, _describe(message))

        client = Client(
            transport,
            cache=None,  # tool lists are always fetched fresh
            read_timeout_seconds=self._connect_timeout_s,
            message_handler=on_message,
            client_info=CLIENT_INFO,
        )
        s.stderr_tail.clear()
        async with client:
            s.protocol_version = client.protocol_version
            s.relist.clear()
            tools = await self._list_tools(s, client)
            if transport.closed.is_set():
                return
            s.client = client
            s.connections += 1
            s.connected.set()
            s.attempted.set()
            logger.info(
                "MCP server %r connected (%s, protocol %s, %d tools)",
                s.name,
                s.config.transport,
                s.protocol_version,
                len(tools),
            )
            self._publish(s, tools)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._refresh_loop, s, client)
                capability = client.server_capabilities.tools
                if (
                    client.protocol_version in MODERN_PROTOCOL_VERSIONS
                    and capability is not None
                    and capability.list_changed
                ):
                    tg.start_soon(self._listen_loop, s, client)
                await transport.closed.wait()
                tg.cancel_scope.cancel()

    async def _list_tools(self, s: _Server, client: Client) -> tuple[MCPTool, ...]:
        tools: dict[str, MCPTool] = {}
        cursor: str | None = None
        for _ in range(MAX_LIST_PAGES):
            page = await client.list_tools(cursor=cursor)
            for tool in page.tools:
                tools[tool.name] = _tool(s.name, tool)
            cursor = page.next_cursor
            if cursor is None:
                break
        return tuple(tools[name] for name in sorted(tools))

    def _publish(self, s: _Server, tools: tuple[MCPTool, ...]) -> None:
        if tools == s.tools:
            return
        s.tools = tools
        logger.info("MCP server %r tools: %s", s.name, ", ".join(t.name for t in tools) or "none")
        if self._on_tools_changed is not None:
            try:
                self._on_tools_changed(s.name, tools)
            except Exception:
                logger.exception("on_tools_changed(%r) raised", s.name)

    async def _refresh_loop(self, s: _Server, client: Client) -> None:
        """Re-list when the server says so, and every ``refresh_s`` anyway."""
        while True:
            with anyio.move_on_after(self._refresh_s):
                await s.relist.wait()
            s.relist.clear()
            try:
                tools = await self._list_tools(s, client)
            except MCPError as exc:
                if exc.code == CONNECTION_CLOSED:
                    return
                logger.warning("MCP server %r: tools/list failed: %s", s.name, _describe(exc))
                continue
            except (ValidationError, TimeoutError) as exc:
                logger.warning("MCP server %r: tools/list failed: %s", s.name, _describe(exc))
                continue
            self._publish(s, tools)

    async def _listen_loop(self, s: _Server, client: Client) -> None:
        """Keep a 2026-07-28 ``subscriptions/listen`` stream for tool-list changes open."""
        delay = self._backoff_initial_s
        while True:
            try:
                async with client.listen(tools_list_changed=True) as sub:
                    if not sub.honored.tools_list_changed:
                        logger.info("MCP server %r: no tool-list events; refreshing only", s.name)
                        return
                    delay = self._backoff_initial_s
                    # A change between the listing and this ack would be missed.
                    s.relist.set()
                    async for _event in sub:
                        s.relist.set()
            except SubscriptionLost:
                logger.debug("MCP server %r: the listen stream dropped; re-listening", s.name)
            except MCPError as exc:
                if exc.code != CONNECTION_CLOSED:
                    logger.info(
                        "MCP server %r: subscriptions/listen refused (%s); refreshing only",
                        s.name,
                        _describe(exc),
                    )
                return
            except (ListenNotSupportedError, TimeoutError) as exc:
                logger.info(
                    "MCP server %r: no subscriptions/listen (%s); refreshing only",
                    s.name,
                    _describe(exc),
                )
                return
            await anyio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._backoff_max_s)


__all__ = [
    "MCPCallError",
    "MCPCallResult",
    "MCPConfigError",
    "MCPConnections",
    "MCPServerConfig",
    "MCPTool",
    "load_mcp_config",
]
