"""What TIERMEM_ACK costs per turn: the commit's latency in each mode.

Starts its own servers on 127.0.0.1 (never the machine's Redis): a primary with
one real replica (``replica`` mode waits for it with WAIT 1), and, for ``aof``,
a primary with AOF on (WAITAOF 1 0; Redis >= 7.2: ``redis-server`` from PATH or
``--waitaof-server /path/to/valkey-server``), once with ``appendfsync always``
and once with ``everysec``. Each mode commits the same turns through
``L2Store.commit`` (the call the session facade makes before ``done``), one at a
time, over a few sessions, and prints the median and p99 of a commit.

    .venv/bin/python -m bench.ack_cost [--turns 1000] [--waitaof-server PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infra.redis_client import create_redis  # noqa: E402
from memory.l2_store import AckMode, L2Store  # noqa: E402
from memory.models import SessionState, Turn  # noqa: E402
from tests.integration.test_ack_modes import (  # noqa: E402
    BinaryRedisServer,
    wait_replica_online,
    waitaof_binary,
)
from tests.servers.redis_server import RedisServer, find_redis_server  # noqa: E402

SESSIONS = 8
REPLY = "a reply of a typical length, " * 12


async def measure(url: str, ack: AckMode, turns: int) -> list[float]:
    client = create_redis(url, socket_timeout=5.0)
    l2 = L2Store(client, session_ttl_s=3600, turn_record_ttl_s=3600, ack=ack,
                 ack_timeout_ms=4000)  # fmt: skip
    tag = uuid.uuid4().hex[:6]
    states = [SessionState(tenant="bench", session_id=f"ack-{tag}-{i}") for i in range(SESSIONS)]
    samples: list[float] = []
    try:
        for n in range(turns + SESSIONS):  # the first commit of each session is warm-up
            state = states[n % SESSIONS]
            index = state.turn_count + 1
            turn = Turn.of_text(index, f"t{index}", f"message {index} of {state.session_id}", REPLY)
            t0 = time.perf_counter()
            state.version = await l2.commit(state, turn, user_id="u")
            elapsed = time.perf_counter() - t0
            state.turn_count = index
            if n >= SESSIONS:
                samples.append(elapsed)
    finally:
        await client.aclose()
    return samples


def version_line(binary: str) -> str:
    return subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()


def row(name: str, samples: list[float], base: float | None) -> str:
    ordered = sorted(samples)
    med = statistics.median(ordered) * 1000
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
    extra = f"  (+{med - base:.3f} ms median)" if base is not None else ""
    return f"{name:<28} n={len(samples):>5}  median {med:7.3f} ms  p99 {p99:7.3f} ms{extra}"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=1000)
    ap.add_argument("--everysec-turns", type=int, default=40)
    ap.add_argument("--waitaof-server", default=None)
    args = ap.parse_args()
    print(await asyncio.to_thread(version_line, find_redis_server()))
    with tempfile.TemporaryDirectory(prefix="ack-cost-") as tmp:
        work = Path(tmp)
        # The replica modes run with AOF off on both, so only the wait differs.
        primary = RedisServer(work / "primary", appendonly=False).start()
        replica = RedisServer(
            work / "replica", appendonly=False,
            extra_args=["--replicaof", "127.0.0.1", str(primary.port)],
        ).start()  # fmt: skip
        try:
            wait_replica_online(primary.port)
            base_samples = await measure(primary.url, "primary", args.turns)
            base = statistics.median(base_samples) * 1000
            print(row("primary (no wait)", base_samples, None))
            print(row("replica (WAIT 1)", await measure(primary.url, "replica", args.turns), base))
        finally:
            replica.stop()
            primary.stop()
        binary = args.waitaof_server or waitaof_binary()
        if binary is None:
            print("aof: skipped, WAITAOF needs Redis >= 7.2 (pass --waitaof-server)")
            return
        print(await asyncio.to_thread(version_line, binary))
        for fsync, turns in (("always", args.turns), ("everysec", args.everysec_turns)):
            server = BinaryRedisServer(
                work / f"aof-{fsync}", binary, extra_args=["--appendfsync", fsync]
            ).start()
            try:
                prim = await measure(server.url, "primary", turns)
                print(row(f"primary, AOF {fsync}", prim, None))
                aof = await measure(server.url, "aof", turns)
                print(row(f"aof (WAITAOF), {fsync}", aof, statistics.median(prim) * 1000))
            finally:
                server.stop()


if __name__ == "__main__":
    asyncio.run(main())
