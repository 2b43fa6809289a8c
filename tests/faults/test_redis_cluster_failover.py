"""Fault 7 of issue 5: a Redis Cluster master killed during writes.

A real cluster of 3 masters + 3 replicas on 127.0.0.1 (tests/servers/redis_cluster.py),
the real app on it, sessions writing turns; the master that owns some sessions'
slots is killed with SIGKILL and its replica takes over. The test counts the
acknowledged turns the failover lost and reports them; it asserts the bound that
asynchronous replication allows, that nothing is duplicated, and that every
session goes on after the failover.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.redis_client import create_redis
from memory.keys import SessionKeys
from tests.faults.conftest import (
    KEEP_LOG_WHOLE,
    TENANT,
    ReportFn,
    TurnWorkload,
    attempt_rows,
    audit,
    running,
)
from tests.harness import AppServer, make_settings
from tests.servers.fake_vllm import FakeVLLM
from tests.servers.redis_cluster import ClusterNodeProcess, RedisClusterLauncher

PER_GROUP = 3  # sessions on the victim master, and sessions on the others


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterLauncher]:
    """A cluster of this test's own (the suite's shared one has no replicas, and
    this test kills a node)."""
    launcher = RedisClusterLauncher(tmp_path / "cluster", masters=3, replicas_per_master=1)
    launcher.start()
    yield launcher
    launcher.stop(remove_files=False)


def pick_sessions(cluster: RedisClusterLauncher) -> tuple[ClusterNodeProcess, list[str], list[str]]:
    """(victim master, sessions whose slot it owns, sessions on the other masters)."""
    tag = uuid.uuid4().hex[:6]
    on_victim: list[str] = []
    elsewhere: list[str] = []
    victim: ClusterNodeProcess | None = None
    for i in range(1000):
        name = f"cf-{tag}-{i}"
        owner = cluster.master_for_key(SessionKeys(TENANT, name).meta)
        victim = victim or owner
        group = on_victim if owner is victim else elsewhere
        if len(group) < PER_GROUP:
            group.append(name)
        if len(on_victim) == len(elsewhere) == PER_GROUP:
            return victim, on_victim, elsewhere
    raise AssertionError("could not spread sessions over the masters")


LAG_S = 1.0
BURST_BYTES = 16 * 1024 * 1024


def write_burst(master: ClusterNodeProcess, session: str) -> None:
    """Writes BURST_BYTES to ``master`` under ``session``'s hash tag (so in a slot it
    owns). With its replica frozen, that fills the replication link's socket
    buffers, so whatever the master acknowledges next waits in its own memory."""
    with master.client(socket_timeout=10) as c:
        for i in range(2):
            c.set(f"burst-{i}:{{{TENANT}:{session}}}", b"x" * (BURST_BYTES // 2), ex=600)


def replica_of(cluster: RedisClusterLauncher, master: ClusterNodeProcess) -> ClusterNodeProcess:
    return next(n for n in cluster.nodes if n.master_id == master.node_id)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.parametrize(
    ("lag", "ack"),
    [("in_sync", "primary"), ("replica_lagging", "primary"), ("replica_lagging", "replica")],
)
async def test_master_killed_during_writes_reports_lost_turns_and_recovers(
    lag: str, ack: str, tmp_path: Path, cluster: RedisClusterLauncher, fault_llm: FakeVLLM,
    fault_report: ReportFn,
) -> None:  # fmt: skip
    """Six sessions write turns, three of them on one master; that master gets
    SIGKILL. Its replica is promoted after the cluster's node timeout (2 s here);
    meanwhile turns on it either complete once the client follows the new slot map
    (the commit retries for ``TIERMEM_COMMIT_DEADLINE_S``) or end with a retryable
    error and are retried with their ``turn_id``.

    What can be lost: Redis replication is asynchronous. The master runs the
    commit script, answers, and streams the write to its replica a moment later; a
    turn acknowledged in that moment and not yet on the replica is gone when the
    replica takes over. The pod then sees its L1 version ahead of L2, reloads and
    appends the session's next turn after what L2 has, so the session goes on; the
    lost turn is simply not in L2.

    ``in_sync``: the replica keeps up, as it does on one machine (microseconds
    behind). Each session writes one turn at a time, so at most its last
    acknowledged turn can be caught in flight: the test asserts lost <= sessions
    on the killed master (usually 0) and reports the count.

    ``replica_lagging``: the replica is frozen (SIGSTOP) and a 16 MB write burst
    fills the replication link, ``LAG_S`` before the master dies, as a replica
    behind by a slow link, a full sync or a busy host would be; it is thawed right
    after the kill. Every turn the master acknowledged meanwhile is lost: the test
    asserts that some are, that they are exactly turns of the killed master's
    sessions acknowledged after the replica fell behind, and reports how many.
    This is the loss ``TIERMEM_ACK=replica`` prevents.

    ``replica_lagging`` with ``TIERMEM_ACK=replica``: each commit is followed by
    ``WAIT 1`` on its connection, so while the replica is frozen the victim's
    turns end with the retryable ``durability_timeout`` instead of ``done`` and
    are retried with their turn_id; the failover then loses only unacknowledged
    writes, which the retries store again on the promoted master. The killed
    master is started again (it rejoins as the new master's replica), since with
    one replica per master nothing could acknowledge the victim's turns before.
    The test asserts 0 acknowledged turns lost.

    Both: no duplicates, and every session commits new turns after the failover.

    What ``WAIT 1`` buys (``TIERMEM_ACK=replica``; not the default): ``WAIT numreplicas
    timeout`` blocks the caller until the writes it sent on that connection have
    reached ``numreplicas`` replicas, or the timeout passes, and returns how many
    did. Sent after the commit script, and with ``done`` held back until it
    returned 1, a turn would be acknowledged only once a replica holds it, so
    killing the master alone would no longer lose an acknowledged turn (with one
    replica per master, the one that acknowledged is the one promoted). It is not
    a transaction: on timeout the write is still on the master (the turn would have
    to end with a retryable error; the turn_id record makes the retry safe), a
    failover can still pick a replica that had not acknowledged when there are
    several, and both master and replica dying together still loses the write
    (WAITAOF, Redis 7.2+, adds the fsync). It costs a replication round trip on
    every commit (sub-millisecond on one host, more across zones) and stalls
    commits for up to the timeout while a replica is down or resyncing; on Redis
    Cluster it must go to the same node and connection as the write, which
    redis-py's cluster pipeline does not promise for a keyless command, so
    ``infra.redis_client.on_one_connection`` sends both on one connection of the
    slot's master. With the default ``primary`` a turn is acknowledged once its
    master has it.
    """
    victim, on_victim, elsewhere = pick_sessions(cluster)
    settings = make_settings(
        tmp_path, cluster.url, llm_url=fault_llm.base_url, archive_threshold=5,
        redis_socket_timeout_s=1.0, commit_deadline_s=6.0, ack=ack, ack_timeout_ms=500,
        **KEEP_LOG_WHOLE,
    )  # fmt: skip
    names = on_victim + elsewhere
    async with (
        AppServer(settings) as app,
        TurnWorkload(app.url, names, retry_delay_s=0.2, give_up_s=45, stagger_s=0.03) as workload,
    ):
        async with running(workload):
            await workload.wait_acked(4 * len(names), within_s=30)
            replica = replica_of(cluster, victim)
            lagging_from = time.monotonic()
            if lag == "replica_lagging":
                await asyncio.to_thread(replica.server.pause)
                await asyncio.to_thread(write_burst, victim, on_victim[0])
                await asyncio.sleep(LAG_S)
            killed_at = time.monotonic()
            await asyncio.to_thread(cluster.kill9, victim)
            dead_at = time.monotonic()
            await asyncio.to_thread(replica.server.resume)
            await asyncio.to_thread(cluster.wait_ok, 30)
            failed_over_at = time.monotonic()
            promoted = await asyncio.to_thread(
                cluster.master_for_key, SessionKeys(TENANT, on_victim[0]).meta
            )
            if ack == "replica":
                # The old master rejoins as the promoted one's replica: until it
                # has synced, WAIT 1 cannot be met on that shard.
                await asyncio.to_thread(cluster.restart, victim)
            # Every session, the victim's included, commits three more turns.
            marks = {s: len(workload.turns[s]) for s in names}

            async def moved_on() -> bool:
                acked = workload.acked_ids()
                return all(
                    sum(tid in acked for tid, _ in workload.turns[s][marks[s] :]) >= 3
                    for s in names
                )

            deadline = time.monotonic() + 45
            while not await moved_on():
                assert time.monotonic() < deadline, (
                    "sessions did not go on after the failover",
                    {
                        s: (
                            s in on_victim,
                            [a.code for a in workload.attempts[-300:] if a.session == s][-3:],
                        )
                        for s in names
                    },
                )
                await asyncio.sleep(0.1)
        # Not cluster.url: that names the first node, which may be the dead one.
        client = create_redis(f"redis+cluster://127.0.0.1:{promoted.port}", socket_timeout=2.0)
        try:
            result = await audit(client, workload)
        finally:
            await client.aclose()

    assert promoted is not victim and promoted.port != victim.port
    assert not workload.gave_up, workload.gave_up
    odd = [a for a in workload.attempts if a.outcome not in ("done", "error")]
    assert not odd, attempt_rows(odd)
    errors = workload.failed()
    assert all(a.retryable for a in errors), attempt_rows([a for a in errors if not a.retryable])
    assert result.duplicated == [], result.summary()
    assert result.gaps == [] and result.trimmed == [], result.summary()
    assert promoted.port == replica.port
    assert {tid.rsplit(".", 1)[0] for tid in result.lost} <= set(on_victim), result.lost
    acked_at = {a.turn_id: a.ended for a in workload.acked()}
    victim_ids = set(on_victim)
    durability_timeouts = [a for a in errors if a.code == "durability_timeout"]
    if ack == "replica":
        assert result.lost == [], result.summary()
        # The wait was exercised: the frozen replica held the victim's turns back.
        assert any(a.session in victim_ids for a in durability_timeouts), attempt_rows(errors)
    elif lag == "in_sync":
        assert len(result.lost) <= len(on_victim), result.summary()
    else:
        assert result.lost, "the lagging replica lost nothing: the test did not test anything"
        # Only what the master acknowledged once the replica had stopped reading
        # and before it died (50 ms for a write already in the replication stream;
        # 250 ms for a `done` on its way when the master died).
        stray = [t for t in result.lost if not lagging_from - 0.05 <= acked_at[t] <= dead_at + 0.25]
        assert not stray, [(t, acked_at[t] - lagging_from, dead_at - lagging_from) for t in stray]
    # Every turn that was not acknowledged was retried until it was: nothing the
    # workload sent is missing except what the failover lost.
    sent = {tid for turns in workload.turns.values() for tid, _ in turns}
    assert sent - set(result.stored) == set(result.lost)

    first_ack = min(
        (a.ended for a in workload.acked() if a.session in victim_ids and a.started > killed_at),
        default=float("inf"),
    )
    fault_report(
        fault=f"redis_cluster_master_kill9_{lag}_ack_{ack}", injected=1,
        acknowledged=result.acknowledged,
        lost=len(result.lost), duplicated=len(result.duplicated),
        recover_s=first_ack - killed_at, failover_s=round(failed_over_at - killed_at, 3),
        lost_turns=result.lost, renumbered=len(result.misnumbered),
        acked_while_lagging=sum(
            lagging_from <= t <= killed_at and tid.rsplit(".", 1)[0] in victim_ids
            for tid, t in acked_at.items()
        ) if lag == "replica_lagging" else 0,
        durability_timeouts=len(durability_timeouts),
        error_attempts_victim=sum(a.session in victim_ids for a in errors),
        error_attempts_others=sum(a.session not in victim_ids for a in errors),
    )  # fmt: skip
