"""The archiver: moves batches of turns from L2 into L3, off the critical path.

When a session's unarchived turns reach the threshold N, the oldest N become a
batch: summarised by the LLM, embedded and upserted into L3 under
``batch_id = hash(tenant, session, first_turn, last_turn)``; only then does the
cursor move in L2. Every step is repeatable:

- the batch is cut from the cursor, so a rerun after a crash cuts the same turns
  and gets the same batch_id; the L3 write is an upsert, so it never duplicates;
- the batch's outbox record in L2 (no TTL until L3 confirms) keeps the summary,
  attempts and next retry time, so a Milvus outage only delays archiving: the
  sweeper retries with backoff and chat goes on;
- an L2 lease makes sure two pods never archive the same session at once.

A tail idle longer than ``archive_idle_after`` is archived as it is (a short
batch) by the sweeper, so nothing is lost to the L2 TTL.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from infra.llm import ChatMessage, LLMClient, LLMError
from memory.cache import Cache, Scope
from memory.l2_store import L2Error, L2Store
from memory.l3_store import L3Store, L3Unavailable, MemoryRecord, batch_id_for
from memory.metrics import Metrics
from memory.models import Turn
from memory.summaries import (
    SUMMARY_PROMPT,
    SUMMARY_PROMPT_VERSION,
    extractive_summary,
    summary_request,
    transcript,
    ungrounded_terms,
)

log = logging.getLogger("tiermem.archiver")

RUNNING_SUMMARY_MAX_CHARS = 4000
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 300.0


@dataclass(frozen=True, slots=True)
class ArchiveResult:
    batch_id: str
    first_turn: int
    last_turn: int
    version: int
    summary: str


# Called after the cursor moved: (tenant, session, new_version, archived_upto,
# summary). The session facade's ``apply_archive``: L1 follows under its lock.
AdvanceHook = Callable[[str, str, int, int, str], Awaitable[None]]
# Test fault injection: runs after the L3 upsert, before the cursor moves.
CrashHook = Callable[[str], Awaitable[None]]


def merge_summaries(running: str, batch_summary: str) -> str:
    """The running summary: batch summaries in order, the oldest dropped first
    once it outgrows its cap (the full batches stay in L3)."""
    merged = f"{running}\n{batch_summary}".strip() if running else batch_summary.strip()
    if len(merged) > RUNNING_SUMMARY_MAX_CHARS:
        merged = merged[-RUNNING_SUMMARY_MAX_CHARS:]
        nl = merged.find("\n")
        if 0 <= nl < 200:
            merged = merged[nl + 1 :]
    return merged


class Archiver:
    def __init__(
        self,
        l2: L2Store,
        l3: L3Store,
        llm: LLMClient,
        metrics: Metrics,
        cache: Cache,
        *,
        threshold: int,
        lease_s: float,
        idle_after_s: float,
        on_advance: AdvanceHook | None = None,
        after_upsert: CrashHook | None = None,
    ) -> None:
        self.l2 = l2
        self.l3 = l3
        self.llm = llm
        self.metrics = metrics
        self.cache = cache
        self.threshold = threshold
        self.lease_s = lease_s
        self.idle_after_s = idle_after_s
        self.on_advance = on_advance
        self.after_upsert = after_upsert
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._again: set[tuple[str, str]] = set()

    # --- scheduling -----------------------------------------------------------------
    def next_batch_id(self, tenant: str, session: str, archived_upto: int) -> str:
        first = archived_upto + 1
        return batch_id_for(tenant, session, first, first + self.threshold - 1)

    def schedule(self, tenant: str, session: str) -> None:
        """Archives due batches of a session in the background (one task per session)."""
        key = (tenant, session)
        if key in self._tasks:
            self._again.add(key)
            return
        task = asyncio.create_task(self._run(tenant, session), name=f"archive:{tenant}:{session}")
        self._tasks[key] = task
        task.add_done_callback(lambda _t: self._tasks.pop(key, None))

    async def _run(self, tenant: str, session: str) -> None:
        key = (tenant, session)
        try:
            while True:
                self._again.discard(key)
                while await self.archive_once(tenant, session, force=False) is not None:
                    pass
                if key not in self._again:
                    return
        except Exception:  # a background task must never die silently
            log.exception("archive failed", extra={"tenant": tenant, "session": session})
            self.metrics.errors.labels("archive").inc()

    @property
    def pending_tasks(self) -> int:
        return len(self._tasks)

    async def drain(self, limit_s: float) -> None:
        """Waits for running archive tasks; what does not finish stays safe in L2
        (cursor unmoved, outbox record pending) and is retried by any pod."""
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=limit_s)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    # --- one batch ------------------------------------------------------------------
    async def archive_once(
        self, tenant: str, session: str, *, force: bool, ignore_backoff: bool = False
    ) -> ArchiveResult | None:
        """Archives the oldest due batch of a session, if there is one.

        ``force`` archives a short tail (the idle case). Returns None when there
        was nothing to do, another pod holds the lease, or L3 is down (the batch
        then waits in its outbox record)."""
        holder = uuid.uuid4().hex
        if not await self.l2.acquire_lease(tenant, session, holder, self.lease_s):
            return None
        try:
            return await self._archive_locked(tenant, session, force, ignore_backoff)
        finally:
            await self.l2.release_lease(tenant, session, holder)

    async def _archive_locked(
        self, tenant: str, session: str, force: bool, ignore_backoff: bool
    ) -> ArchiveResult | None:
        state = await self.l2.read_meta(tenant, session)
        if state is None or state.unarchived <= 0:
            return None
        if state.unarchived < self.threshold and not force:
            return None
        first = state.archived_upto + 1
        last = min(state.turn_count, first + self.threshold - 1)
        batch_id = batch_id_for(tenant, session, first, last)
        _meta, turns, record = await self.l2.cut_batch(tenant, session, batch_id, first, last)
        if record is None or len(turns) != last - first + 1:
            log.error(
                "batch turns missing from L2",
                extra={"tenant": tenant, "session": session, "batch_id": batch_id},
            )
            self.metrics.errors.labels("archive_missing_turns").inc()
            return None
        if not ignore_backoff and record.next_try_at > time.time():
            return None
        text = transcript(turns)
        summary = await self._summary_of(tenant, session, batch_id, turns, text)
        # An extractive summary repeats the turns' first sentences: nothing to
        # find in it that the chunks lack, so only a model's summary is indexed.
        # (Decided from the text, so a retried batch writes the same rows.)
        indexed = "" if summary == extractive_summary(turns) else summary
        try:
            rows = await self.l3.upsert_batch(
                MemoryRecord(
                    batch_id=batch_id,
                    tenant=tenant,
                    user_id=state.user_id or "",
                    session_id=session,
                    first_turn=first,
                    last_turn=last,
                    text=text,
                    created_at=time.time(),
                    summary=indexed,
                )
            )
        except L3Unavailable as exc:
            attempts = record.attempts + 1
            delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempts - 1))
            await self.l2.note_batch_failure(
                tenant, session, batch_id, attempts, time.time() + delay
            )
            self.metrics.archive_batches.labels("l3_unavailable").inc()
            log.warning(
                "L3 unavailable; batch waits in L2 outbox",
                extra={"tenant": tenant, "session": session, "batch_id": batch_id,
                       "attempts": attempts, "retry_in_s": delay, "error": str(exc)},
            )  # fmt: skip
            return None
        self.metrics.l3_writes.inc()
        self.metrics.l3_rows.inc(rows)
        if self.after_upsert is not None:
            await self.after_upsert(batch_id)
        if await self.l2.is_forgotten(tenant, session):
            # Forgotten while this batch was on its way: what was just written
            # goes too (the forget wrote its marker before it deleted L3 rows, so
            # either it deleted these, or this sees the marker).
            await self.l3.delete_session(tenant, session)
            self.metrics.archive_batches.labels("forgotten").inc()
            return None
        running = merge_summaries(state.summary, summary)
        version = await self.l2.advance_archive(tenant, session, batch_id, first, last, running)
        if version is None:
            self.metrics.archive_batches.labels("raced").inc()
            return None
        self.metrics.archive_batches.labels("archived").inc()
        if self.on_advance is not None:
            await self.on_advance(tenant, session, version, last, running)
        log.info(
            "batch archived",
            extra={"tenant": tenant, "session": session, "batch_id": batch_id,
                   "first_turn": first, "last_turn": last},
        )  # fmt: skip
        return ArchiveResult(batch_id, first, last, version, running)

    async def _summary_of(
        self, tenant: str, session: str, batch_id: str, turns: list[Turn], text: str
    ) -> str:
        """The batch's summary, through the cache (per session, so forgotten with
        it): a batch archived again (a crash after the summary, L3 down) reuses it
        and never pays the LLM twice. Keyed by batch id, the model and the summary
        prompt's version; what the LLM failed to answer is not cached (the next
        attempt asks again)."""
        answered: list[bool] = []

        async def summarise() -> str:
            summary, ok = await self._summarise(turns, session, text)
            answered.append(ok)
            return summary

        got = await self.cache.fetch(
            "summary", Scope(tenant, session),
            {"batch": batch_id, "model": self.llm.model_label, "prompt": SUMMARY_PROMPT_VERSION},
            summarise, encode=str.encode, decode=bytes.decode, cacheable=lambda _s: all(answered),
        )  # fmt: skip
        assert got.value is not None
        return got.value

    async def _summarise(self, turns: list[Turn], session: str, text: str) -> tuple[str, bool]:
        """The batch's summary: the LLM's, unless it fails or names or numbers
        something the turns do not (``ungrounded_terms``); then an extractive one,
        which the archive does not index. The flag: the LLM answered."""
        messages: list[ChatMessage] = [
            {"role": "system", "content": SUMMARY_PROMPT},
            {"role": "user", "content": summary_request(text)},
        ]
        try:
            result = await self.llm.complete(messages, session_key=session, max_tokens=256)
        except LLMError as exc:
            log.warning("summary LLM call failed; using an extractive summary: %s", exc)
            self.metrics.errors.labels("summary_llm").inc()
            return extractive_summary(turns), False
        usage = result.usage
        if usage is not None:
            self.metrics.summary_tokens.inc(usage.prompt_tokens + usage.completion_tokens)
        summary = result.text.strip()
        if not summary:
            return extractive_summary(turns), True
        invented = ungrounded_terms(summary, text)
        if invented:
            self.metrics.summaries_rejected.inc()
            log.warning(
                "batch summary names or numbers what the turns do not; kept out of L3",
                extra={"session": session, "terms": invented[:5]},
            )
            return extractive_summary(turns), True
        return summary, True

    # --- sweeper ----------------------------------------------------------------------
    async def sweep_once(self, now: float | None = None) -> int:
        """One pass over L2: archives due batches (including ones that waited for
        L3) and idle tails. Returns the number of batches archived."""
        now = time.time() if now is None else now
        archived = 0
        backlog = 0
        try:
            async for tenant, session, meta in self.l2.scan_sessions():
                unarchived = int(meta["turn_count"]) - int(meta["archived_upto"])
                if unarchived <= 0:
                    continue
                idle = now - float(meta["updated_at"] or 0) > self.idle_after_s
                tail = 1 if idle and unarchived % self.threshold else 0
                due = unarchived // self.threshold + tail
                if not due:
                    continue
                done = 0
                while True:
                    result = await self.archive_once(tenant, session, force=idle)
                    if result is None:
                        break
                    done += 1
                archived += done
                backlog += max(0, due - done)
        except (L2Error, OSError) as exc:
            log.warning("sweep stopped early: %s", exc)
            return archived
        self.metrics.archive_backlog.set(backlog)
        return archived

    async def sweep_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sweep_once()
            except Exception:
                log.exception("sweep failed")
                self.metrics.errors.labels("sweep").inc()
