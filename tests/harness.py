"""Running the real app for tests: a real uvicorn server on 127.0.0.1 (in this
process, or as a `tiermem serve` subprocess) and a real httpx client reading SSE."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvicorn

from app.limits import http_protocol
from app.main import create_app
from app.services import Services
from infra.settings import Settings
from tests.servers.redis_server import free_port

REPO = Path(__file__).resolve().parent.parent


def make_settings(data_dir: Path, redis_url: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": data_dir,
        "redis_url": redis_url,
        "milvus_uri": str(data_dir / "milvus.db"),
        "embeddings": "hash",
        # The canned development LLM, explicitly: with TIERMEM_LLM unset the app
        # would start the embedded vLLM engine where it is installed (tests/engine
        # runs that one, shared across its module).
        "llm": "dev",
        # No prewarm requests unless a test asks for them: most tests count the
        # requests their fake LLM gets (tests/e2e/test_prewarm.py turns it on).
        "prewarm": False,
        "auth": "off",
        "sweep_interval_s": 3600.0,
        "log_format": "text",
    }
    base.update(overrides)
    return Settings(**base)


class AppServer:
    """The app under a real uvicorn server, in this process's event loop."""

    def __init__(self, settings: Settings, services: Services | None = None) -> None:
        self.settings = settings
        self.services = services or Services(settings)
        self.port = free_port()
        app = create_app(settings, self.services)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, loop="asyncio", http=http_protocol(settings),
            lifespan="on", log_config=None, access_log=False, timeout_graceful_shutdown=10,
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> AppServer:
        self._task = asyncio.create_task(self.server.serve())
        deadline = time.monotonic() + 60
        while not self.server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("server exited during start")
            if time.monotonic() > deadline:
                raise TimeoutError("app did not start")
            await asyncio.sleep(0.02)
        return self

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await asyncio.wait_for(self._task, timeout=60)

    async def __aenter__(self) -> AppServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class ServeProcess:
    """`tiermem serve` as a real subprocess, configured through TIERMEM_* env."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        # The development LLM unless the test says otherwise (see make_settings).
        self.env = {**os.environ, "TIERMEM_LLM": "dev", "TIERMEM_PREWARM": "false", **env,
                    "TIERMEM_PORT": str(self.port),
                    "TIERMEM_HOST": "127.0.0.1"}  # fmt: skip
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> ServeProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"], cwd=REPO, env=self.env,
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tiermem serve exited: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"tiermem serve not ready: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


def l2_round_trips(services: Services) -> int:
    """Round trips the app's L2 store made so far (its Prometheus counter)."""
    # Collected from the one counter: the registry's get_sample_value walks
    # every metric, histograms included (a tenth of the CPU of a loaded bench).
    for metric in services.metrics.l2_round_trips.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                return int(sample.value)
    return 0


@dataclass
class SSEEvent:
    id: str | None
    event: str
    data: dict[str, Any]


@dataclass
class TurnResult:
    status_code: int
    events: list[SSEEvent] = field(default_factory=list)
    body: dict[str, Any] | None = None
    heartbeats: int = 0

    @property
    def text(self) -> str:
        return "".join(e.data["text"] for e in self.events if e.event == "token")

    @property
    def final(self) -> SSEEvent:
        return self.events[-1]

    @property
    def done(self) -> dict[str, Any]:
        ends = [e for e in self.events if e.event == "done"]
        assert ends, f"no done event in {[e.event for e in self.events]}"
        return ends[-1].data


def parse_sse(lines: list[str]) -> tuple[list[SSEEvent], int]:
    events: list[SSEEvent] = []
    heartbeats = 0
    cur: dict[str, str] = {}
    for line in lines:
        if line == "":
            if cur:
                events.append(SSEEvent(cur.get("id"), cur.get("event", "message"),
                                       orjson.loads(cur.get("data", "{}"))))  # fmt: skip
                cur = {}
            continue
        if line.startswith(":"):
            heartbeats += 1
            continue
        name, _, value = line.partition(":")
        cur[name] = value[1:] if value.startswith(" ") else value
    return events, heartbeats


async def post_turn(
    client: httpx.AsyncClient,
    base: str,
    session: str,
    message: str,
    user: str = "u1",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> TurnResult:
    body = {"user_id": user, "message": message, **extra}
    async with client.stream(
        "POST", f"{base}/v1/sessions/{session}/turns", json=body, headers=headers or {}
    ) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return TurnResult(resp.status_code, body=resp.json())
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in resp.aiter_lines()]
    events, heartbeats = parse_sse(lines)
    return TurnResult(200, events, heartbeats=heartbeats)
