"""L3: archived turn batches as summary vectors in Milvus, per tenant and user.

One row per batch, keyed by ``batch_id_for(tenant, session, first_turn,
last_turn)`` and written with UPSERT, so archiving the same batch again (after a
crash, or by a second pod) replaces the row instead of adding one.

Isolation is built in, not left to callers: every read, count and delete goes
through ``_scope``, which requires a valid tenant and puts it in the filter, and
every id is checked by ``validate_id`` (letters, digits, ``.``, ``_``, ``-``)
before it is quoted into a filter expression, so no quote can escape it.
Search also drops any hit whose tenant or user differs from the request.

The collection records the name of the embedder that filled it (a collection
property); a store with another embedder, or another vector size, refuses to use it
(``L3SchemaError``) rather than mix two vector spaces.

Every Milvus or embedding failure is raised as ``L3Unavailable``: the archiver
keeps the batch in its L2 outbox and tries again later.

The collection is described here (``collection_spec``: fields, scalar and vector
indexes) in infra's plain terms; infra/milvus.py alone turns it into pymilvus
objects, so this module never imports pymilvus.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from infra.embeddings import Embedder
from infra.errors import Misconfigured, Unavailable
from infra.milvus import (
    AsyncMilvus,
    CollectionSpec,
    FieldSpec,
    FieldType,
    IndexSpec,
    MilvusError,
)
from memory.keys import validate_id

log = logging.getLogger(__name__)

TEXT_MAX_BYTES = 65_535
BATCH_ID_MAX = 64
# Milvus' default cap on the rows one query or search may return (offset + limit).
MAX_ROWS = 16_384
# Creating the index and loading a collection on a real cluster can take longer than
# an ordinary call.
ADMIN_TIMEOUT_S = 60.0

_VECTOR = "vector"
# A collection property naming the embedder: vectors of two embedders of the same
# size would mix silently (say, one pod on MiniLM and one on the hashing fallback).
EMBEDDER_PROPERTY = "tiermem.embedder"
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_RECORD_FIELDS = [
    "batch_id",
    "tenant",
    "user_id",
    "session_id",
    "first_turn",
    "last_turn",
    "text",
    "created_at",
]


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
    """The L3 collection: one row per archived batch, its summary's vector."""
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
            # Every query filters on tenant and user: scalar indexes keep that cheap.
            IndexSpec("tenant", "INVERTED"),
            IndexSpec("user_id", "INVERTED"),
        ),
    )


def batch_id_for(tenant: str, session: str, first_turn: int, last_turn: int) -> str:
    """The L3 primary key of turns ``first_turn..last_turn`` of a session.

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
    batch_id: str
    tenant: str
    user_id: str
    session_id: str
    first_turn: int
    last_turn: int
    text: str
    created_at: float


@dataclass(frozen=True)
class MemoryHit:
    batch_id: str
    session_id: str
    first_turn: int
    last_turn: int
    text: str
    score: float


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


class L3Store:
    """Archived batches of one Milvus collection; see the module docstring."""

    def __init__(self, milvus: AsyncMilvus, embedder: Embedder, collection: str, dim: int) -> None:
        if embedder.dim != dim:
            raise ValueError(f"embedder {embedder.name} has {embedder.dim} dims, store has {dim}")
        if not collection.replace("_", "").isalnum() or not collection[0].isalpha():
            raise ValueError("collection name must be letters, digits and _ (starting a letter)")
        self.milvus = milvus
        self.embedder = embedder
        self.collection = collection
        self.dim = dim
        self._ready = False
        self._ready_lock = asyncio.Lock()

    # --- collection -----------------------------------------------------------------------

    async def ensure_collection(self) -> None:
        """Create (if missing), check and load the collection. Idempotent."""
        async with self._ready_lock:
            if self._ready:
                return
            try:
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
                            properties={EMBEDDER_PROPERTY: self.embedder.name},
                            timeout=ADMIN_TIMEOUT_S,
                        )
                    except MilvusError:
                        # Another pod may have created it between our check and create.
                        if not await self.milvus.has_collection(self.collection):
                            raise
                        exists = True
                    else:
                        # sync=False: the collection is empty, there is nothing to wait
                        # for (see AsyncMilvus.create_indexes).
                        await self.milvus.create_indexes(
                            self.collection, spec.indexes, sync=False, timeout=ADMIN_TIMEOUT_S
                        )
                        log.info("created L3 collection %s (dim %d)", self.collection, self.dim)
                if exists:
                    self._check_schema(await self.milvus.describe_collection(self.collection))
                await self.milvus.load_collection(self.collection, timeout=ADMIN_TIMEOUT_S)
            except MilvusError as exc:
                raise L3Unavailable(str(exc)) from exc
            self._ready = True

    def _check_schema(self, description: dict[str, Any]) -> None:
        fields = {f.get("name"): f for f in description.get("fields", [])}
        missing = [name for name in [*_RECORD_FIELDS, _VECTOR] if name not in fields]
        if missing:
            raise L3SchemaError(
                f"collection {self.collection} lacks fields {missing}; use another "
                "TIERMEM_MILVUS_COLLECTION"
            )
        recorded = (description.get("properties") or {}).get(EMBEDDER_PROPERTY)
        if recorded is not None and recorded != self.embedder.name:
            raise L3SchemaError(
                f"collection {self.collection} holds vectors of embedder {recorded!r}, this "
                f"pod embeds with {self.embedder.name!r}; set TIERMEM_EMBEDDINGS to match or "
                "use another TIERMEM_MILVUS_COLLECTION"
            )
        got = int(fields[_VECTOR].get("params", {}).get("dim", -1))
        if got != self.dim:
            raise L3SchemaError(
                f"collection {self.collection} holds {got}-dim vectors, the embedder makes "
                f"{self.dim}; use another TIERMEM_MILVUS_COLLECTION or the same embedder"
            )

    async def _ensure(self) -> None:
        if not self._ready:
            await self.ensure_collection()

    def _unavailable(self, exc: Exception) -> L3Unavailable:
        # Check (and load) the collection again on the next call: a restarted
        # Milvus brings collections back released, and searches then fail until
        # something loads them.
        self._ready = False
        return L3Unavailable(str(exc))

    async def _embed(self, text: str) -> list[float]:
        try:
            vectors = await self.embedder.embed([text])
        except Exception as exc:
            log.warning("embedding for L3 failed (%s)", type(exc).__name__, exc_info=True)
            raise L3Unavailable(f"embedding failed: {exc}") from exc
        if len(vectors) != 1 or len(vectors[0]) != self.dim:
            raise L3SchemaError(f"embedder {self.embedder.name} returned a wrong-sized vector")
        return vectors[0]

    # --- writes ---------------------------------------------------------------------------

    async def upsert_batch(self, record: MemoryRecord) -> None:
        """Embed ``record.text`` and write the row; repeating it is harmless."""
        batch_id = validate_id(record.batch_id, "batch_id")
        if len(batch_id) > BATCH_ID_MAX:
            raise ValueError(f"batch_id longer than {BATCH_ID_MAX}")
        _scope(record.tenant, record.user_id, record.session_id)
        _check_turns(record.first_turn, record.last_turn)
        if not record.text.strip():
            raise ValueError("an archived batch needs a non-empty text")
        text = truncate_utf8(record.text)
        await self._ensure()
        vector = await self._embed(text)
        row = {
            "batch_id": batch_id,
            "tenant": record.tenant,
            "user_id": record.user_id,
            "session_id": record.session_id,
            "first_turn": record.first_turn,
            "last_turn": record.last_turn,
            "text": text,
            "created_at": float(record.created_at),
            _VECTOR: vector,
        }
        try:
            await self.milvus.upsert(self.collection, [row])
        except MilvusError as exc:
            raise self._unavailable(exc) from exc

    async def delete_user(self, tenant: str, user_id: str) -> int:
        """Delete every batch of one user of one tenant; the number of rows deleted."""
        expr = _scope(tenant, user_id)
        await self._ensure()
        try:
            return await self.milvus.delete(self.collection, filter=expr)
        except MilvusError as exc:
            raise self._unavailable(exc) from exc

    # --- reads ----------------------------------------------------------------------------

    async def search(self, tenant: str, user_id: str, query: str, k: int) -> list[MemoryHit]:
        """The ``k`` batches of this tenant's user nearest to ``query``, best first."""
        expr = _scope(tenant, user_id)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_ROWS:
            raise ValueError(f"k must be an integer in 1..{MAX_ROWS}")
        if not query.strip():
            return []
        await self._ensure()
        vector = await self._embed(query)
        try:
            results = await self.milvus.search(
                self.collection,
                [vector],
                filter=expr,
                limit=k,
                output_fields=_RECORD_FIELDS,
                anns_field=_VECTOR,
                search_params={"metric_type": "COSINE"},
            )
        except MilvusError as exc:
            raise self._unavailable(exc) from exc
        hits: list[MemoryHit] = []
        for raw in results[0] if results else []:
            entity = raw.get("entity", {})
            if entity.get("tenant") != tenant or entity.get("user_id") != user_id:
                # Cannot happen with a correct filter; if it ever does, never leak.
                log.error("L3 search returned a row of another tenant or user; dropped")
                continue
            hits.append(
                MemoryHit(
                    batch_id=str(entity.get("batch_id", raw.get("batch_id", raw.get("id")))),
                    session_id=str(entity["session_id"]),
                    first_turn=int(entity["first_turn"]),
                    last_turn=int(entity["last_turn"]),
                    text=str(entity["text"]),
                    score=float(raw["distance"]),
                )
            )
        # COSINE distance in Milvus is the similarity: larger is nearer.
        hits.sort(key=lambda h: h.score, reverse=True)
        return hits[:k]

    async def count(
        self, tenant: str, user_id: str | None = None, session_id: str | None = None
    ) -> int:
        expr = _scope(tenant, user_id, session_id)
        await self._ensure()
        try:
            rows = await self.milvus.query(
                self.collection,
                filter=expr,
                output_fields=["count(*)"],
                consistency_level="Strong",
            )
        except MilvusError as exc:
            raise self._unavailable(exc) from exc
        return int(rows[0]["count(*)"]) if rows else 0

    async def list_batches(self, tenant: str, session_id: str) -> list[MemoryRecord]:
        """The batches of a session, ordered by ``first_turn`` (at most ``MAX_ROWS``)."""
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
        """The rows ``expr`` (built on ``_scope``) selects, as records, ordered by
        turn range; a row of another tenant is never returned."""
        await self._ensure()
        try:
            rows = await self.milvus.query(
                self.collection,
                filter=expr,
                output_fields=_RECORD_FIELDS,
                limit=MAX_ROWS,
                consistency_level="Strong",
            )
        except MilvusError as exc:
            raise self._unavailable(exc) from exc
        records = [_record(r) for r in rows if r.get("tenant") == tenant]
        records.sort(key=lambda rec: (rec.first_turn, rec.last_turn))
        return records

    async def ping(self) -> bool:
        """Whether Milvus answers now; never raises. (A missing collection is still
        "up": the next operation creates it.)"""
        try:
            await self.milvus.has_collection(self.collection)
        except MilvusError:
            return False
        return True


def _record(r: dict[str, Any]) -> MemoryRecord:
    return MemoryRecord(
        batch_id=str(r["batch_id"]),
        tenant=str(r["tenant"]),
        user_id=str(r["user_id"]),
        session_id=str(r["session_id"]),
        first_turn=int(r["first_turn"]),
        last_turn=int(r["last_turn"]),
        text=str(r["text"]),
        created_at=float(r["created_at"]),
    )
