"""The embedded Redis is supervised, and never outlives the app.

``tiermem serve`` runs as a real subprocess with no ``TIERMEM_REDIS_URL``, so it
starts its own redis-server under its data dir (infra/embedded_redis.py):

- the redis-server is ``kill -9``ed and, to make the outage last long enough to
  watch, its port is held meanwhile by a listener that hangs up on every
  connection (so Redis cannot bind it, and the app's client finds no Redis):
  ``/readyz`` turns 503 and turns end with a retryable error; once the port is
  free, the supervisor's next try brings Redis back on the same port and data,
  and turns work again in the same app process, with the turns stored before;
- the app is ``kill -9``ed: its redis-server ends too (PR_SET_PDEATHSIG), by a
  graceful SIGTERM shutdown, and a new app starts on the same data dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from infra.embedded_redis import RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_S, EmbeddedRedis
from infra.redis_client import create_redis
from tests.harness import REPO, ServeProcess, TurnResult, post_turn

COMMIT_DEADLINE_S = 1.0
REDIS_SOCKET_TIMEOUT_S = 1.0
# How long a redis-server may take to start and load a small AOF, or to shut
# down gracefully (EmbeddedRedis's stop_timeout): generous for a loaded machine.
REDIS_START_S = 10.0
REDIS_STOP_S = 10.0


def serve_env(tmp_path: Path) -> dict[str, str]:
    return {
        # Blank is unset (Settings): the app starts its embedded Redis.
        "TIERMEM_REDIS_URL": "",
        "TIERMEM_DATA_DIR": str(tmp_path / "data"),
        "TIERMEM_AUTH": "off",
        "TIERMEM_EMBEDDINGS": "hash",
        "TIERMEM_LOG_FORMAT": "text",
        "TIERMEM_COMMIT_DEADLINE_S": str(COMMIT_DEADLINE_S),
        "TIERMEM_REDIS_SOCKET_TIMEOUT_S": str(REDIS_SOCKET_TIMEOUT_S),
    }


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeProcess]:
    proc = ServeProcess(serve_env(tmp_path), tmp_path / "serve.log").start()
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        proc.terminate()


def gone(pid: int) -> bool:
    """Dead, reaped or not: a zombie waits for whoever adopted it to reap it."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(what: str, check: Any, timeout: float, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.1f} s")
        time.sleep(every)


def redis_child(app_pid: int) -> psutil.Process | None:
    """The app's live redis-server child, if it has one now."""
    for child in psutil.Process(app_pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.name() == "redis-server" and child.status() != psutil.STATUS_ZOMBIE:
                return child
    return None


def listen_port(proc: psutil.Process) -> int:
    ports = [c.laddr.port for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    assert len(ports) == 1, ports
    return int(ports[0])


class HangUp:
    """Listens on a port and closes every connection at once: whatever wants to
    bind the port cannot, and a client connecting there finds no Redis."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @classmethod
    def take(cls, port: int, timeout: float) -> HangUp | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # The dead server's closed connections sit in TIME_WAIT on the port.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                s.listen(128)
            except OSError:
                s.close()
                time.sleep(0.002)
                continue
            s.settimeout(0.05)
            return cls(s)
        return None

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()

    def release(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


def kill_redis_and_hold_its_port(app_pid: int) -> tuple[int, HangUp]:
    """``kill -9`` the app's redis-server and take its port before the supervisor
    restarts it (it waits RESTART_BACKOFF_S first). Should the restart win the
    race on a busy machine, the new server is killed in turn."""
    for _ in range(5):
        victim = wait_for("a redis-server child", lambda: redis_child(app_pid), REDIS_START_S)
        port = listen_port(victim)
        os.kill(victim.pid, signal.SIGKILL)
        holder = HangUp.take(port, timeout=RESTART_BACKOFF_S)
        if holder is not None:
            return port, holder
    raise AssertionError("the supervisor restarted Redis before the port could be taken, 5 times")


def failed_retryably(r: TurnResult) -> bool:
    if r.status_code != 200:
        err = (r.body or {}).get("error", {})
        return r.status_code == 503 and bool(err)
    if not r.events or r.final.event != "error":
        return False
    # Today's key is "retry"; it is being renamed "retryable".
    return bool(r.final.data.get("retryable", r.final.data.get("retry")))


def completed(r: TurnResult) -> bool:
    return r.status_code == 200 and bool(r.events) and r.final.event == "done"


async def test_a_killed_redis_is_restarted_and_turns_work_again(serve: ServeProcess) -> None:
    assert serve.proc is not None
    app_pid = serve.proc.pid
    session = "sup-" + uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(timeout=60) as c:
        before = await post_turn(c, serve.url, session, "remember the blue door", retrieve="never")
        assert completed(before), before.events[-1:]
        first_pid = redis_child(app_pid)
        assert first_pid is not None

        port, holder = kill_redis_and_hold_its_port(app_pid)
        try:
            # A failed ping is quick here (the holder hangs up); a socket timeout
            # bounds a slow one.
            async def not_ready() -> bool:
                return (await c.get(f"{serve.url}/readyz")).status_code == 503

            deadline = time.monotonic() + 2 * REDIS_SOCKET_TIMEOUT_S + 5
            while not await not_ready():
                assert time.monotonic() < deadline, "/readyz stayed 200 with Redis down"
                await asyncio.sleep(0.05)
            # A turn on a new session needs Redis at once; one on the session in
            # L1 needs it at the commit, which gives up after COMMIT_DEADLINE_S.
            fresh = await post_turn(c, serve.url, "sup-new-" + uuid.uuid4().hex[:6], "hello")
            assert failed_retryably(fresh), (fresh.status_code, fresh.body, fresh.events[-1:])
            held = await post_turn(c, serve.url, session, "and the red one", retrieve="never")
            assert failed_retryably(held), (held.status_code, held.body, held.events[-1:])
            print("while down:", fresh.status_code, fresh.body or fresh.final.data)
            print("while down:", held.status_code, held.body or held.final.data)
        finally:
            holder.release()

        # The supervisor's next try is at most RESTART_BACKOFF_MAX_S away.
        recovery_s = RESTART_BACKOFF_MAX_S + REDIS_START_S + COMMIT_DEADLINE_S
        deadline = time.monotonic() + recovery_s
        while True:
            again = await post_turn(c, serve.url, session, "and the green one", retrieve="never")
            if completed(again):
                break
            assert failed_retryably(again), (again.status_code, again.body, again.events[-1:])
            assert time.monotonic() < deadline, f"turns still failing {recovery_s:.0f} s later"
            await asyncio.sleep(0.2)
        assert (await c.get(f"{serve.url}/readyz")).status_code == 200
        state = (await c.get(f"{serve.url}/v1/sessions/{session}")).json()

    # Same app process, a new redis-server on the same port, the old turn kept.
    assert serve.proc.poll() is None
    now = redis_child(app_pid)
    assert now is not None and now.pid != first_pid.pid
    assert listen_port(now) == port
    assert state["turn_count"] >= 2
    log = serve.log_path.read_text(errors="replace")
    assert "exited with status -9; restarting it" in log
    assert "embedded Redis restarted" in log


async def test_the_redis_server_dies_with_the_app_even_by_kill_9(
    tmp_path: Path, serve: ServeProcess
) -> None:
    assert serve.proc is not None
    session = "orphan-" + uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(timeout=60) as c:
        r = await post_turn(c, serve.url, session, "keep this", retrieve="never")
        assert completed(r)
    redis = redis_child(serve.proc.pid)
    assert redis is not None
    redis_pid = redis.pid

    serve.kill9()
    # SIGTERM from the kernel the moment the app died, then Redis's own shutdown.
    wait_for(f"redis-server {redis_pid} to end", lambda: gone(redis_pid), REDIS_STOP_S)
    log = (tmp_path / "data" / "redis" / "redis.log").read_text(errors="replace")
    assert "Received SIGTERM" in log, log[-1500:]

    # Nothing is left on the data dir: a new app starts on it and has the turn.
    second = ServeProcess(serve_env(tmp_path), tmp_path / "serve2.log").start()
    try:
        async with httpx.AsyncClient(timeout=60) as c:
            state = (await c.get(f"{second.url}/v1/sessions/{session}")).json()
        assert state["turn_count"] == 1
    finally:
        second.terminate()


# --- the supervisor itself, in this process ----------------------------------------------
async def test_restarts_back_off_while_they_fail_and_stop_ends_supervision(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backoff, cap = 0.05, 0.4
    embedded = EmbeddedRedis(
        tmp_path, restart_backoff_s=backoff, restart_backoff_max_s=cap, stable_after_s=60
    )
    caplog.set_level(logging.WARNING, logger="infra.embedded_redis")
    url = await embedded.start()
    client = create_redis(url, socket_timeout=REDIS_SOCKET_TIMEOUT_S)
    try:
        await client.set("k", "v")
        first_pid, port = embedded.pid, embedded.port
        assert first_pid is not None and port is not None
        os.kill(first_pid, signal.SIGKILL)
        # This blocks the loop, so the supervisor cannot restart before the port is held.
        holder = HangUp.take(port, timeout=REDIS_START_S)
        assert holder is not None
        held_s = 6 * cap
        await asyncio.sleep(held_s)
        holder.release()
        deadline = time.monotonic() + cap + REDIS_START_S
        while embedded.restarts < 1:
            assert time.monotonic() < deadline, "not restarted after the port was freed"
            await asyncio.sleep(0.02)
        assert await client.get("k") == b"v"
        assert embedded.port == port and embedded.pid not in (None, first_pid)
    finally:
        await client.aclose()

    failed = [
        r for r in caplog.records if "restart" in r.getMessage() and "failed" in r.getMessage()
    ]
    # Doubling from `backoff` up to `cap`: far fewer tries than a retry loop
    # without backoff would make, and never two closer than the delay before them.
    expected: list[float] = []
    while sum(expected) < held_s:
        expected.append(min(cap, backoff * 2 ** len(expected)))
    assert 2 <= len(failed) <= len(expected) + 1, (len(failed), expected)
    print("failed tries:", len(failed), "schedule:", expected)
    gaps = [b.created - a.created for a, b in itertools.pairwise(failed)]
    assert all(gap >= expected[i + 1] * 0.9 for i, gap in enumerate(gaps)), (gaps, expected)
    assert any("restarted" in r.getMessage() for r in caplog.records)

    # stop(): the supervisor goes first, so the server stays down.
    pid = embedded.pid
    assert pid is not None
    await embedded.stop()
    assert gone(pid)
    await asyncio.sleep(2 * cap)
    assert not embedded.running
    assert not [
        p.pid
        for p in psutil.process_iter(["name", "cwd"])
        if p.info["name"] == "redis-server" and p.info["cwd"] == str(embedded.dir)
    ]


PARENT = """
import asyncio, sys
from pathlib import Path
from infra.embedded_redis import EmbeddedRedis

async def main() -> None:
    embedded = EmbeddedRedis(Path(sys.argv[2]))
    await embedded.start()
    print(embedded.pid, flush=True)
    await asyncio.sleep(3600)

if sys.argv[1] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_child_dies_with_its_parent_on_either_event_loop(tmp_path: Path, loop: str) -> None:
    # `tiermem serve` runs uvloop; the in-process test servers run asyncio.
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, loop, str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), "the parent did not start its Redis"
        redis_pid = int(line)
        assert psutil.Process(redis_pid).ppid() == parent.pid
    finally:
        parent.kill()
        parent.wait(10)
    wait_for(f"redis-server {redis_pid} to end", lambda: gone(redis_pid), REDIS_STOP_S)
