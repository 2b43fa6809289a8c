"""What the benchmark scripts share: launching the servers they measure (each in a
process of its own), reading a turn's SSE stream with timings, statistics,
Redis INFO probes, machine facts, and writing tables (console, Markdown, JSON).

Nothing here is a test. Every server is started on a free 127.0.0.1 port and
stopped by whoever started it; Redis is always a server of our own, never the
machine's 6379.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
from fastapi import FastAPI, Request

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/, not the repo, on the path
    sys.path.insert(0, str(REPO))

from tests.servers.redis_server import RedisServer, free_port  # noqa: E402

# The marker each benchmark message carries, so the fake LLM's own TTFT of a
# request can be paired with the TTFT the client saw for the same turn. Anchored
# at the end: a summary request's transcript holds markers too, never at its end.
MARKER_RE = re.compile(r"\[bench ([A-Za-z0-9._#:-]+)\]\s*$")


def marker(session: str, turn: int) -> str:
    return f"{session}#{turn}"


def with_marker(text: str, session: str, turn: int) -> str:
    return f"{text} [bench {marker(session, turn)}]"


# --------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(values: Iterable[float]) -> dict[str, float]:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return {
        "n": len(v),
        "median": pct(v, 50),
        "p90": pct(v, 90),
        "p99": pct(v, 99),
        "mean": sum(v) / len(v) if v else math.nan,
        "max": max(v) if v else math.nan,
    }


def ms(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x * 1000:.{digits}f}"


def num(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def ratio(a: float, b: float) -> float:
    if b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


# --------------------------------------------------------------------------------------
# machine and output
# --------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = math.nan
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "git": _git_state(),
    }


def _git_state() -> str:
    """The commit measured, and whether tracked files outside bench/ differed from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench"],
            cwd=REPO, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" + uncommitted changes" if changed else "")


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"{info['date']} · {info['cores']} cores ({info['cpu']}) · "
        f"{info['memory_gib']} GiB · Python {info['python']} · "
        f"load average at start {info['load_avg_at_start'][0]} · commit {info.get('git', '?')}"
    )


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""

    def markdown(self) -> str:
        out = [f"**{self.title}**", ""]
        out.append("| " + " | ".join(self.headers) + " |")
        out.append("|" + "|".join("---" for _ in self.headers) + "|")
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.note:
            out += ["", self.note]
        return "\n".join(out)

    def print(self) -> None:
        from rich.console import Console
        from rich.table import Table as RichTable

        t = RichTable(title=self.title, title_justify="left")
        for i, h in enumerate(self.headers):
            t.add_column(h, justify="left" if i == 0 else "right")
        for r in self.rows:
            t.add_row(*r)
        console = Console(width=None if sys.stdout.isatty() else 200)
        console.print(t)
        if self.note:
            console.print(self.note, style="dim")


def write_results(name: str, data: dict[str, Any], tables: list[Table], header: str) -> Path:
    """Writes bench/results/<name>.json and <name>.md (the tables as Markdown)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"{name}.json"
    options = orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    json_path.write_bytes(orjson.dumps(data, option=options, default=_json_default))
    md = [header, ""] + [t.markdown() + "\n" for t in tables]
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    return json_path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj).__name__)


# --------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------


class ServerProcess:
    """A benchmark server (``python -m <module> ...``) in a process of its own,
    so its CPU time and RSS are its own. ``start`` waits until ``ready_path``
    answers 200."""

    def __init__(
        self,
        module: str,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        ready_path: str = "/healthz",
    ) -> None:
        self.module = module
        self.port = free_port()
        self.args = [*args, "--port", str(self.port)]
        self.env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
        self.log_path = log_path or (RESULTS / "logs" / f"{module.rsplit('.', 1)[-1]}.log")
        self.ready_path = ready_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited during start:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"{self.module} not ready in {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def start_redis(workdir: Path) -> RedisServer:
    """A redis-server of our own, configured like tiermem's embedded Redis (AOF,
    fsync every second), with automatic AOF rewrites off so AOF growth per turn
    can be read from ``aof_current_size``."""
    return RedisServer(
        workdir,
        extra_args=["--appendfsync", "everysec", "--auto-aof-rewrite-percentage", "0"],
    ).start()


class RedisProbe:
    """INFO readings of the benchmark's own Redis, over a connection of its own."""

    # Commands this probe and client housekeeping issue; left out of per-turn counts.
    IGNORED = frozenset(
        {"info", "echo", "monitor", "ping", "config|get", "config", "client|setinfo", "hello"}
    )

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis

        self.client = aioredis.Redis.from_url(url, decode_responses=True)

    async def snapshot(self) -> dict[str, Any]:
        cs = await self.client.info("commandstats")
        stats = await self.client.info("stats")
        pers = await self.client.info("persistence")
        calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in cs.items()}
        return {
            "calls": calls,
            "net_in": int(stats["total_net_input_bytes"]),
            "aof": int(pers.get("aof_current_size", 0)),
        }

    def delta(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        calls = {
            k: v - before["calls"].get(k, 0)
            for k, v in after["calls"].items()
            if k not in self.IGNORED and v - before["calls"].get(k, 0)
        }
        return {
            "calls": calls,
            "commands": sum(calls.values()),
            "evalsha": calls.get("evalsha", 0) + calls.get("eval", 0),
            "net_in": after["net_in"] - before["net_in"],
            "aof": after["aof"] - before["aof"],
        }

    async def aclose(self) -> None:
        await self.client.aclose()


# --------------------------------------------------------------------------------------
# the client side of a turn
# --------------------------------------------------------------------------------------


@dataclass
class TurnSample:
    session: str
    turn: int
    status: int
    ttft_s: float | None = None  # request sent -> first `token` event
    total_s: float | None = None  # request sent -> stream closed
    tokens: int = 0
    text: str = ""
    l1_hit: bool | None = None
    done: dict[str, Any] | None = None
    error: str | None = None


async def post_turn_timed(
    client: httpx.AsyncClient,
    base: str,
    session: str,
    turn: int,
    message: str,
    user: str = "bench-user",
) -> TurnSample:
    """One turn over real HTTP + SSE, timed as a client sees it."""
    sample = TurnSample(session, turn, 0)
    body = {"user_id": user, "message": message}
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", f"{base}/v1/sessions/{session}/turns", json=body) as r:
            sample.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                sample.error = r.text[:300]
                return sample
            event = ""
            pieces: list[str] = []
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    if event == "token":
                        if sample.ttft_s is None:
                            sample.ttft_s = time.perf_counter() - t0
                        pieces.append(orjson.loads(line[6:])["text"])
                        sample.tokens += 1
                    elif event == "meta":
                        sample.l1_hit = orjson.loads(line[6:]).get("l1_hit")
                    elif event == "done":
                        sample.done = orjson.loads(line[6:])
                    elif event == "error":
                        sample.error = line[6:300]
            sample.text = "".join(pieces)
    except httpx.HTTPError as exc:
        sample.error = f"{type(exc).__name__}: {exc}"
    sample.total_s = time.perf_counter() - t0
    return sample


_WORDS = [
    "schedule", "budget", "garden", "travel", "recipe", "library", "project", "invoice",
    "meeting", "camera", "weather", "concert", "bicycle", "lesson", "kitchen", "report",
    "museum", "harbour", "ticket", "planet",
]  # fmt: skip


def user_message(session_index: int, turn: int) -> str:
    """A plain message of a conversation: deterministic, ~12 words, and free of
    the recall cues that make tiermem search long-term memory (see
    ``graph.guard.needs_memory``), so every turn takes the same path."""
    a = _WORDS[(session_index * 7 + turn) % len(_WORDS)]
    b = _WORDS[(session_index * 3 + turn * 5) % len(_WORDS)]
    return f"Turn {turn}: please help me plan the {a} and compare it with the {b} options."


async def get_json(client: httpx.AsyncClient, url: str) -> Any:
    r = await client.get(url)
    r.raise_for_status()
    return r.json()


async def wait_until(pred: Any, within_s: float = 30.0, interval: float = 0.02) -> bool:
    """Polls an async predicate until it is true or ``within_s`` seconds pass."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await pred():
            return True
        await asyncio.sleep(interval)
    return bool(await pred())


def add_probe_routes(app: FastAPI, records: list[dict[str, Any]]) -> None:
    """The probe endpoints of a server under test that keeps its own per-turn
    ``records``: ``GET /bench/turns`` (``?clear=1`` empties them) and
    ``GET /bench/stats`` (the process's CPU time and RSS)."""
    proc = psutil.Process()

    @app.get("/bench/turns")
    async def turns(request: Request) -> list[dict[str, Any]]:
        out = list(records)
        if request.query_params.get("clear"):
            records.clear()
        return out

    @app.get("/bench/stats")
    async def stats() -> dict[str, Any]:
        cpu = proc.cpu_times()
        return {"cpu_s": cpu.user + cpu.system, "rss": proc.memory_info().rss}


def serve(config: Any) -> None:
    """Runs a ``uvicorn.Config`` as a benchmark server. ``BENCH_PROFILE=PATH`` runs
    it under cProfile and writes the stats to ``PATH.<pid>`` when it stops: a tool
    for finding CPU; a profiled run's figures are not comparable with others."""
    import cProfile
    import signal

    import uvicorn

    path = os.environ.get("BENCH_PROFILE")
    if not path:
        uvicorn.Server(config).run()
        return
    # uvicorn re-raises the SIGTERM it handled once it has shut down; with the
    # default handler that would end the process before the stats are written.
    signal.signal(signal.SIGTERM, lambda *_: None)
    with cProfile.Profile() as prof:
        uvicorn.Server(config).run()
    prof.dump_stats(f"{path}.{os.getpid()}")
