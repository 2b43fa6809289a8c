"""``tiermem reindex``: rebuild batches of the L3 schema before pieces (one row per
batch, one vector of its summary and transcript) as pieces (memory/l3_store.py).

Each old row's text is the batch's summary and transcript, so the new rows are
built from it alone: nothing else needs to exist. Idempotent and resumable: a
batch whose pieces exist already is skipped, and writing one again would upsert
the same keys anyway; a run stopped half-way (Ctrl-C, Milvus down) is run again.
When every batch is rebuilt, the old collection is marked
(``REINDEXED_PROPERTY``) and stores stop reading it at their next start; it is
not dropped: an operator drops it when satisfied.

This is the one reader of L3 that is not scoped to a tenant: an administrator's
command over the whole collection, never part of a request. Each rebuilt batch
keeps its own tenant, user and session.

Old rows are read by batch id prefix (ids are uniform hex digits), in groups
small enough for Milvus' cap on the rows of one query.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from infra.milvus import MilvusError
from memory.l3_store import (
    MAX_ROWS,
    RECORD_FIELDS,
    REINDEXED_PROPERTY,
    L3Store,
    L3Unavailable,
    MemoryRecord,
    legacy_cut,
)

log = logging.getLogger("tiermem.reindex")

_HEX = "0123456789abcdef"
# Rows per group at most, well under MAX_ROWS so an uneven prefix still fits.
_GROUP_ROWS = MAX_ROWS // 2


@dataclass
class ReindexReport:
    collection: str
    into: str
    batches: int = 0  # rows of the old collection
    rebuilt: int = 0
    skipped: int = 0  # already rebuilt by an earlier run
    rows_written: int = 0
    # Old texts that the archiver of the time had cut: rebuilt as they are.
    cut: int = 0
    failed: list[str] = field(default_factory=list)
    marked: bool = False


async def reindex(
    store: L3Store, progress: Callable[[ReindexReport], None] | None = None
) -> ReindexReport:
    """Rebuild every old batch that has no pieces yet; mark the old collection
    done when all are. Raises ``L3Unavailable`` if Milvus cannot be read."""
    await store.ensure_collection()
    milvus, old = store.milvus, store.legacy_collection
    report = ReindexReport(old, store.collection)
    try:
        if not await milvus.has_collection(old):
            return report
        await milvus.load_collection(old)
        rows = await milvus.query(
            old, filter='batch_id != ""', output_fields=["count(*)"], consistency_level="Strong"
        )
        report.batches = int(rows[0]["count(*)"]) if rows else 0
        depth = (
            0
            if report.batches <= _GROUP_ROWS
            else math.ceil(math.log(report.batches / _GROUP_ROWS, 16)) + 1
        )
        for prefix in _prefixes(depth):
            await _group(store, prefix, report)
            if progress is not None:
                progress(report)
        if not report.failed:
            await milvus.call(
                "alter_collection_properties",
                old,
                properties={REINDEXED_PROPERTY: store.collection},
            )
            report.marked = True
    except MilvusError as exc:
        raise L3Unavailable(str(exc)) from exc
    return report


def _prefixes(depth: int) -> list[str]:
    out = [""]
    for _ in range(depth):
        out = [p + h for p in out for h in _HEX]
    return out


async def _group(store: L3Store, prefix: str, report: ReindexReport) -> None:
    milvus = store.milvus
    expr = f'batch_id like "{prefix}%"' if prefix else 'batch_id != ""'
    rows = await milvus.query(
        store.legacy_collection, filter=expr, output_fields=RECORD_FIELDS, limit=MAX_ROWS,
        consistency_level="Strong",
    )  # fmt: skip
    if not rows:
        return
    ids = [str(r["batch_id"]) for r in rows]
    done: set[str] = set()
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        quoted = ",".join(f'"{i}"' for i in chunk)
        found = await milvus.query(
            store.collection,
            filter=f'batch_id in [{quoted}] and kind == "turns" and piece == 0',
            output_fields=["batch_id"], limit=len(chunk), consistency_level="Strong",
        )  # fmt: skip
        done.update(str(r["batch_id"]) for r in found)
    for r in rows:
        bid = str(r["batch_id"])
        if bid in done:
            report.skipped += 1
            continue
        text = str(r["text"])
        if legacy_cut(text):
            report.cut += 1
        record = MemoryRecord(
            batch_id=bid, tenant=str(r["tenant"]), user_id=str(r["user_id"]),
            session_id=str(r["session_id"]), first_turn=int(r["first_turn"]),
            last_turn=int(r["last_turn"]), text=text, created_at=float(r["created_at"]),
        )  # fmt: skip
        try:
            report.rows_written += await store.upsert_batch(record)
        except (L3Unavailable, ValueError) as exc:
            log.warning("batch %s not rebuilt: %s", bid, exc)
            report.failed.append(bid)
            continue
        report.rebuilt += 1
