"""Which LLM replica serves a request: routing policies as small swappable classes.

vLLM reuses KV-cache blocks only on the replica that computed them, so a
session should keep going to one replica. ``RendezvousRouter`` does that with
highest-random-weight (rendezvous) hashing of ``session_key`` x replica, which
moves only the sessions of a replica that leaves (and only about 1/n of them
to a replica that joins), bounded by load so one hot replica cannot take a
queue of sessions while others idle. ``RoundRobinRouter`` ignores sessions.

Routers are plain Python owned by one event loop: no locks, no I/O. The
replica set may change at run time (``set_replicas``, fed by discovery);
in-flight counts and health of replicas that stay are kept.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Pick:
    """A routing decision.

    ``moved`` is True when the session did not get its first-choice replica
    (that one was unhealthy or over its load bound): its prefix cache, if any,
    is elsewhere.
    """

    replica: str
    moved: bool


class NoReplicas(RuntimeError):
    """The router has no replica to offer (none configured or discovered yet)."""


class Router(Protocol):
    @property
    def replicas(self) -> list[str]: ...

    def pick(self, session_key: str) -> Pick: ...

    def acquire(self, replica: str) -> None: ...

    def release(self, replica: str) -> None: ...

    def in_flight(self, replica: str) -> int: ...

    def is_healthy(self, replica: str) -> bool: ...

    def mark_healthy(self, replica: str) -> None: ...

    def mark_unhealthy(self, replica: str) -> None: ...

    def set_replicas(self, replicas: Iterable[str]) -> None: ...


@dataclass
class _ReplicaState:
    in_flight: int = 0
    # monotonic time until which the replica is skipped; 0 = healthy
    unhealthy_until: float = 0.0


class _BaseRouter:
    """Replica bookkeeping shared by the policies: set, in-flight, health.

    An unhealthy replica is skipped for ``unhealthy_cooldown_s``, then tried
    again by real traffic (a success marks it healthy, a connect error marks
    it unhealthy again), so a replica that comes back is used without a
    separate prober.
    """

    def __init__(
        self,
        replicas: Iterable[str] = (),
        *,
        unhealthy_cooldown_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._states: dict[str, _ReplicaState] = {}
        self._order: list[str] = []
        self._cooldown = unhealthy_cooldown_s
        self._clock = clock
        self.set_replicas(replicas)

    @property
    def replicas(self) -> list[str]:
        return list(self._order)

    def set_replicas(self, replicas: Iterable[str]) -> None:
        new_order: list[str] = []
        for r in replicas:
            r = r.rstrip("/")
            if r and r not in new_order:
                new_order.append(r)
        self._states = {r: self._states.get(r) or _ReplicaState() for r in new_order}
        self._order = new_order

    def acquire(self, replica: str) -> None:
        state = self._states.get(replica)
        if state is not None:
            state.in_flight += 1

    def release(self, replica: str) -> None:
        # A replica removed while a request was in flight has no state left.
        state = self._states.get(replica)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1

    def in_flight(self, replica: str) -> int:
        state = self._states.get(replica)
        return state.in_flight if state is not None else 0

    def is_healthy(self, replica: str) -> bool:
        state = self._states.get(replica)
        return state is not None and state.unhealthy_until <= self._clock()

    def mark_healthy(self, replica: str) -> None:
        state = self._states.get(replica)
        if state is not None:
            state.unhealthy_until = 0.0

    def mark_unhealthy(self, replica: str) -> None:
        state = self._states.get(replica)
        if state is not None:
            state.unhealthy_until = self._clock() + self._cooldown

    def _require_replicas(self) -> None:
        if not self._order:
            raise NoReplicas("no LLM replica is configured or discovered yet")


class RoundRobinRouter(_BaseRouter):
    """Each request to the next healthy replica in turn; ``moved`` is always False.

    It has no notion of a session's replica, so it breaks prefix-cache
    locality; it is here as the baseline and for stateless workloads.
    """

    def __init__(
        self,
        replicas: Iterable[str] = (),
        *,
        unhealthy_cooldown_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._next = 0
        super().__init__(replicas, unhealthy_cooldown_s=unhealthy_cooldown_s, clock=clock)

    def pick(self, session_key: str) -> Pick:
        self._require_replicas()
        n = len(self._order)
        for i in range(n):
            replica = self._order[(self._next + i) % n]
            if self.is_healthy(replica):
                self._next = (self._next + i + 1) % n
                return Pick(replica, moved=False)
        # All unhealthy: trying one beats failing without a request.
        replica = self._order[self._next % n]
        self._next = (self._next + 1) % n
        return Pick(replica, moved=False)


def rendezvous_weight(session_key: str, replica: str) -> int:
    """The 64-bit weight of ``replica`` for ``session_key`` (same in every process)."""
    digest = hashlib.blake2b(
        replica.encode() + b"\x00" + session_key.encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


class RendezvousRouter(_BaseRouter):
    """Highest-random-weight hashing of session x replica, with bounded load.

    A session's replicas are ranked by ``rendezvous_weight``; it takes the
    first that is healthy and whose in-flight count is at most ``load_factor``
    times the mean in-flight count, the mean taken with the request being
    placed included ((total + 1) / n). Because that mean is above the least
    loaded replica's count, some healthy replica always qualifies when
    ``load_factor >= 1``.
    """

    def __init__(
        self,
        replicas: Iterable[str] = (),
        *,
        load_factor: float = 1.25,
        unhealthy_cooldown_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if load_factor < 1.0:
            raise ValueError("load_factor must be >= 1 (1 = perfectly even load)")
        self.load_factor = load_factor
        super().__init__(replicas, unhealthy_cooldown_s=unhealthy_cooldown_s, clock=clock)

    def ranking(self, session_key: str) -> list[str]:
        """All replicas, the session's first choice first."""
        return sorted(self._order, key=lambda r: rendezvous_weight(session_key, r), reverse=True)

    def pick(self, session_key: str) -> Pick:
        self._require_replicas()
        ranked = self.ranking(session_key)
        healthy = [r for r in ranked if self.is_healthy(r)]
        if not healthy:
            # Every replica failed recently: try the first choice rather than
            # refusing; a success there marks it healthy again.
            return Pick(ranked[0], moved=False)
        total = sum(self._states[r].in_flight for r in self._order)
        bound = self.load_factor * (total + 1) / len(self._order)
        for replica in healthy:
            if self._states[replica].in_flight <= bound:
                return Pick(replica, moved=replica != ranked[0])
        # Unreachable when every replica is healthy; with some unhealthy the
        # healthy ones may all exceed the bound: take the least loaded.
        replica = min(healthy, key=lambda r: self._states[r].in_flight)
        return Pick(replica, moved=replica != ranked[0])
