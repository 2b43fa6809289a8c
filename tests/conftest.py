"""Shared fixtures: real servers the suite starts itself, on 127.0.0.1 only."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

# Every app the suite starts (in process, or as `tiermem serve`, which inherits
# this environment) answers with the canned development LLM unless a test sets
# another: with TIERMEM_LLM unset it would start the embedded vLLM engine, tens
# of seconds each. The real-engine suite (tests/engine) sets what it runs.
os.environ.setdefault("TIERMEM_LLM", "dev")

from infra.redis_client import RedisLike, create_redis
from tests.servers.redis_cluster import RedisClusterLauncher
from tests.servers.redis_server import RedisServer


@pytest.fixture(scope="session")
def tmp_root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="tiermem-tests-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(tmp_root: Path) -> Iterator[RedisServer]:
    """A standalone redis-server of the suite's own (never the machine's 6379)."""
    server = RedisServer(tmp_root / "redis-standalone").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster(tmp_root: Path) -> Iterator[RedisClusterLauncher]:
    """A real 3-master Redis Cluster (no replicas), started once for the session."""
    launcher = RedisClusterLauncher(tmp_root / "redis-cluster", masters=3).start()
    yield launcher
    launcher.stop(remove_files=True)


@pytest.fixture(scope="session")
def redis_cluster_url(redis_cluster: RedisClusterLauncher) -> str:
    return redis_cluster.url


@pytest.fixture(
    scope="session",
    params=["standalone", pytest.param("cluster", marks=pytest.mark.cluster)],
)
def any_redis_url(request: pytest.FixtureRequest) -> str:
    """The standalone URL, then the cluster URL: a test using it runs on both.

    The cluster is started only when a cluster-parametrised test runs, so
    ``-m "not cluster"`` never starts one.
    """
    name = "redis_cluster_url" if request.param == "cluster" else "redis_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
async def any_redis(any_redis_url: str) -> AsyncIterator[RedisLike]:
    """A client (create_redis) on ``any_redis_url``, closed after the test."""
    client = create_redis(any_redis_url, socket_timeout=2.0)
    yield client
    await client.aclose()
