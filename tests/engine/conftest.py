"""The real-engine suite: real vLLM processes (infra/engine.py), started once and shared.

Where the engine is not installed (not Linux x86_64, `make install` could not
install it, no prepared model) every test here is skipped, and the reason is
printed at the end of the run in capitals, so a green run never hides that the
real engine was not exercised.

Engine start-up costs tens of seconds on idle cores, minutes on loaded ones (three
Python processes import torch and vLLM), so the suite starts two engines, once, at
the same time: the one a real `tiermem serve` (no TIERMEM_LLM_URL) starts as its
child, and one started here; every test shares them, and the replica tests use
both as two replicas.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from infra.engine import EmbeddedEngine, EngineStatus, engine_status
from infra.settings import Settings
from tests.harness import ServeProcess

# KV cache per engine (GiB): a few sessions of a few thousand tokens each fit.
KV_CACHE_GIB = 1
# The longest wait for an engine to serve: generous, the machine may be loaded.
START_S = 900


def _status() -> EngineStatus:
    # The repository's data dir: where `make install` prepared the model.
    return engine_status(Settings(llm="engine"))


STATUS = _status()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if STATUS.usable:
        return
    skip = pytest.mark.skip(reason=f"REAL-ENGINE SUITE SKIPPED: {STATUS.reason}")
    for item in items:
        if "tests/engine/" in str(item.path).replace("\\", "/"):
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not STATUS.usable:
        terminalreporter.write_sep(
            "!", f"REAL-ENGINE SUITE SKIPPED: {STATUS.reason}", red=True, bold=True
        )


def _cpus() -> tuple[str | None, str | None]:
    # vLLM's CPU backend pins its threads ("auto": the first core); two engines on
    # one machine get a core each.
    try:
        usable = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None, None
    return (str(usable[0]), str(usable[1])) if len(usable) >= 2 else (None, None)


@dataclass
class ServedEngine:
    """The engine `tiermem serve` runs, as its log names it."""

    url: str
    pid: int
    start_s: float


class Engines:
    """A `tiermem serve` with its embedded engine, and an engine of the suite's own."""

    def __init__(self, root: Path, redis_url: str) -> None:
        serve_cpu, own_cpu = _cpus()
        env = {
            "TIERMEM_LLM": "auto",  # what `tiermem serve` does with nothing set
            "TIERMEM_PREWARM": "true",  # the default (the harness turns it off)
            "TIERMEM_DATA_DIR": str(root / "serve-data"),
            "TIERMEM_ENGINE_PYTHON": str(STATUS.python),
            "TIERMEM_ENGINE_MODEL_DIR": str(STATUS.model_dir),
            "TIERMEM_ENGINE_KV_CACHE_GIB": str(KV_CACHE_GIB),
            "TIERMEM_ENGINE_START_TIMEOUT_S": str(START_S),
            "TIERMEM_REDIS_URL": redis_url,
            "TIERMEM_EMBEDDINGS": "hash",
            "TIERMEM_AUTH": "off",
            "TIERMEM_LOG_FORMAT": "text",
            "TIERMEM_LLM_MAX_TOKENS": "16",
            "TIERMEM_LLM_TEMPERATURE": "0",
            "TIERMEM_LLM_FIRST_TOKEN_TIMEOUT_S": "300",
        }
        if serve_cpu is not None:
            env["TIERMEM_ENGINE_CPU_BIND"] = serve_cpu
        self.serve = ServeProcess(env, root / "serve.log")
        self.own = EmbeddedEngine(
            STATUS.python, STATUS.model_dir, root / "engine",
            kv_cache_gib=KV_CACHE_GIB, cpu_bind=own_cpu, start_timeout=START_S,
        )  # fmt: skip
        self.served: ServedEngine | None = None
        self._start = asyncio.ensure_future(
            asyncio.gather(asyncio.to_thread(self.serve.start, START_S + 60), self.own.start())
        )

    async def ready(self) -> Engines:
        await asyncio.shield(self._start)
        if self.served is None:
            log = self.serve.log_path.read_text(errors="replace")
            m = re.search(
                r"embedded vLLM engine serves \S+ at (\S+) \(pid (\d+), ready in ([\d.]+) s", log
            )
            assert m, f"tiermem serve did not say what answers:\n{log[-3000:]}"
            self.served = ServedEngine(m.group(1), int(m.group(2)), float(m.group(3)))
        return self

    @property
    def replica_urls(self) -> list[str]:
        assert self.served is not None
        return [self.served.url, self.own.url]

    async def stop(self) -> None:
        self._start.cancel()
        await asyncio.gather(self._start, return_exceptions=True)
        try:
            if self.serve.proc is not None and self.serve.proc.poll() is None:
                # SIGTERM: tiermem drains, stops its engine, exits 0.
                rc = await asyncio.to_thread(self.serve.terminate, 120)
                assert rc == 0, f"tiermem serve exited {rc}:\n{self.serve.log_tail()}"
                if self.served is not None:
                    await _gone(self.served.pid, 60)
        finally:
            if self.serve.proc is not None and self.serve.proc.poll() is None:
                self.serve.kill9()
            await self.own.stop()


async def _gone(pid: int, within_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        assert asyncio.get_running_loop().time() < deadline, f"engine {pid} outlived tiermem"
        await asyncio.sleep(0.2)


@pytest.fixture(scope="session")
async def engines(redis_url: str) -> AsyncIterator[Engines]:
    root = Path(tempfile.mkdtemp(prefix="tiermem-engines-"))
    e = Engines(root, redis_url)
    try:
        yield await e.ready()
    finally:
        await e.stop()


@pytest.fixture(scope="session")
async def engine(engines: Engines) -> EmbeddedEngine:
    """The suite's own engine."""
    return engines.own
