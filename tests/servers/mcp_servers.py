"""Real MCP servers for the tests, built with the SDK's ``MCPServer``.

One script, two transports:

- ``python tests/servers/mcp_servers.py stdio [--name NAME]``: an MCP server on its
  stdin/stdout (what ``MCPServerConfig(command=sys.executable, args=[...])`` runs).
- ``python tests/servers/mcp_servers.py http --port PORT [--name NAME]``: a Streamable
  HTTP server on ``http://127.0.0.1:PORT/mcp`` (``stateless_http=True``; a client
  speaking the 2026-07-28 revision is served per request regardless).
  :class:`MCPHTTPServer` runs it as a child process, waits until the port accepts
  connections, and stops it (SIGTERM, then SIGKILL) on the same port it can restart.

Tools (the same on both transports, so two servers expose tools of the same names):

- ``echo {text}``: returns ``text`` (annotated read-only and idempotent);
- ``add {a, b}``: the sum;
- ``sleep {seconds}``: returns ``"slept"`` after that long (cancellable);
- ``crash {}``: the process exits abruptly (``os._exit``) mid-call;
- ``huge {chars}``: a string of that many ``x``;
- ``fail {}``: an ``isError`` result;
- ``count {hold_s=0}``: appends a line to the file ``$MCP_COUNT_FILE`` and returns the
  number of lines (after holding ``hold_s`` seconds), so a test counts real
  invocations; ``slow_count {seconds}`` sleeps first, then counts (a call cancelled
  during the sleep never counts);
- ``rendezvous {tag, parties=2, within_s=10}``: ``"met N"`` once ``parties`` calls
  with this tag have started, in any of these servers (they meet in a directory
  beside ``$MCP_COUNT_FILE``, else in the temp directory), else ``"alone"`` after
  ``within_s``: proof that calls run at once;
- ``pid {}``: the server process id (read-only), proof that calls share one process;
- ``image {}``: one text block and one 4-byte PNG image block;
- ``add_tool {name, announce=true}``: registers a new tool ``name`` (it returns
  ``"<name> ok"``) and announces it: ``notifications/tools/list_changed`` on a
  handshake-era connection, an event on ``subscriptions/listen`` streams at
  2026-07-28 (``announce: false``: silently, so only a periodic refresh finds it).

``--legacy`` (stdio): serve the handshake era only, as a 2025-era server does.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import anyio
from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.utilities.types import Image
from mcp.server.runner import serve_loop
from mcp.server.stdio import stdio_server
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

SCRIPT = Path(__file__).resolve()
READ_ONLY = ToolAnnotations(read_only_hint=True, idempotent_hint=True)
# The smallest thing that is called a PNG here: the signature's first 4 bytes.
PNG_BYTES = b"\x89PNG"


def _count() -> int:
    path = Path(os.environ["MCP_COUNT_FILE"])
    with path.open("a", encoding="utf-8") as f:
        f.write("call\n")
    return len(path.read_text(encoding="utf-8").splitlines())


def build_server(name: str = "testmcp") -> MCPServer:
    server: MCPServer = MCPServer(name, log_level="WARNING")

    @server.tool(description="Echo the text back.", annotations=READ_ONLY)
    def echo(text: str) -> str:
        return text

    @server.tool(description="Add two numbers.")
    def add(a: float, b: float) -> float:
        return a + b

    @server.tool(description="Sleep that many seconds, then answer 'slept'.")
    async def sleep(seconds: float) -> str:
        await anyio.sleep(seconds)
        return "slept"

    @server.tool(description="Exit the server process abruptly, mid-call.")
    def crash() -> str:
        os._exit(17)

    @server.tool(description="Return that many characters.", annotations=READ_ONLY)
    def huge(chars: int) -> str:
        return "x" * chars

    @server.tool(description="Always fails (an isError result).")
    def fail() -> str:
        raise ToolError("deliberate failure")

    @server.tool(description="Count this call in $MCP_COUNT_FILE, hold hold_s; return the count.")
    async def count(hold_s: float = 0.0) -> int:
        counted = _count()
        await anyio.sleep(hold_s)
        return counted

    @server.tool(description="Sleep that many seconds, then count like 'count'.")
    async def slow_count(seconds: float) -> int:
        await anyio.sleep(seconds)
        return _count()

    @server.tool(description="Wait until `parties` calls of this tag have started.")
    async def rendezvous(tag: str, parties: int = 2, within_s: float = 10.0) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", tag):
            raise ToolError("tag: 1-64 letters, digits, '_' or '-'")
        # Beside the count file when there is one (a test's own temp directory).
        count_file = os.environ.get("MCP_COUNT_FILE")
        base = Path(count_file).parent if count_file else Path(tempfile.gettempdir())
        place = base / f"mcp-rendezvous-{tag}"
        place.mkdir(exist_ok=True)
        (place / f"{os.getpid()}-{uuid.uuid4().hex}").touch()
        deadline = time.monotonic() + within_s
        while (arrived := len(list(place.iterdir()))) < parties:
            if time.monotonic() > deadline:
                return "alone"
            await anyio.sleep(0.02)
        return f"met {arrived}"

    @server.tool(description="The server's process id.", annotations=READ_ONLY)
    def pid() -> int:
        return os.getpid()

    @server.tool(description="A text block and an image block.", annotations=READ_ONLY)
    def image() -> CallToolResult:
        picture = Image(data=PNG_BYTES, format="png").to_image_content()
        return CallToolResult(content=[TextContent(type="text", text="an image:"), picture])

    @server.tool(description="Register a new tool of that name; announce it unless told not to.")
    async def add_tool(name: str, ctx: Context, announce: bool = True) -> str:
        def dynamic() -> str:
            return f"{name} ok"

        server.add_tool(dynamic, name=name, description=f"Added at run time: {name}.")
        if announce:
            # 2026-07-28: change events reach subscriptions/listen streams only.
            await ctx.notify_tools_changed()
            if ctx.request_context.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS:
                # Handshake era: the spontaneous notification on the session.
                await ctx.session.send_tool_list_changed()
        return f"added {name}"

    return server


async def serve_stdio_legacy(server: MCPServer) -> None:
    """Serve stdio in the handshake era only, as a 2025-era server does: no
    ``server/discover`` (clients fall back to ``initialize``), spontaneous
    ``notifications/tools/list_changed``. ``Server.run`` would serve both eras."""
    lowlevel = server._lowlevel_server
    options = lowlevel.create_initialization_options(NotificationOptions(tools_changed=True))
    async with stdio_server() as (read_stream, write_stream), lowlevel.lifespan(lowlevel) as state:
        await serve_loop(
            lowlevel, read_stream, write_stream, lifespan_state=state, init_options=options
        )


def serve_http(server: MCPServer, port: int) -> None:
    import uvicorn

    app = server.streamable_http_app(stateless_http=True, host="127.0.0.1")
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        # A subscriptions/listen stream never ends on its own: do not wait for it.
        timeout_graceful_shutdown=1,
    )
    uvicorn.Server(config).run()


def stdio_command(name: str = "testmcp", *, legacy: bool = False) -> tuple[str, list[str]]:
    """The command and args that run the stdio server (for an MCP config)."""
    return sys.executable, [str(SCRIPT), "stdio", "--name", name, *(["--legacy"] if legacy else [])]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MCPHTTPServer:
    """The HTTP server as a child process on 127.0.0.1:``port``; restartable on that port."""

    def __init__(
        self, port: int | None = None, *, name: str = "testmcp", env: dict[str, str] | None = None
    ) -> None:
        self.port = port or free_port()
        self.name = name
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self, timeout: float = 30.0) -> MCPHTTPServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        args = [sys.executable, str(SCRIPT), "http", "--port", str(self.port), "--name", self.name]
        self.proc = subprocess.Popen(
            args, env={**os.environ, **self.env}, stdout=subprocess.DEVNULL, stderr=None
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"MCP HTTP server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"MCP HTTP server not listening on {self.port}") from None
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def __enter__(self) -> MCPHTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("transport", choices=["stdio", "http"])
    parser.add_argument("--name", default="testmcp")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--legacy", action="store_true", help="stdio: handshake era only")
    args = parser.parse_args(argv)
    server = build_server(args.name)
    if args.transport == "stdio" and args.legacy:
        anyio.run(serve_stdio_legacy, server)
    elif args.transport == "stdio":
        server.run("stdio")
    else:
        serve_http(server, args.port or free_port())


if __name__ == "__main__":
    main()
