"""The session suite of the core issue, through real HTTP + SSE (httpx against
uvicorn), on standalone Redis and on a real 3-node Redis Cluster (``any_redis_url``)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest

from memory.l3_store import batch_id_for
from tests.harness import AppServer, l2_round_trips, make_settings, post_turn

TENANT = "default"  # auth off in these tests: the default tenant


def sid() -> str:
    return "s-" + uuid.uuid4().hex[:12]


async def wait_archived(c: httpx.AsyncClient, url: str, session: str, upto: int) -> dict:
    state: dict = {}
    for _ in range(200):
        state = (await c.get(f"{url}/v1/sessions/{session}")).json()
        if state["archived_upto"] >= upto:
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"archived_upto stuck at {state.get('archived_upto')}")


async def test_25_turns_make_exactly_two_batches(tmp_path: Path, any_redis_url: str) -> None:
    settings = make_settings(tmp_path, any_redis_url, archive_threshold=10)
    session = sid()
    async with AppServer(settings) as srv, httpx.AsyncClient(timeout=30) as c:
        dones = []
        for i in range(1, 26):
            r = await post_turn(c, srv.url, session, f"fact number {i}: the sky has {i} clouds.")
            assert r.status_code == 200
            dones.append(r.done)
            if i in (10, 20):
                # The turn that reached the threshold names its batch in `done`.
                first = i - 9
                assert r.done["usage"]["archived_batch"] == batch_id_for(TENANT, session, first, i)
                await wait_archived(c, srv.url, session, i)
            else:
                # Once: not again on the turns after it, archived yet or not.
                assert r.done["usage"]["archived_batch"] is None, i
        assert [d["turn"] for d in dones] == list(range(1, 26))
        state = await wait_archived(c, srv.url, session, 20)
        l3 = srv.services.l3
        batches = await l3.list_batches(TENANT, session)
        assert len(batches) == 2
        assert await l3.count(TENANT, session_id=session) == 2
        assert [(b.first_turn, b.last_turn) for b in batches] == [(1, 10), (11, 20)]
        text = "\n".join(b.text for b in batches)
        for i in range(1, 21):
            assert f"fact number {i}:" in text
        assert "fact number 21:" not in text
        assert state["running_summary"]
        assert "fact number 1" in state["running_summary"] or "turn 1" in state["running_summary"]
        assert state["turn_count"] == 25
        assert state["archived_upto"] == 20
        assert [t["turn"] for t in state["unarchived_turns"]] == [21, 22, 23, 24, 25]
        assert state["unarchived_turns"][0]["user"].startswith("fact number 21:")


async def test_l1_hit_is_one_redis_round_trip(tmp_path: Path, any_redis_url: str) -> None:
    settings = make_settings(tmp_path, any_redis_url, archive_threshold=100)
    session = sid()
    async with AppServer(settings) as srv, httpx.AsyncClient(timeout=30) as c:
        await post_turn(c, srv.url, session, "first")
        before = l2_round_trips(srv.services)
        r = await post_turn(c, srv.url, session, "second")
        assert r.events[0].data["l1_hit"] is True
        assert l2_round_trips(srv.services) - before == 1
        # A miss costs one round trip more (the load), not more than that.
        await c.post(f"{srv.url}/v1/sessions/{session}/release")
        before = l2_round_trips(srv.services)
        r = await post_turn(c, srv.url, session, "third")
        assert r.events[0].data["l1_hit"] is False
        assert l2_round_trips(srv.services) - before == 2
        assert r.done["turn"] == 3


async def test_crash_after_upsert_before_cursor_keeps_one_row(
    tmp_path: Path, any_redis_url: str
) -> None:
    from app.services import Services

    crashes = {"left": 1}

    async def crash(batch_id: str) -> None:
        if crashes["left"]:
            crashes["left"] -= 1
            raise RuntimeError("simulated crash between the L3 upsert and the L2 cursor move")

    settings = make_settings(tmp_path, any_redis_url, archive_threshold=5)
    services = Services(settings, archive_after_upsert=crash)
    session = sid()
    async with AppServer(settings, services) as srv, httpx.AsyncClient(timeout=30) as c:
        for i in range(5):
            await post_turn(c, srv.url, session, f"note {i}")
        archiver = services.archiver
        # Let the background attempt crash, then rerun the batch as the sweeper would.
        for _ in range(100):
            if not archiver.pending_tasks:
                break
            await asyncio.sleep(0.05)
        assert crashes["left"] == 0
        state = (await c.get(f"{srv.url}/v1/sessions/{session}")).json()
        assert state["archived_upto"] == 0  # the cursor did not move
        assert await services.l3.count(TENANT, session_id=session) == 1
        result = await archiver.archive_once(TENANT, session, force=False, ignore_backoff=True)
        assert result is not None and (result.first_turn, result.last_turn) == (1, 5)
        assert result.batch_id == batch_id_for(TENANT, session, 1, 5)
        assert await services.l3.count(TENANT, session_id=session) == 1
        state = (await c.get(f"{srv.url}/v1/sessions/{session}")).json()
        assert state["archived_upto"] == 5
        # Running it again finds nothing to do: still one row.
        assert await archiver.archive_once(TENANT, session, force=False) is None
        assert await services.l3.count(TENANT, session_id=session) == 1


async def test_two_instances_alternating(tmp_path: Path, any_redis_url: str) -> None:
    # Two pods on one Redis; each has its own Milvus Lite file (one process per
    # file), so the threshold is out of reach here: this is about L1/L2.
    a_settings = make_settings(tmp_path / "a", any_redis_url, archive_threshold=1000)
    b_settings = make_settings(tmp_path / "b", any_redis_url, archive_threshold=1000)
    session = sid()
    async with (
        AppServer(a_settings) as a,
        AppServer(b_settings) as b,
        httpx.AsyncClient(timeout=30) as c,
    ):
        versions = []
        for i in range(12):
            srv = a if i % 2 == 0 else b
            r = await post_turn(c, srv.url, session, f"message {i}")
            assert r.done["turn"] == i + 1
            versions.append(r.done["version"])
        assert versions == sorted(versions) and len(set(versions)) == len(versions)
        # Both pods now hold stale L1 copies at some point; concurrent turns on
        # both must still land once each, in a total order.
        results = await asyncio.gather(
            *[post_turn(c, (a if i % 2 else b).url, session, f"burst {i}") for i in range(6)]
        )
        assert all(r.done["status"] == "complete" for r in results)
        state = (await c.get(f"{a.url}/v1/sessions/{session}")).json()
        turns = state["unarchived_turns"]
        assert [t["turn"] for t in turns] == list(range(1, 19))
        users = [t["user"] for t in turns]
        assert users[:12] == [f"message {i}" for i in range(12)]
        assert sorted(users[12:]) == sorted(f"burst {i}" for i in range(6))
        assert len({t["turn_id"] for t in turns}) == 18
        assert state["version"] >= 18


@pytest.mark.parametrize("threshold", [3])
async def test_idle_tail_archived_by_sweeper(
    tmp_path: Path, redis_url: str, threshold: int
) -> None:
    settings = make_settings(tmp_path, redis_url, archive_threshold=threshold,
                             archive_idle_after=0.5)  # fmt: skip
    session = sid()
    async with AppServer(settings) as srv, httpx.AsyncClient(timeout=30) as c:
        await post_turn(c, srv.url, session, "only one turn")
        # The suite's Redis holds other tests' sessions too: look at this one.
        await srv.services.archiver.sweep_once()
        state = (await c.get(f"{srv.url}/v1/sessions/{session}")).json()
        assert state["archived_upto"] == 0  # not idle yet, under the threshold
        await asyncio.sleep(0.7)
        assert await srv.services.archiver.sweep_once() >= 1
        state = (await c.get(f"{srv.url}/v1/sessions/{session}")).json()
        assert state["archived_upto"] == 1
        batches = await srv.services.l3.list_batches(TENANT, session)
        assert [(b.first_turn, b.last_turn) for b in batches] == [(1, 1)]
