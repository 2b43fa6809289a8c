"""Redis infrastructure against real servers: create_redis on standalone and Redis Cluster,
Lua on hash-tagged keys, scan_keys over every master, fast failure, the embedded Redis,
and the cluster launcher itself (health, replicas, a real failover)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.crc import key_slot
from redis.exceptions import (
    ClusterCrossSlotError,
    MovedError,
    RedisClusterException,
    RedisError,
)

from infra.embedded_redis import EmbeddedRedis, EmbeddedRedisError, ensure_redis, find_redis_server
from infra.redis_client import REDIS_ERRORS, RedisLike, create_redis, is_cluster, scan_keys
from infra.settings import Settings
from tests.servers.redis_cluster import RedisClusterLauncher
from tests.servers.redis_server import RedisServer, free_port

# SET one key, append to a list, bump a hash field: three keys, one atomic script.
MULTI_KEY_LUA = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[1])
local n = redis.call('HINCRBY', KEYS[3], 'n', 1)
return {redis.call('GET', KEYS[1]), redis.call('LLEN', KEYS[2]), n}
"""


def _tag(prefix: str = "t") -> str:
    return f"tm:{{{prefix}{uuid.uuid4().hex[:12]}:s}}"


async def _scan_set(client: RedisLike, pattern: str, count: int = 1000) -> list[bytes]:
    return [k async for k in scan_keys(client, pattern, count=count)]


# --- create_redis ------------------------------------------------------------------------
async def test_create_redis_returns_the_right_kind(any_redis_url: str) -> None:
    client = create_redis(any_redis_url, socket_timeout=2.0, max_connections=8)
    try:
        assert is_cluster(client) == any_redis_url.startswith("redis+cluster://")
        assert isinstance(client, RedisCluster) == is_cluster(client)
        key = f"{_tag()}:v"
        await client.set(key, "é-bytes", ex=60)
        # decode_responses=False: values come back as the bytes written.
        assert await client.get(key) == "é-bytes".encode()
        assert await client.ttl(key) > 0
    finally:
        await client.aclose()


async def test_bounded_pool_queues_instead_of_failing(redis_url: str) -> None:
    client = create_redis(redis_url, socket_timeout=2.0, max_connections=2)
    try:
        # Ten concurrent blocking calls on a pool of two: they wait their turn.
        key = f"{_tag()}:q"
        results = await asyncio.gather(*(client.blpop([key], timeout=0.05) for _ in range(10)))
        assert results == [None] * 10
    finally:
        await client.aclose()


def test_tls_schemes_build_tls_clients() -> None:
    # No TLS server here; what the client would connect with is checked without connecting.
    cluster = create_redis("rediss+cluster://127.0.0.1:7000", socket_timeout=1.0)
    assert isinstance(cluster, RedisCluster)
    assert cluster.get_connection_kwargs()["connection_class"] is SSLConnection
    standalone = create_redis("rediss://127.0.0.1:6380/2", socket_timeout=1.0)
    assert isinstance(standalone, Redis) and not is_cluster(standalone)
    pool_kwargs = standalone.connection_pool.connection_kwargs
    assert standalone.connection_pool.connection_class is SSLConnection
    assert (pool_kwargs["db"], pool_kwargs["socket_timeout"]) == (2, 1.0)


def test_unknown_scheme_and_cluster_db_are_rejected() -> None:
    with pytest.raises(ValueError, match="scheme"):
        create_redis("http://127.0.0.1:6379", socket_timeout=1.0)
    with pytest.raises(ValueError, match="database 0"):
        create_redis("redis+cluster://127.0.0.1:7000/3", socket_timeout=1.0)


# --- Lua on hash-tagged keys ---------------------------------------------------------------
async def test_multi_key_script_on_one_hash_tag(any_redis: RedisLike) -> None:
    base = _tag()
    keys = [f"{base}:meta", f"{base}:log", f"{base}:cpns"]
    assert len({key_slot(k.encode()) for k in keys}) == 1
    script = any_redis.register_script(MULTI_KEY_LUA)
    assert await script(keys=keys, args=["v1"]) == [b"v1", 1, 1]
    # After SCRIPT FLUSH (a restarted or failed-over Redis) EVALSHA misses; the script
    # object loads itself again on the node that owns the slot.
    await any_redis.script_flush()
    assert await script(keys=keys, args=["v2"]) == [b"v2", 2, 2]
    assert await any_redis.lrange(keys[1], 0, -1) == [b"v1", b"v2"]


@pytest.mark.cluster
async def test_script_runs_on_the_master_of_the_tag(redis_cluster: RedisClusterLauncher) -> None:
    client = create_redis(redis_cluster.url, socket_timeout=2.0)
    try:
        base = _tag()
        keys = [f"{base}:a", f"{base}:b", f"{base}:c"]
        await client.register_script(MULTI_KEY_LUA)(keys=keys, args=["x"])
        owner = redis_cluster.master_for_key(keys[0])
        with owner.client() as direct:
            assert direct.get(keys[0]) == b"x"
            assert direct.lrange(keys[1], 0, -1) == [b"x"]
        for other in redis_cluster.current_masters():
            if other.port != owner.port:
                with other.client() as direct, pytest.raises(MovedError):
                    direct.get(keys[0])
    finally:
        await client.aclose()


@pytest.mark.cluster
async def test_script_across_slots_is_refused(redis_cluster_url: str) -> None:
    client = create_redis(redis_cluster_url, socket_timeout=2.0)
    try:
        keys = [f"{_tag()}:a", f"{_tag()}:a"]
        assert key_slot(keys[0].encode()) != key_slot(keys[1].encode())
        with pytest.raises(ClusterCrossSlotError):
            await client.register_script(MULTI_KEY_LUA)(keys=[*keys, keys[0]], args=["x"])
        assert await client.exists(*keys) == 0
    finally:
        await client.aclose()


# --- scan_keys -----------------------------------------------------------------------------
async def test_scan_keys_finds_every_key(any_redis: RedisLike) -> None:
    run = uuid.uuid4().hex[:8]
    written = {f"tm:{{scan{run}-{i}:s}}:meta".encode() for i in range(60)}
    for key in written:
        await any_redis.set(key, b"1", ex=60)
    await any_redis.set(f"tm:{{other{run}:s}}:meta", b"1", ex=60)  # must not match
    # A small COUNT forces many cursor round trips per node.
    found = await _scan_set(any_redis, f"tm:{{scan{run}-*", count=5)
    assert set(found) == written


@pytest.mark.cluster
async def test_scan_keys_covers_every_master(redis_cluster: RedisClusterLauncher) -> None:
    client = create_redis(redis_cluster.url, socket_timeout=2.0)
    try:
        run = uuid.uuid4().hex[:8]
        written = {f"tm:{{m{run}-{i}:s}}:meta".encode() for i in range(60)}
        for key in written:
            await client.set(key, b"1", ex=60)
        found = await _scan_set(client, f"tm:{{m{run}-*")
        assert Counter(found) == Counter(written)
        per_master = {}
        for master in redis_cluster.current_masters():
            with master.client() as direct:
                per_master[master.port] = set(direct.scan_iter(match=f"tm:{{m{run}-*"))
        assert len(per_master) == 3
        assert all(per_master.values()), "60 random tags should land on every master"
        assert set().union(*per_master.values()) == written
    finally:
        await client.aclose()


# --- fast failure --------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
async def test_closed_port_fails_fast(scheme: str) -> None:
    client = create_redis(f"{scheme}://127.0.0.1:{free_port()}", socket_timeout=1.0)
    started = time.monotonic()
    try:
        with pytest.raises(REDIS_ERRORS):
            await client.set("tm:{a:b}:meta", b"1")
    finally:
        await client.aclose()
    assert time.monotonic() - started < 2.0


async def test_frozen_server_times_out_instead_of_hanging(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "frozen", appendonly=False).start()
    client = create_redis(server.url, socket_timeout=0.3)
    try:
        assert await client.ping()
        server.pause()  # SIGSTOP: the socket stays open, nothing answers
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            await client.get("tm:{a:b}:meta")
        assert time.monotonic() - started < 2.0
    finally:
        server.resume()
        await client.aclose()
        server.stop()


def test_cluster_connect_error_is_in_redis_errors() -> None:
    # Callers catch REDIS_ERRORS; the cluster's "cannot connect" is not a RedisError.
    assert not issubclass(RedisClusterException, RedisError)
    assert RedisClusterException in REDIS_ERRORS


# --- the embedded Redis --------------------------------------------------------------------
async def _config(url: str, name: str) -> str:
    client = create_redis(url, socket_timeout=2.0)
    try:
        reply = await client.config_get(name)
    finally:
        await client.aclose()
    # CONFIG GET replies are parsed to a dict of str even with decode_responses=False.
    value = dict(reply)[name]
    return value.decode() if isinstance(value, bytes) else str(value)


async def test_embedded_redis_persists_across_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    embedded = EmbeddedRedis(tmp_path)
    with caplog.at_level(logging.WARNING, logger="infra.embedded_redis"):
        url = await embedded.start()
    assert url.startswith("redis://127.0.0.1:")
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "embedded development Redis" in warning
    assert str(tmp_path / "redis") in warning and "TIERMEM_REDIS_URL" in warning
    try:
        assert await _config(url, "bind") == "127.0.0.1"
        assert await _config(url, "protected-mode") == "yes"
        assert await _config(url, "appendonly") == "yes"
        assert await _config(url, "appendfsync") == "everysec"
        assert await _config(url, "save") == ""
        assert Path(await _config(url, "dir")) == (tmp_path / "redis").resolve()
        client = create_redis(url, socket_timeout=2.0)
        await client.set("tm:{t:s}:meta", b"kept")
        await client.rpush("tm:{t:s}:log", b"turn-1", b"turn-2")
        await client.aclose()
    finally:
        await embedded.stop()
    assert not embedded.running
    assert (tmp_path / "redis" / "redis.log").exists()

    again = EmbeddedRedis(tmp_path)
    url2 = await again.start()
    try:
        client = create_redis(url2, socket_timeout=2.0)
        assert await client.get("tm:{t:s}:meta") == b"kept"
        assert await client.lrange("tm:{t:s}:log", 0, -1) == [b"turn-1", b"turn-2"]
        await client.aclose()
    finally:
        await again.stop()


async def test_embedded_stop_is_safe_after_the_process_died(tmp_path: Path) -> None:
    embedded = EmbeddedRedis(tmp_path)
    await embedded.stop()  # before start: nothing to do
    await embedded.start()
    assert embedded.pid is not None
    os.kill(embedded.pid, signal.SIGKILL)
    await asyncio.sleep(0.2)
    await embedded.stop()
    await embedded.stop()
    assert not embedded.running
    # The directory lock went with it: the same dir starts again.
    url = await embedded.start()
    try:
        client = create_redis(url, socket_timeout=2.0)
        assert await client.ping()
        await client.aclose()
    finally:
        await embedded.stop()


async def test_embedded_fixed_port_and_one_owner_per_dir(tmp_path: Path) -> None:
    port = free_port()
    first = EmbeddedRedis(tmp_path, port=port)
    assert await first.start() == f"redis://127.0.0.1:{port}/0"
    try:
        with pytest.raises(EmbeddedRedisError, match="used by another"):
            await EmbeddedRedis(tmp_path).start()
        assert first.running
    finally:
        await first.stop()


@pytest.fixture
def orphan_redis(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """What a tiermem killed by SIGKILL leaves behind: its redis-server, still serving
    tmp_path/redis, with a key written."""
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    port = free_port()
    orphan = subprocess.Popen(
        [
            find_redis_server(), "--port", str(port), "--bind", "127.0.0.1",
            "--dir", str(redis_dir), "--appendonly", "yes", "--save", "",
            "--pidfile", str(redis_dir / "redis.pid"),
            "--logfile", str(redis_dir / "orphan.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        RedisServer(redis_dir, port=port).wait_ready()
        with redis.Redis(port=port) as c:
            c.set("tm:{t:s}:meta", b"from-orphan")
        deadline = time.monotonic() + 5
        while not (redis_dir / "redis.pid").exists():
            assert time.monotonic() < deadline, "redis-server wrote no pid file"
            time.sleep(0.02)
        yield orphan
    finally:
        if orphan.poll() is None:
            orphan.kill()
        orphan.wait(5)


async def test_embedded_takes_over_a_server_left_running(
    tmp_path: Path, orphan_redis: subprocess.Popen[bytes]
) -> None:
    embedded = EmbeddedRedis(tmp_path)
    url = await embedded.start()
    try:
        assert orphan_redis.poll() is not None, "the old server must be gone"
        client = create_redis(url, socket_timeout=2.0)
        assert await client.get("tm:{t:s}:meta") == b"from-orphan"
        await client.aclose()
    finally:
        await embedded.stop()


async def test_ensure_redis_prefers_the_configured_url(tmp_path: Path, redis_url: str) -> None:
    url, embedded = await ensure_redis(Settings(redis_url=redis_url, data_dir=tmp_path))
    assert (url, embedded) == (redis_url, None)
    url, embedded = await ensure_redis(Settings(redis_url=None, data_dir=tmp_path))
    assert embedded is not None
    try:
        assert url == embedded.url
        assert (tmp_path / "redis" / "redis.log").exists()
    finally:
        await embedded.stop()


# --- the cluster launcher ------------------------------------------------------------------
@pytest.fixture(scope="module")
def replica_cluster(tmp_root: Path) -> Iterator[RedisClusterLauncher]:
    launcher = RedisClusterLauncher(tmp_root / "redis-cluster-replicas", 3, 1)
    launcher.start()
    yield launcher
    launcher.stop(remove_files=True)


@pytest.mark.cluster
def test_cluster_launcher_is_healthy(redis_cluster: RedisClusterLauncher) -> None:
    assert redis_cluster.url == f"redis+cluster://127.0.0.1:{redis_cluster.nodes[0].port}"
    assert len(redis_cluster.nodes) == 3
    owners = redis_cluster.slot_owners()
    assert len(owners) == 16384
    assert {n.port for n in owners.values()} == set(redis_cluster.ports)
    for node in redis_cluster.nodes:
        with node.client() as c:
            assert b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO")
    key = "tm:{tenant:session}:meta"
    assert owners[key_slot(key.encode())] is redis_cluster.master_for_key(key)


@pytest.mark.cluster
async def test_replicas_follow_their_masters_and_scan_skips_them(
    replica_cluster: RedisClusterLauncher,
) -> None:
    masters = [n for n in replica_cluster.nodes if n.role == "master"]
    replicas = [n for n in replica_cluster.nodes if n.role == "replica"]
    assert len(masters) == 3 and len(replicas) == 3
    assert {r.master_id for r in replicas} == {m.node_id for m in masters}
    client = create_redis(replica_cluster.url, socket_timeout=2.0)
    try:
        run = uuid.uuid4().hex[:8]
        written = {f"tm:{{r{run}-{i}:s}}:meta".encode() for i in range(30)}
        for key in written:
            await client.set(key, b"1", ex=60)
        # Wait until every replica holds its master's copies: a scan that visited
        # replicas too would now report each key twice.
        deadline = time.monotonic() + 10
        while True:
            held = 0
            for r in replicas:
                with r.client() as c:
                    c.execute_command("READONLY")
                    held += len(list(c.scan_iter(match=f"tm:{{r{run}-*")))
            if held == len(written) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert held == len(written)
        found = await _scan_set(client, f"tm:{{r{run}-*")
        assert Counter(found) == Counter(written)
    finally:
        await client.aclose()


@pytest.mark.cluster
async def test_killed_master_fails_over_to_its_replica(
    replica_cluster: RedisClusterLauncher,
) -> None:
    client = create_redis(replica_cluster.url, socket_timeout=1.0)
    key = f"{_tag()}:meta"
    try:
        await client.set(key, b"before")
        old = replica_cluster.master_for_key(key)
        with old.client() as c:
            assert c.execute_command("WAIT", 1, 2000) == 1  # the replica has it
        replica_cluster.kill9(old)
        deadline = time.monotonic() + 20
        while replica_cluster.master_for_key(key).port == old.port:
            assert time.monotonic() < deadline, "no failover"
            await asyncio.sleep(0.1)
        replica_cluster.wait_ok(timeout=20)
        new = replica_cluster.master_for_key(key)
        assert new.role == "replica" and new.master_id == old.node_id
        # The client still maps the slot to the dead node: a connection error makes it
        # refresh the slot map and retry on the promoted replica.
        assert await client.get(key) == b"before"
        await client.set(key, b"after")
        # The old master comes back as a replica of the new one; the cluster is whole.
        replica_cluster.restart(old)
        replica_cluster.wait_ok(timeout=20)
        assert len(replica_cluster.current_masters()) == 3
        with old.client() as c:
            assert c.info("replication")["role"] == "slave"
    finally:
        await client.aclose()
