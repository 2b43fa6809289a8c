"""An asyncio face on pymilvus' synchronous ``MilvusClient``.

Every call runs in the thread-pool executor given to ``AsyncMilvus``, with a
deadline, so a slow or dead Milvus never blocks the event loop. Any failure
(unreachable, timeout, refused request, closed client) is raised as one
``MilvusError`` with the pymilvus exception as its cause. This module knows
collections and rows, nothing about what is stored in them.

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
templates (``{param}``), so filters are literal expressions.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, ClassVar

log = logging.getLogger(__name__)


class MilvusError(RuntimeError):
    """A Milvus call failed: unreachable, timed out, refused, or the client is closed."""


def is_local_uri(uri: str) -> bool:
    """pymilvus' own rule: a path ending in ``.db`` is a Milvus Lite database."""
    return uri.endswith(".db")


class AsyncMilvus:
    """One ``MilvusClient``, opened lazily, called from the executor.

    ``connect`` is optional: the first call connects, and a failed connect is tried
    again on the next call, so a pod can start while Milvus is still down.
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
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.uri = uri
        self.timeout_s = timeout_s
        self._token = token or ""
        self._executor = executor
        self._client: Any = None
        self._lite_path: str | None = None
        self._closed = False
        self._connect_lock = asyncio.Lock()

    @property
    def is_local(self) -> bool:
        return is_local_uri(self.uri)

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def connect(self) -> None:
        if self._closed:
            raise MilvusError("Milvus client is closed")
        async with self._connect_lock:
            if self._client is not None:
                return
            self._client = await self._in_executor("connect", self._open)

    def _open(self) -> Any:
        from pymilvus import MilvusClient

        if self.is_local:
            # A fresh data dir may not exist yet; pymilvus refuses a missing parent.
            path = Path(self.uri).expanduser().resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            client = MilvusClient(uri=str(path), timeout=self.timeout_s)
            with self._lite_lock:
                self._lite_users[str(path)] = self._lite_users.get(str(path), 0) + 1
            self._lite_path = str(path)
            return client
        return MilvusClient(uri=self.uri, token=self._token, timeout=self.timeout_s)

    async def call(self, fn_name: str, *args: Any, **kwargs: Any) -> Any:
        """``MilvusClient.<fn_name>(*args, **kwargs)`` in the executor.

        ``timeout`` defaults to ``timeout_s``; pass a longer one for slow admin
        calls (loading a large collection).
        """
        if fn_name.startswith("_") or fn_name == "close":
            raise ValueError(f"not a callable MilvusClient operation: {fn_name!r}")
        if self._client is None:
            await self.connect()
        fn = getattr(self._client, fn_name, None)
        if not callable(fn):
            raise ValueError(f"MilvusClient has no operation {fn_name!r}")
        kwargs.setdefault("timeout", self.timeout_s)
        return await self._in_executor(fn_name, functools.partial(fn, *args, **kwargs))

    async def _in_executor(self, what: str, fn: Any) -> Any:
        if self._closed:
            raise MilvusError("Milvus client is closed")
        loop = asyncio.get_running_loop()
        timeout = self.timeout_s
        if isinstance(getattr(fn, "keywords", None), dict):
            timeout = fn.keywords.get("timeout") or timeout
        try:
            fut = loop.run_in_executor(self._executor, fn)
            # pymilvus enforces the deadline itself; this guard only frees the caller
            # if a call ignores it (the worker thread cannot be interrupted).
            return await asyncio.wait_for(fut, timeout + 5.0)
        except MilvusError:
            raise
        except TimeoutError as exc:
            raise MilvusError(f"Milvus {what} timed out after {timeout + 5.0:.1f}s") from exc
        except Exception as exc:
            raise MilvusError(f"Milvus {what} failed: {exc}") from exc

    async def close(self) -> None:
        """Close the client; idempotent. Calls after this raise ``MilvusError``."""
        if self._closed:
            return
        async with self._connect_lock:
            self._closed = True
            client, self._client = self._client, None
        if client is None:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._close_sync, client)
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
        self, name: str, schema: Any, index_params: Any = None, **kwargs: Any
    ) -> None:
        await self.call(
            "create_collection", name, schema=schema, index_params=index_params, **kwargs
        )

    async def create_index(self, name: str, index_params: Any, **kwargs: Any) -> None:
        await self.call("create_index", name, index_params, **kwargs)

    async def load_collection(self, name: str, **kwargs: Any) -> None:
        await self.call("load_collection", name, **kwargs)

    async def upsert(self, name: str, rows: list[dict[str, Any]]) -> Any:
        return await self.call("upsert", name, rows)

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
