"""LangGraph's checkpointer on plain Redis (standalone or Cluster, no modules).

``langgraph-checkpoint-redis`` needs RedisJSON and RediSearch, which plain and
most managed Redis lack. ``RedisCheckpointSaver`` implements LangGraph's async
checkpointer API on strings, hashes, sorted sets and sets only, in the L2 key
layout of ``memory.keys`` and the record format of ``graph.checkpoint_records``.
The Lua that writes a checkpoint is ``memory.l2_scripts.PUT_CHECKPOINT``, the
same function the turn commit runs inside its one script, so there is one writer
of the layout; records are always encoded with this saver's ``serde`` (the turn
commit asks ``encode_checkpoint`` for its record).

Per thread ``<tenant>:<session>`` and checkpoint namespace ``ns``:

- ``cp:<ns>:<id>``: one record (checkpoint, metadata, parent id), a string;
- ``cpidx:<ns>``: the checkpoint ids, a ZSET with every score 0, so members sort
  by id, and LangGraph's uuid6 ids sort by time;
- ``cpw:<ns>:<id>``: pending writes of checkpoint ``id``, a hash keyed
  ``<task_id>|<idx>``;
- ``cpns``: the namespaces the thread used, a set.

Every key carries the thread's hash tag, so each Lua script below touches one
Cluster slot. Every key has a TTL (``ttl_s``), refreshed when it is written. A
record holds its checkpoint whole, so the bytes one ``aput`` sends depend on the
size of the graph state, never on how many checkpoints came before; keep the
state small (the conversation lives in the turn log, not in the checkpoint).

Metadata filters of ``alist`` are applied in Python after decoding: there is no
secondary index on plain Redis, and one thread's history is bounded (by
``max_history``, or by the TTL), so a scan of it is cheap. ``alist(None, ...)``,
LangGraph's search across threads, SCANs the keyspace: a tool for operators, not
for the request path.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    PendingWrite,
    empty_checkpoint,
    get_checkpoint_id,
    get_serializable_checkpoint_metadata,
    writes_sort_key,
)
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.serde.base import SerializerProtocol
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from graph.checkpoint_records import (
    CheckpointRecord,
    decode_record,
    decode_write,
    encode_record,
    encode_write,
)
from infra.redis_client import scan_keys
from memory import l2_scripts
from memory.keys import PREFIX, SessionKeys, split_thread_id
from memory.l2_store import CheckpointWrite

__all__ = ["DEFAULT_TTL_S", "RedisCheckpointSaver"]

DEFAULT_TTL_S = 7 * 24 * 3600

# Ids read per ZREVRANGEBYLEX and records fetched per pipeline in ``alist``.
_PAGE = 100
# ``adelete_thread`` retries this often when namespaces appear while it runs.
_DELETE_ATTEMPTS = 10

# KEYS: writes hash, namespaces. ARGV: 1 ttl, 2 ns, 3 "upsert" or "insert",
# 4.. field/value pairs. "insert" keeps a field already there, as the Postgres
# saver's INSERT ... ON CONFLICT DO NOTHING does for regular writes.
_PUT_WRITES = """
local upsert = ARGV[3] == 'upsert'
for i = 4, #ARGV, 2 do
  if upsert then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  else
    redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
local ttl = tonumber(ARGV[1])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[2], ttl)
return 1
"""

# KEYS: index. ARGV: 1 record key prefix, 2 writes key prefix.
# The newest checkpoint whose record still exists, with its writes, or nil. A
# record can be gone while the index (refreshed by every put) still names it.
_LATEST = """
local i = redis.call('ZCARD', KEYS[1]) - 1
while i >= 0 do
  local lo = i - 15
  if lo < 0 then lo = 0 end
  local ids = redis.call('ZRANGE', KEYS[1], lo, i)
  for j = #ids, 1, -1 do
    local rec = redis.call('GET', ARGV[1] .. ids[j])
    if rec then
      return {ids[j], rec, redis.call('HGETALL', ARGV[2] .. ids[j])}
    end
  end
  i = lo - 1
end
return false
"""

# KEYS: namespaces, then the index of each namespace.
# ARGV: 1 namespace count n, then per namespace: ns, record prefix, writes prefix.
# Returns 0, deleting nothing, when the namespaces changed since the caller read
# them (the caller reads them again), else 1.
_DELETE = """
local n = tonumber(ARGV[1])
if redis.call('SCARD', KEYS[1]) ~= n then return 0 end
for k = 1, n do
  if redis.call('SISMEMBER', KEYS[1], ARGV[2 + (k - 1) * 3]) == 0 then return 0 end
end
for k = 1, n do
  local base = 2 + (k - 1) * 3
  local ids = redis.call('ZRANGE', KEYS[k + 1], 0, -1)
  for _, id in ipairs(ids) do
    redis.call('DEL', ARGV[base + 1] .. id, ARGV[base + 2] .. id)
  end
  redis.call('DEL', KEYS[k + 1])
end
redis.call('DEL', KEYS[1])
return 1
"""

_ASYNC_ONLY = (
    "RedisCheckpointSaver is async only: use {} (graph.ainvoke / astream / aget_state), "
    "a sync call would block the event loop on Redis"
)


@dataclass(frozen=True, slots=True)
class _Source:
    """One namespace of one thread: where ``alist`` reads ids from."""

    thread: str
    ns: str
    keys: SessionKeys


def _keys(thread_id: Any) -> SessionKeys:
    if not isinstance(thread_id, str):
        raise ValueError("thread_id must be a string '<tenant>:<session>'")
    tenant, session = split_thread_id(thread_id)
    return SessionKeys(tenant, session)


def _valid_thread(thread: str) -> bool:
    try:
        split_thread_id(thread)
    except ValueError:
        return False
    return True


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _contains(doc: Any, query: Any) -> bool:
    """JSONB containment (``doc @> query``), the Postgres saver's metadata filter."""
    if isinstance(query, dict):
        return isinstance(doc, dict) and all(
            k in doc and _contains(doc[k], v) for k, v in query.items()
        )
    if isinstance(query, list | tuple):
        return isinstance(doc, list | tuple) and all(
            any(_contains(d, q) for d in doc) for q in query
        )
    if isinstance(query, bool) or isinstance(doc, bool):
        # JSON true is not 1, though Python's True == 1.
        return type(doc) is type(query) and doc == query
    return bool(doc == query)


class RedisCheckpointSaver(BaseCheckpointSaver[str]):
    """LangGraph checkpointer on plain Redis; see the module docstring.

    ``redis`` must return bytes (``decode_responses=False``), as the clients of
    ``infra.redis_client`` do. ``max_history`` keeps at most that many checkpoints
    per namespace of a thread, pruning the oldest (records and writes) in the same
    script that writes a new one; ``None`` keeps all until the TTL.
    """

    def __init__(
        self,
        redis: Redis | RedisCluster,
        *,
        ttl_s: int = DEFAULT_TTL_S,
        max_history: int | None = None,
        serde: SerializerProtocol | None = None,
    ) -> None:
        super().__init__(serde=serde)
        if ttl_s < 1:
            raise ValueError("ttl_s must be at least 1 second")
        if max_history is not None and max_history < 1:
            raise ValueError("max_history must be at least 1, or None to keep all")
        if redis.get_encoder().decode_responses:
            raise ValueError("the Redis client must return bytes (decode_responses=False)")
        self.redis = redis
        self.ttl_s = ttl_s
        self.max_history = max_history
        self._put = redis.register_script(l2_scripts.PUT_CHECKPOINT)
        self._put_writes = redis.register_script(_PUT_WRITES)
        self._latest = redis.register_script(_LATEST)
        self._delete = redis.register_script(_DELETE)

    # --- reading ------------------------------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint named by ``config``, or the newest of its namespace."""
        conf = config["configurable"]
        thread = conf["thread_id"]
        keys = _keys(thread)
        ns: str = conf.get("checkpoint_ns", "")
        checkpoint_id = get_checkpoint_id(config)
        if checkpoint_id:
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(keys.cp(ns, checkpoint_id))
            pipe.hgetall(keys.cp_writes(ns, checkpoint_id))
            raw, writes = await pipe.execute()
            if raw is None:
                return None
            return self._tuple(thread, ns, decode_record(raw, self.serde), writes)
        found = await self._latest(
            keys=[keys.cp_index(ns)], args=[keys.cp(ns, ""), keys.cp_writes(ns, "")]
        )
        if found is None:
            return None
        _, raw, flat = found
        writes = dict(zip(flat[::2], flat[1::2], strict=True))
        return self._tuple(thread, ns, decode_record(raw, self.serde), writes)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """Checkpoints newest first (by id, across namespaces when ``config`` names
        none), as the Postgres saver orders them.

        ``filter`` is JSONB containment on the metadata, like Postgres'
        ``metadata @> filter``; ``before`` keeps ids strictly older than its
        checkpoint id; ``config=None`` searches every thread (a SCAN).
        """
        if limit is not None and limit <= 0:
            return
        before_id = get_checkpoint_id(before) if before else None
        sources = await self._sources(config)
        wanted_id = get_checkpoint_id(config) if config else None
        candidates: AsyncIterator[tuple[_Source, str]]
        if wanted_id:
            if before_id is not None and wanted_id >= before_id:
                return
            candidates = _each((s, wanted_id) for s in sources)
        else:
            page = min(limit, _PAGE) if limit is not None and not filter else _PAGE
            candidates = self._merged_ids(sources, before_id, page)

        left = limit
        chunk: list[tuple[_Source, str]] = []
        async for cand in candidates:
            chunk.append(cand)
            if len(chunk) < _PAGE and (left is None or filter or len(chunk) < left):
                continue
            async for tup in self._fetch(chunk, filter):
                yield tup
                if left is not None:
                    left -= 1
                    if left == 0:
                        return
            chunk = []
        async for tup in self._fetch(chunk, filter):
            yield tup
            if left is not None:
                left -= 1
                if left == 0:
                    return

    async def _sources(self, config: RunnableConfig | None) -> list[_Source]:
        if config is None:
            found = {
                _text(key).partition("{")[2].rpartition("}")[0]
                async for key in scan_keys(self.redis, f"{PREFIX}:{{*}}:cpns")
            }
            threads = sorted(t for t in found if _valid_thread(t))
            ns_filter = None
        else:
            threads = [config["configurable"]["thread_id"]]
            ns_filter = config["configurable"].get("checkpoint_ns")
        sources: list[_Source] = []
        for thread in threads:
            keys = _keys(thread)
            if ns_filter is not None:
                sources.append(_Source(thread, ns_filter, keys))
                continue
            try:
                members = await self.redis.smembers(keys.cp_namespaces)
            except ResponseError:
                if config is not None:
                    raise
                # A SCAN across the keyspace can meet a key of another shape under
                # that name (WRONGTYPE); it holds no checkpoints of ours.
                continue
            sources.extend(_Source(thread, _text(m), keys) for m in sorted(members))
        return sources

    async def _merged_ids(
        self, sources: list[_Source], before_id: str | None, page: int
    ) -> AsyncIterator[tuple[_Source, str]]:
        """Ids of all sources, newest first: a merge of each one's descending pages."""
        iters = [self._ids_desc(s, before_id, page) for s in sources]
        heads = [await anext(it, None) for it in iters]
        while True:
            live = [i for i, h in enumerate(heads) if h is not None]
            if not live:
                return
            best = max(live, key=lambda i: cast(str, heads[i]))
            yield sources[best], cast(str, heads[best])
            heads[best] = await anext(iters[best], None)

    async def _ids_desc(
        self, source: _Source, before_id: str | None, page: int
    ) -> AsyncIterator[str]:
        index = source.keys.cp_index(source.ns)
        upper = f"({before_id}" if before_id else "+"
        while True:
            batch = await self.redis.zrevrangebylex(index, upper, "-", start=0, num=page)
            for member in batch:
                yield _text(member)
            if len(batch) < page:
                return
            upper = f"({_text(batch[-1])}"

    async def _fetch(
        self, chunk: list[tuple[_Source, str]], filter: dict[str, Any] | None
    ) -> AsyncIterator[CheckpointTuple]:
        if not chunk:
            return
        pipe = self.redis.pipeline(transaction=False)
        for source, checkpoint_id in chunk:
            pipe.get(source.keys.cp(source.ns, checkpoint_id))
            pipe.hgetall(source.keys.cp_writes(source.ns, checkpoint_id))
        replies = await pipe.execute()
        for n, (source, _) in enumerate(chunk):
            raw, writes = replies[2 * n], replies[2 * n + 1]
            if raw is None:
                # Expired (each record keeps its own TTL) or pruned meanwhile.
                continue
            record = decode_record(raw, self.serde)
            if filter and not _contains(record.metadata, filter):
                continue
            yield self._tuple(source.thread, source.ns, record, writes)

    def _tuple(
        self, thread: str, ns: str, record: CheckpointRecord, writes: dict[bytes, bytes]
    ) -> CheckpointTuple:
        return CheckpointTuple(
            config={
                "configurable": {
                    "thread_id": thread,
                    "checkpoint_ns": ns,
                    "checkpoint_id": record.checkpoint_id,
                }
            },
            checkpoint=cast(Checkpoint, record.checkpoint),
            metadata=cast(CheckpointMetadata, record.metadata),
            parent_config=(
                {
                    "configurable": {
                        "thread_id": thread,
                        "checkpoint_ns": ns,
                        "checkpoint_id": record.parent_id,
                    }
                }
                if record.parent_id
                else None
            ),
            pending_writes=self._pending_writes(writes),
        )

    def _pending_writes(self, writes: dict[bytes, bytes]) -> list[PendingWrite]:
        decoded: list[tuple[tuple[str, str, int], PendingWrite]] = []
        for field, raw in writes.items():
            idx = int(_text(field).rpartition("|")[2])
            task_id, task_path, channel, value = decode_write(raw, self.serde)
            decoded.append((writes_sort_key(task_path, task_id, idx), (task_id, channel, value)))
        decoded.sort(key=lambda d: d[0])
        return [w for _, w in decoded]

    # --- writing ------------------------------------------------------------------

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Store ``checkpoint`` as the child of ``config``'s checkpoint, in one script."""
        conf = config["configurable"]
        thread = conf["thread_id"]
        keys = _keys(thread)
        ns: str = conf.get("checkpoint_ns", "")
        checkpoint_id = checkpoint["id"]
        # Encoding runs inline: records are a few KiB by design (see the module
        # docstring), which takes less time than a hop to a worker thread.
        record = encode_record(
            CheckpointRecord(
                checkpoint_id=checkpoint_id,
                parent_id=conf.get("checkpoint_id"),
                checkpoint=dict(checkpoint),
                metadata=dict(get_serializable_checkpoint_metadata(config, metadata)),
            ),
            self.serde,
        )
        await self._put(
            keys=[keys.cp(ns, checkpoint_id), keys.cp_index(ns), keys.cp_namespaces],
            args=[
                checkpoint_id,
                record,
                ns,
                self.ttl_s,
                self.max_history or 0,
                keys.cp(ns, ""),
                keys.cp_writes(ns, ""),
            ],
        )
        return {
            "configurable": {
                "thread_id": thread,
                "checkpoint_ns": ns,
                "checkpoint_id": checkpoint_id,
            }
        }

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Store a task's writes against ``config``'s checkpoint.

        As in the Postgres saver: special channels (errors, interrupts, resume
        values) have fixed negative indexes and replace what was there when a
        call holds only such writes; otherwise a write already stored is kept.
        """
        if not writes:
            return
        conf = config["configurable"]
        keys = _keys(conf["thread_id"])
        ns: str = conf.get("checkpoint_ns", "")
        checkpoint_id = conf["checkpoint_id"]
        mode = "upsert" if all(ch in WRITES_IDX_MAP for ch, _ in writes) else "insert"
        pairs: list[str | bytes] = []
        for idx, (channel, value) in enumerate(writes):
            pairs.append(f"{task_id}|{WRITES_IDX_MAP.get(channel, idx)}")
            pairs.append(encode_write(task_id, task_path, channel, value, self.serde))
        await self._put_writes(
            keys=[keys.cp_writes(ns, checkpoint_id), keys.cp_namespaces],
            args=[self.ttl_s, ns, mode, *pairs],
        )

    async def adelete_thread(self, thread_id: str) -> None:
        """Delete every checkpoint, index and pending write of the thread, atomically.

        Only the checkpointer's keys: the session's turn log and meta belong to
        the L2 store.
        """
        keys = _keys(thread_id)
        for _ in range(_DELETE_ATTEMPTS):
            namespaces = sorted(_text(m) for m in await self.redis.smembers(keys.cp_namespaces))
            if not namespaces:
                return
            args: list[str | int] = [len(namespaces)]
            for ns in namespaces:
                args += [ns, keys.cp(ns, ""), keys.cp_writes(ns, "")]
            done = await self._delete(
                keys=[keys.cp_namespaces, *(keys.cp_index(ns) for ns in namespaces)], args=args
            )
            if int(done) == 1:
                return
        raise RuntimeError(f"checkpoint namespaces of {thread_id!r} kept changing during delete")

    def encode_checkpoint(
        self,
        thread_id: str,
        values: dict[str, Any],
        *,
        step: int,
        parent_id: str | None,
        metadata: dict[str, Any],
    ) -> CheckpointWrite:
        """A checkpoint of ``values`` (the graph's channels) as the child of
        ``parent_id``, encoded with this saver's serde, for a writer that stores
        it in a script of its own (the turn commit). ``step`` orders it: channel
        versions are ``step``, so they grow with every commit of the thread."""
        _keys(thread_id)  # validates the thread id
        checkpoint = empty_checkpoint()
        checkpoint["id"] = str(uuid6(clock_seq=step))
        checkpoint["channel_values"] = values
        version = f"{step:032}.{0.0:016}"
        checkpoint["channel_versions"] = dict.fromkeys(values, version)
        checkpoint["updated_channels"] = sorted(values)
        record = encode_record(
            CheckpointRecord(checkpoint["id"], parent_id, dict(checkpoint), metadata), self.serde
        )
        return CheckpointWrite(checkpoint["id"], record)

    def get_next_version(self, current: str | None, channel: None) -> str:
        """As the in-memory and Postgres savers: a zero-padded counter, then a random
        fraction, so versions compare as strings and concurrent writers rarely tie."""
        if current is None:
            current_v = 0
        elif isinstance(current, int):
            current_v = current
        else:
            current_v = int(current.split(".")[0])
        return f"{current_v + 1:032}.{random.random():016}"

    # --- sync API: not offered ----------------------------------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        raise NotImplementedError(_ASYNC_ONLY.format("aget_tuple"))

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        raise NotImplementedError(_ASYNC_ONLY.format("alist"))

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        raise NotImplementedError(_ASYNC_ONLY.format("aput"))

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        raise NotImplementedError(_ASYNC_ONLY.format("aput_writes"))

    def delete_thread(self, thread_id: str) -> None:
        raise NotImplementedError(_ASYNC_ONLY.format("adelete_thread"))


async def _each(items: Iterator[tuple[_Source, str]]) -> AsyncIterator[tuple[_Source, str]]:
    for item in items:
        yield item
