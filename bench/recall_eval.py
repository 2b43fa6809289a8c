"""The recall benchmark's measuring side: per-turn baselines (dense and BM25) at
tiermem's text budget, hit counting, and the L3 storage figures read from the
Milvus Lite file.

- **Per-turn text**: what tiermem's transcript holds for a turn
  (memory/summaries.py ``transcript``): ``[turn N] user: ...`` and
  ``[turn N] assistant: ...`` lines, the assistant text being the reply the service
  streamed. Baselines index and return exactly that text, so characters compare.
- **Dense**: the same MiniLM model the service embeds with, loaded by
  ``infra.embeddings.MiniLMEmbedder``; cosine of normalised vectors in numpy.
- **BM25**: ``bm25s`` (Lucene variant, k1 = 1.5, b = 0.75), lower-cased
  ``\\w\\w+`` tokens, English stop words removed, no stemming.
- **Budget**: for a question and k, tiermem's answer spent B characters (the
  ``matches`` texts when the response has them, else the batches' ``text``); a
  baseline returns turns best first while their texts add up to at most B, and
  always at least one turn.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Corpus:
    """One user's turns as the baselines see them."""

    keys: list[tuple[str, int]] = field(default_factory=list)  # (tiermem session, turn)
    texts: list[str] = field(default_factory=list)


def turn_text(index: int, user: str, assistant: str) -> str:
    lines = [f"[turn {index}] user: {user}"]
    if assistant:
        lines.append(f"[turn {index}] assistant: {assistant}")
    return "\n".join(lines)


def take_budget(order: Sequence[int], lengths: Sequence[int], budget: int) -> list[int]:
    """Indices from ``order`` while their lengths add up to at most ``budget``; at
    least one."""
    out: list[int] = []
    spent = 0
    for i in order:
        if out and spent + lengths[i] > budget:
            break
        out.append(i)
        spent += lengths[i]
    return out


# --- dense --------------------------------------------------------------------------------


class DenseBaseline:
    def __init__(self) -> None:
        from infra.embeddings import MiniLMEmbedder

        self.executor = ThreadPoolExecutor(1)
        self.embedder = MiniLMEmbedder(self.executor)

    async def embed(self, texts: list[str]) -> np.ndarray:
        vectors = await self.embedder.embed(texts)
        return np.asarray(vectors, dtype=np.float32)

    def close(self) -> None:
        self.executor.shutdown(wait=True)


def dense_rankings(doc_vecs: np.ndarray, query_vecs: np.ndarray) -> np.ndarray:
    """Per query, document indices best first."""
    scores = query_vecs @ doc_vecs.T
    return np.argsort(-scores, axis=1, kind="stable")


# --- BM25 ---------------------------------------------------------------------------------

_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def bm25_tokens(text: str, stopwords: frozenset[str]) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in stopwords]


def bm25_rankings(docs: list[str], queries: list[str]) -> np.ndarray:
    import bm25s
    from bm25s.stopwords import STOPWORDS_EN

    stop = frozenset(STOPWORDS_EN)
    retriever = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    corpus = [bm25_tokens(d, stop) or ["\u2400"] for d in docs]
    retriever.index(corpus, show_progress=False)
    vocab = set(retriever.vocab_dict)
    out = np.zeros((len(queries), len(docs)), dtype=np.int64)
    for qi, q in enumerate(queries):
        toks = [t for t in bm25_tokens(q, stop) if t in vocab]
        scores = retriever.get_scores(toks) if toks else np.zeros(len(docs))
        out[qi] = np.argsort(-np.asarray(scores), kind="stable")
    return out


# --- tiermem hits ---------------------------------------------------------------------------


def answer_chars(memories: list[dict[str, Any]]) -> tuple[int, bool]:
    """(characters the answer carries, whether it had ``matches``)."""
    has = any("matches" in m for m in memories)
    if has:
        texts = [x.get("text") for m in memories for x in m.get("matches") or ()]
        return sum(len(str(t or "")) for t in texts), True
    return sum(len(str(m.get("text") or "")) for m in memories), False


def range_hit(memories: list[dict[str, Any]], evidence: set[tuple[str, int]]) -> bool:
    for m in memories:
        for sid, t in evidence:
            if m.get("session_id") == sid and int(m["first_turn"]) <= t <= int(m["last_turn"]):
                return True
    return False


def strict_hit(memories: list[dict[str, Any]], evidence: set[tuple[str, int]]) -> bool | None:
    """Evidence among the returned ``matches``; None when the response has none."""
    if not any("matches" in m for m in memories):
        return None
    for m in memories:
        for x in m.get("matches") or ():
            if (m.get("session_id"), int(x["turn"])) in evidence:
                return True
    return False


# --- storage ------------------------------------------------------------------------------


def milvus_storage(db_path: Path) -> dict[str, Any]:
    """Rows, vectors and bytes of every collection in a Milvus Lite file, read with
    pymilvus' MilvusClient once the service has stopped. Dense vectors count
    ``dim`` float32 (or 2 bytes per value for float16/bfloat16, dim/8 for binary)
    per row; sparse vectors 8 bytes (uint32 index + float32 value) per non-zero;
    VARCHAR fields their UTF-8 bytes; other scalars their width."""
    from pymilvus import DataType, MilvusClient

    client = MilvusClient(uri=str(db_path))
    out: dict[str, Any] = {"db_bytes_on_disk": _disk_bytes(db_path), "collections": {}}
    try:
        for name in client.list_collections():
            desc = client.describe_collection(name)
            fields = desc.get("fields", [])
            dense: dict[str, int] = {}
            sparse: list[str] = []
            scalars: dict[str, Any] = {}
            pk = None
            for f in fields:
                ftype = f.get("type")
                params = f.get("params") or {}
                if f.get("is_primary"):
                    pk = f["name"]
                if ftype == DataType.FLOAT_VECTOR:
                    dense[f["name"]] = int(params["dim"]) * 4
                elif ftype in (DataType.FLOAT16_VECTOR, DataType.BFLOAT16_VECTOR):
                    dense[f["name"]] = int(params["dim"]) * 2
                elif ftype == DataType.BINARY_VECTOR:
                    dense[f["name"]] = int(params["dim"]) // 8
                elif ftype == DataType.SPARSE_FLOAT_VECTOR:
                    sparse.append(f["name"])
                else:
                    scalars[f["name"]] = ftype
            client.load_collection(name)
            fetch = [n for n in scalars if n] + sparse
            rows = 0
            varchar = 0
            other = 0
            nnz = 0
            sparse_rows = 0
            batches: set[Any] = set()
            spans: set[tuple[Any, Any, Any]] = set()
            it = client.query_iterator(name, batch_size=1000, filter="", output_fields=fetch)
            try:
                while True:
                    page = it.next()
                    if not page:
                        break
                    for row in page:
                        rows += 1
                        for n, ftype in scalars.items():
                            v = row.get(n)
                            if v is None:
                                continue
                            if ftype == DataType.VARCHAR:
                                varchar += len(str(v).encode("utf-8"))
                            elif ftype in (DataType.INT64, DataType.DOUBLE):
                                other += 8
                            elif ftype in (DataType.INT32, DataType.FLOAT):
                                other += 4
                            elif ftype in (DataType.INT16,):
                                other += 2
                            elif ftype in (DataType.INT8, DataType.BOOL):
                                other += 1
                            else:
                                other += len(str(v).encode("utf-8"))
                        for n in sparse:
                            v = row.get(n)
                            if v is not None:
                                sparse_rows += 1
                                nnz += _nnz(v)
                        if "batch_id" in row:
                            batches.add(row["batch_id"])
                        if {"session_id", "first_turn", "last_turn"} <= row.keys():
                            spans.add((row["session_id"], row["first_turn"], row["last_turn"]))
            finally:
                it.close()
            out["collections"][name] = {
                "rows": rows,
                "primary_key": pk,
                "dense_fields": dense,
                "sparse_fields": sparse,
                "dense_vectors": rows * len(dense),
                "dense_bytes": rows * sum(dense.values()),
                "sparse_vectors": sparse_rows,
                "sparse_nnz": nnz,
                "sparse_bytes": nnz * 8,
                "varchar_bytes": varchar,
                "other_scalar_bytes": other,
                "batches": len(batches) if batches else rows,
                "turns_covered": sum(int(b) - int(a) + 1 for _s, a, b in spans) if spans else None,
                "fields": {f["name"]: str(f.get("type")) for f in fields},
            }
    finally:
        client.close()
    return out


def _nnz(v: Any) -> int:
    if isinstance(v, dict):
        return len(v)
    nnz = getattr(v, "nnz", None)
    if nnz is not None:
        return int(nnz)
    try:
        return len(v)
    except TypeError:
        return 0


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0
