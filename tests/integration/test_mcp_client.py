"""infra/mcp.py against real MCP servers (tests/servers/mcp_servers.py), no mocks.

Stdio servers are child processes of this test process; HTTP servers are child
processes on 127.0.0.1 ports of their own. Covers the config file, listing and
calling over both transports, concurrent calls on one connection (one child, one
pid), deadlines (the call is cancelled on the server, the connection survives), a
child that crashes mid-call or is killed -9 (in-flight calls fail at once, the
connection comes back), HTTP servers down at start, going away and coming back,
tool-list changes (2026-07-28 listen streams, 2025-era notifications, periodic
refresh), and aclose leaving no child behind.

Every wait polls the condition it waits for, with a generous deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psutil
import pytest

from infra.errors import Misconfigured, Unavailable
from infra.mcp import (
    MCPCallError,
    MCPConfigError,
    MCPConnections,
    MCPServerConfig,
    MCPTool,
    load_mcp_config,
)
from tests.servers.mcp_servers import MCPHTTPServer, free_port, stdio_command

DEADLINE_S = 30.0
TOOL_NAMES = [
    "add",
    "add_tool",
    "count",
    "crash",
    "echo",
    "fail",
    "huge",
    "image",
    "pid",
    "rendezvous",
    "sleep",
    "slow_count",
]


# --- helpers ---------------------------------------------------------------------------


def stdio_config(name: str, count_file: Path, *, legacy: bool = False) -> MCPServerConfig:
    command, args = stdio_command(name, legacy=legacy)
    return MCPServerConfig(
        name, command=command, args=tuple(args), env={"MCP_COUNT_FILE": str(count_file)}
    )


def connections(*configs: MCPServerConfig, **kwargs: object) -> MCPConnections:
    kwargs.setdefault("backoff_initial_s", 0.1)
    kwargs.setdefault("backoff_max_s", 0.5)
    return MCPConnections(configs, **kwargs)  # type: ignore[arg-type]


async def eventually(condition: Callable[[], bool], what: str, within: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:g} s: {what}")
        await asyncio.sleep(0.05)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stdio_children(name: str | None = None) -> list[psutil.Process]:
    """This process's live stdio MCP server children (of ``name`` if given)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = child.cmdline()
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.NoSuchProcess:
            continue
        ours = any(a.endswith("mcp_servers.py") for a in cmdline) and "stdio" in cmdline
        if ours and (name is None or cmdline[cmdline.index("--name") + 1] == name):
            found.append(child)
    return found


async def pid_of(conns: MCPConnections, server: str) -> int:
    return int((await conns.call(server, "pid", {}, timeout_s=DEADLINE_S)).content)


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def counts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mcp-counts")


@pytest.fixture(scope="module")
def beta_server(counts: Path) -> Iterator[MCPHTTPServer]:
    with MCPHTTPServer(name="beta", env={"MCP_COUNT_FILE": str(counts / "beta")}) as server:
        yield server


@pytest.fixture(scope="module")
async def shared(counts: Path, beta_server: MCPHTTPServer) -> AsyncIterator[MCPConnections]:
    """alpha (stdio) and beta (HTTP): both have the same tools, echo included."""
    conns = connections(
        stdio_config("alpha", counts / "alpha"), MCPServerConfig("beta", url=beta_server.url)
    )
    await conns.start(wait_s=DEADLINE_S)
    yield conns
    await conns.aclose()


# --- config ----------------------------------------------------------------------------


def test_config_common_format(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "files": {"command": "npx", "args": ["-y", "srv"], "env": {"A": "1"}},
                    "web-1": {
                        "type": "http",
                        "url": "https://example.test/mcp",
                        "headers": {"Authorization": "Bearer t"},
                    },
                    "plain": {"command": "srv", "disabled": False, "cache": {"get": 60}},
                }
            }
        )
    )
    with caplog.at_level(logging.WARNING, logger="infra.mcp"):
        files, web, plain = load_mcp_config(path)
    assert "disabled" in caplog.text
    assert (files.name, files.transport, files.command) == ("files", "stdio", "npx")
    assert files.args == ("-y", "srv") and dict(files.env) == {"A": "1"} and files.url is None
    with pytest.raises(TypeError):
        files.env["B"] = "2"  # type: ignore[index]
    assert (web.name, web.transport, web.url) == ("web-1", "http", "https://example.test/mcp")
    assert dict(web.headers) == {"Authorization": "Bearer t"} and web.command is None
    assert plain.args == () and dict(plain.env) == {}
    assert dict(plain.cache) == {"get": 60.0} and dict(files.cache) == {}

    path.write_text(json.dumps({"solo": {"url": "http://127.0.0.1:1/mcp"}}))  # no wrapper
    assert [c.name for c in load_mcp_config(path)] == ["solo"]
    path.write_text(json.dumps({"mcpServers": {}}))
    assert load_mcp_config(path) == []


@pytest.mark.parametrize(
    ("content", "server", "fragment"),
    [
        (None, None, "not found"),
        ("{not json", None, "not valid JSON"),
        ("[1, 2]", None, "JSON object"),
        ('{"mcpServers": []}', None, "'mcpServers'"),
        ('{"s": 3}', "s", "JSON object"),
        ('{"s": {"command": "x", "url": "http://h/mcp"}}', "s", "exactly one"),
        ('{"s": {"args": ["a"]}}', "s", "exactly one"),
        ('{"s": {"command": 7}}', "s", "'command'"),
        ('{"s": {"command": "  "}}', "s", "'command'"),
        ('{"s": {"command": "x", "args": "a b"}}', "s", "'args'"),
        ('{"s": {"command": "x", "args": [1]}}', "s", "'args'"),
        ('{"s": {"command": "x", "env": {"A": 1}}}', "s", "'env'"),
        ('{"s": {"command": "x", "headers": {}}}', "s", "headers"),
        ('{"s": {"url": "http://h/mcp", "env": {}}}', "s", "env"),
        ('{"s": {"url": "ftp://h/mcp"}}', "s", "'url'"),
        ('{"s": {"url": "http://h/mcp", "headers": ["x"]}}', "s", "'headers'"),
        ('{"s": {"url": "http://h/mcp", "type": "stdio"}}', "s", "'type'"),
        ('{"s": {"url": "http://h/sse", "type": "sse"}}', "s", "SSE"),
        ('{"s": {"command": "x", "cache": ["get"]}}', "s", "'cache'"),
        ('{"s": {"command": "x", "cache": {"get": 0}}}', "s", "'cache'"),
        ('{"s": {"command": "x", "cache": {"get": true}}}', "s", "'cache'"),
        ('{"s": {"url": "http://h/mcp", "cache": {"get": "60"}}}', "s", "'cache'"),
        ('{"a__b": {"command": "x"}}', "a__b", "'__'"),
        ('{"a b": {"command": "x"}}', "a b", "letters"),
        ('{"": {"command": "x"}}', "", "letters"),
        (json.dumps({"x" * 49: {"command": "x"}}), "x" * 49, "letters"),
    ],
)
def test_config_mistakes(tmp_path: Path, content: str | None, server: str | None, fragment: str):
    path = tmp_path / "mcp.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(MCPConfigError) as caught:
        load_mcp_config(path)
    message = str(caught.value)
    assert str(path) in message and fragment in message
    if server is not None:
        assert repr(server) in message
    assert isinstance(caught.value, Misconfigured)


def test_server_config_checks_itself() -> None:
    with pytest.raises(MCPConfigError, match="exactly one"):
        MCPServerConfig("s")
    with pytest.raises(MCPConfigError, match="exactly one"):
        MCPServerConfig("s", command="x", url="http://h/mcp")
    with pytest.raises(MCPConfigError, match="__"):
        MCPServerConfig("a__b", command="x")
    with pytest.raises(MCPConfigError, match="twice"):
        MCPConnections([MCPServerConfig("s", command="x"), MCPServerConfig("s", command="y")])


# --- listing and calling ---------------------------------------------------------------


async def test_tools_listed_over_both_transports(shared: MCPConnections) -> None:
    tools = shared.tools()
    assert set(tools) == {"alpha", "beta"}
    for server, listed in tools.items():
        assert [t.name for t in listed] == TOOL_NAMES  # sorted by name
        assert all(isinstance(t, MCPTool) and t.server == server for t in listed)
        by_name = {t.name: t for t in listed}
        assert by_name["echo"].read_only and by_name["echo"].idempotent
        assert not by_name["add"].read_only and not by_name["add"].idempotent
        assert by_name["echo"].description == "Echo the text back."
        assert set(by_name["add"].input_schema["properties"]) == {"a", "b"}
    status = shared.status()
    assert status["alpha"]["transport"] == "stdio" and status["beta"]["transport"] == "http"
    assert all(s["connected"] and s["restarts"] == 0 for s in status.values())


@pytest.mark.parametrize("server", ["alpha", "beta"])
async def test_calls(shared: MCPConnections, server: str) -> None:
    echo = await shared.call(server, "echo", {"text": "héllo"}, timeout_s=DEADLINE_S)
    assert echo.ok and echo.content == "héllo" and echo.structured == {"result": "héllo"}
    added = await shared.call(server, "add", {"a": 1, "b": 2.5}, timeout_s=DEADLINE_S)
    assert added.ok and added.content == "3.5"
    huge = await shared.call(server, "huge", {"chars": 300_000}, timeout_s=DEADLINE_S)
    assert huge.ok and huge.content == "x" * 300_000
    failed = await shared.call(server, "fail", {}, timeout_s=DEADLINE_S)
    assert not failed.ok and "deliberate failure" in failed.content
    image = await shared.call(server, "image", {}, timeout_s=DEADLINE_S)
    assert image.ok and image.content == "an image:\n[image image/png, 4 bytes]"

    with pytest.raises(MCPCallError) as caught:
        await shared.call(server, "nope", {}, timeout_s=DEADLINE_S)
    assert caught.value.kind == "unknown_tool" and not caught.value.retryable
    with pytest.raises(MCPCallError) as caught:
        await shared.call("gamma", "echo", {}, timeout_s=DEADLINE_S)
    assert caught.value.kind == "unknown_tool"


@pytest.mark.parametrize("server", ["alpha", "beta"])
async def test_each_call_runs_once(shared: MCPConnections, counts: Path, server: str) -> None:
    before = lines(counts / server)
    results = [await shared.call(server, "count", {}, timeout_s=DEADLINE_S) for _ in range(3)]
    assert [r.content for r in results] == [str(before + n) for n in (1, 2, 3)]
    assert lines(counts / server) == before + 3


@pytest.mark.parametrize("server", ["alpha", "beta"])
async def test_concurrent_calls_share_one_connection(shared: MCPConnections, server: str) -> None:
    pids = await asyncio.gather(*(pid_of(shared, server) for _ in range(12)))
    assert len(set(pids)) == 1
    if server == "alpha":
        assert [c.pid for c in stdio_children("alpha")] == [pids[0]]  # one child, that one
    # Six calls that each wait until all six have started: served one after the other,
    # the first would give up after within_s and answer "alone".
    tag = uuid.uuid4().hex
    met = await asyncio.gather(
        *(
            shared.call(
                server, "rendezvous", {"tag": tag, "parties": 6, "within_s": 20}, timeout_s=30
            )
            for _ in range(6)
        )
    )
    assert [r.content for r in met] == ["met 6"] * 6
    assert await pid_of(shared, server) == pids[0]
    assert shared.status()[server]["restarts"] == 0


async def test_calls_to_two_servers_run_at_once(shared: MCPConnections) -> None:
    args = {"tag": uuid.uuid4().hex, "parties": 2, "within_s": 20}
    met = await asyncio.gather(
        *(shared.call(server, "rendezvous", args, timeout_s=30) for server in ("alpha", "beta"))
    )
    assert [r.content for r in met] == ["met 2", "met 2"]


@pytest.mark.parametrize("server", ["alpha", "beta"])
async def test_timeout_cancels_the_call(shared: MCPConnections, counts: Path, server: str) -> None:
    pid, before = await pid_of(shared, server), lines(counts / server)
    started = time.monotonic()
    with pytest.raises(MCPCallError) as caught:
        await shared.call(server, "slow_count", {"seconds": 1.5}, timeout_s=0.3)
    assert caught.value.kind == "timeout" and caught.value.retryable
    assert isinstance(caught.value, Unavailable)
    assert time.monotonic() - started < 5
    # The same connection still serves, and by the end of this 2 s sleep the slow_count
    # would have counted, had it not been cancelled on the server.
    slept = await shared.call(server, "sleep", {"seconds": 2.0}, timeout_s=DEADLINE_S)
    assert slept.content == "slept"
    assert lines(counts / server) == before
    assert await pid_of(shared, server) == pid
    assert shared.status()[server]["restarts"] == 0


# --- stdio supervision -----------------------------------------------------------------


@pytest.mark.slow
async def test_crash_mid_call_then_reconnects(tmp_path: Path) -> None:
    changes: list[tuple[str, tuple[MCPTool, ...]]] = []
    conns = connections(
        stdio_config("crashy", tmp_path / "count"),
        on_tools_changed=lambda server, tools: changes.append((server, tools)),
    )
    try:
        await conns.start(wait_s=DEADLINE_S)
        assert len(changes) == 1 and changes[0][0] == "crashy"
        first = await pid_of(conns, "crashy")
        in_flight = asyncio.create_task(
            conns.call("crashy", "sleep", {"seconds": 60}, timeout_s=60)
        )
        started = time.monotonic()
        with pytest.raises(MCPCallError) as caught:
            await conns.call("crashy", "crash", {}, timeout_s=60)
        assert caught.value.kind == "crashed"
        with pytest.raises(MCPCallError) as caught:
            await in_flight
        assert caught.value.kind == "crashed"
        assert time.monotonic() - started < 10  # promptly, not at the 60 s deadline

        assert await conns.wait_connected("crashy", DEADLINE_S)
        second = await pid_of(conns, "crashy")
        assert second != first and not alive(first)
        echo = await conns.call("crashy", "echo", {"text": "back"}, timeout_s=DEADLINE_S)
        assert echo.content == "back"
        status = conns.status()["crashy"]
        assert status["connected"] and status["restarts"] == 1
        assert "closed" in status["last_error"]
        assert len(changes) == 1  # re-listed, but the same tools: no change
        assert [c.pid for c in stdio_children("crashy")] == [second]
    finally:
        await conns.aclose()


@pytest.mark.slow
async def test_kill_9_mid_call_then_reconnects(tmp_path: Path) -> None:
    conns = connections(stdio_config("killed", tmp_path / "count"))
    try:
        await conns.start(wait_s=DEADLINE_S)
        first = await pid_of(conns, "killed")
        in_flight = asyncio.create_task(
            conns.call("killed", "sleep", {"seconds": 60}, timeout_s=60)
        )
        await pid_of(conns, "killed")  # a round trip: the sleep is on its way
        started = time.monotonic()
        os.kill(first, signal.SIGKILL)
        with pytest.raises(MCPCallError) as caught:
            await in_flight
        assert caught.value.kind == "crashed"
        assert time.monotonic() - started < 10
        with pytest.raises(MCPCallError) as caught:
            await conns.call("killed", "echo", {"text": "x"}, timeout_s=30)
        assert caught.value.kind == "down"  # a new child takes a while to start
        assert await conns.wait_connected("killed", DEADLINE_S)
        assert await pid_of(conns, "killed") != first
        assert conns.status()["killed"]["restarts"] == 1
    finally:
        await conns.aclose()


async def test_command_that_cannot_start(tmp_path: Path) -> None:
    conns = connections(MCPServerConfig("ghost", command=str(tmp_path / "no-such-server")))
    try:
        await conns.start(wait_s=DEADLINE_S)  # never raises for a server that is down
        status = conns.status()["ghost"]
        assert not status["connected"] and "FileNotFoundError" in status["last_error"]
        assert conns.tools() == {}
        with pytest.raises(MCPCallError) as caught:
            await conns.call("ghost", "echo", {}, timeout_s=1)
        assert caught.value.kind == "down"
        assert not await conns.wait_connected("ghost", 0.2)
    finally:
        await conns.aclose()


async def test_aclose_leaves_no_child(tmp_path: Path) -> None:
    conns = connections(
        stdio_config("one", tmp_path / "one"), stdio_config("two", tmp_path / "two", legacy=True)
    )
    await conns.start(wait_s=DEADLINE_S)
    pids = [await pid_of(conns, "one"), await pid_of(conns, "two")]
    assert sorted(c.pid for c in stdio_children("one") + stdio_children("two")) == sorted(pids)
    in_flight = asyncio.create_task(conns.call("one", "sleep", {"seconds": 60}, timeout_s=60))
    await pid_of(conns, "one")
    await conns.aclose()
    assert not any(alive(pid) for pid in pids)
    assert stdio_children("one") == [] and stdio_children("two") == []
    with pytest.raises(MCPCallError) as caught:
        await in_flight
    assert caught.value.kind == "down"


# --- Streamable HTTP: down, gone, back -------------------------------------------------


@pytest.mark.slow
async def test_http_down_at_start_then_started(tmp_path: Path) -> None:
    server = MCPHTTPServer(free_port(), name="late", env={"MCP_COUNT_FILE": str(tmp_path / "c")})
    conns = connections(MCPServerConfig("late", url=server.url))
    try:
        started = time.monotonic()
        await conns.start(wait_s=DEADLINE_S)
        assert time.monotonic() - started < DEADLINE_S  # the first attempt failed fast
        status = conns.status()["late"]
        assert not status["connected"] and "Connect" in status["last_error"]
        with pytest.raises(MCPCallError) as caught:
            await conns.call("late", "echo", {"text": "x"}, timeout_s=5)
        assert caught.value.kind == "down"
        await asyncio.to_thread(server.start)
        assert await conns.wait_connected("late", DEADLINE_S)
        assert (await conns.call("late", "echo", {"text": "up"}, timeout_s=30)).content == "up"
        assert [t.name for t in conns.tools()["late"]] == TOOL_NAMES
    finally:
        await conns.aclose()
        server.stop()


@pytest.mark.slow
async def test_http_server_gone_then_back(tmp_path: Path) -> None:
    server = MCPHTTPServer(name="gone", env={"MCP_COUNT_FILE": str(tmp_path / "c")}).start()
    conns = connections(MCPServerConfig("gone", url=server.url))
    try:
        await conns.start(wait_s=DEADLINE_S)
        first = await pid_of(conns, "gone")
        await asyncio.to_thread(server.stop)
        with pytest.raises(MCPCallError) as caught:
            await conns.call("gone", "echo", {"text": "x"}, timeout_s=5)
        assert caught.value.kind == "down" and caught.value.retryable
        await eventually(lambda: not conns.status()["gone"]["connected"], "seen as down")
        assert [t.name for t in conns.tools()["gone"]] == TOOL_NAMES  # the list stays

        await asyncio.to_thread(server.start)
        assert await conns.wait_connected("gone", DEADLINE_S)
        assert await pid_of(conns, "gone") != first
        assert conns.status()["gone"]["restarts"] >= 1
    finally:
        await conns.aclose()
        server.stop()


# --- tool-list changes -----------------------------------------------------------------


@pytest.fixture(params=["stdio", "stdio-2025", "http"])
async def changing(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[str, MCPConnections, list[tuple[MCPTool, ...]]]]:
    """A server whose list can change (its own process), with refresh far away: only
    the server's own announcement can make the client re-list."""
    server: MCPHTTPServer | None = None
    if request.param == "http":
        server = MCPHTTPServer(name="chg", env={"MCP_COUNT_FILE": str(tmp_path / "c")}).start()
        config = MCPServerConfig("chg", url=server.url)
    else:
        config = stdio_config("chg", tmp_path / "c", legacy=request.param == "stdio-2025")
    changes: list[tuple[MCPTool, ...]] = []
    conns = connections(
        config, refresh_s=3600, on_tools_changed=lambda _server, tools: changes.append(tools)
    )
    await conns.start(wait_s=DEADLINE_S)
    yield request.param, conns, changes
    await conns.aclose()
    if server is not None:
        server.stop()


async def test_list_changed(
    changing: tuple[str, MCPConnections, list[tuple[MCPTool, ...]]],
) -> None:
    kind, conns, changes = changing
    expected = "2025-11-25" if kind == "stdio-2025" else "2026-07-28"
    assert conns.status()["chg"]["protocol_version"] == expected
    assert [[t.name for t in c] for c in changes] == [TOOL_NAMES]
    added = await conns.call("chg", "add_tool", {"name": "zz_new"}, timeout_s=DEADLINE_S)
    assert added.content == "added zz_new"
    await eventually(lambda: len(changes) == 2, "on_tools_changed with the new list")
    assert [t.name for t in changes[1]] == [*TOOL_NAMES, "zz_new"]
    assert conns.tools()["chg"] == changes[1]
    result = await conns.call("chg", "zz_new", {}, timeout_s=DEADLINE_S)
    assert result.content == "zz_new ok"


async def test_periodic_refresh_finds_silent_changes(tmp_path: Path) -> None:
    changes: list[tuple[MCPTool, ...]] = []
    conns = connections(
        stdio_config("quiet", tmp_path / "c"),
        refresh_s=0.5,
        on_tools_changed=lambda _server, tools: changes.append(tools),
    )
    try:
        await conns.start(wait_s=DEADLINE_S)
        args = {"name": "hush", "announce": False}
        await conns.call("quiet", "add_tool", args, timeout_s=DEADLINE_S)
        await eventually(lambda: "hush" in {t.name for t in conns.tools()["quiet"]}, "refresh")
        assert len(changes) == 2
    finally:
        await conns.aclose()
