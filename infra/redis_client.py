"""Redis clients: one factory for standalone Redis and Redis Cluster, and a SCAN over either.

The URL picks the kind of client:

- ``redis://host:port/db``, ``rediss://...`` (TLS), ``unix:///path?db=0``: standalone.
- ``redis+cluster://host:port``, ``rediss+cluster://host:port``: a Redis Cluster; any one
  node is enough, the rest is discovered with CLUSTER SLOTS.

Both kinds return bytes (``decode_responses=False``) and share the same time limits, so
callers never branch on the kind except where Redis Cluster itself differs (SCAN runs
per node: :func:`scan_keys`). Multi-key commands and Lua scripts work on the cluster as
long as every key carries the same hash tag (``memory/keys.py`` guarantees that for the
keys of one session).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias, cast
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

RedisLike: TypeAlias = Redis | RedisCluster

# What a Redis call can raise when Redis is unreachable or refuses. A cluster that cannot
# be reached at all raises RedisClusterException, which is NOT a RedisError subclass.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException)

_STANDALONE_SCHEMES = frozenset({"redis", "rediss", "unix"})
_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

# An idle pooled connection is PINGed before reuse once it has been idle this long, so a
# connection cut by a load balancer or a Redis restart is found before a command is lost.
HEALTH_CHECK_INTERVAL_S = 30.0

# Only connection errors are retried. A TimeoutError means the command may have run on
# the server already; retrying a non-idempotent write (an append to the turn log) could
# apply it twice, so timeouts surface to the caller, who knows whether a repeat is safe.
_RETRIES = 2
_BACKOFF_BASE_S = 0.05
_BACKOFF_CAP_S = 0.5


def _retry() -> Retry:
    return Retry(
        ExponentialBackoff(cap=_BACKOFF_CAP_S, base=_BACKOFF_BASE_S),
        _RETRIES,
        supported_errors=(RedisConnectionError,),
    )


def create_redis(
    url: str, *, socket_timeout: float, max_connections: int | None = None
) -> RedisLike:
    """A client for ``url`` (see the module docstring); nothing is connected yet.

    ``socket_timeout`` bounds both the TCP connect and every read, so a dead or frozen
    Redis fails in about that long instead of hanging a request. ``max_connections``
    caps the pool (per node on a cluster); on a standalone server a full pool makes a
    caller wait up to ``socket_timeout`` for a free connection instead of failing.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme in _CLUSTER_SCHEMES:
        return _create_cluster(
            url, _CLUSTER_SCHEMES[scheme], socket_timeout=socket_timeout,
            max_connections=max_connections,
        )  # fmt: skip
    if scheme not in _STANDALONE_SCHEMES:
        raise ValueError(
            f"unsupported Redis URL scheme {scheme!r}: use redis://, rediss://, unix://, "
            "redis+cluster:// or rediss+cluster://"
        )
    common: dict[str, Any] = {
        "decode_responses": False,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "retry": _retry(),
    }
    if max_connections is None:
        return Redis.from_url(url, **common)
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=socket_timeout, **common
    )
    return Redis.from_pool(pool)


def _create_cluster(
    url: str, plain_scheme: str, *, socket_timeout: float, max_connections: int | None
) -> RedisCluster:
    parts = urlsplit(url)
    db = parts.path.strip("/")
    if db not in ("", "0"):
        raise ValueError(f"Redis Cluster has only database 0, the URL asks for {db!r}")
    plain_url = urlunsplit((plain_scheme, parts.netloc, "", parts.query, ""))
    extra = {} if max_connections is None else {"max_connections": max_connections}
    # The cluster client's ``retry`` sets how often a command is re-sent after a
    # connection error, a CLUSTERDOWN or an uncovered slot, each time after refreshing
    # the slot map, which is what carries a command across a failover.
    return RedisCluster.from_url(
        plain_url,
        decode_responses=False,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
        retry=_retry(),
        **extra,
    )


def is_cluster(client: RedisLike) -> bool:
    return isinstance(client, RedisCluster)


# A MOVED reply (a slot migrated, a failover the client has not heard of) is
# followed this many times, the slot map patched each time, before giving up.
_MOVED_FOLLOWS = 3


async def on_one_connection(
    client: RedisLike, key: str, commands: list[tuple[Any, ...]]
) -> list[Any]:
    """Runs ``commands`` in order on ONE connection to the node that owns ``key``,
    in one round trip, and returns their replies; a command Redis refused comes
    back as its ``ResponseError`` instance, not raised.

    For what depends on the connection: ``WAIT``/``WAITAOF`` count what THIS
    connection wrote, so they must follow the write on its connection, which a
    pooled client does not promise for two separate calls. Standalone: a
    non-transactional pipeline (one connection for the whole stack; its retry
    after a connection error re-sends the whole stack on one new connection).
    Cluster: redis-py's ClusterPipeline routes a keyless WAIT by its own rules
    (and drops an explicit target when it retries), so the commands go straight
    to a pooled connection of the primary that owns ``key``'s slot. A MOVED
    reply to the first command patches the slot map and runs them again (the
    first command did not run); a connection error refreshes the map and raises,
    for the caller to retry.
    """
    if not isinstance(client, RedisCluster):
        async with client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return cast("list[Any]", await pipe.execute(raise_on_error=False))
    for _ in range(_MOVED_FOLLOWS):
        await client.initialize()
        node = client.get_node_from_key(key)
        if node is None:
            raise RedisClusterException(f"no primary serves the slot of {key!r}")
        try:
            replies = await _on_node(node, commands)
        except (RedisConnectionError, RedisTimeoutError):
            # The node may be gone (a failover): the next call reads the slot map
            # again first, as redis-py's own retry loop does.
            client._initialize = True
            raise
        first = replies[0] if replies else None
        if not isinstance(first, MovedError):
            return replies
        await client.nodes_manager.move_slot(first)
    raise RedisClusterException(f"{key!r} kept moving: {replies[0]}")


async def _on_node(node: ClusterNode, commands: list[tuple[Any, ...]]) -> list[Any]:
    connection = node.acquire_connection()
    try:
        await connection.send_packed_command(connection.pack_commands(commands))
        replies: list[Any] = []
        for command in commands:
            try:
                replies.append(await node.parse_response(connection, command[0]))
            except ResponseError as exc:
                replies.append(exc)
        return replies
    except BaseException:
        # A half-read connection must never go back to the pool with replies
        # still on the wire.
        await connection.disconnect()
        raise
    finally:
        node.release(connection)


async def scan_keys(client: RedisLike, pattern: str, count: int = 1000) -> AsyncIterator[bytes]:
    """Every key matching ``pattern``, by SCAN (never KEYS, which blocks the server).

    On a cluster each primary is scanned once, since a SCAN cursor belongs to one node
    and replicas only hold copies. As with SCAN itself, a key may be yielded twice if the
    server rehashes during the scan; callers that count must deduplicate.
    """
    if not isinstance(client, RedisCluster):
        async for key in client.scan_iter(match=pattern, count=count):
            yield _as_bytes(key)
        return
    await client.initialize()
    for node in client.get_primaries():
        cursor = 0
        while True:
            # On a cluster, SCAN replies {node name: cursor} and the keys of that node.
            reply = await client.scan(cursor=cursor, match=pattern, count=count, target_nodes=node)
            cursors, keys = cast("tuple[dict[str, int], list[bytes | str]]", reply)
            for key in keys:
                yield _as_bytes(key)
            cursor = int(cursors[node.name])
            if cursor == 0:
                break


def _as_bytes(key: bytes | str) -> bytes:
    # A client made elsewhere with decode_responses=True hands back str.
    return key if isinstance(key, bytes) else key.encode()
