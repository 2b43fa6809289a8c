"""An asyncio face on pymilvus' synchronous ``MilvusClient``, and the only module
that imports pymilvus.

Every call runs in the thread-pool executor given to ``AsyncMilvus`` (the app's
``milvus`` pool, infra/executors.py, never the one embeddings run in), with a
deadline, so a slow or dead Milvus never blocks the event loop. Any failure
(unreachable, timeout, refused request, closed client) is raised as one
``MilvusError`` with the pymilvus exception as its cause. This module knows
collections and rows, nothing about what is stored in them: a store describes
its collection with ``CollectionSpec`` (plain field and index specs) and this
module turns that into pymilvus' schema and index objects.

Deadlines and threads: pymilvus calls cannot be interrupted once they run, so
what bounds them is their own gRPC deadline, which pymilvus honours (a call to
a black-holed server returns DEADLINE_EXCEEDED after ``timeout``). A call's
deadline starts when it is made, so time spent waiting for a thread counts
against it and a call never starts after its caller has given up. At most
``max_in_flight`` calls of one client hold a thread (running, or queued in the
executor) at once; a slot is freed when the thread finishes, not when the caller
stops waiting, so a caller that gives up early (a retrieval deadline shorter
than ``timeout_s``) cannot let threads pile up. Calls beyond that wait for a slot
within their deadline, except when every slot is held by a call whose caller
already left: Milvus is then not answering, and new calls fail at once.

Milvus Lite: a ``uri`` ending in ``.db`` is a local Milvus Lite database (a
directory, despite the name), served in-process by milvus-lite. One process
per file: the first process takes an advisory lock on it, and a second process
opening the same path fails (``MilvusError``, "Open local milvus failed"). So a
pod, or a test worker, needs a file of its own; several ``AsyncMilvus`` in one
process may share a file. Measured on 2 CPU cores (milvus-lite 3.2, pymilvus
3.0): opening a new file takes about 0.1 s, reopening one in the same process
under 10 ms, creating a collection about 20 ms when its indexes are created with
``sync=False`` (0.5 s per index with pymilvus' default wait, which polls and
calls AllocTimestamp, an RPC Milvus Lite lacks). Milvus Lite accepts no filter
templates (``{param}``), so filters are literal expressions. It does run
Milvus' BM25 function (sparse vectors filled from an analysed text field) and
hybrid search with RRF fusion (checked with milvus-lite 3.2.2).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from concurrent.futures import Future as ThreadFuture
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from infra.errors import Unavailable

log = logging.getLogger(__name__)

# How long past its deadline a caller still waits for a call: only a call that
# ignores its gRPC deadline gets this far.
GRACE_S = 5.0
DEFAULT_MAX_IN_FLIGHT = 4


class MilvusError(Unavailable):
    """A Milvus call failed: unreachable, timed out, refused, or the client is closed."""

    code = "milvus_unavailable"
    default_message = "Milvus is unavailable; retry"


def is_local_uri(uri: str) -> bool:
    """pymilvus' own rule: a path ending in ``.db`` is a Milvus Lite database."""
    return uri.endswith(".db")


# --- collection descriptions --------------------------------------------------------------


class FieldType(enum.StrEnum):
    """The Milvus field types the stores use; values are pymilvus ``DataType`` names."""

    VARCHAR = "VARCHAR"
    INT64 = "INT64"
    DOUBLE = "DOUBLE"
    FLOAT_VECTOR = "FLOAT_VECTOR"
    # Filled by Milvus itself from a text field (a BM25 function); never written.
    SPARSE_FLOAT_VECTOR = "SPARSE_FLOAT_VECTOR"


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: FieldType
    max_length: int | None = None  # VARCHAR: in bytes
    dim: int | None = None  # FLOAT_VECTOR
    primary: bool = False
    # VARCHAR: tokenised by Milvus' standard analyzer, so a BM25 function can read it.
    analyzer: bool = False

    def __post_init__(self) -> None:
        if self.type is FieldType.VARCHAR and not (self.max_length and self.max_length > 0):
            raise ValueError(f"VARCHAR field {self.name!r} needs a positive max_length")
        if self.type is FieldType.FLOAT_VECTOR and not (self.dim and self.dim > 0):
            raise ValueError(f"FLOAT_VECTOR field {self.name!r} needs a positive dim")


@dataclass(frozen=True)
class IndexSpec:
    field: str
    index_type: str  # "AUTOINDEX", "INVERTED", "HNSW"...
    metric_type: str | None = None  # vector indexes: "COSINE", "L2", "IP"


@dataclass(frozen=True)
class BM25Spec:
    """Milvus' built-in BM25 function: ``output`` (a sparse vector field) holds the
    term weights of ``input`` (a VARCHAR field with ``analyzer=True``), computed by
    Milvus on insert; a search of ``output`` takes the query as plain text."""

    name: str
    input: str
    output: str


@dataclass(frozen=True)
class CollectionSpec:
    """A collection's fields (no dynamic fields, no auto ids), its BM25 functions
    and its indexes."""

    fields: tuple[FieldSpec, ...]
    indexes: tuple[IndexSpec, ...] = ()
    functions: tuple[BM25Spec, ...] = ()

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError("field names must be distinct")
        if sum(f.primary for f in self.fields) != 1:
            raise ValueError("a collection needs exactly one primary field")
        unknown = [i.field for i in self.indexes if i.field not in names]
        if unknown:
            raise ValueError(f"indexes on unknown fields {unknown}")
        by_name = {f.name: f for f in self.fields}
        for fn in self.functions:
            src, out = by_name.get(fn.input), by_name.get(fn.output)
            if src is None or src.type is not FieldType.VARCHAR or not src.analyzer:
                raise ValueError(f"BM25 {fn.name!r} needs an analysed VARCHAR input")
            if out is None or out.type is not FieldType.SPARSE_FLOAT_VECTOR:
                raise ValueError(f"BM25 {fn.name!r} needs a sparse vector output")


def _schema_of(spec: CollectionSpec) -> Any:
    from pymilvus import DataType, Function, FunctionType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    for f in spec.fields:
        params: dict[str, Any] = {}
        if f.max_length is not None:
            params["max_length"] = f.max_length
        if f.dim is not None:
            params["dim"] = f.dim
        if f.analyzer:
            params["enable_analyzer"] = True
        schema.add_field(f.name, DataType[f.type.value], is_primary=f.primary, **params)
    for fn in spec.functions:
        schema.add_function(
            Function(
                name=fn.name,
                function_type=FunctionType.BM25,
                input_field_names=[fn.input],
                output_field_names=[fn.output],
            )
        )
    return schema


def _index_params_of(indexes: Sequence[IndexSpec]) -> Any:
    from pymilvus import MilvusClient

    params = MilvusClient.prepare_index_params()
    for i in indexes:
        extra = {"metric_type": i.metric_type} if i.metric_type else {}
        params.add_index(field_name=i.field, index_type=i.index_type, **extra)
    return params


@dataclass(frozen=True)
class AnnRequest:
    """One ranked list of a hybrid search: ``data`` (a vector, or the query text for
    a BM25 field) against ``field``, the ``limit`` nearest rows that ``filter``
    admits."""

    field: str
    data: list[float] | str
    metric_type: str
    limit: int
    filter: str


# --- the client ---------------------------------------------------------------------------


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # Marks an outcome nobody awaits any more as seen (asyncio would log it).
    if not fut.cancelled():
        fut.exception()


class AsyncMilvus:
    """One ``MilvusClient``, opened lazily, called from the executor.

    ``connect`` is optional: the first call connects, and a failed connect is tried
    again on the next call, so a pod can start while Milvus is still down.
    Concurrent first calls share one connection attempt and its outcome.
    """

    # Milvus Lite servers live as long as the process unless released; release one
    # when the last AsyncMilvus of this process using its file closes, which also
    # flushes it and drops the file lock.
    _lite_users: ClassVar[dict[str, int]] = {}
    _lite_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        uri: str,
        token: str | None,
        executor: Executor,
        timeout_s: float = 10.0,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.uri = uri
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        self._token = token or ""
        self._executor = executor
        self._client: Any = None
        self._lite_path: str | None = None
        self._closed = False
        self._connecting: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(max_in_flight)
        # Calls holding a slot (their thread has not returned), and those of them
        # whose caller stopped waiting.
        self._held: set[asyncio.Future[Any]] = set()
        self._abandoned: set[asyncio.Future[Any]] = set()
        # Updated by the worker threads themselves.
        self._running = 0
        self._running_lock = threading.Lock()

    @property
    def is_local(self) -> bool:
        return is_local_uri(self.uri)

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def in_flight(self) -> int:
        """Calls holding a thread of the executor now (running or queued there)."""
        return len(self._held)

    @property
    def running(self) -> int:
        """Calls whose RPC is under way on a thread now (``in_flight`` less the queued)."""
        return self._running

    @property
    def stuck(self) -> int:
        """Calls still holding a thread although their caller stopped waiting."""
        return len(self._abandoned)

    async def connect(self, wait_s: float | None = None) -> None:
        """Connect now, waiting at most ``wait_s`` (default: ``timeout_s`` + grace)."""
        if self._closed:
            raise MilvusError("Milvus client is closed")
        if self._client is not None:
            return
        task = self._connecting
        if task is None or task.done():
            task = asyncio.create_task(self._connect_once(), name="milvus-connect")
            task.add_done_callback(_retrieve)
            self._connecting = task
        wait = self.timeout_s + GRACE_S if wait_s is None else max(0.0, wait_s)
        try:
            # shield: a caller that gives up must not cancel the attempt others share.
            await asyncio.wait_for(asyncio.shield(task), wait)
        except TimeoutError as exc:
            raise MilvusError(f"Milvus connect timed out after {wait:.1f}s") from exc

    async def _connect_once(self) -> None:
        client = await self._in_executor("connect", self._open, time.monotonic() + self.timeout_s)
        if self._closed:
            # close() ran while this attempt was under way: nobody else will close it.
            await self._close_client(client)
            raise MilvusError("Milvus client is closed")
        self._client = client

    def _open(self, timeout: float) -> Any:
        from pymilvus import MilvusClient

        if self.is_local:
            # A fresh data dir may not exist yet; pymilvus refuses a missing parent.
            path = Path(self.uri).expanduser().resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            client = MilvusClient(uri=str(path), timeout=timeout)
            with self._lite_lock:
                self._lite_users[str(path)] = self._lite_users.get(str(path), 0) + 1
            self._lite_path = str(path)
            return client
        return MilvusClient(uri=self.uri, token=self._token, timeout=timeout)

    async def call(self, fn_name: str, *args: Any, **kwargs: Any) -> Any:
        """``MilvusClient.<fn_name>(*args, **kwargs)`` in the executor.

        ``timeout`` defaults to ``timeout_s``; pass a longer one for slow admin
        calls (loading a large collection). It covers the whole call: connecting
        if need be, waiting for a thread, and the RPC itself.
        """
        if fn_name.startswith("_") or fn_name == "close":
            raise ValueError(f"not a callable MilvusClient operation: {fn_name!r}")
        timeout = float(kwargs.pop("timeout", None) or self.timeout_s)
        deadline = time.monotonic() + timeout
        if self._client is None:
            await self.connect(wait_s=timeout + GRACE_S)
        client = self._client
        if client is None:
            raise MilvusError("Milvus client is closed")
        fn = getattr(client, fn_name, None)
        if not callable(fn):
            raise ValueError(f"MilvusClient has no operation {fn_name!r}")

        def run(left: float) -> Any:
            return fn(*args, timeout=left, **kwargs)

        return await self._in_executor(fn_name, run, deadline)

    async def _in_executor(self, what: str, fn: Callable[[float], Any], deadline: float) -> Any:
        """``fn(seconds left)`` on a thread of the executor, by ``deadline`` (monotonic)."""
        if self._closed:
            raise MilvusError("Milvus client is closed")
        await self._take_slot(what, deadline)
        try:
            thread_fut = self._executor.submit(self._run_by, what, fn, deadline)
        except RuntimeError as exc:  # the executor was shut down
            self._slots.release()
            raise MilvusError(f"Milvus {what} failed: {exc}") from exc
        fut = asyncio.wrap_future(thread_fut)
        self._held.add(fut)
        fut.add_done_callback(self._finished)
        guard = max(0.0, deadline - time.monotonic()) + GRACE_S
        try:
            done, _ = await asyncio.wait({fut}, timeout=guard)
        except asyncio.CancelledError:
            self._abandon(fut, thread_fut)
            raise
        if not done:
            self._abandon(fut, thread_fut)
            raise MilvusError(
                f"Milvus {what} timed out: no answer {GRACE_S:.0f}s past its deadline"
            )
        if fut.cancelled():
            raise MilvusError(f"Milvus {what} was cancelled (the executor is shutting down)")
        try:
            return fut.result()
        except MilvusError:
            raise
        except Exception as exc:
            raise MilvusError(f"Milvus {what} failed: {exc}") from exc

    async def _take_slot(self, what: str, deadline: float) -> None:
        if len(self._abandoned) >= self.max_in_flight:
            raise MilvusError(
                f"Milvus {what} refused at once: all {self.max_in_flight} call slots are "
                "held by earlier calls still waiting on Milvus after their callers gave up"
            )
        left = deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, left)):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise MilvusError(
                f"Milvus {what} timed out waiting for one of {self.max_in_flight} call slots"
            ) from exc

    def _run_by(self, what: str, fn: Callable[[float], Any], deadline: float) -> Any:
        left = deadline - time.monotonic()
        if left <= 0:
            raise MilvusError(f"Milvus {what} timed out waiting for a thread")
        with self._running_lock:
            self._running += 1
        try:
            return fn(left)
        finally:
            with self._running_lock:
                self._running -= 1

    def _finished(self, fut: asyncio.Future[Any]) -> None:
        self._held.discard(fut)
        self._abandoned.discard(fut)
        self._slots.release()
        _retrieve(fut)

    def _abandon(self, fut: asyncio.Future[Any], thread_fut: ThreadFuture[Any]) -> None:
        # Not started yet: cancelled, and its slot comes back through _finished.
        if thread_fut.cancel() or fut.done():
            return
        self._abandoned.add(fut)

    async def close(self) -> None:
        """Close the client; idempotent. Calls after this raise ``MilvusError``."""
        if self._closed:
            return
        self._closed = True
        task = self._connecting
        if task is not None and not task.done():
            # Bounded by the connect deadline; the attempt closes what it opened.
            await asyncio.wait({task})
        client, self._client = self._client, None
        if client is not None:
            await self._close_client(client)

    async def _close_client(self, client: Any) -> None:
        # Not through the call slots: closing must work while stuck calls hold them.
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.run_in_executor(self._executor, self._close_sync, client),
                self.timeout_s + GRACE_S,
            )
        except Exception:
            log.warning("closing the Milvus client failed", exc_info=True)

    def _close_sync(self, client: Any) -> None:
        client.close()
        path = self._lite_path
        if path is None:
            return
        with self._lite_lock:
            users = self._lite_users.get(path, 0) - 1
            if users > 0:
                self._lite_users[path] = users
                return
            self._lite_users.pop(path, None)
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(path)

    # --- the operations the stores use, typed ---------------------------------------------

    async def has_collection(self, name: str) -> bool:
        return bool(await self.call("has_collection", name))

    async def list_collections(self) -> list[str]:
        return list(await self.call("list_collections"))

    async def describe_collection(self, name: str) -> dict[str, Any]:
        return dict(await self.call("describe_collection", name))

    async def create_collection(
        self,
        name: str,
        spec: CollectionSpec,
        *,
        consistency_level: str | None = None,
        properties: Mapping[str, str] | None = None,
        # pymilvus' name for the call's deadline, kept for the callers of ``call``.
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        """Create the collection of ``spec``'s fields; its indexes come with
        ``create_indexes`` (a separate step, so a creation lost to a race with
        another pod can be told from a failed index)."""
        if self._client is None:
            # Connected first: building the schema imports pymilvus, which is slow
            # the first time and belongs on a thread, as connecting does it.
            await self.connect()
        kwargs: dict[str, Any] = {"schema": _schema_of(spec), "timeout": timeout}
        if consistency_level is not None:
            kwargs["consistency_level"] = consistency_level
        if properties:
            kwargs["properties"] = dict(properties)
        await self.call("create_collection", name, **kwargs)

    async def create_indexes(
        self,
        name: str,
        indexes: Sequence[IndexSpec],
        *,
        sync: bool = False,
        # pymilvus' name for the call's deadline, kept for the callers of ``call``.
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> None:
        """Build ``indexes`` on the collection. ``sync=False`` returns once Milvus
        accepted them: on an empty collection there is nothing to wait for, and
        the wait polls every 0.5 s per index with an RPC Milvus Lite lacks."""
        if not indexes:
            return
        if self._client is None:
            await self.connect()
        await self.call("create_index", name, _index_params_of(indexes), sync=sync, timeout=timeout)

    async def load_collection(self, name: str, **kwargs: Any) -> None:
        await self.call("load_collection", name, **kwargs)

    async def upsert(self, name: str, rows: list[dict[str, Any]]) -> Any:
        return await self.call("upsert", name, rows)

    async def flush(self, name: str) -> None:
        """Seal the collection's growing segments, so they are indexed. Milvus Lite
        searches rows of a growing segment several times slower than sealed ones
        (measured: 36 ms against 8 ms for 600 rows) and seals them late."""
        await self.call("flush", name)

    async def search(
        self,
        name: str,
        vectors: list[list[float]],
        *,
        filter: str,
        limit: int,
        output_fields: list[str],
        anns_field: str,
        search_params: dict[str, Any] | None = None,
    ) -> list[list[dict[str, Any]]]:
        result = await self.call(
            "search",
            name,
            data=vectors,
            filter=filter,
            limit=limit,
            output_fields=output_fields,
            anns_field=anns_field,
            search_params=search_params or {},
        )
        return [[dict(hit) for hit in hits] for hits in result]

    async def hybrid_search(
        self,
        name: str,
        requests: Sequence[AnnRequest],
        *,
        rrf_k: int,
        limit: int,
        output_fields: list[str],
    ) -> list[dict[str, Any]]:
        """Rows of several ranked lists fused by reciprocal rank fusion (Milvus'
        ``RRFRanker``), best first; each row's ``distance`` is its fused score."""
        from pymilvus import AnnSearchRequest, RRFRanker

        reqs = [
            AnnSearchRequest(
                data=[r.data],
                anns_field=r.field,
                param={"metric_type": r.metric_type},
                limit=r.limit,
                expr=r.filter,
            )
            for r in requests
        ]
        result = await self.call(
            "hybrid_search",
            name,
            reqs,
            ranker=RRFRanker(rrf_k),
            limit=limit,
            output_fields=output_fields,
        )
        return [dict(hit) for hit in result[0]] if result else []

    async def query(
        self,
        name: str,
        *,
        filter: str,
        output_fields: list[str],
        limit: int | None = None,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        if limit is not None:
            kwargs["limit"] = limit
        rows = await self.call("query", name, filter=filter, output_fields=output_fields, **kwargs)
        return [dict(row) for row in rows]

    async def delete(self, name: str, *, filter: str) -> int:
        """Delete rows matching ``filter``; the number deleted, as Milvus reports it."""
        result = await self.call("delete", name, filter=filter)
        # Older servers and Milvus Lite return the deleted primary keys; newer ones a
        # dict whose zero counts are omitted.
        if isinstance(result, list):
            return len(result)
        if isinstance(result, dict):
            return int(result.get("delete_count", 0))
        return 0
