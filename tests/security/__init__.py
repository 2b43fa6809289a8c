"""Security suites: rate limits, bad input and fuzzing, tenant isolation, auth.

Helpers shared by these suites live here (this package has no conftest of its
own): an API-key file writer, a Redis key scanner, and ``ThreadedApp``, the
real app under a real uvicorn server in a thread and event loop of its own, for
tests that drive it with blocking clients (Hypothesis, schemathesis) and for
timing requests without the test's own loop in the way.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import redis
import uvicorn

from app.auth import hash_key
from app.main import create_app
from app.services import Services
from infra.settings import Settings
from tests.servers.redis_server import free_port

T = TypeVar("T")


def write_keys(path: Path, entries: Iterable[tuple[str, str] | tuple[str, str, bool]]) -> None:
    """An API key file: (key, tenant) or (key, tenant, revoked); only hashes are written.

    Written to a temp file and renamed, as a Kubernetes Secret update would be."""
    keys = []
    for entry in entries:
        key, tenant, *rest = entry
        keys.append({"sha256": hash_key(key), "tenant": tenant, "name": f"k-{tenant}",
                     "revoked": bool(rest and rest[0])})  # fmt: skip
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": keys}))
    tmp.replace(path)


def scan_keys(redis_url: str, pattern: str = "*") -> set[bytes]:
    client = redis.Redis.from_url(redis_url)
    try:
        return set(client.scan_iter(match=pattern, count=1000))
    finally:
        client.close()


class ThreadedApp:
    """The app (lifespan on) under uvicorn, in a daemon thread with its own loop."""

    def __init__(self, settings: Settings, services: Services | None = None) -> None:
        self.settings = settings
        self.services = services or Services(settings)
        self.port = free_port()
        config = uvicorn.Config(
            create_app(settings, self.services), host="127.0.0.1", port=self.port,
            loop="asyncio", http="httptools", lifespan="on", log_config=None,
            access_log=False, timeout_graceful_shutdown=5,
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _main(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self.server.serve())
        except BaseException as exc:  # reported by start()
            self._error = exc
        finally:
            self.loop.close()

    def start(self, timeout: float = 60.0) -> ThreadedApp:
        self._thread = threading.Thread(target=self._main, daemon=True, name="tiermem-app")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"app exited during start: {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("app did not start")
            time.sleep(0.02)
        return self

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
        """Runs ``fn()`` on the app's loop (where its Redis and Milvus clients live)."""
        assert self.loop is not None

        async def run() -> T:
            return await fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.server.force_exit = True
                self._thread.join(10)

    def __enter__(self) -> ThreadedApp:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
