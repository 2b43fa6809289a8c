"""``tiermem reindex`` as an operator runs it: a separate process, on a Milvus Lite
file written by the schema before pieces; run twice, it resumes."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from infra.embeddings import HashingEmbedder
from infra.milvus import AsyncMilvus
from memory.l3_store import batch_id_for, legacy_collection_spec

ROOT = Path(__file__).resolve().parents[2]
N = 30


async def _old_collection(uri: str) -> None:
    embedder = HashingEmbedder(384)
    with ThreadPoolExecutor(2) as ex:
        m = AsyncMilvus(uri, None, ex)
        spec = legacy_collection_spec(384)
        await m.create_collection(
            "tiermem_memories", spec, properties={"tiermem.embedder": embedder.name}
        )
        await m.create_indexes("tiermem_memories", spec.indexes)
        rows = []
        for i in range(N):
            first = 10 * i + 1
            text = f"Summary {i}.\n\n[turn {first}] user: fact {i}\n[turn {first}] assistant: ok"
            rows.append({
                "batch_id": batch_id_for("acme", "s", first, first + 9), "tenant": "acme",
                "user_id": "bob", "session_id": "s", "first_turn": first,
                "last_turn": first + 9, "text": text, "created_at": 1.0,
                "vector": (await embedder.embed([text]))[0],
            })  # fmt: skip
        await m.upsert("tiermem_memories", rows)
        await m.close()


async def _run(env: dict[str, str]) -> tuple[int, dict[str, object]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", "reindex", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode is not None
    assert out, err.decode()[-2000:]
    return proc.returncode, json.loads(out)


async def test_reindex_rebuilds_then_resumes(tmp_path: Path) -> None:
    uri = str(tmp_path / "l3.db")
    await _old_collection(uri)
    env = {**os.environ, "TIERMEM_MILVUS_URI": uri, "TIERMEM_EMBEDDINGS": "hash",
           "TIERMEM_DATA_DIR": str(tmp_path), "TIERMEM_LLM": "dev"}  # fmt: skip
    code, report = await _run(env)
    assert code == 0
    assert (report["batches"], report["rebuilt"], report["skipped"]) == (N, N, 0)
    assert report["marked"] is True and report["failed"] == []
    code, again = await _run(env)
    assert code == 0
    # Marked done: nothing left to read; and had it been read, nothing to rebuild.
    assert again["rebuilt"] == 0 and again["skipped"] == N
