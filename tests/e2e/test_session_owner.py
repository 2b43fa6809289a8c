"""A session belongs to the user of its first turn (issue: bob's words must never
land in alice's session, nor be archived into her memories)."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from memory.l2_store import L2Store, SessionUserMismatch
from memory.models import SessionState, Turn
from tests.harness import AppServer, l2_round_trips, make_settings, post_turn


async def test_another_users_turn_is_409_and_writes_nothing(
    tmp_path: Path, any_redis_url: str
) -> None:
    session = f"s-{uuid.uuid4().hex[:8]}"
    a_settings = make_settings(tmp_path / "a", any_redis_url)
    b_settings = make_settings(tmp_path / "b", any_redis_url)
    async with (
        AppServer(a_settings) as pod_a,
        AppServer(b_settings) as pod_b,
        httpx.AsyncClient(timeout=30) as c,
    ):
        first = await post_turn(c, pod_a.url, session, "I am alice", user="alice")
        assert first.done["turn"] == 1
        # The pod holding the session (L1) and a pod that must load it (L2).
        for url in (pod_a.url, pod_b.url):
            r = await post_turn(c, url, session, "I am bob", user="bob")
            assert r.status_code == 409, r.body
            assert r.body == {
                "error": {"code": "session_user_mismatch",
                          "message": "this session belongs to another user"}
            }  # fmt: skip
        again = await post_turn(c, pod_b.url, session, "still alice", user="alice")
        assert again.done["turn"] == 2
        state = (await c.get(f"{pod_b.url}/v1/sessions/{session}")).json()
    assert state["user_id"] == "alice" and state["turn_count"] == 2
    assert [t["user"] for t in state["unarchived_turns"]] == ["I am alice", "still alice"]


async def test_a_new_sessions_first_turn_asks_l2_once_and_binds_its_user(
    tmp_path: Path, any_redis_url: str
) -> None:
    """The route's owner check finds no session in L2 and keeps it in L1 as new:
    the turn's own open does not ask again."""
    async with (
        AppServer(make_settings(tmp_path, any_redis_url)) as pod,
        httpx.AsyncClient(timeout=30) as c,
    ):
        session = f"s-{uuid.uuid4().hex[:8]}"
        before = l2_round_trips(pod.services)
        first = await post_turn(c, pod.url, session, "I am alice", user="alice", retrieve="never")
        assert first.done["turn"] == 1 and first.events[0].data["l1_hit"] is False
        # The load, the commit, the tenant's session index (4 when open asked again).
        assert l2_round_trips(pod.services) - before == 3
        r = await post_turn(c, pod.url, session, "I am bob", user="bob")
        assert r.status_code == 409, r.body


async def test_an_owner_check_without_its_turn_binds_no_one(
    tmp_path: Path, any_redis_url: str
) -> None:
    """A first turn refused after the route's owner check (the rate limits) never
    runs: the session it left in L1 as new is nobody's, so another user's first
    turn of that id is taken."""
    async with (
        AppServer(make_settings(tmp_path, any_redis_url)) as pod,
        httpx.AsyncClient(timeout=30) as c,
    ):
        session = f"s-{uuid.uuid4().hex[:8]}"
        await pod.services.sessions.check_owner("default", session, "alice")
        held = pod.services.l1.peek("default", session)
        assert held is not None and held.user_id is None and held.version == 0
        bob = await post_turn(c, pod.url, session, "I am bob", user="bob")
        assert bob.done["turn"] == 1, bob.body
        state = (await c.get(f"{pod.url}/v1/sessions/{session}")).json()
        assert state["user_id"] == "bob"
        alice = await post_turn(c, pod.url, session, "I am alice", user="alice")
        assert alice.status_code == 409, alice.body


async def test_the_commit_script_refuses_another_user(any_redis, any_redis_url: str) -> None:
    """Two first turns racing on two pods: the script that commits is the judge."""
    l2 = L2Store(any_redis, session_ttl_s=60, turn_record_ttl_s=60)
    session = f"s-{uuid.uuid4().hex[:8]}"
    state = await l2.load("default", session)
    assert state is None
    fresh = SessionState(tenant="default", session_id=session)
    turn = Turn.of_text(1, "t1", "hi", "hello")
    assert await l2.commit(fresh, turn, user_id="alice") == 1
    stale = SessionState(tenant="default", session_id=session, version=1, turn_count=1)
    with pytest.raises(SessionUserMismatch):
        await l2.commit(stale, Turn.of_text(2, "t2", "bob here", "x"), user_id="bob")
    stored = await l2.load("default", session)
    assert stored is not None and stored.turn_count == 1 and stored.user_id == "alice"
