"""``tiermem reindex``: rebuild L3 batches of the schema before pieces
(memory/l3_reindex.py) with the same settings ``tiermem serve`` reads.

With Milvus Lite (a local ``.db``) only one process may open the file: stop the
service first. Against a Milvus server it runs beside the service. It prints a
line of progress per group and a JSON report at the end; exit 0 when every
batch was rebuilt, 1 when some were not (run it again: it resumes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from dataclasses import asdict

from infra.embeddings import build_embedder, close_embedder
from infra.executors import Executors
from infra.milvus import AsyncMilvus
from infra.settings import Settings
from memory.l3_reindex import ReindexReport, reindex
from memory.l3_store import L3Store

log = logging.getLogger("tiermem.reindex")


async def run_reindex(settings: Settings) -> ReindexReport:
    with Executors(settings.cpu_workers, settings.milvus_workers) as executors:
        milvus = AsyncMilvus(
            settings.resolved_milvus_uri, settings.milvus_token, executors.milvus,
            timeout_s=settings.milvus_timeout_s, max_in_flight=executors.milvus_workers,
        )  # fmt: skip
        embedder = build_embedder(settings, executors.cpu)
        try:
            store = L3Store.from_settings(settings, milvus, embedder, cpu=executors.cpu)

            def progress(r: ReindexReport) -> None:
                print(
                    f"reindex: {r.rebuilt} rebuilt, {r.skipped} already done, "
                    f"{len(r.failed)} failed of {r.batches}",
                    file=sys.stderr,
                )

            return await reindex(store, progress)
        finally:
            await close_embedder(embedder)
            await milvus.close()


def main(settings: Settings) -> int:
    report = asyncio.run(run_reindex(settings))
    print(json.dumps(asdict(report), indent=2))
    return 0 if not report.failed else 1
