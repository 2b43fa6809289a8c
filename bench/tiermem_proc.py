"""tiermem as the benchmarks run it: the real app (``create_app`` + ``Services``)
under uvicorn with uvloop and httptools, as ``tiermem serve`` runs it, in a process
of its own, with a probe for the benchmark driver.

The probe changes nothing on the turn path; it only watches it:

- the LLM client is wrapped to time how long each turn waits on the LLM
  (request sent -> stream finished, summed over the awaits of the stream);
- the turn runner is wrapped to note, per turn, when the request arrived, when
  the LLM request went out, when ``done`` went out, when the graph finished,
  the graph's own phase timings, whether L1 hit, and ``tiermem_l2_round_trips_total``
  between the start of the turn and ``done``.

``GET /bench/turns?clear=1`` returns those records; ``GET /bench/stats`` the
process's CPU time and RSS, L1 and L2 counters and a few Prometheus counters.

Configuration comes from the ``TIERMEM_*`` environment, as for ``tiermem serve``;
``BENCH_PROFILE`` as in ``bench.common.serve``.
Run: ``python -m bench.tiermem_proc --port P``.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import AsyncGenerator
from typing import Any

import psutil
import uvicorn
from fastapi import APIRouter, Request

from app.logging_setup import setup_logging
from app.main import create_app
from app.services import Services
from bench.common import serve
from graph.builder import TurnRunner
from graph.events import TurnEvent
from graph.state import TurnControl, TurnInput
from infra.llm import LLMClient, LLMEvent, LLMToken
from infra.settings import Settings


def l2_round_trips(services: Services) -> int:
    # Collected from the one counter: the registry's get_sample_value walks
    # every metric, histograms included (a tenth of the CPU of a loaded bench).
    for metric in services.metrics.l2_round_trips.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                return int(sample.value)
    return 0


class _LLMWait:
    __slots__ = ("end", "first_token", "request", "wait")

    def __init__(self) -> None:
        self.request: float | None = None
        self.first_token: float | None = None
        self.end: float | None = None
        self.wait = 0.0


class TimedLLM:
    """Wraps the turn's LLM client; notes per session key how long the turn
    waited on the LLM. One turn per session runs at a time (the L1 lock)."""

    def __init__(self, inner: LLMClient) -> None:
        self.inner = inner
        self.name = inner.name
        self.is_dev = inner.is_dev
        self.waits: dict[str, _LLMWait] = {}

    @property
    def model_label(self) -> str:
        return self.inner.model_label

    async def stream_chat(
        self, messages: Any, *, session_key: str, **options: Any
    ) -> AsyncGenerator[LLMEvent, None]:
        w = self.waits.setdefault(session_key, _LLMWait())
        w.request = time.perf_counter()
        gen = self.inner.stream_chat(messages, session_key=session_key, **options)
        try:
            while True:
                t = time.perf_counter()
                try:
                    ev = await anext(gen)
                except StopAsyncIteration:
                    w.end = time.perf_counter()
                    w.wait += w.end - t
                    return
                now = time.perf_counter()
                w.wait += now - t
                if w.first_token is None and isinstance(ev, LLMToken):
                    w.first_token = now
                yield ev
        finally:
            await gen.aclose()

    async def complete(self, messages: Any, *, session_key: str, **options: Any) -> Any:
        return await self.inner.complete(messages, session_key=session_key, **options)

    async def health(self) -> bool:
        return await self.inner.health()

    async def aclose(self) -> None:
        await self.inner.aclose()


class RecordingRunner(TurnRunner):
    """The turn runner, noting what the benchmark needs about each turn."""

    def __init__(self, services: Services, timed: TimedLLM) -> None:
        super().__init__(services.runner.deps)
        self.services = services
        self.timed = timed
        self.records: list[dict[str, Any]] = []

    async def run(
        self, inp: TurnInput, control: TurnControl, started: float | None = None
    ) -> dict[str, Any]:
        started = time.perf_counter() if started is None else started
        key = f"{inp.tenant}:{inp.session_id}"
        services = self.services
        rec: dict[str, Any] = {"session": inp.session_id, "l1_hit": None, "status": None}
        rt0 = l2_round_trips(services)
        rec["t_run"] = time.perf_counter() - started
        emit = control.emit

        def watch(ev: TurnEvent) -> None:
            kind = ev.name
            if kind == "meta":
                rec["l1_hit"] = ev.data().get("l1_hit")
            elif kind in ("done", "error"):
                rec["t_done"] = time.perf_counter() - started
                rec["round_trips_to_done"] = l2_round_trips(services) - rt0
                data = ev.data()
                rec["status"] = data.get("status", kind)
                usage = data.get("usage") or {}
                rec["prompt_tokens"] = usage.get("prompt_tokens")
                rec["archived_batch"] = usage.get("archived_batch")
            emit(ev)

        control.emit = watch
        final = await super().run(inp, control, started)
        rec["t_end"] = time.perf_counter() - started
        w = self.timed.waits.pop(key, None) or _LLMWait()
        rec["llm_wait"] = w.wait
        rec["t_llm_request"] = (w.request - started) if w.request else None
        rec["t_first_token"] = (w.first_token - started) if w.first_token else None
        # From the end of the LLM stream to the end of the turn: commit, done, graph exit.
        rec["after_llm"] = (rec["t_end"] - (w.end - started)) if w.end else None
        timings = dict(final.get("timings") or {})
        rec["timings"] = timings
        rec["nodes_outside_llm"] = sum(v for k, v in timings.items() if k != "agent")
        # Everything the service did for this turn except wait on the LLM.
        rec["own"] = rec["t_end"] - w.wait
        self.records.append(rec)
        return final


class BenchServices(Services):
    async def start(self) -> None:
        await super().start()
        timed = TimedLLM(self.llm)
        # The archiver keeps the plain client: only turn LLM time is subtracted.
        self.runner.deps.llm = timed
        # The app's runner gives way to the recording one, warm runs and all.
        await self.runner.aclose()
        self.runner = RecordingRunner(self, timed)
        self._stack.push_async_callback(self.runner.aclose)
        self.runner.refill()


def probe_router(services: BenchServices) -> APIRouter:
    router = APIRouter()
    proc = psutil.Process()

    @router.get("/bench/turns")
    async def turns(request: Request) -> list[dict[str, Any]]:
        runner = services.runner
        assert isinstance(runner, RecordingRunner)
        out = list(runner.records)
        if request.query_params.get("clear"):
            runner.records.clear()
        return out

    @router.get("/bench/stats")
    async def stats(request: Request) -> dict[str, Any]:
        if request.query_params.get("gc"):
            gc.collect()
        cpu = proc.cpu_times()
        reg = services.metrics.registry
        return {
            "cpu_s": cpu.user + cpu.system,
            "rss": proc.memory_info().rss,
            "l1_sessions": len(services.l1),
            "l1_bytes": services.l1.bytes,
            "l1_hits": services.l1.hits,
            "l1_misses": services.l1.misses,
            "l2_round_trips": l2_round_trips(services),
            "archive_pending": services.archiver.pending_tasks,
            "l3_writes": reg.get_sample_value("tiermem_l3_writes_total") or 0.0,
            "summary_tokens": reg.get_sample_value("tiermem_summary_tokens_total") or 0.0,
            "turns_in_flight": len(services.turn_tasks),
        }

    return router


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    # The benchmarks measure tiermem's own overhead: the development LLM unless
    # the driver sets TIERMEM_LLM (or TIERMEM_LLM_URL) itself.
    os.environ.setdefault("TIERMEM_LLM", "dev")
    settings = Settings(host="127.0.0.1", port=args.port)
    setup_logging(settings.log_format, settings.log_level)
    services = BenchServices(settings)
    app = create_app(settings, services)
    app.include_router(probe_router(services))
    config = uvicorn.Config(
        app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
        lifespan="on", log_config=None, access_log=False, timeout_graceful_shutdown=5,
    )  # fmt: skip
    serve(config)


if __name__ == "__main__":
    main()
