"""Recall of tiermem's long-term memory (issue 16, items 6 and 9), next to two
per-turn baselines at the same text budget.

1. **Data**: multi-session conversations per user with planted facts and questions
   with their evidence turns, generated from ``--seed`` (bench/recall_data.py, which
   documents the generator and the JSON format), or read from ``--dataset
   file.json``. ``--save-dataset file.json`` writes the generated data.
2. **Replay through the real service**: ``tiermem serve`` (``python -m app.cli
   serve``) in a process of its own on 127.0.0.1, on its embedded defaults (a Redis
   it starts itself and Milvus Lite, both under a temporary data dir; the bundled
   MiniLM embedder, ``TIERMEM_EMBEDDINGS=minilm`` so it cannot fall back to
   hashing), ``TIERMEM_ARCHIVE_THRESHOLD=10``, ``TIERMEM_AUTH=off`` (the explicit
   development switch: tenant ``default``) and always ``TIERMEM_LLM_URL``: the fake
   OpenAI-compatible server of bench/fake_llm_proc.py (first token after 1 ms, 24
   tokens, no delay between them; its reply opens with the first words of the
   message). Each dataset session is one tiermem session (``<user>.<session>``) of
   its user; dataset turn ``i`` is posted as tiermem turn ``i`` with
   ``POST /v1/sessions/{id}/turns`` (``retrieve: "never"``: the replay only writes).
   ``--concurrency`` sessions replay at once, each one's turns in order.
3. **Wait for the archive**: the archive cursors (``GET /v1/sessions/{id}``,
   ``archived_upto``) are polled until every session is archived up to its last
   turn. The deadline moves with progress: the wait gives up only after no batch
   was archived for ``max(30 s, 20 x the median time between batches so far)``.
   A turn that fails retryably (``error`` with ``retryable: true``, or a 5xx) is
   posted again with the same ``turn_id`` (a failed turn runs again in place),
   up to three tries.
   **Tails**: generated sessions are multiples of 10 turns, so every turn is in a
   full batch, and the service keeps its idle-tail defaults. Only when some
   session's length is not a multiple of 10 does the service run with
   ``TIERMEM_ARCHIVE_IDLE_AFTER=--tail-idle-s`` (20 s) and
   ``TIERMEM_SWEEP_INTERVAL_S=1``, so its idle-tail sweeper archives those tails as
   short batches once their session is done (a session's turns are posted back to
   back; on a loaded machine a turn late by more than that idle time gets its
   session's tail archived early, off the 10-turn grid: a 5 s setting did that to
   158 of 1,158 batches under a load average of 19). The stall limit is then at
   least that idle time + 30 s. A question whose evidence is still unarchived
   when the wait ends is left out, and counted.
4. **Search**: each question with ``GET /v1/users/{user}/memories?query=...&k=K`` for
   each K in ``--ks`` (1,3,5,10), one call per K (so nothing assumes the ranking
   is prefix-stable), timed from the client. A hit counts two ways:
   *range*: a returned batch of the evidence's session has ``first_turn <= turn <=
   last_turn``; *strict*: the evidence turn is among the batch's ``matches`` (the
   turns the prompt would carry). Responses without ``matches`` count strict as
   range (the table says so).
5. **Baselines** (bench/recall_eval.py), in this process after the service has
   stopped: per-turn dense (the same MiniLM) and per-turn BM25, each returning
   turns best first until it has spent the characters tiermem's top-K answer
   spent (at least one turn).
6. **Storage**: the Milvus Lite file is opened with pymilvus' ``MilvusClient``
   once the service has stopped: per collection, rows, vector fields (dense:
   dim x 4 bytes a row; sparse: 8 bytes a non-zero), VARCHAR bytes, per batch and
   per archived turn, against a per-turn store (one 384-float vector + the turn's
   transcript text per turn).

Run: ``python bench/recall.py`` (about 4 minutes on 2 cores); ``--quick`` (under
2 minutes); ``--latency-user`` (one user, 50 sessions x 200 turns = 1,000 batches,
for the search p95 target). Results: tables on stdout and
``bench/results/recall.{json,md}`` (``--name`` changes the file names).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import orjson
from rich.console import Console

from bench.common import (
    ServerProcess,
    Table,
    machine_info,
    machine_line,
    num,
    pct,
    write_results,
)
from bench.recall_data import DUser, dump_dataset, generate, load_dataset, summary_line
from bench.recall_eval import (
    DenseBaseline,
    answer_chars,
    bm25_rankings,
    dense_rankings,
    milvus_storage,
    range_hit,
    strict_hit,
    take_budget,
    turn_text,
)

console = Console()
THRESHOLD = 10
MINILM_DIM = 384
_BAD_ID = re.compile(r"[^A-Za-z0-9._-]")


def tiermem_ids(user_id: str, session_id: str | None = None) -> str:
    """A dataset id as a tiermem id: other characters become ``_``, at most 128."""
    raw = user_id if session_id is None else f"{user_id}.{session_id}"
    return _BAD_ID.sub("_", raw)[:128] or "_"


@dataclass
class SessionRun:
    user: str  # tiermem user id
    sid: str  # tiermem session id
    turns: list[str]  # user messages
    replies: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    archived_batch: list[str | None] = field(default_factory=list)  # done.usage, per turn
    retried: list[str] = field(default_factory=list)  # retryable failures, retried
    archived_upto: int = 0


# --------------------------------------------------------------------------------------
# the service
# --------------------------------------------------------------------------------------


def service_env(
    data_dir: Path, llm_url: str, tail_idle_s: float | None, extra: list[str] | None = None
) -> dict[str, str]:
    env = {
        "TIERMEM_DATA_DIR": str(data_dir),
        "TIERMEM_LLM_URL": llm_url,
        "TIERMEM_EMBEDDINGS": "minilm",
        "TIERMEM_AUTH": "off",
        "TIERMEM_ARCHIVE_THRESHOLD": str(THRESHOLD),
        "TIERMEM_LOG_FORMAT": "text",
        "TIERMEM_LOG_LEVEL": "WARNING",
    }
    if tail_idle_s is not None:
        # Only for datasets with tails: a short idle time also archives the
        # tail of a live session whose next turn is late (a loaded machine),
        # which would cut its batches off the 10-turn grid.
        env["TIERMEM_ARCHIVE_IDLE_AFTER"] = str(tail_idle_s)
        env["TIERMEM_SWEEP_INTERVAL_S"] = "1"
    for item in extra or []:
        key, _, value = item.partition("=")
        if not key.startswith("TIERMEM_") or not _:
            raise SystemExit(f"--set wants TIERMEM_NAME=value, got {item!r}")
        env[key] = value
    return env


@dataclass
class TurnOutcome:
    reply: str = ""
    error: str | None = None
    retryable: bool = False
    archived_batch: str | None = None  # done.usage.archived_batch


async def post_turn(
    client: httpx.AsyncClient, base: str, run: SessionRun, message: str, turn_id: str
) -> TurnOutcome:
    """One turn over HTTP + SSE, with a turn id of our own so a retry is safe."""
    body = {"user_id": run.user, "message": message, "retrieve": "never", "turn_id": turn_id}
    out = TurnOutcome()
    pieces: list[str] = []
    done = False
    async with client.stream("POST", f"{base}/v1/sessions/{run.sid}/turns", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            out.error = f"HTTP {r.status_code}: {r.text[:200]}"
            out.retryable = r.status_code >= 500
            return out
        event = ""
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                if event == "token":
                    pieces.append(orjson.loads(line[6:])["text"])
                elif event == "done":
                    done = True
                    usage = orjson.loads(line[6:]).get("usage") or {}
                    out.archived_batch = usage.get("archived_batch")
                elif event == "error":
                    data = orjson.loads(line[6:])
                    out.error = line[6:300]
                    out.retryable = bool(data.get("retryable"))
    out.reply = "".join(pieces)
    if not done and out.error is None:
        out.error = "stream ended without done"
    return out


async def post_turn_retrying(
    client: httpx.AsyncClient, base: str, run: SessionRun, message: str, index: int
) -> TurnOutcome:
    """A retryable failure (e.g. the LLM connection broke) is posted again with the
    same turn id: the service runs a failed turn again in place (README), so turn
    indexes stay those of the dataset. Three tries."""
    outcome = TurnOutcome()
    for attempt in range(3):
        outcome = await post_turn(client, base, run, message, f"t{index}")
        if outcome.error is None or not outcome.retryable:
            break
        run.retried.append(f"turn {index} try {attempt + 1}: {outcome.error[:160]}")
        await asyncio.sleep(0.5)
    return outcome


async def replay(
    client: httpx.AsyncClient, base: str, runs: list[SessionRun], concurrency: int
) -> float:
    total = sum(len(r.turns) for r in runs)
    posted = 0
    queue: asyncio.Queue[SessionRun] = asyncio.Queue()
    for r in runs:
        queue.put_nowait(r)
    t0 = time.perf_counter()
    last_print = t0

    async def worker() -> None:
        nonlocal posted, last_print
        while True:
            try:
                run = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            for index, msg in enumerate(run.turns, start=1):
                outcome = await post_turn_retrying(client, base, run, msg, index)
                run.replies.append(outcome.reply)
                run.archived_batch.append(outcome.archived_batch)
                if outcome.error:
                    run.errors.append(outcome.error)
                posted += 1
                now = time.perf_counter()
                if now - last_print > 10:
                    last_print = now
                    rate = posted / (now - t0)
                    console.print(
                        f"  replay: {posted}/{total} turns, {rate:.0f} turns/s", style="dim"
                    )

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return time.perf_counter() - t0


async def wait_archived(
    client: httpx.AsyncClient, base: str, runs: list[SessionRun], min_stall_s: float
) -> dict:
    """Polls the archive cursors until every session is archived to its end, or
    until progress stops (see the module docstring)."""
    target = sum(len(r.turns) for r in runs)
    t0 = time.perf_counter()
    last_change = t0
    last_value = -1
    gaps: list[float] = []
    while True:
        for r in runs:
            if r.archived_upto < len(r.turns):
                resp = await client.get(f"{base}/v1/sessions/{r.sid}")
                resp.raise_for_status()
                r.archived_upto = int(resp.json()["archived_upto"])
        value = sum(r.archived_upto for r in runs)
        now = time.perf_counter()
        if value != last_value:
            if last_value >= 0:
                gaps.append((now - last_change) / max(1, (value - last_value) / THRESHOLD))
            last_value, last_change = value, now
        if value >= target:
            break
        stall = max(min_stall_s, 20 * (pct(gaps, 50) if gaps else 0.0))
        if now - last_change > stall:
            console.print(f"  archive: no progress for {stall:.0f} s; giving up", style="red")
            break
        await asyncio.sleep(0.5)
    return {
        "archived_turns": last_value,
        "turns": target,
        "wait_s": time.perf_counter() - t0,
        "complete": last_value >= target,
    }


@dataclass
class QRun:
    user: str
    qid: str
    qtype: str
    question: str
    evidence: set[tuple[str, int]]
    results: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    latency: dict[int, float] = field(default_factory=dict)
    retried_searches: int = 0  # answered 503 and asked again

    @property
    def key(self) -> str:  # question ids need only be unique within a user
        return f"{self.user}/{self.qid}"


async def search_all(
    client: httpx.AsyncClient, base: str, questions: list[QRun], ks: list[int]
) -> None:
    # A few warm-up searches: connections, the query path's first call.
    if questions:
        for _ in range(3):
            q = questions[0]
            await client.get(
                f"{base}/v1/users/{q.user}/memories", params={"query": q.question, "k": max(ks)}
            )
    for i, q in enumerate(questions):
        for k in ks:
            for attempt in range(4):
                t = time.perf_counter()
                resp = await client.get(
                    f"{base}/v1/users/{q.user}/memories", params={"query": q.question, "k": k}
                )
                q.latency[k] = time.perf_counter() - t
                # A 503 says "retry" (Milvus slow or down): retried, and counted.
                if resp.status_code != 503 or attempt == 3:
                    break
                q.retried_searches += 1
                await asyncio.sleep(float(resp.headers.get("retry-after", "1")))
            resp.raise_for_status()
            q.results[k] = list(resp.json().get("memories") or [])
        if (i + 1) % 50 == 0:
            console.print(f"  search: {i + 1}/{len(questions)} questions", style="dim")


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------


def build_runs(users: list[DUser]) -> tuple[list[SessionRun], dict[str, tuple[str, int]]]:
    runs: list[SessionRun] = []
    where: dict[str, tuple[str, int]] = {}  # "<user>\0<turn id>" -> (tiermem sid, turn)
    seen: set[str] = set()
    for u in users:
        uid = tiermem_ids(u.user_id)
        for s in u.sessions:
            sid = tiermem_ids(u.user_id, s.session_id)
            if sid in seen:
                raise ValueError(f"two sessions map to tiermem session {sid!r}")
            seen.add(sid)
            runs.append(SessionRun(uid, sid, [t.user for t in s.turns]))
            for i, t in enumerate(s.turns, start=1):
                where[f"{u.user_id}\0{t.id}"] = (sid, i)
    return runs, where


async def measure_service(args: argparse.Namespace, users: list[DUser]) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="tiermem-recall-"))
    data_dir = tmp / "data"
    runs, where = build_runs(users)
    fake = ServerProcess(
        "bench.fake_llm_proc",
        ["--first-token-delay-ms", "1", "--token-interval-ms", "0", "--reply-tokens", "24"],
        ready_path="/health",
    )
    tails = any(len(r.turns) % THRESHOLD for r in runs)
    tail_idle = (args.tail_idle_s or 20.0) if tails else None
    srv = ServerProcess(
        "app.cli",
        ["serve"],
        env=service_env(data_dir, "", tail_idle, args.set),
        ready_path="/readyz",
    )
    out: dict[str, Any] = {"tmp": str(tmp)}
    try:
        fake.start()
        srv.env["TIERMEM_LLM_URL"] = fake.url + "/v1"
        t = time.perf_counter()
        srv.start(timeout=180)
        out["start_s"] = time.perf_counter() - t
        console.print(f"tiermem serve up in {out['start_s']:.1f} s at {srv.url}")
        limits = httpx.Limits(max_connections=args.concurrency + 8, keepalive_expiry=2.0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            out["replay_s"] = await replay(client, srv.url, runs, args.concurrency)
            errors = [e for r in runs for e in r.errors]
            out["turn_errors"] = len(errors)
            retried = [e for r in runs for e in r.retried]
            out["turn_retries"] = retried
            if retried:
                console.print(f"  {len(retried)} retryable failures, retried: {retried[0]}")
            if errors:
                console.print(f"  {len(errors)} turns failed; first: {errors[0]}", style="red")
            console.print(
                f"replayed {sum(len(r.turns) for r in runs)} turns in {out['replay_s']:.1f} s"
            )
            reported = [b for r in runs for b in r.archived_batch if b]
            out["archived_batch_reports"] = {"turns": len(reported), "distinct": len(set(reported))}
            console.print(
                f"  done.usage.archived_batch non-null on {len(reported)} turns, "
                f"{len(set(reported))} distinct ids",
                style="dim",
            )
            out["archive"] = await wait_archived(client, srv.url, runs, (tail_idle or 0) + 30)
            a = out["archive"]
            console.print(
                f"archived {a['archived_turns']}/{a['turns']} turns, "
                f"waited {a['wait_s']:.1f} s after the replay"
            )
            questions, excluded = make_questions(users, where, runs)
            out["excluded_questions"] = excluded
            t = time.perf_counter()
            await search_all(client, srv.url, questions, args.ks)
            out["search_s"] = time.perf_counter() - t
            retried_searches = sum(q.retried_searches for q in questions)
            if retried_searches:
                console.print(f"  {retried_searches} searches answered 503 and were retried")
            try:
                m = (await client.get(srv.url + "/metrics")).text
                out["metrics"] = {
                    line.split(" ")[0]: float(line.split(" ")[1])
                    for line in m.splitlines()
                    if line.startswith(("tiermem_archive_batches_total", "tiermem_l3_writes"))
                }
            except (httpx.HTTPError, ValueError, IndexError):
                pass
    finally:
        srv.stop(timeout=60)
        fake.stop()
    out["runs"] = runs
    out["questions"] = questions
    db = data_dir / "milvus.db"
    t = time.perf_counter()
    try:
        out["storage"] = milvus_storage(db)
    except Exception as exc:
        console.print(f"storage: could not read {db}: {exc!r}", style="red")
        out["storage"] = {"error": repr(exc)}
    out["storage_read_s"] = time.perf_counter() - t
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def make_questions(
    users: list[DUser], where: dict[str, tuple[str, int]], runs: list[SessionRun]
) -> tuple[list[QRun], int]:
    archived = {r.sid: r.archived_upto for r in runs}
    out: list[QRun] = []
    excluded = 0
    for u in users:
        for q in u.questions:
            ev = {where[f"{u.user_id}\0{e}"] for e in q.evidence}
            ev = {(sid, t) for sid, t in ev if t <= archived.get(sid, 0)}
            if not ev:
                excluded += 1
                continue
            out.append(QRun(tiermem_ids(u.user_id), q.id, q.type, q.question, ev))
    return out, excluded


# --------------------------------------------------------------------------------------
# baselines and scoring
# --------------------------------------------------------------------------------------


def baselines(runs: list[SessionRun], questions: list[QRun], ks: list[int]) -> dict[str, Any]:
    """Per question and k: (hit, turns returned, chars) of each per-turn baseline."""
    by_user: dict[str, list[SessionRun]] = defaultdict(list)
    for r in runs:
        by_user[r.user].append(r)
    qs_by_user: dict[str, list[QRun]] = defaultdict(list)
    for q in questions:
        qs_by_user[q.user].append(q)
    dense = DenseBaseline()
    results: dict[str, dict[str, dict[int, tuple[bool, int, int]]]] = {"dense": {}, "bm25": {}}
    t_dense = t_bm25 = 0.0
    try:
        for user, uruns in by_user.items():
            qs = qs_by_user.get(user, [])
            if not qs:
                continue
            keys: list[tuple[str, int]] = []
            texts: list[str] = []
            for r in uruns:
                for i, (msg, reply) in enumerate(zip(r.turns, r.replies, strict=False), start=1):
                    if i > r.archived_upto:
                        break  # a baseline knows only what tiermem has in L3
                    keys.append((r.sid, i))
                    texts.append(turn_text(i, msg, reply))
            lengths = [len(x) for x in texts]
            t = time.perf_counter()
            doc_vecs = asyncio.run(dense.embed(texts))
            q_vecs = asyncio.run(dense.embed([q.question for q in qs]))
            ranks = {"dense": dense_rankings(doc_vecs, q_vecs)}
            t_dense += time.perf_counter() - t
            t = time.perf_counter()
            ranks["bm25"] = bm25_rankings(texts, [q.question for q in qs])
            t_bm25 += time.perf_counter() - t
            for qi, q in enumerate(qs):
                for name, rank in ranks.items():
                    per_k: dict[int, tuple[bool, int, int]] = {}
                    for k in ks:
                        budget, _ = answer_chars(q.results.get(k, []))
                        chosen = take_budget(rank[qi], lengths, budget)
                        hit = any(keys[i] in q.evidence for i in chosen)
                        per_k[k] = (hit, len(chosen), sum(lengths[i] for i in chosen))
                    results[name][q.key] = per_k
    finally:
        dense.close()
    return {"results": results, "dense_s": t_dense, "bm25_s": t_bm25}


def score(questions: list[QRun], base: dict[str, Any], ks: list[int]) -> dict[str, Any]:
    """recall[method][type][k] and the n per type."""
    methods = ["tiermem range", "tiermem strict", "per-turn dense", "per-turn BM25"]
    hits: dict[str, dict[str, dict[int, list[bool]]]] = {
        m: defaultdict(lambda: defaultdict(list)) for m in methods
    }
    has_matches = False
    for q in questions:
        for k in ks:
            mem = q.results.get(k, [])
            r = range_hit(mem, q.evidence)
            s = strict_hit(mem, q.evidence)
            if s is not None:
                has_matches = True
            vals = {
                "tiermem range": r,
                "tiermem strict": r if s is None else s,
                "per-turn dense": base["results"]["dense"][q.key][k][0],
                "per-turn BM25": base["results"]["bm25"][q.key][k][0],
            }
            for m, v in vals.items():
                hits[m][q.qtype][k].append(v)
                hits[m]["overall"][k].append(v)
    recall = {
        m: {t: {k: sum(v) / len(v) for k, v in per.items()} for t, per in by_t.items()}
        for m, by_t in hits.items()
    }
    n = {t: len(v[ks[0]]) for t, v in hits["tiermem range"].items()}
    return {"recall": recall, "n": n, "has_matches": has_matches, "methods": methods}


# --------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------


def tables(res: dict[str, Any], ks: list[int]) -> list[Table]:
    sc = res["score"]
    recall = sc["recall"]
    methods = sc["methods"]
    types = ["overall", *sorted(t for t in sc["n"] if t != "overall")]
    strict_note = (
        "strict: the evidence turn among the returned `matches`."
        if sc["has_matches"]
        else "strict: the responses carry no `matches` yet, so strict is counted as range."
    )
    t1 = Table(
        "Recall@k overall",
        ["method", *[f"R@{k}" for k in ks]],
        [[m, *[num(recall[m]["overall"][k], 3) for k in ks]] for m in methods],
        note=(
            f"{sc['n']['overall']} questions ({res['excluded_questions']} left out: evidence "
            "not archived). range: a returned batch of the evidence's session covers the "
            f"evidence turn. {strict_note} Baselines: per-turn retrieval returning turns "
            "best first within the characters tiermem's top-k answer returned."
        ),
    )
    rows = []
    for t in types:
        for m in methods:
            rows.append([t, m, str(sc["n"][t]), *[num(recall[m][t][k], 3) for k in ks]])
    t2 = Table("Recall@k per question type", ["type", "method", "n", *[f"R@{k}" for k in ks]], rows)
    qs: list[QRun] = res["questions"]
    base = res["baselines"]["results"]
    rows = []
    for k in ks:
        chars = [answer_chars(q.results.get(k, []))[0] for q in qs]
        nb = [len(q.results.get(k, [])) for q in qs]
        dt = [base["dense"][q.key][k][1] for q in qs]
        bt = [base["bm25"][q.key][k][1] for q in qs]
        lat = [q.latency[k] for q in qs if k in q.latency]
        rows.append(
            [
                str(k),
                num(pct(nb, 50), 0),
                num(pct(chars, 50), 0),
                num(pct(dt, 50), 0),
                num(pct(bt, 50), 0),
                num(pct(lat, 50) * 1000, 1),
                num(pct(lat, 95) * 1000, 1),
                str(len(lat)),
            ]
        )
    lat_all = [v for q in qs for v in q.latency.values()]
    rows.append(
        ["all", "", "", "", "", num(pct(lat_all, 50) * 1000, 1),
         num(pct(lat_all, 95) * 1000, 1), str(len(lat_all))]
    )  # fmt: skip
    t3 = Table(
        "Text budget and search latency per k",
        ["k", "batches returned (median)", "chars returned (median)",
         "dense turns at that budget", "BM25 turns at that budget",
         "search p50 ms", "search p95 ms", "searches"],
        rows,
        note=(
            "Search latency: client-side, GET /v1/users/{user}/memories, one request at a "
            "time over a kept-alive connection (loopback). Chars: the `matches` texts when "
            "present, else the batches' `text`."
        ),
    )  # fmt: skip
    return [t1, t2, t3, storage_table(res)]


def storage_table(res: dict[str, Any]) -> Table:
    st = res.get("storage") or {}
    runs: list[SessionRun] = res["runs"]
    turns = sum(r.archived_upto for r in runs)
    ref_text = sum(
        len(turn_text(i, m, a).encode("utf-8"))
        for r in runs
        for i, (m, a) in enumerate(zip(r.turns, r.replies, strict=False), start=1)
        if i <= r.archived_upto
    )
    rows = []
    note = ""
    if "error" in st:
        note = f"Could not read the Milvus Lite file: {st['error']}"
    for name, c in (st.get("collections") or {}).items():
        batches = c["batches"] or 1
        vectors = c["dense_vectors"] + c["sparse_vectors"]
        vbytes = c["dense_bytes"] + c["sparse_bytes"]
        total = vbytes + c["varchar_bytes"] + c["other_scalar_bytes"]
        rows.append(
            [
                f"tiermem L3 `{name}`",
                num(c["rows"], 0),
                num(c["batches"], 0),
                f"{c['dense_vectors']:,} + {c['sparse_vectors']:,}",
                num(vectors / batches, 2),
                num(vectors / max(1, turns), 3),
                num(vbytes / max(1, turns), 0),
                num(c["varchar_bytes"] / max(1, turns), 0),
                num(total / max(1, turns), 0),
            ]
        )
    ref_v = turns * MINILM_DIM * 4
    rows.append(
        [
            "per-turn store (1 x 384 floats + text per turn)",
            num(turns, 0),
            "–",
            f"{turns:,} + 0",
            num(THRESHOLD, 2),
            "1.000",
            num(ref_v / max(1, turns), 0),
            num(ref_text / max(1, turns), 0),
            num((ref_v + ref_text) / max(1, turns), 0),
        ]
    )
    disk = st.get("db_bytes_on_disk")
    note = note or (
        f"{turns:,} archived turns. Read with pymilvus MilvusClient from the Milvus Lite file "
        "after the service stopped (query_iterator over every row). Dense: dim x 4 bytes a "
        "row; sparse: 8 bytes a non-zero; text: UTF-8 bytes of VARCHAR fields. Milvus Lite "
        f"file on disk: {num(disk or 0, 0)} bytes ({num((disk or 0) / max(1, turns), 0)} per "
        "turn, indexes and overhead included)."
    )
    return Table(
        "Storage: L3 against a per-turn store",
        ["store", "rows", "batches", "vectors (dense + sparse)", "vectors / batch",
         "vectors / turn", "vector bytes / turn", "text bytes / turn", "bytes / turn"],
        rows,
        note=note,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Recall of tiermem's L3 against per-turn baselines (issue 16).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", type=Path, help="a JSON dataset (format: bench/recall_data.py)")
    p.add_argument("--save-dataset", type=Path, help="write the generated dataset here")
    p.add_argument("--users", type=int, default=3)
    p.add_argument("--sessions", type=int, default=8, help="sessions per user")
    p.add_argument("--turns-per-session", type=int, default=50)
    p.add_argument(
        "--per-type", type=int, default=None, help="questions per type and user (default 1..6)"
    )
    p.add_argument("--distractors", type=int, default=1, help="rounds of near-miss turns per fact")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2 users x 3 sessions x 20 turns")
    p.add_argument(
        "--latency-user",
        action="store_true",
        help="one user, 50 sessions x 200 turns: 1,000 batches (search p95 at scale)",
    )
    p.add_argument("--ks", default="1,3,5,10")
    p.add_argument("--concurrency", type=int, default=4, help="sessions replayed at once")
    p.add_argument(
        "--tail-idle-s",
        type=float,
        default=None,
        help="TIERMEM_ARCHIVE_IDLE_AFTER when sessions have tails (default 20)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    p.add_argument(
        "--set", action="append", default=[], metavar="TIERMEM_X=V",
        help="a setting for the service (repeatable), e.g. TIERMEM_L3_CHUNK_TOKENS=128",
    )  # fmt: skip
    p.add_argument("--name", default=None, help="results file name (default recall[-mode])")
    args = p.parse_args(argv)
    if args.quick:
        args.users, args.sessions, args.turns_per_session = 2, 3, 20
    if args.latency_user:
        args.users, args.sessions, args.turns_per_session = 1, 50, 200
    args.ks = sorted({int(x) for x in str(args.ks).split(",") if x.strip()})
    if args.name is None:
        args.name = (
            "recall" + ("-quick" if args.quick else "") + ("-latency" if args.latency_user else "")
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The service must run on the settings given here, not on whatever this shell has.
    for key in [k for k in os.environ if k.startswith("TIERMEM_")]:
        del os.environ[key]
    info = machine_info()
    t_all = time.perf_counter()
    if args.dataset:
        users = load_dataset(args.dataset)
        source = f"dataset {args.dataset}"
    else:
        users = generate(
            args.users,
            args.sessions,
            args.turns_per_session,
            args.seed,
            args.per_type,
            args.distractors,
        )
        source = (
            f"generated: seed {args.seed}, {args.users} users x {args.sessions} sessions x "
            f"{args.turns_per_session} turns, {args.distractors} round(s) of near misses"
        )
        if args.save_dataset:
            dump_dataset(users, args.save_dataset)
    console.print(f"{source}: {summary_line(users)}")
    res = asyncio.run(measure_service(args, users))
    t = time.perf_counter()
    res["baselines"] = baselines(res["runs"], res["questions"], args.ks)
    res["baselines_s"] = time.perf_counter() - t
    res["score"] = score(res["questions"], res["baselines"], args.ks)
    res["total_s"] = time.perf_counter() - t_all
    tabs = tables(res, args.ks)
    header = (
        f"Measured {machine_line(info)}; {source} ({summary_line(users)}); run took "
        f"{res['total_s']:.0f} s (service start {res.get('start_s', math.nan):.0f} s, replay "
        f"{res.get('replay_s', math.nan):.0f} s, archive wait "
        f"{(res.get('archive') or {}).get('wait_s', math.nan):.0f} s, searches "
        f"{res.get('search_s', math.nan):.0f} s, baselines {res['baselines_s']:.0f} s)."
    )
    console.print(header)
    for tab in tabs:
        tab.print()
    data = {
        "machine": info,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "source": source,
        "timings": {
            k: res.get(k) for k in ("start_s", "replay_s", "search_s", "baselines_s", "total_s")
        },
        "archive": res.get("archive"),
        "archived_batch_reports": res.get("archived_batch_reports"),
        "turn_errors": res.get("turn_errors"),
        "turn_retries": res.get("turn_retries"),
        "excluded_questions": res.get("excluded_questions"),
        "metrics": res.get("metrics"),
        "score": res["score"],
        "storage": res.get("storage"),
        "questions": [
            {
                "id": q.qid,
                "user": q.user,
                "type": q.qtype,
                "question": q.question,
                "evidence": sorted(q.evidence),
                "latency_ms": {k: v * 1000 for k, v in q.latency.items()},
                "tiermem": {
                    k: [
                        {
                            "session_id": m.get("session_id"),
                            "first_turn": m.get("first_turn"),
                            "last_turn": m.get("last_turn"),
                            "score": m.get("score"),
                            "matches": [x.get("turn") for x in m.get("matches") or ()]
                            if "matches" in m
                            else None,
                        }
                        for m in mem
                    ]
                    for k, mem in q.results.items()
                },
                "dense": res["baselines"]["results"]["dense"].get(q.key),
                "bm25": res["baselines"]["results"]["bm25"].get(q.key),
            }
            for q in res["questions"]
        ],
    }
    path = write_results(args.name, data, tabs, header)
    console.print(f"results: {path} and {path.with_suffix('.md')}", style="dim")
    return 1 if res.get("turn_errors") or not (res.get("archive") or {}).get("complete") else 0


if __name__ == "__main__":
    sys.exit(main())
