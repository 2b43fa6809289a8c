"""tiermem next to the peer users would pick instead: LangGraph's memory chatbot with
its Postgres checkpointer (issue 6, items 3-5).

Item 3: the same conversations go through tiermem and through the peer
(``bench/peer_app.py``: ``StateGraph(MessagesState)`` + ``AsyncPostgresSaver``,
the whole message history in graph state, as LangGraph's docs show a memory
chatbot), one request at a time, in front of the same fake LLM. At turns 10,
100 and 500 it reports, side by side:

- the service's own time per turn (route entry to end of turn, minus the time
  spent waiting on the LLM stream) and the client's TTFT over the LLM's own;
- the prompt tokens each sends to the LLM;
- bytes written per turn: for tiermem the growth of Redis's append-only file
  and of the bytes clients sent to Redis; for the peer the growth of
  PostgreSQL's WAL (``pg_current_wal_insert_lsn``) and of the thread's row
  payload (checkpoint JSON, metadata and blobs, as ``octet_length``).

Item 4, write amplification: tiermem's L3 (Milvus) writes and LLM tokens spent
on memory upkeep (batch summaries) per turn, measured over the same run, next
to a design that extracts memories with an LLM call on every turn. That design
is not run; it is computed, under a stated assumption: one call per turn whose
prompt is an extraction instruction (tiermem's summary instruction) plus the
turn plus the existing memories (taken to be as large as tiermem's running
summary at that turn), whose completion is as long as one of tiermem's batch
summaries, and one Milvus write per turn.

Item 5, cold load: sessions with 10, 1,000 and 10,000 stored turns, written
straight into L2 (``L2Store.commit`` in a loop, with the context builder's
compaction and ``advance_archive`` every threshold turns, as the service would
leave them), then loaded from L2 into L1 (``L2Store.load`` + ``L1Pool.put``)
and, through the service, by a turn after ``release``. For the peer, a thread
of the same length (one ``aupdate_state``), loaded with ``aget_tuple`` as a run
does at its start.

PostgreSQL: the server at ``--dsn`` (127.0.0.1:5432, database ``test``), or one
started privately (``bench/postgres.py``); if neither works the output says so
and the tiermem-only parts still run. Tables go to a schema of their own,
dropped at the end.

Run: ``python bench/peer_langgraph_pg.py`` (about 3 minutes on 2 cores);
``--help`` for the knobs. Results: tables on stdout and
``bench/results/peer_langgraph_pg.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import psycopg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.common import (
    ServerProcess,
    Table,
    get_json,
    machine_info,
    machine_line,
    marker,
    ms,
    num,
    post_turn_timed,
    ratio,
    summary,
    user_message,
    with_marker,
    write_results,
)
from bench.postgres import Postgres, PostgresUnavailable, find_or_start
from bench.turn_overhead import Stack, archive_idle, tiermem_env

console = Console()

SCHEMA = "tiermem_bench"
TENANT = "default"  # the service runs with auth off: every session is the default tenant's


# --------------------------------------------------------------------------------------
# PostgreSQL readings
# --------------------------------------------------------------------------------------

PAYLOAD_SQL = """
SELECT
  (SELECT coalesce(sum(octet_length(checkpoint::text) + octet_length(metadata::text)), 0)
     FROM checkpoints WHERE thread_id = %(t)s)
+ (SELECT coalesce(sum(octet_length(blob)), 0) FROM checkpoint_blobs WHERE thread_id = %(t)s)
+ (SELECT coalesce(sum(octet_length(blob)), 0) FROM checkpoint_writes WHERE thread_id = %(t)s)
"""


class PgProbe:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def open(self) -> None:
        self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)

    async def snapshot(self, thread: str) -> dict[str, Any]:
        assert self.conn is not None
        lsn = await (await self.conn.execute("SELECT pg_current_wal_insert_lsn()")).fetchone()
        payload = await (await self.conn.execute(PAYLOAD_SQL, {"t": thread})).fetchone()
        return {"lsn": str(lsn[0]) if lsn else "0/0", "payload": int(payload[0]) if payload else 0}

    async def delta(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
        assert self.conn is not None
        row = await (await self.conn.execute(
            "SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)", (after["lsn"], before["lsn"])
        )).fetchone()  # fmt: skip
        return {"wal": int(row[0]) if row else 0, "payload": after["payload"] - before["payload"]}

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


def prepare_schema(pg: Postgres, drop: bool) -> None:
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        if not drop:
            conn.execute(f"CREATE SCHEMA {SCHEMA}")


# --------------------------------------------------------------------------------------
# item 3 (+ the data for item 4): the same conversations through both
# --------------------------------------------------------------------------------------


async def llm_ttft(client: httpx.AsyncClient, stack: Stack, key: str) -> float | None:
    got = await get_json(client, stack.fake.url + "/bench/ttft?clear=1")
    value = got.get(key)
    return float(value) if value is not None else None


async def conversations(
    stack: Stack, tm: ServerProcess, peer: ServerProcess | None, pgp: PgProbe | None,
    args: argparse.Namespace, progress: Progress,
) -> dict[str, Any]:  # fmt: skip
    run = uuid.uuid4().hex[:6]
    measure = {n for n in args.at if n <= args.turns}
    rows: list[dict[str, Any]] = []
    marks: list[dict[str, Any]] = []
    task = progress.add_task("conversations", total=args.turns * args.sessions)
    async with httpx.AsyncClient(timeout=300) as client:
        await stack.llm_config(client, first_token_delay_ms=args.first_token_ms,
                               token_interval_ms=args.token_interval_ms)  # fmt: skip
        for srv in [tm] + ([peer] if peer else []):
            for i in range(1, 4):
                await post_turn_timed(client, srv.url, f"warm-{run}", i, user_message(97, i))
            await get_json(client, srv.url + "/bench/turns?clear=1")
        await archive_idle(client, tm.url)
        await get_json(client, stack.fake.url + "/bench/ttft?clear=1")
        tm_stats0 = await get_json(client, tm.url + "/bench/stats")
        for t in range(1, args.turns + 1):
            for s in range(args.sessions):
                sid = f"conv-{run}-{s}"
                msg = with_marker(user_message(s, t), sid, t)
                key = marker(sid, t)
                at = t in measure
                row: dict[str, Any] = {"turn": t, "session": sid}
                # tiermem
                if at:
                    await archive_idle(client, tm.url)
                    st0 = await get_json(client, tm.url + "/bench/stats")
                    r0 = await stack.probe.snapshot()
                sample = await post_turn_timed(client, tm.url, sid, t, msg)
                row["tm"] = {"status": sample.status, "error": sample.error,
                             "ttft": sample.ttft_s, "llm_ttft": await llm_ttft(client, stack, key),
                             "prompt_tokens": (sample.done or {}).get("usage", {}).get(
                                 "prompt_tokens")}  # fmt: skip
                if at:
                    await archive_idle(client, tm.url)
                    r1 = await stack.probe.snapshot()
                    st1 = await get_json(client, tm.url + "/bench/stats")
                    d = stack.probe.delta(r0, r1)
                    session = await get_json(client, f"{tm.url}/v1/sessions/{sid}")
                    marks.append({
                        "turn": t, "session": sid, "system": "tiermem",
                        "aof": d["aof"], "net_in": d["net_in"],
                        "archived": bool((sample.done or {}).get("usage", {}).get(
                            "archived_batch")),
                        "summary_tokens": st1["summary_tokens"] - st0["summary_tokens"],
                        "l3_writes": st1["l3_writes"] - st0["l3_writes"],
                        "running_summary": session["running_summary"],
                        "user": msg, "assistant": sample.text,
                    })  # fmt: skip
                # the peer
                if peer is not None and pgp is not None:
                    if at:
                        p0 = await pgp.snapshot(sid)
                    sample = await post_turn_timed(client, peer.url, sid, t, msg)
                    row["peer"] = {"status": sample.status, "error": sample.error,
                                   "ttft": sample.ttft_s,
                                   "llm_ttft": await llm_ttft(client, stack, key),
                                   "prompt_tokens": (sample.done or {}).get("usage", {}).get(
                                       "prompt_tokens")}  # fmt: skip
                    if at:
                        p1 = await pgp.snapshot(sid)
                        d = await pgp.delta(p0, p1)
                        marks.append({"turn": t, "session": sid, "system": "peer",
                                      "wal": d["wal"], "payload": d["payload"]})  # fmt: skip
                rows.append(row)
                progress.advance(task)
        await archive_idle(client, tm.url)
        tm_stats1 = await get_json(client, tm.url + "/bench/stats")
        tm_records = await get_json(client, tm.url + "/bench/turns?clear=1")
        peer_records = await get_json(client, peer.url + "/bench/turns?clear=1") if peer else []
    # The k-th record of a session is its k-th turn (one turn at a time).
    for records, name in ((tm_records, "tm"), (peer_records, "peer")):
        by_session: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            by_session.setdefault(r["session"], []).append(r)
        for row in rows:
            recs = by_session.get(row["session"], [])
            if name in row and len(recs) >= row["turn"]:
                r = recs[row["turn"] - 1]
                row[name].update(own=r["own"], pre_llm=r.get("t_llm_request"),
                                 after_llm=r.get("after_llm"))  # fmt: skip
    total_turns = args.turns * args.sessions
    return {
        "rows": rows,
        "marks": marks,
        "tm_totals": {
            "turns": total_turns,
            "l3_writes": tm_stats1["l3_writes"] - tm_stats0["l3_writes"],
            "summary_tokens": tm_stats1["summary_tokens"] - tm_stats0["summary_tokens"],
        },
    }


def at_turn(conv: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per measured turn N: the turns N-9..N of every session, and the marks at N."""
    out = []
    for n in sorted(x for x in args.at if x <= args.turns):
        win = [r for r in conv["rows"] if n - args.window < r["turn"] <= n]
        entry: dict[str, Any] = {"turn": n}
        for name in ("tm", "peer"):
            rs = [r[name] for r in win if name in r and r[name]["status"] == 200]
            if not rs:
                continue
            entry[name] = {
                "own": summary(x["own"] for x in rs if x.get("own") is not None),
                "pre_llm": summary(x["pre_llm"] for x in rs if x.get("pre_llm") is not None),
                "ttft_overhead": summary(
                    x["ttft"] - x["llm_ttft"] for x in rs
                    if x.get("ttft") is not None and x.get("llm_ttft") is not None
                ),
                "prompt_tokens": summary(
                    x["prompt_tokens"] for x in rs if x.get("prompt_tokens") is not None
                ),
            }  # fmt: skip
        tm_marks = [m for m in conv["marks"] if m["turn"] == n and m["system"] == "tiermem"]
        pg_marks = [m for m in conv["marks"] if m["turn"] == n and m["system"] == "peer"]
        entry["tm_bytes"] = {
            "aof": summary(m["aof"] for m in tm_marks)["median"],
            "net_in": summary(m["net_in"] for m in tm_marks)["median"],
            "archived": any(m["archived"] for m in tm_marks),
        }
        if pg_marks:
            entry["peer_bytes"] = {
                "wal": summary(m["wal"] for m in pg_marks)["median"],
                "payload": summary(m["payload"] for m in pg_marks)["median"],
            }
        out.append(entry)
    return out


def write_amplification(conv: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from infra.tokenizer import default_tokenizer
    from memory.summaries import SUMMARY_PROMPT as SUMMARIZE_SYSTEM_PROMPT

    tok = default_tokenizer()
    totals = conv["tm_totals"]
    batches = max(1.0, totals["l3_writes"])
    completion = args.reply_tokens  # what the fake LLM answers to a summary request
    per_n = []
    for n in sorted(x for x in args.at if x <= args.turns):
        marks = [m for m in conv["marks"] if m["turn"] == n and m["system"] == "tiermem"]
        if not marks:
            continue
        m = marks[0]
        extraction_prompt = (
            tok.count(SUMMARIZE_SYSTEM_PROMPT) + tok.count(m["user"]) + tok.count(m["assistant"])
            + tok.count(m["running_summary"])
        )  # fmt: skip
        per_n.append({
            "turn": n,
            "tm_batch_tokens": m["summary_tokens"] if m["archived"] else None,
            "tm_running_summary_tokens": tok.count(m["running_summary"]),
            "extraction_tokens": extraction_prompt + completion,
        })  # fmt: skip
    return {
        "turns": totals["turns"],
        "tm_l3_writes_per_turn": totals["l3_writes"] / totals["turns"],
        "tm_upkeep_tokens_per_turn": totals["summary_tokens"] / totals["turns"],
        "tm_tokens_per_batch": totals["summary_tokens"] / batches,
        "extraction_completion_tokens": completion,
        "per_turn": per_n,
        "extraction_mean_tokens_per_turn": (
            sum(p["extraction_tokens"] for p in per_n) / len(per_n) if per_n else None
        ),
    }


# --------------------------------------------------------------------------------------
# item 5: cold load
# --------------------------------------------------------------------------------------


async def build_tiermem_session(
    l2: Any, context: Any, session: str, n: int, threshold: int, progress: Progress, task: Any
) -> None:
    """Writes a session of ``n`` turns into L2 as the service would leave it: each
    turn committed (one script), compaction planned by the context builder, a
    batch archived (cursor moved, log trimmed) every ``threshold`` turns."""
    from memory.archiver import extractive_summary, merge_summaries
    from memory.l3_store import batch_id_for
    from memory.models import SessionState, Turn
    from tests.servers.fake_vllm import default_reply

    now = time.time()
    state = SessionState(tenant=TENANT, session_id=session, user_id="bench-user",
                         created_at=now, updated_at=now)  # fmt: skip
    pending: list[Turn] = []
    for i in range(1, n + 1):
        msg = user_message(5, i)
        reply = default_reply([{"role": "user", "content": msg}], 24, context.tokenizer)
        plan = context.plan(state, msg, None)
        turn = Turn.of_text(
            index=i, turn_id=uuid.uuid4().hex, user=msg, assistant=reply,
            created_at=time.time(), usage={"prompt_tokens": plan.prompt_tokens},
        )  # fmt: skip
        context.turn_tokens(turn)  # stored with the turn, as the commit node does
        meta = dict(plan.meta_updates)
        meta["updated_at"] = repr(turn.created_at)
        if state.version == 0:
            meta["created_at"] = repr(now)
        state.version = await l2.commit(state, turn, meta_updates=meta, user_id="bench-user")
        state.turns.append(turn)
        state.turn_count = i
        if plan.compaction is not None:
            state.context_start, state.context_summary = plan.compaction
            state.turns = [t for t in state.turns if t.index >= state.context_start]
        state.last_rendered = context.after_reply(plan, reply)
        pending.append(turn)
        if state.unarchived >= threshold:
            first, last = state.archived_upto + 1, state.archived_upto + threshold
            batch = [t for t in pending if first <= t.index <= last]
            running = merge_summaries(state.summary, extractive_summary(batch))
            version = await l2.advance_archive(
                TENANT, session, batch_id_for(TENANT, session, first, last), first, last, running
            )
            assert version is not None
            state.version = version
            state.archived_upto = state.summary_upto = last
            state.summary = running
            pending = [t for t in pending if t.index > last]
        progress.advance(task)


async def cold_load(
    stack: Stack, tm: ServerProcess, pg: Postgres | None, args: argparse.Namespace,
    progress: Progress,
) -> list[dict[str, Any]]:  # fmt: skip
    from infra.redis_client import create_redis
    from infra.settings import Settings
    from infra.tokenizer import build_tokenizer
    from memory.context import ContextBuilder, StablePrefix
    from memory.l1_pool import L1Pool
    from memory.l2_store import L2Store

    s = Settings(archive_threshold=args.threshold)
    redis = create_redis(stack.redis.url, socket_timeout=10)
    l2 = L2Store(redis, session_ttl_s=s.session_ttl_s, turn_record_ttl_s=s.turn_record_ttl_s)
    context = ContextBuilder(StablePrefix.load(s.system_prompt, s.prefix_file),
                             build_tokenizer("auto"), s.context_budget_tokens,
                             s.compaction_target_ratio)  # fmt: skip
    run = uuid.uuid4().hex[:6]
    out = []
    build_task = progress.add_task("cold load: writing sessions", total=sum(args.cold))
    sessions = {}
    for n in args.cold:
        sid = f"cold-{run}-{n}"
        await build_tiermem_session(l2, context, sid, n, args.threshold, progress, build_task)
        sessions[n] = sid
    peer_graph = peer_pool = None
    if pg is not None:
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

        from bench.peer_app import build_graph, pool_for
        from infra.llm import OpenAICompatibleLLM

        peer_pool = pool_for(pg.schema_dsn(SCHEMA), max_size=2)
        await peer_pool.open()
        saver = AsyncPostgresSaver(peer_pool)  # type: ignore[arg-type]
        await saver.setup()
        peer_llm = OpenAICompatibleLLM([stack.llm_url])  # never called: the graph is not run
        peer_graph = build_graph(peer_llm, saver)
    measure_task = progress.add_task("cold load: loading", total=len(args.cold))
    try:
        async with httpx.AsyncClient(timeout=120) as client:
            for n in args.cold:
                sid = sessions[n]
                entry: dict[str, Any] = {"stored_turns": n}
                # Straight from L2 into an L1 pool, as load_state does on a miss.
                times = []
                state = None
                for _ in range(args.cold_reps):
                    pool = L1Pool(10, 1 << 30, 900)
                    t0 = time.perf_counter()
                    state = await l2.load(TENANT, sid)
                    assert state is not None
                    pool.put(state)
                    times.append(time.perf_counter() - t0)
                assert state is not None
                entry["tm_load"] = summary(times)
                entry["tm_turns_loaded"] = len(state.turns)
                entry["tm_bytes_loaded"] = sum(len(t.encode()) for t in state.turns) + sum(
                    len(v) for v in state.meta_fields().values()
                )
                entry["tm_archived_upto"] = state.archived_upto
                entry["tm_context_start"] = state.context_start
                # Through the service: a turn after release loads the session from L2.
                phases, pre = [], []
                for k in range(args.cold_service_reps):
                    (await client.post(f"{tm.url}/v1/sessions/{sid}/release")).raise_for_status()
                    await archive_idle(client, tm.url)
                    await post_turn_timed(client, tm.url, sid, n + k + 1, user_message(5, n + k))
                    rec = (await get_json(client, tm.url + "/bench/turns?clear=1"))[-1]
                    if rec["l1_hit"] is False:
                        phases.append(rec["timings"]["prepare"])
                        pre.append(rec["t_llm_request"])
                entry["tm_service_load"] = summary(phases)
                entry["tm_service_pre_llm"] = summary(pre)
                if peer_graph is not None:
                    entry.update(await peer_cold(peer_graph, n, run, args.cold_reps))
                out.append(entry)
                progress.advance(measure_task)
    finally:
        await redis.aclose()
        if peer_pool is not None:
            await peer_pool.close()
    return out


async def peer_cold(graph: Any, n: int, run: str, reps: int) -> dict[str, Any]:
    """A peer thread of ``n`` turns, then ``aget_tuple`` as a run starts with."""
    from langchain_core.messages import AIMessage, HumanMessage

    from infra.tokenizer import default_tokenizer
    from tests.servers.fake_vllm import default_reply

    tok = default_tokenizer()
    msgs: list[Any] = []
    for i in range(1, n + 1):
        m = user_message(5, i)
        msgs.append(HumanMessage(content=m))
        msgs.append(AIMessage(content=default_reply([{"role": "user", "content": m}], 24, tok)))
    config: dict[str, Any] = {"configurable": {"thread_id": f"cold-{run}-{n}"}}
    await graph.aupdate_state(config, {"messages": msgs})
    saver = graph.checkpointer
    times = []
    loaded = 0
    for _ in range(reps):
        t0 = time.perf_counter()
        tup = await saver.aget_tuple(config)
        times.append(time.perf_counter() - t0)
        loaded = len(tup.checkpoint["channel_values"]["messages"])
    return {"peer_load": summary(times), "peer_messages_loaded": loaded}


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def tables(result: dict[str, Any], args: argparse.Namespace) -> list[Table]:
    out = []
    pg_note = result["postgres"]
    if "at" in result:
        t = Table(
            "Per-turn overhead: tiermem vs LangGraph + PostgresSaver (same conversations)",
            ["turn", "tiermem own median ms", "peer own median ms", "peer / tiermem",
             "tiermem own p90 ms", "peer own p90 ms", "tiermem TTFT overhead median ms",
             "peer TTFT overhead median ms", "tiermem prompt tokens", "peer prompt tokens"],
        )  # fmt: skip
        for e in result["at"]:
            tm, pe = e.get("tm"), e.get("peer")
            t.rows.append([
                f"{e['turn']:,}", ms(tm["own"]["median"]) if tm else "–",
                ms(pe["own"]["median"]) if pe else "–",
                num(ratio(pe["own"]["median"], tm["own"]["median"])) if pe and tm else "–",
                ms(tm["own"]["p90"]) if tm else "–", ms(pe["own"]["p90"]) if pe else "–",
                ms(tm["ttft_overhead"]["median"]) if tm else "–",
                ms(pe["ttft_overhead"]["median"]) if pe else "–",
                num(tm["prompt_tokens"]["median"], 0) if tm else "–",
                num(pe["prompt_tokens"]["median"], 0) if pe else "–",
            ])  # fmt: skip
        t.note = (
            f"Turns N−{args.window - 1}..N of {args.sessions} sessions, one request at a time. "
            f"LLM: first token {args.first_token_ms:g} ms, {args.token_interval_ms:g} ms/token, "
            f"{args.reply_tokens} tokens. Own time: route entry to end of turn minus time "
            "awaiting the LLM stream (the peer's includes loading and writing its checkpoints). "
            f"PostgreSQL: {pg_note}."
        )
        out.append(t)

        t = Table(
            "Bytes written per turn: tiermem (Redis) vs LangGraph + PostgresSaver (PostgreSQL)",
            ["turn", "tiermem AOF bytes", "tiermem net-in bytes", "tiermem archived?",
             "peer WAL bytes", "peer row payload bytes", "WAL / AOF"],
        )  # fmt: skip
        for e in result["at"]:
            tb, pb = e["tm_bytes"], e.get("peer_bytes")
            t.rows.append([
                f"{e['turn']:,}", num(tb["aof"], 0), num(tb["net_in"], 0),
                "yes" if tb["archived"] else "no", num(pb["wal"], 0) if pb else "–",
                num(pb["payload"], 0) if pb else "–",
                num(ratio(pb["wal"], tb["aof"]), 1) if pb else "–",
            ])  # fmt: skip
        t.note = (
            "tiermem: growth of Redis's aof_current_size (appendonly, everysec) and of "
            "total_net_input_bytes over the turn and the archive step it sets off (turns that "
            f"are multiples of {args.threshold} archive a batch). Peer: pg_wal_lsn_diff of "
            "pg_current_wal_insert_lsn over the turn (the whole server's WAL: indexes, TOAST "
            "and page images included), and the growth of the thread's rows in checkpoints, "
            "checkpoint_blobs and checkpoint_writes (octet_length). Median of the sessions."
        )
        out.append(t)

    wa = result.get("write_amplification")
    if wa:
        t = Table(
            "Write amplification: memory upkeep per turn",
            ["design", "Milvus writes / turn"]
            + [f"upkeep LLM tokens / turn at turn {p['turn']:,}" for p in wa["per_turn"]],
        )
        per_batch = [
            num(p["tm_batch_tokens"] / args.threshold, 0) if p["tm_batch_tokens"] else "–"
            for p in wa["per_turn"]
        ]
        t.rows.append(["tiermem (measured)", num(wa["tm_l3_writes_per_turn"], 3), *per_batch])
        t.rows.append(
            ["LLM extraction every turn (computed)", "1"]
            + [num(p["extraction_tokens"], 0) for p in wa["per_turn"]]
        )
        t.rows.append(["LangGraph + PostgresSaver", "0 (no long-term memory)"]
                      + ["0" for _ in wa["per_turn"]])  # fmt: skip
        t.note = (
            f"tiermem: {wa['turns']:,} turns wrote {wa['tm_l3_writes_per_turn'] * wa['turns']:.0f}"
            f" L3 rows (target 1/{args.threshold} = {1 / args.threshold:.3f} per turn) and spent "
            f"{wa['tm_upkeep_tokens_per_turn']:.1f} summary tokens per turn on average "
            f"({wa['tm_tokens_per_batch']:.0f} per batch, prompt + completion); the columns show "
            f"the batch archived at that turn divided by {args.threshold}. Extraction design "
            "(assumption, not run): one LLM call per turn, prompt = tiermem's summary "
            "instruction + the turn + existing memories as large as tiermem's running summary "
            f"at that turn, completion = {wa['extraction_completion_tokens']} tokens (one summary "
            "of the fake LLM), and one Milvus write per turn. The peer keeps no long-term "
            "memory: instead its prompt carries the whole history (table above)."
        )
        out.append(t)

    cold = result.get("cold")
    if cold:
        t = Table(
            "Cold load: a session with N stored turns, from storage into memory",
            ["stored turns", "tiermem L2→L1 median ms", "tiermem p99 ms", "turns loaded",
             "bytes loaded", "service load phase (miss) median ms",
             "service miss turn, before LLM median ms", "peer aget_tuple median ms",
             "peer p99 ms", "messages loaded"],
        )  # fmt: skip
        for e in cold:
            t.rows.append([
                f"{e['stored_turns']:,}", ms(e["tm_load"]["median"]), ms(e["tm_load"]["p99"]),
                f"{e['tm_turns_loaded']:,}", num(e["tm_bytes_loaded"], 0),
                ms(e["tm_service_load"]["median"]), ms(e["tm_service_pre_llm"]["median"]),
                ms(e["peer_load"]["median"]) if "peer_load" in e else "–",
                ms(e["peer_load"]["p99"]) if "peer_load" in e else "–",
                f"{e['peer_messages_loaded']:,}" if "peer_messages_loaded" in e else "–",
            ])  # fmt: skip
        t.note = (
            "tiermem sessions written straight into L2 (commit per turn, compaction as the "
            f"context builder plans it, a batch archived every {args.threshold} turns); loaded "
            f"{args.cold_reps}× with L2Store.load + L1Pool.put, and "
            f"{args.cold_service_reps}× through the service (release, then a turn: its load "
            "phase, and all it did before the LLM request; turns carry their stored token "
            "counts, the live summary is counted once). Peer: a thread of N turns written with one "
            "aupdate_state, loaded with "
            f"AsyncPostgresSaver.aget_tuple {args.cold_reps}×."
        )
        out.append(t)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="tiermem next to LangGraph + langgraph-checkpoint-postgres",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--turns", type=int, default=500, help="turns per conversation")
    p.add_argument("--sessions", type=int, default=2, help="conversations per system")
    p.add_argument(
        "--at",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[10, 100, 500],
        help="turns to report",
    )
    p.add_argument("--window", type=int, default=10, help="turns per reported point")
    p.add_argument("--first-token-ms", type=float, default=5.0)
    p.add_argument("--token-interval-ms", type=float, default=1.0)
    p.add_argument("--reply-tokens", type=int, default=24)
    p.add_argument("--threshold", type=int, default=10, help="TIERMEM_ARCHIVE_THRESHOLD")
    p.add_argument(
        "--cold",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[10, 1000, 10000],
        help="stored turns of the cold-load sessions",
    )
    p.add_argument("--cold-reps", type=int, default=30)
    p.add_argument("--cold-service-reps", type=int, default=10)
    p.add_argument("--skip-conversations", action="store_true")
    p.add_argument("--skip-cold", action="store_true")
    p.add_argument("--name", default="peer_langgraph_pg", help="results file name")
    args = p.parse_args(argv)
    # Stack reads these for the fake LLM it starts.
    return args


async def amain(args: argparse.Namespace) -> int:
    info = machine_info()
    console.print(f"[bold]peer_langgraph_pg[/bold] · {machine_line(info)}")
    pg: Postgres | None = None
    try:
        pg = find_or_start(args.dsn)
        prepare_schema(pg, drop=False)
        pg_note = pg.how
    except (PostgresUnavailable, psycopg.Error) as exc:
        pg_note = f"NOT AVAILABLE: {exc}"
        console.print(f"[bold red]PostgreSQL is not available; the peer is not measured.[/] "
                      f"{exc}")  # fmt: skip
        pg = None
    console.print(f"PostgreSQL: {pg_note}")
    stack = Stack(args)
    result: dict[str, Any] = {"postgres": pg_note}
    started = time.perf_counter()
    tm = peer = None
    pgp = None
    try:
        env = tiermem_env(stack.redis.url, stack.llm_url, stack.tmp / "app", args.threshold)
        tm = ServerProcess("bench.tiermem_proc", env=env).start()
        if pg is not None:
            peer = ServerProcess(
                "bench.peer_app", ["--llm-url", stack.llm_url, "--dsn", pg.schema_dsn(SCHEMA)]
            ).start()
            pgp = PgProbe(pg.schema_dsn(SCHEMA))
            await pgp.open()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:  # fmt: skip
            if not args.skip_conversations:
                conv = await conversations(stack, tm, peer, pgp, args, progress)
                result["conversations"] = conv
                result["at"] = at_turn(conv, args)
                result["write_amplification"] = write_amplification(conv, args)
            if not args.skip_cold:
                result["cold"] = await cold_load(stack, tm, pg, args, progress)
    finally:
        if pgp is not None:
            await pgp.close()
        for srv in (tm, peer):
            if srv is not None:
                srv.stop()
        await stack.close()
        if pg is not None:
            prepare_schema(pg, drop=True)
            pg.stop()
    elapsed = time.perf_counter() - started
    out_tables = tables(result, args)
    for t in out_tables:
        t.print()
    header = f"Measured {machine_line(info)}; run took {elapsed:.0f} s. PostgreSQL: {pg_note}."
    data = {"machine": info, "args": vars(args), "elapsed_s": elapsed, **result}
    path = write_results(args.name, data, out_tables, header)
    console.print(f"{header}\nJSON: {path}  Markdown: {path.with_suffix('.md')}")
    rows = result.get("conversations", {}).get("rows", [])
    errors = sum(1 for r in rows for k in ("tm", "peer") if k in r and r[k]["status"] != 200)
    return 1 if errors or pg is None else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop

        return uvloop.run(amain(args))
    except ImportError:
        return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
