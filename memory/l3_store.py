"""L3: archived turn batches in Milvus, per tenant and user, found by what was said.

Each batch is stored as **pieces** (memory/l3_pieces.py): chunks of whole turns
of its transcript, and its summary when the archiver judged it grounded. Each
turn is embedded on its own (it fits the embedder's window; a longer one is
split into parts). Every piece is one row with a dense vector (the mean
direction of its turns' vectors), a sparse BM25 vector (computed by Milvus from
the row's text) and its turns' codes (memory/l3_codes.py), keyed by
``piece_id(batch_id, ...)``: one UPSERT per batch writes all of its rows, and
archiving the same batch again writes the same keys, never new rows.

Search is hybrid: the dense and the BM25 lists of pieces, fused by reciprocal
rank fusion inside Milvus (one call), then ranked again per turn
(memory/l3_focus.py: each candidate turn's code and own BM25 rank) and grouped by
batch. A batch ranks by its best turn, is returned once, and says which turn
matched, with its text; its ``text`` is what a prompt carries: the summary when
that matched, then that turn, never the whole batch.

Isolation is built in, not left to callers: every read, count and delete goes
through ``_scope``, which requires a valid tenant and puts it in the filter, and
every id is checked by ``validate_id`` (letters, digits, ``.``, ``_``, ``-``)
before it is quoted into a filter expression, so no quote can escape it.
Search also drops any hit whose tenant or user differs from the request.

Collections. The pieces live in ``<collection>_v2``. ``<collection>`` itself is
the schema before it (one row per batch, one vector of its summary and
transcript): when it exists and ``tiermem reindex`` has not rebuilt it
(memory/l3_reindex.py marks it done), it stays readable: searches also ask it and
fuse its batches in, listings and counts include its batches not rebuilt yet, and
deletes reach it. Nothing is written to it any more.

The pieces collection records the embedder that filled it and the chunk size
(collection properties); a store with another embedder, vector size or an
explicit other chunk size refuses to use it (``L3SchemaError``) rather than mix
two vector spaces or two chunkings (whose piece keys would differ); the default
size follows the collection. A pieces collection created before turn codes (no
``codes`` field) is written without codes and ranked by chunk.

Every Milvus or embedding failure is raised as ``L3Unavailable``: the archiver
keeps the batch in its L2 outbox and tries again later.

The collections are described here in infra's plain terms; infra/milvus.py alone
turns them into pymilvus objects, so this module never imports pymilvus.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from infra.embeddings import Embedder
from infra.errors import Misconfigured, Unavailable
from infra.milvus import (
    AnnRequest,
    AsyncMilvus,
    BM25Spec,
    CollectionSpec,
    FieldSpec,
    FieldType,
    IndexSpec,
    MilvusError,
)
from infra.settings import Settings
from memory import l3_codes, l3_focus, l3_pieces
from memory.keys import validate_id
from memory.l3_focus import Candidate
from memory.l3_pieces import SUMMARY, TURNS, Piece
from memory.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

TEXT_MAX_BYTES = 65_535
BATCH_ID_MAX = 64
PIECE_ID_MAX = 80
# Milvus' default cap on the rows one query or search may return (offset + limit).
MAX_ROWS = 16_384
# Creating the index and loading a collection on a real cluster can take longer than
# an ordinary call.
ADMIN_TIMEOUT_S = 60.0
# Pieces each ranked list of a search brings back (per requested batch, and at
# least): enough that k distinct batches survive the grouping.
PIECES_PER_BATCH = 8
MIN_PIECES = 40
# RRF's constant, as in the original paper and Milvus' default.
RRF_K = 60
V2_SUFFIX = "_v2"
# Milvus Lite searches rows not yet flushed (its memtable) far slower than sealed
# ones: every search copies each of them into a dict and rebuilds a BM25 index of
# them, about 0.5 ms a row per search whoever's rows they are (measured at 1,000
# batches: a hybrid search 28 ms p50 with none, 64 with 64, 165 with 254). A flush
# of a few rows costs 11-18 ms and compaction merges the small segments it leaves
# in the background (searches after 64 flushes of 2-32 rows: as fast as before
# them). So the archiver keeps the memtable small: it flushes once this many rows
# are unflushed...
LITE_FLUSH_ROWS = 16
# ...and at most this long after the first of them was written (a timer that later
# batches do not move), so rows of a quiet pod do not wait for 16 more. At most one
# flush a second: about 1% of a core at worst, against 0.5 ms a waiting row costs
# every search.
LITE_FLUSH_AFTER_S = 1.0
# A new collection's chunks: this many embedder windows of whole turns. A chunk's
# vector only says where to look (its turns' codes say which turn), so it may hold
# more than one embedding reads: fewer rows, as good a first pass (measured on the
# recall bench: the same recall as one window, a third fewer rows).
DEFAULT_CHUNK_WINDOWS = 2

_VECTOR = "vector"
_SPARSE = "sparse"
# A piece's turn codes (memory/l3_codes.py), base64. Collections created before
# codes existed lack the field: they are written and ranked without codes.
CODES = "codes"
CODES_MAX = 65_535
# Collection properties: the embedder and chunk window that filled it. Vectors of
# two embedders of the same size would mix silently (say, one pod on MiniLM and one
# on the hashing fallback); two windows would key the same batch's pieces apart.
EMBEDDER_PROPERTY = "tiermem.embedder"
WINDOW_PROPERTY = "tiermem.chunk_tokens"
# Set on a collection of the schema before pieces once ``tiermem reindex``
# rebuilt every batch of it: reads stop asking it.
REINDEXED_PROPERTY = "tiermem.reindexed_into"
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
RECORD_FIELDS = [
    "batch_id",
    "tenant",
    "user_id",
    "session_id",
    "first_turn",
    "last_turn",
    "text",
    "created_at",
]
_PIECE_FIELDS = [*RECORD_FIELDS, "piece_id", "kind", "piece", "piece_first", "piece_last"]


class L3Unavailable(Unavailable):
    """Milvus (or the embedder) could not be reached or failed; nothing was changed
    that the caller can rely on, and the operation may be retried."""

    code = "memory_unavailable"
    default_message = "long-term memory is unavailable; retry"


class L3SchemaError(Misconfigured):
    """The collection exists with a schema this store cannot use (e.g. another
    vector dimension): a configuration error, not a transient one."""

    code = "memory_misconfigured"
    default_message = "the long-term memory collection does not fit this configuration"


def collection_spec(dim: int) -> CollectionSpec:
    """The pieces collection: one row per piece of an archived batch, with the
    batch's identity on every row, the piece's text, its dense and BM25 vectors,
    and the codes of its turns."""
    return CollectionSpec(
        fields=(
            FieldSpec("piece_id", FieldType.VARCHAR, max_length=PIECE_ID_MAX, primary=True),
            FieldSpec("batch_id", FieldType.VARCHAR, max_length=BATCH_ID_MAX),
            FieldSpec("tenant", FieldType.VARCHAR, max_length=128),
            FieldSpec("user_id", FieldType.VARCHAR, max_length=128),
            FieldSpec("session_id", FieldType.VARCHAR, max_length=128),
            FieldSpec("first_turn", FieldType.INT64),
            FieldSpec("last_turn", FieldType.INT64),
            FieldSpec("kind", FieldType.VARCHAR, max_length=16),
            FieldSpec("piece", FieldType.INT64),
            FieldSpec("piece_first", FieldType.INT64),
            FieldSpec("piece_last", FieldType.INT64),
            FieldSpec("text", FieldType.VARCHAR, max_length=TEXT_MAX_BYTES, analyzer=True),
            FieldSpec("created_at", FieldType.DOUBLE),
            FieldSpec(_VECTOR, FieldType.FLOAT_VECTOR, dim=dim),
            FieldSpec(_SPARSE, FieldType.SPARSE_FLOAT_VECTOR),
            FieldSpec(CODES, FieldType.VARCHAR, max_length=CODES_MAX),
        ),
        functions=(BM25Spec("text_bm25", "text", _SPARSE),),
        indexes=(
            IndexSpec(_VECTOR, "AUTOINDEX", metric_type="COSINE"),
            IndexSpec(_SPARSE, "SPARSE_INVERTED_INDEX", metric_type="BM25"),
            # Every query filters on tenant and user (or session): scalar indexes
            # keep that cheap.
            IndexSpec("tenant", "INVERTED"),
            IndexSpec("user_id", "INVERTED"),
            IndexSpec("session_id", "INVERTED"),
        ),
    )


def legacy_collection_spec(dim: int) -> CollectionSpec:
    """The schema before pieces: one row per batch, a vector of its summary and
    transcript. Only read (and created by tests and ``tiermem reindex``'s tests)."""
    return CollectionSpec(
        fields=(
            FieldSpec("batch_id", FieldType.VARCHAR, max_length=BATCH_ID_MAX, primary=True),
            FieldSpec("tenant", FieldType.VARCHAR, max_length=128),
            FieldSpec("user_id", FieldType.VARCHAR, max_length=128),
            FieldSpec("session_id", FieldType.VARCHAR, max_length=128),
            FieldSpec("first_turn", FieldType.INT64),
            FieldSpec("last_turn", FieldType.INT64),
            FieldSpec("text", FieldType.VARCHAR, max_length=TEXT_MAX_BYTES),
            FieldSpec("created_at", FieldType.DOUBLE),
            FieldSpec(_VECTOR, FieldType.FLOAT_VECTOR, dim=dim),
        ),
        indexes=(
            IndexSpec(_VECTOR, "AUTOINDEX", metric_type="COSINE"),
            IndexSpec("tenant", "INVERTED"),
            IndexSpec("user_id", "INVERTED"),
        ),
    )


def batch_id_for(tenant: str, session: str, first_turn: int, last_turn: int) -> str:
    """The L3 key of turns ``first_turn..last_turn`` of a session (its pieces' keys
    derive from it).

    sha256 over a JSON array (unambiguous: ``("a-b", "c")`` and ``("a", "b-c")``
    encode differently), first 32 hex digits. Stable across processes and versions:
    the archiver relies on a retried batch getting the same id.
    """
    validate_id(tenant, "tenant")
    validate_id(session, "session_id")
    _check_turns(first_turn, last_turn)
    canonical = json.dumps(
        ["tiermem.l3.batch.v1", tenant, session, first_turn, last_turn],
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:32]


@dataclass(frozen=True)
class MemoryRecord:
    """A batch as written and read back. ``text`` is its transcript, preceded by
    ``summary + "\n\n"`` when it has one (the archiver's layout). Writing,
    ``summary`` None takes the part of ``text`` before the first ``[turn N] user:``
    line for the summary; ``""`` indexes none (the archiver's choice for a summary
    it does not trust). Read back, ``summary`` is the indexed summary or None."""

    batch_id: str
    tenant: str
    user_id: str
    session_id: str
    first_turn: int
    last_turn: int
    text: str
    created_at: float
    summary: str | None = None
    # A batch of the schema before pieces whose text the archiver of the time cut
    # (its last turn may lack lines). Pieces are never cut.
    cut: bool = False


@dataclass(frozen=True)
class MatchedTurn:
    turn: int
    text: str


@dataclass(frozen=True)
class MemoryHit:
    batch_id: str
    session_id: str
    first_turn: int
    last_turn: int
    text: str
    score: float
    matches: tuple[MatchedTurn, ...] = field(default=())
    summary: str | None = None


def memory_hit_json(hit: MemoryHit) -> dict[str, Any]:
    """A hit as the ``memory`` event, the turn's stored hits, the retrieval cache
    and the memory search route all give it: one shape."""
    return {
        "batch_id": hit.batch_id,
        "session_id": hit.session_id,
        "first_turn": hit.first_turn,
        "last_turn": hit.last_turn,
        "text": hit.text,
        "score": round(hit.score, 6),
        "matches": [{"turn": m.turn, "text": m.text} for m in hit.matches],
    }


def truncate_utf8(text: str, max_bytes: int = TEXT_MAX_BYTES) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8, never inside a character.

    Lone surrogates (which UTF-8 cannot encode) become U+FFFD.
    """
    data = _SURROGATE_RE.sub("\ufffd", text)
    raw = data.encode("utf-8")
    if len(raw) <= max_bytes:
        return data
    # Cutting may split the last character; "ignore" drops only that partial tail.
    return raw[:max_bytes].decode("utf-8", errors="ignore")


def _check_turns(first_turn: int, last_turn: int) -> None:
    for value in (first_turn, last_turn):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError("turn indexes must be non-negative integers")
    if first_turn > last_turn:
        raise ValueError("first_turn must not be after last_turn")


def _scope(tenant: str, user_id: str | None = None, session_id: str | None = None) -> str:
    """The filter expression of a tenant (and user, session); refuses anything else.

    The only way this module builds a filter, so no query can leave out the tenant.
    """
    clauses = [f'tenant == "{validate_id(tenant, "tenant")}"']
    if user_id is not None:
        clauses.append(f'user_id == "{validate_id(user_id, "user_id")}"')
    if session_id is not None:
        clauses.append(f'session_id == "{validate_id(session_id, "session_id")}"')
    return " and ".join(clauses)


def pieces_of(
    record: MemoryRecord, count: Callable[[str], int], window: int, chunk_tokens: int | None = None
) -> list[Piece]:
    """The rows' pieces of a batch: chunks of its transcript (of at most
    ``chunk_tokens``, default ``window``; each turn within ``window``), then its
    summary."""
    head, segments = l3_pieces.split_text(record.text, record.first_turn, record.last_turn)
    summary = record.summary if record.summary is not None else head
    body_pieces = l3_pieces.chunk(segments, count, window, chunk_tokens)
    if summary and summary.strip():
        body_pieces += l3_pieces.summary_pieces(
            summary.strip(), record.first_turn, record.last_turn, count, window
        )
    return body_pieces


def legacy_cut(text: str) -> bool:
    """Whether a batch of the schema before pieces may have been cut: its archiver
    capped texts at 30,000 characters, Milvus' field at 65,535 bytes."""
    return len(text) >= 30_000 or len(text.encode("utf-8")) > TEXT_MAX_BYTES - 4


class L3Store:
    """Archived batches of one Milvus collection (and the one before it); see the
    module docstring.

    ``chunk_tokens``: the tokens of a chunk at most (0: what the collection
    recorded, and for a new one ``DEFAULT_CHUNK_WINDOWS`` embedder windows); a
    value below the embedder's window also caps what one embedding reads.
    ``cpu`` runs the chunking (it tokenises whole batches) off the event loop.
    """

    def __init__(
        self,
        milvus: AsyncMilvus,
        embedder: Embedder,
        collection: str,
        dim: int,
        *,
        chunk_tokens: int = 0,
        metrics: Metrics | None = None,
        cpu: Executor | None = None,
    ) -> None:
        if embedder.dim != dim:
            raise ValueError(f"embedder {embedder.name} has {embedder.dim} dims, store has {dim}")
        if not collection.replace("_", "").isalnum() or not collection[0].isalpha():
            raise ValueError("collection name must be letters, digits and _ (starting a letter)")
        if chunk_tokens < 0:
            raise ValueError("chunk_tokens must be 0 (the default) or positive")
        self.milvus = milvus
        self.embedder = embedder
        self._chunk_setting = chunk_tokens
        self._set_chunks(chunk_tokens or DEFAULT_CHUNK_WINDOWS * self.embedder_window)
        self.legacy_collection = collection
        self.collection = collection + V2_SUFFIX
        self.dim = dim
        self.metrics = metrics
        self._cpu = cpu
        self._ready = False
        self._legacy = False
        self._codes = True  # the collection has the codes field (until found otherwise)
        self._ready_lock = asyncio.Lock()
        self._unflushed = 0
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None

    def _set_chunks(self, chunk_tokens: int) -> None:
        # ``window``: what one embedding reads (a turn, a part of a long one);
        # ``chunk_tokens``: what one row holds.
        self.chunk_tokens = chunk_tokens
        self.window = min(self.embedder_window, chunk_tokens)

    @property
    def embedder_window(self) -> int:
        return int(self.embedder.max_tokens)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        milvus: AsyncMilvus,
        embedder: Embedder,
        *,
        metrics: Metrics | None = None,
        cpu: Executor | None = None,
    ) -> L3Store:
        """The store ``TIERMEM_MILVUS_COLLECTION`` and ``TIERMEM_L3_CHUNK_TOKENS`` name."""
        return cls(
            milvus, embedder, settings.milvus_collection, settings.embedding_dim,
            chunk_tokens=settings.l3_chunk_tokens, metrics=metrics, cpu=cpu,
        )  # fmt: skip

    # --- collection -----------------------------------------------------------------------

    async def ensure_collection(self) -> None:
        """Create (if missing), check and load the pieces collection, and find out
        whether a collection of the schema before needs reading. Idempotent."""
        async with self._ready_lock:
            if self._ready:
                return
            try:
                await self._ensure_pieces()
                self._legacy = await self._legacy_in_use()
            except MilvusError as exc:
                raise L3Unavailable(str(exc)) from exc
            self._ready = True

    async def _ensure_pieces(self) -> None:
        exists = await self.milvus.has_collection(self.collection)
        if not exists:
            spec = collection_spec(self.dim)
            try:
                # Bounded staleness for search (the cheap default); counts and
                # listings ask for Strong consistency per query.
                await self.milvus.create_collection(
                    self.collection,
                    spec,
                    consistency_level="Bounded",
                    properties={
                        EMBEDDER_PROPERTY: self.embedder.name,
                        WINDOW_PROPERTY: str(self.chunk_tokens),
                    },
                    timeout=ADMIN_TIMEOUT_S,
                )
            except MilvusError:
                # Another pod may have created it between our check and create.
                if not await self.milvus.has_collection(self.collection):
                    raise
                exists = True
            else:
                # sync=False: the collection is empty, there is nothing to wait for
                # (see AsyncMilvus.create_indexes).
                await self.milvus.create_indexes(
                    self.collection, spec.indexes, sync=False, timeout=ADMIN_TIMEOUT_S
                )
                log.info(
                    "created L3 collection %s (dim %d, chunks of %d tokens, turns of %d)",
                    self.collection, self.dim, self.chunk_tokens, self.window,
                )  # fmt: skip
        if exists:
            description = await self.milvus.describe_collection(self.collection)
            self._check_schema(
                description, [*_PIECE_FIELDS, _VECTOR, _SPARSE], self.collection, window=True
            )
            self._codes = any(f.get("name") == CODES for f in description.get("fields", []))
            if not self._codes:
                log.warning(
                    "L3 collection %s predates turn codes: its batches rank by chunk "
                    "(a new collection, or `tiermem reindex` into one, ranks by turn)",
                    self.collection,
                )  # fmt: skip
        await self.milvus.load_collection(self.collection, timeout=ADMIN_TIMEOUT_S)

    async def _legacy_in_use(self) -> bool:
        if not await self.milvus.has_collection(self.legacy_collection):
            return False
        description = await self.milvus.describe_collection(self.legacy_collection)
        if (description.get("properties") or {}).get(REINDEXED_PROPERTY):
            return False
        self._check_schema(
            description, [*RECORD_FIELDS, _VECTOR], self.legacy_collection, window=False
        )
        await self.milvus.load_collection(self.legacy_collection, timeout=ADMIN_TIMEOUT_S)
        log.info(
            "L3 collection %s (one row per batch) is read beside %s until "
            "`tiermem reindex` rebuilds it", self.legacy_collection, self.collection,
        )  # fmt: skip
        return True

    def _check_schema(
        self, description: dict[str, Any], required: list[str], name: str, *, window: bool
    ) -> None:
        fields = {f.get("name"): f for f in description.get("fields", [])}
        missing = [n for n in required if n not in fields]
        if missing:
            raise L3SchemaError(
                f"collection {name} lacks fields {missing}; use another TIERMEM_MILVUS_COLLECTION"
            )
        properties = description.get("properties") or {}
        recorded = properties.get(EMBEDDER_PROPERTY)
        if recorded is not None and recorded != self.embedder.name:
            raise L3SchemaError(
                f"collection {name} holds vectors of embedder {recorded!r}, this "
                f"pod embeds with {self.embedder.name!r}; set TIERMEM_EMBEDDINGS to match or "
                "use another TIERMEM_MILVUS_COLLECTION"
            )
        got = int(fields[_VECTOR].get("params", {}).get("dim", -1))
        if got != self.dim:
            raise L3SchemaError(
                f"collection {name} holds {got}-dim vectors, the embedder makes "
                f"{self.dim}; use another TIERMEM_MILVUS_COLLECTION or the same embedder"
            )
        chunked = properties.get(WINDOW_PROPERTY)
        if window and chunked is not None and int(chunked) != self.chunk_tokens:
            if self._chunk_setting:
                raise L3SchemaError(
                    f"collection {name} holds chunks of {chunked} tokens, this pod cuts "
                    f"{self.chunk_tokens}; set TIERMEM_L3_CHUNK_TOKENS to match (or 0) or use "
                    "another TIERMEM_MILVUS_COLLECTION"
                )
            # The default follows the collection (one filled by an earlier default).
            self._set_chunks(int(chunked))

    def recheck(self) -> None:
        """Check the collections again before the next operation."""
        self._ready = False

    @property
    def reads_legacy(self) -> bool:
        """Whether a collection of the schema before pieces is still read."""
        return self._legacy

    async def _ensure(self) -> None:
        if not self._ready:
            await self.ensure_collection()

    def _unavailable(self, exc: Exception) -> L3Unavailable:
        # Check (and load) the collection again on the next call: a restarted
        # Milvus brings collections back released, and searches then fail until
        # something loads them.
        self._ready = False
        return L3Unavailable(str(exc))

    async def _off_loop(self, fn: Callable[[], T]) -> T:
        if self._cpu is None:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn)

    async def _count_cut(self, text: str, what: str) -> None:
        """Count what the model will cut of ``text`` beyond its window
        (``tiermem_embedding_tokens_cut_total``). Only queries need it: pieces are
        cut to the window by the chunker, with this same counter."""
        window = self.embedder.max_tokens
        if len(text) <= window:
            # Every token covers at least one character: nothing to cut, and no
            # tokenisation (an executor hop) on the search's path.
            return
        cut = await self._off_loop(lambda: max(0, self.embedder.count_tokens(text) - window))
        if cut and self.metrics is not None:
            self.metrics.embedding_tokens_cut.labels(what).inc(cut)

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        """Vectors of ``texts``, checked for size."""
        try:
            vectors = await self.embedder.embed(texts)
        except Exception as exc:
            log.warning("embedding for L3 failed (%s)", type(exc).__name__, exc_info=True)
            raise L3Unavailable(f"embedding failed: {exc}") from exc
        if len(vectors) != len(texts) or any(len(v) != self.dim for v in vectors):
            raise L3SchemaError(f"embedder {self.embedder.name} returned a wrong-sized vector")
        return vectors

    # --- writes ---------------------------------------------------------------------------

    async def upsert_batch(self, record: MemoryRecord) -> int:
        """Embed the batch's pieces and write their rows in one upsert; repeating
        it is harmless (same pieces, same keys). The number of rows written."""
        batch_id = validate_id(record.batch_id, "batch_id")
        if len(batch_id) > BATCH_ID_MAX:
            raise ValueError(f"batch_id longer than {BATCH_ID_MAX}")
        _scope(record.tenant, record.user_id, record.session_id)
        _check_turns(record.first_turn, record.last_turn)
        if not record.text.strip():
            raise ValueError("an archived batch needs a non-empty text")
        text = _SURROGATE_RE.sub("\ufffd", record.text)
        summary = None if record.summary is None else _SURROGATE_RE.sub("\ufffd", record.summary)
        clean = MemoryRecord(**{**record.__dict__, "text": text, "summary": summary})
        await self._ensure()
        pieces = await self._off_loop(
            lambda: pieces_of(clean, self.embedder.count_tokens, self.window, self.chunk_tokens)
        )
        # Each turn on its own (each fits the window; a chunk may hold more than
        # one window of them): its vector is its code, the mean direction of a
        # chunk's turns is the chunk's vector.
        units = [l3_pieces.units(p) for p in pieces]
        flat = await self._embed([u for us in units for u in us])
        vectors, codes = [], []
        at = 0
        for us in units:
            mine = flat[at : at + len(us)]
            at += len(us)
            vectors.append(_mean_direction(mine))
            codes.append(l3_codes.encode(mine))
        rows = [
            {
                "piece_id": l3_pieces.piece_id(batch_id, p.kind, p.no),
                "batch_id": batch_id,
                "tenant": record.tenant,
                "user_id": record.user_id,
                "session_id": record.session_id,
                "first_turn": record.first_turn,
                "last_turn": record.last_turn,
                "kind": p.kind,
                "piece": p.no,
                "piece_first": p.first,
                "piece_last": p.last,
                "text": p.text,
                "created_at": float(record.created_at),
                _VECTOR: vector,
                **({CODES: code if len(code) <= CODES_MAX else ""} if self._codes else {}),
            }
            for p, vector, code in zip(pieces, vectors, codes, strict=True)
        ]
        try:
            await self.milvus.upsert(self.collection, rows)
        except MilvusError as exc:
            raise self._unavailable(exc) from exc
        if self.milvus.is_local:
            self._unflushed += len(rows)
            if self._unflushed >= LITE_FLUSH_ROWS:
                await self._flush()
            elif self._flush_timer is None:
                self._arm_timer()
        return len(rows)

    async def _flush(self) -> None:
        """Seal the rows written since the last flush (Milvus Lite)."""
        self._unflushed = 0
        self._stop_timer()
        try:
            await self.milvus.flush(self.collection)
        except MilvusError as exc:
            # The rows are written; sealing them is only for speed.
            log.warning("L3 flush failed (searches stay slower until the next): %s", exc)

    def _start_timed_flush(self) -> None:
        self._flush_timer = None
        if not self._unflushed:
            return
        if self._flushing is not None:
            # The last timed flush still runs: these rows get the next one, not
            # none (no later batch may come to arm it).
            self._arm_timer()
            return
        self._flushing = asyncio.create_task(self._flush(), name="l3-timed-flush")
        self._flushing.add_done_callback(self._flushed)

    def _arm_timer(self) -> None:
        self._flush_timer = asyncio.get_running_loop().call_later(
            LITE_FLUSH_AFTER_S, self._start_timed_flush
        )

    def _stop_timer(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._flushing = None
        if not task.cancelled() and task.exception() is not None:
            log.warning("L3 timed flush failed: %s", task.exception())

    async def aclose(self) -> None:
        """Stop the timed flush (before Milvus closes); rows stay written either way
        (Milvus Lite's write-ahead log holds them)."""
        self._stop_timer()
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)

    async def delete_user(self, tenant: str, user_id: str) -> int:
        """Delete every batch of one user of one tenant; the number of rows deleted."""
        return await self._delete(_scope(tenant, user_id))

    async def delete_session(self, tenant: str, session_id: str) -> int:
        """Delete every batch of one session of one tenant; the number of rows deleted."""
        return await self._delete(_scope(tenant, session_id=session_id))

    async def _delete(self, expr: str) -> int:
        """Rows matching ``expr`` (a ``_scope``), from the collection and the
        legacy one while it is read."""
        await self._ensure()
        names = [self.collection, *([self.legacy_collection] if self._legacy else [])]
        deleted = 0
        try:
            for name in names:
                deleted += await self.milvus.delete(name, filter=expr)
        except MilvusError as exc:
            raise self._unavailable(exc) from exc
        return deleted

    # --- reads ----------------------------------------------------------------------------

    async def search(self, tenant: str, user_id: str, query: str, k: int) -> list[MemoryHit]:
        """The ``k`` batches of this tenant's user that best match ``query``, best
        first, each once, with the turns that matched."""
        expr = _scope(tenant, user_id)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_ROWS:
            raise ValueError(f"k must be an integer in 1..{MAX_ROWS}")
        if not query.strip():
            return []
        await self._ensure()
        await self._count_cut(query, "query")
        [vector] = await self._embed([query])
        limit = min(MAX_ROWS, max(MIN_PIECES, k * PIECES_PER_BATCH))
        requests = [
            AnnRequest(_VECTOR, vector, "COSINE", limit, expr),
            AnnRequest(_SPARSE, query, "BM25", limit, expr),
        ]
        try:
            rows, legacy = await asyncio.gather(
                self.milvus.hybrid_search(
                    self.collection, requests, rrf_k=RRF_K, limit=limit,
                    output_fields=[*_PIECE_FIELDS, *([CODES] if self._codes else [])],
                ),
                self._legacy_search(expr, vector, k),
            )  # fmt: skip
        except MilvusError as exc:
            raise self._unavailable(exc) from exc
        # 1-3 ms of arithmetic on a few dozen rows: on the loop, not queued
        # behind embeddings in the CPU pool.
        hits = _group(self._own(rows, tenant, user_id), k, query, vector, self.dim)
        if legacy:
            hits = _fuse_batches(hits, self._legacy_hits(legacy, tenant, user_id), k)
        return hits

    def _own(self, rows: list[dict[str, Any]], tenant: str, user_id: str) -> list[dict[str, Any]]:
        out = []
        for raw in rows:
            entity = raw.get("entity", raw)
            if entity.get("tenant") != tenant or entity.get("user_id") != user_id:
                # Cannot happen with a correct filter; if it ever does, never leak.
                log.error("L3 search returned a row of another tenant or user; dropped")
                continue
            out.append({**entity, "_score": float(raw.get("distance", 0.0))})
        return out

    async def _legacy_search(self, expr: str, vector: list[float], k: int) -> list[dict[str, Any]]:
        if not self._legacy:
            return []
        results = await self.milvus.search(
            self.legacy_collection,
            [vector],
            filter=expr,
            limit=k,
            output_fields=RECORD_FIELDS,
            anns_field=_VECTOR,
            search_params={"metric_type": "COSINE"},
        )
        return results[0] if results else []

    def _legacy_hits(
        self, rows: list[dict[str, Any]], tenant: str, user_id: str
    ) -> list[MemoryHit]:
        hits = []
        for entity in self._own(rows, tenant, user_id):
            hits.append(
                MemoryHit(
                    batch_id=str(entity["batch_id"]),
                    session_id=str(entity["session_id"]),
                    first_turn=int(entity["first_turn"]),
                    last_turn=int(entity["last_turn"]),
                    text=str(entity["text"]),
                    score=entity["_score"],
                )
            )
        # COSINE distance in Milvus is the similarity: larger is nearer.
        hits.sort(key=lambda h: h.score, reverse=True)
        return hits

    async def count(
        self, tenant: str, user_id: str | None = None, session_id: str | None = None
    ) -> int:
        """Batches stored for the scope (each counted once, whatever its pieces)."""
        expr = _scope(tenant, user_id, session_id)
        await self._ensure()
        try:
            if not self._legacy:
                # One row per batch is its first chunk: count those.
                expr += f' and kind == "{TURNS}" and piece == 0'
                rows = await self.milvus.query(
                    self.collection,
                    filter=expr,
                    output_fields=["count(*)"],
                    consistency_level="Strong",
                )
                return int(rows[0]["count(*)"]) if rows else 0
            ids: set[str] = set()
            for name in (self.collection, self.legacy_collection):
                ids.update(str(r["batch_id"]) for r in await self._rows(name, expr, ["batch_id"]))
            return len(ids)
        except MilvusError as exc:
            raise self._unavailable(exc) from exc

    async def list_batches(self, tenant: str, session_id: str) -> list[MemoryRecord]:
        """The batches of a session, ordered by ``first_turn`` (at most ``MAX_ROWS``
        rows read)."""
        expr = _scope(tenant, session_id=session_id)
        return await self._records(tenant, expr)

    async def batches_overlapping(
        self, tenant: str, session_id: str, first: int, last: int
    ) -> list[MemoryRecord]:
        """The batches of a session that hold any turn of ``first..last``, ordered by
        ``first_turn`` (what a page of the session's history needs, not all of it)."""
        _check_turns(first, last)
        expr = _scope(tenant, session_id=session_id)
        expr += f" and first_turn <= {last} and last_turn >= {first}"
        return await self._records(tenant, expr)

    async def _records(self, tenant: str, expr: str) -> list[MemoryRecord]:
        """The batches ``expr`` (built on ``_scope``) selects, reassembled from their
        pieces (and, while it is read, the collection before), ordered by turn
        range; a row of another tenant is never returned."""
        await self._ensure()
        try:
            rows = await self._rows(self.collection, expr, _PIECE_FIELDS)
            legacy = []
            if self._legacy:
                legacy = await self._rows(self.legacy_collection, expr, RECORD_FIELDS)
        except MilvusError as exc:
            raise self._unavailable(exc) from exc
        records = _assemble([r for r in rows if r.get("tenant") == tenant])
        have = {rec.batch_id for rec in records}
        for r in legacy:
            if r.get("tenant") == tenant and str(r["batch_id"]) not in have:
                records.append(_legacy_record(r))
        records.sort(key=lambda rec: (rec.first_turn, rec.last_turn))
        return records

    async def _rows(self, name: str, expr: str, fields: list[str]) -> list[dict[str, Any]]:
        """Up to ``MAX_ROWS`` rows of ``name`` that ``expr`` (built on ``_scope``)
        selects, read with Strong consistency (listings must see the last write)."""
        return await self.milvus.query(
            name, filter=expr, output_fields=fields, limit=MAX_ROWS, consistency_level="Strong"
        )

    async def ping(self) -> bool:
        """Whether Milvus answers now; never raises. (A missing collection is still
        "up": the next operation creates it.)"""
        try:
            await self.milvus.has_collection(self.collection)
        except MilvusError:
            return False
        return True


# --- search results ---------------------------------------------------------------------------


def _piece(row: dict[str, Any]) -> Piece:
    return Piece(
        str(row["kind"]), int(row["piece"]), int(row["piece_first"]), int(row["piece_last"]),
        str(row["text"]),
    )  # fmt: skip


def _mean_direction(vectors: list[list[float]]) -> list[float]:
    """The unit vector along the mean of ``vectors`` (one vector: itself)."""
    if len(vectors) == 1:
        return vectors[0]
    mean = np.mean(np.asarray(vectors, dtype=np.float32), axis=0)
    norm = float(np.linalg.norm(mean))
    return [float(x) for x in (mean / norm if norm else mean)]


def _group(
    rows: list[dict[str, Any]], k: int, query: str, vector: list[float], dim: int
) -> list[MemoryHit]:
    """Fused piece rows (best first) as the ``k`` best batches, each with the turn
    it carries and its summary if that matched (memory/l3_focus.py ranks them;
    ``vector``, the query's, scores the turn codes)."""
    candidates = []
    heads: dict[str, dict[str, Any]] = {}
    coded = l3_codes.scores_many(vector, [str(row.get(CODES) or "") for row in rows], dim)
    for i, row in enumerate(rows):
        bid = str(row["batch_id"])
        heads.setdefault(bid, row)
        piece = _piece(row)
        dense = tuple(coded[i])
        candidates.append(
            Candidate(bid, i, piece.kind == SUMMARY, tuple(l3_pieces.turns_of(piece)),
                      piece.text, dense)
        )  # fmt: skip
    hits: list[MemoryHit] = []
    for b in l3_focus.rank(query, candidates, k):
        head = heads[b.batch_id]
        matches = tuple(MatchedTurn(turn, text) for turn, text in b.turns)
        body = "\n".join(m.text.strip() for m in matches)
        hits.append(
            MemoryHit(
                batch_id=b.batch_id,
                session_id=str(head["session_id"]),
                first_turn=int(head["first_turn"]),
                last_turn=int(head["last_turn"]),
                text="\n\n".join(part for part in (b.summary, body) if part),
                score=b.score,
                matches=matches,
                summary=b.summary,
            )
        )
    return hits


def _fuse_batches(a: list[MemoryHit], b: list[MemoryHit], k: int) -> list[MemoryHit]:
    """Two ranked batch lists (pieces, and the collection before) as one, by
    reciprocal rank fusion; a batch in both keeps its pieces' hit."""
    score: dict[str, float] = {}
    hit: dict[str, MemoryHit] = {}
    for ranked in (a, b):
        for rank, h in enumerate(ranked):
            score[h.batch_id] = score.get(h.batch_id, 0.0) + 1.0 / (RRF_K + rank + 1)
            hit.setdefault(h.batch_id, h)
    best = sorted(score, key=lambda bid: score[bid], reverse=True)[:k]
    return [MemoryHit(**{**hit[bid].__dict__, "score": score[bid]}) for bid in best]


# --- records ------------------------------------------------------------------------------


def _assemble(rows: list[dict[str, Any]]) -> list[MemoryRecord]:
    """Batches from their piece rows: the chunks in order are the transcript; the
    summary pieces, the summary."""
    by_batch: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_batch.setdefault(str(r["batch_id"]), []).append(r)
    records = []
    for bid, group in by_batch.items():
        group.sort(key=lambda r: (r["kind"] != TURNS, int(r["piece"])))
        body = "".join(str(r["text"]) for r in group if r["kind"] == TURNS)
        summary = "".join(str(r["text"]) for r in group if r["kind"] == SUMMARY) or None
        head = group[0]
        records.append(
            MemoryRecord(
                batch_id=bid,
                tenant=str(head["tenant"]),
                user_id=str(head["user_id"]),
                session_id=str(head["session_id"]),
                first_turn=int(head["first_turn"]),
                last_turn=int(head["last_turn"]),
                text=f"{summary}\n\n{body}" if summary else body,
                created_at=float(head["created_at"]),
                summary=summary,
            )
        )
    return records


def _legacy_record(r: dict[str, Any]) -> MemoryRecord:
    text = str(r["text"])
    return MemoryRecord(
        batch_id=str(r["batch_id"]),
        tenant=str(r["tenant"]),
        user_id=str(r["user_id"]),
        session_id=str(r["session_id"]),
        first_turn=int(r["first_turn"]),
        last_turn=int(r["last_turn"]),
        text=text,
        created_at=float(r["created_at"]),
        cut=legacy_cut(text),
    )
