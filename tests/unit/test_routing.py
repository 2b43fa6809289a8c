"""Routing policies: distribution, stickiness, minimal movement, bounded load, health."""

from __future__ import annotations

from collections import Counter

import pytest

from infra.routing import NoReplicas, Pick, RendezvousRouter, RoundRobinRouter

REPLICAS = [f"http://vllm-{i}:8000/v1" for i in range(4)]
SESSIONS = [f"tenant:session-{i}" for i in range(4000)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def assignment(router: RendezvousRouter) -> dict[str, str]:
    return {s: router.pick(s).replica for s in SESSIONS}


def test_sessions_spread_evenly() -> None:
    counts = Counter(assignment(RendezvousRouter(REPLICAS)).values())
    assert set(counts) == set(REPLICAS)
    expected = len(SESSIONS) / len(REPLICAS)
    for n in counts.values():
        assert abs(n - expected) < 0.15 * expected


def test_a_session_sticks_to_its_replica() -> None:
    router = RendezvousRouter(REPLICAS)
    first = router.pick("t:s1")
    assert first == Pick(router.ranking("t:s1")[0], moved=False)
    for _ in range(20):
        assert router.pick("t:s1") == first
    # A router in another process agrees: weights do not depend on process state.
    assert RendezvousRouter(list(reversed(REPLICAS))).pick("t:s1") == first


def test_adding_a_replica_moves_only_sessions_to_it() -> None:
    router = RendezvousRouter(REPLICAS)
    before = assignment(router)
    new = "http://vllm-new:8000/v1"
    router.set_replicas([*REPLICAS, new])
    after = assignment(router)
    moved = [s for s in SESSIONS if before[s] != after[s]]
    assert all(after[s] == new for s in moved)
    # About 1/5 of the sessions move, not a reshuffle.
    assert 0.15 < len(moved) / len(SESSIONS) < 0.25


def test_removing_a_replica_moves_only_its_sessions() -> None:
    router = RendezvousRouter(REPLICAS)
    before = assignment(router)
    gone = REPLICAS[1]
    router.set_replicas([r for r in REPLICAS if r != gone])
    after = assignment(router)
    for s in SESSIONS:
        if before[s] != gone:
            assert after[s] == before[s]
        else:
            assert after[s] != gone


def test_bounded_load_moves_a_session_off_a_hot_replica() -> None:
    a, b = "http://a/v1", "http://b/v1"
    router = RendezvousRouter([a, b], load_factor=1.25)
    session = next(s for s in SESSIONS if router.ranking(s)[0] == a)
    # in-flight (0,0): mean with this request 0.5, bound 0.625; a has 0 -> a
    assert router.pick(session) == Pick(a, moved=False)
    router.acquire(a)
    # (1,0): mean 1.0, bound 1.25; a has 1 -> still a
    assert router.pick(session) == Pick(a, moved=False)
    router.acquire(a)
    # (2,0): mean 1.5, bound 1.875; a has 2 -> over, next in ranking
    assert router.pick(session) == Pick(b, moved=True)
    router.release(a)
    assert router.pick(session) == Pick(a, moved=False)
    assert router.in_flight(a) == 1


def test_load_stays_within_the_bound_under_skewed_traffic() -> None:
    router = RendezvousRouter(REPLICAS, load_factor=1.25)
    hot = [s for s in SESSIONS if router.ranking(s)[0] == REPLICAS[0]][:200]
    for s in hot * 3:
        pick = router.pick(s)
        bound = 1.25 * (sum(router.in_flight(r) for r in REPLICAS) + 1) / len(REPLICAS)
        assert router.in_flight(pick.replica) <= bound
        router.acquire(pick.replica)
    loads = [router.in_flight(r) for r in REPLICAS]
    assert sum(loads) == 600
    assert max(loads) <= 1.25 * 600 / 4 + 1


def test_unhealthy_replica_is_skipped_until_cooldown() -> None:
    clock = FakeClock()
    router = RendezvousRouter(REPLICAS, unhealthy_cooldown_s=5.0, clock=clock)
    ranked = router.ranking("t:s")
    router.mark_unhealthy(ranked[0])
    assert not router.is_healthy(ranked[0])
    assert router.pick("t:s") == Pick(ranked[1], moved=True)
    clock.now += 5.1
    assert router.pick("t:s") == Pick(ranked[0], moved=False)
    router.mark_unhealthy(ranked[0])
    router.mark_healthy(ranked[0])
    assert router.pick("t:s") == Pick(ranked[0], moved=False)


def test_all_unhealthy_still_returns_the_first_choice() -> None:
    router = RendezvousRouter(REPLICAS)
    for r in REPLICAS:
        router.mark_unhealthy(r)
    assert router.pick("t:s") == Pick(router.ranking("t:s")[0], moved=False)


def test_set_replicas_keeps_state_of_replicas_that_stay() -> None:
    router = RendezvousRouter(REPLICAS)
    router.acquire(REPLICAS[0])
    router.acquire(REPLICAS[3])
    router.mark_unhealthy(REPLICAS[0])
    router.set_replicas([REPLICAS[0], REPLICAS[1] + "/"])
    assert router.replicas == [REPLICAS[0], REPLICAS[1]]
    assert router.in_flight(REPLICAS[0]) == 1
    assert not router.is_healthy(REPLICAS[0])
    # A request that finishes on a removed replica is simply forgotten.
    router.release(REPLICAS[3])
    assert router.in_flight(REPLICAS[3]) == 0


def test_no_replicas() -> None:
    with pytest.raises(NoReplicas):
        RendezvousRouter().pick("t:s")
    with pytest.raises(NoReplicas):
        RoundRobinRouter().pick("t:s")


def test_load_factor_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        RendezvousRouter(REPLICAS, load_factor=0.9)


def test_round_robin_cycles_and_skips_unhealthy() -> None:
    router = RoundRobinRouter(REPLICAS[:3])
    picks = [router.pick("same-session").replica for _ in range(6)]
    assert picks == REPLICAS[:3] * 2
    router.mark_unhealthy(REPLICAS[1])
    picks = [router.pick("x").replica for _ in range(4)]
    assert REPLICAS[1] not in picks
    assert Counter(picks) == {REPLICAS[0]: 2, REPLICAS[2]: 2}
