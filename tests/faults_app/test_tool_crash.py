"""A side-effecting tool never runs twice: ``kill -9`` of ``tiermem serve`` right
after a tool ran, then the client's retry (same ``turn_id``) on a fresh process.

The tool (``local__count`` of a real stdio MCP server, a child of the app) counts
its invocations in a file. Two kill points:

- while the call is still in flight, its side effect done: only the step's intent
  is in L2. The retry does not call the tool again; the model gets an error result
  saying the call may have run;
- after the step's result was recorded, while the next LLM request waits: the retry
  reuses the recorded result.

Either way the file says one invocation, and the turn completes on the new process.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.harness import ServeProcess, TurnResult, post_turn
from tests.servers.fake_vllm import FakeVLLM
from tests.servers.mcp_servers import stdio_command

pytestmark = [pytest.mark.timeout(300)]


@pytest.fixture
def fake_llm() -> Iterator[FakeVLLM]:
    llm = FakeVLLM(reply_tokens=6).start()
    yield llm
    llm.stop()


def serve_env(tmp_path: Path, redis_url: str, llm: FakeVLLM, count_file: Path) -> dict[str, str]:
    command, args = stdio_command("local")
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"local": {
        "command": command, "args": args, "env": {"MCP_COUNT_FILE": str(count_file)},
    }}}))  # fmt: skip
    return {
        "TIERMEM_REDIS_URL": redis_url,
        "TIERMEM_DATA_DIR": str(tmp_path / "data"),
        "TIERMEM_AUTH": "off",
        "TIERMEM_EMBEDDINGS": "hash",
        "TIERMEM_LLM_URL": llm.base_url,
        "TIERMEM_MCP_CONFIG": str(config),
        "TIERMEM_TOOL_TIMEOUT_S": "120",
        "TIERMEM_LOG_FORMAT": "json",
    }


def invocations(count_file: Path) -> int:
    return len(count_file.read_text().splitlines()) if count_file.exists() else 0


def mcp_connections(log: Path) -> int:
    """How many times a server process writing ``log`` said its MCP server is in.

    A pod is ready without its MCP servers (it waits 10 s for them, then goes on
    and lists their tools once they come); a session started before that has no
    ``local__count``. A stdio server took 12.6 s to start in the suite beside a
    CPU burner, so the test waits for it, not for readiness alone."""
    return log.read_text(errors="replace").count("MCP server 'local' connected")


def wait_until(predicate: Any, what: str, within_s: float = 120.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stream_in_background(url: str, sid: str, message: str, turn_id: str) -> threading.Thread:
    """Streams the turn from a thread, so the test can kill the server while the
    stream is open (what that stream gets does not matter: the retry's does)."""

    def run() -> None:
        try:
            body = {"user_id": "u1", "message": message, "turn_id": turn_id}
            url_ = f"{url}/v1/sessions/{sid}/turns"
            with httpx.stream("POST", url_, json=body, timeout=300) as r:
                for _ in r.iter_lines():
                    pass
        except httpx.HTTPError:
            pass  # the server was killed under it

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


async def retry(url: str, sid: str, message: str, turn_id: str) -> TurnResult:
    async with httpx.AsyncClient(timeout=300) as client:
        return await post_turn(client, url, sid, message, turn_id=turn_id)


@pytest.mark.parametrize("kill_point", ["during_the_call", "after_the_result"])
async def test_kill_after_a_side_effecting_tool_ran_never_runs_it_twice(
    tmp_path: Path, redis_url: str, fake_llm: FakeVLLM, kill_point: str
) -> None:
    count_file = tmp_path / "count.txt"
    env = serve_env(tmp_path, redis_url, fake_llm, count_file)
    log = tmp_path / "serve.log"
    sid, turn_id = f"crash-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    # The call holds a while after counting: long in the first case (the kill
    # lands mid-call), short in the second (the hang is set before the next request).
    hold = 600 if kill_point == "during_the_call" else 2
    message = f'CALL local__count {{"hold_s": {hold}}}'
    first = ServeProcess(env, log).start()
    try:
        wait_until(lambda: mcp_connections(log) >= 1, "the MCP server of the first process")
        stream_in_background(first.url, sid, message, turn_id)
        wait_until(lambda: invocations(count_file) == 1, "the tool's side effect")
        if kill_point == "after_the_result":
            fake_llm.inject("hang", times=1)  # the next LLM request never answers
            wait_until(lambda: len(fake_llm.chat_requests()) == 2, "the next LLM request")
        assert first.proc is not None
        children = psutil.Process(first.proc.pid).children(recursive=True)
        first.kill9()
    finally:
        if first.proc is not None and first.proc.poll() is None:
            first.kill9()
    # A pod's processes die with it; here the MCP child outlives its parent by
    # as long as its call holds, so it goes the same way.
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    fake_llm.clear_failures()
    # The log is shared; the first process may have connected more than once.
    connected_before = mcp_connections(log)
    second = ServeProcess(env, log).start()
    try:
        wait_until(
            lambda: mcp_connections(log) > connected_before, "the MCP server of the second process"
        )
        r = await retry(second.url, sid, message, turn_id)
        assert r.status_code == 200, r.body
        assert r.done["status"] == "complete", [e.event for e in r.events]
        (result,) = [e.data for e in r.events if e.event == "tool_result"]
        if kill_point == "during_the_call":
            assert result["ok"] is False and "not run again" in result["content"]
        else:
            assert result == {**result, "ok": True, "content": "1"}
        assert invocations(count_file) == 1
        # The stored turn holds the one call and its result.
        async with httpx.AsyncClient(timeout=30) as client:
            stored = (await client.get(f"{second.url}/v1/sessions/{sid}/turns")).json()
        (turn,) = stored["turns"]
        assert [m["role"] for m in turn["messages"]] == ["user", "assistant", "tool", "assistant"]
    finally:
        assert second.terminate() == 0
