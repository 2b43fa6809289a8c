"""RedisCheckpointSaver on real Redis (standalone and Cluster), and under a real LangGraph graph."""

from __future__ import annotations

import asyncio
import operator
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver, Checkpoint, CheckpointMetadata
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from graph.checkpointer import RedisCheckpointSaver
from infra.redis_client import scan_keys
from memory.keys import SessionKeys

TTL_S = 3600


# Every test runs on the standalone server and on the 3-master cluster.
@pytest.fixture
def url(any_redis_url: str) -> str:
    return any_redis_url


@pytest.fixture
def client(any_redis: Redis | RedisCluster) -> Redis | RedisCluster:
    return any_redis


@pytest.fixture
def saver(client: Redis | RedisCluster) -> RedisCheckpointSaver:
    return RedisCheckpointSaver(client, ttl_s=TTL_S)


def new_thread() -> str:
    return f"t{uuid.uuid4().hex[:8]}:s{uuid.uuid4().hex}"


def keys_of(thread: str) -> SessionKeys:
    tenant, session = thread.split(":")
    return SessionKeys(tenant, session)


def cfg(thread: str, ns: str = "", checkpoint_id: str | None = None) -> RunnableConfig:
    conf: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ns}
    if checkpoint_id:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def make_checkpoint(
    saver: RedisCheckpointSaver, values: dict[str, Any], version: str | None = None
) -> Checkpoint:
    return Checkpoint(
        v=4,
        id=str(uuid6()),
        ts=datetime.now(UTC).isoformat(timespec="microseconds"),
        channel_values=values,
        channel_versions={k: version or saver.get_next_version(None, None) for k in values},
        versions_seen={},
        updated_channels=list(values),
    )


async def put_chain(
    saver: RedisCheckpointSaver,
    thread: str,
    n: int,
    ns: str = "",
    metadata: Any = None,
) -> list[RunnableConfig]:
    """``n`` checkpoints, each the child of the one before; their configs, oldest first."""
    configs: list[RunnableConfig] = []
    parent = cfg(thread, ns)
    for i in range(n):
        md: CheckpointMetadata = metadata(i) if metadata else {"source": "loop", "step": i}
        parent = await saver.aput(parent, make_checkpoint(saver, {"n": i}), md, {})
        configs.append(parent)
    return configs


async def thread_keys(client: Redis | RedisCluster, thread: str) -> set[bytes]:
    return {k async for k in scan_keys(client, f"{keys_of(thread).base}:*")}


def cp_id(config: RunnableConfig) -> str:
    return str(config["configurable"]["checkpoint_id"])


# --- the saver's own API ------------------------------------------------------------------


async def test_put_then_get_round_trips_checkpoint_and_metadata(saver: RedisCheckpointSaver):
    thread = new_thread()
    checkpoint = make_checkpoint(saver, {"messages": ["hi", {"role": "user"}], "count": 3})
    config: RunnableConfig = {
        "configurable": {"thread_id": thread, "checkpoint_ns": "", "run_label": "nightly"}
    }
    saved = await saver.aput(config, checkpoint, {"source": "input", "step": -1}, {})
    assert saved == cfg(thread, "", checkpoint["id"])

    latest = await saver.aget_tuple(cfg(thread))
    by_id = await saver.aget_tuple(saved)
    assert latest is not None and by_id is not None
    assert latest == by_id
    assert latest.config == saved
    assert latest.checkpoint == checkpoint
    # Like the Postgres saver, plain configurable values join the metadata.
    assert latest.metadata == {"source": "input", "step": -1, "run_label": "nightly"}
    assert latest.parent_config is None
    assert latest.pending_writes == []


async def test_unknown_thread_or_checkpoint_is_none(saver: RedisCheckpointSaver):
    thread = new_thread()
    assert await saver.aget_tuple(cfg(thread)) is None
    await put_chain(saver, thread, 1)
    assert await saver.aget_tuple(cfg(thread, "", str(uuid6()))) is None
    assert await saver.aget_tuple(cfg(thread, "other-ns")) is None


async def test_parent_config_links_each_checkpoint_to_the_one_before(
    saver: RedisCheckpointSaver,
):
    thread = new_thread()
    configs = await put_chain(saver, thread, 3)
    tuples = [await saver.aget_tuple(c) for c in configs]
    assert [t.parent_config if t else "missing" for t in tuples] == [None, configs[0], configs[1]]
    latest = await saver.aget_tuple(cfg(thread))
    assert latest is not None and latest.config == configs[2]


async def test_pending_writes_come_back_in_langgraph_order(saver: RedisCheckpointSaver):
    thread = new_thread()
    [config] = await put_chain(saver, thread, 1)
    await saver.aput_writes(config, [("b", 2), ("a", 1)], task_id="task-2", task_path="~0")
    await saver.aput_writes(config, [("c", {"x": 3})], task_id="task-1", task_path="~1")
    await saver.aput_writes(config, [("__error__", "boom")], task_id="task-3", task_path="~0")

    tup = await saver.aget_tuple(cfg(thread))
    assert tup is not None
    # writes_sort_key: (task_path, task_id, idx); the error channel has idx -1.
    assert tup.pending_writes == [
        ("task-2", "b", 2),
        ("task-2", "a", 1),
        ("task-3", "__error__", "boom"),
        ("task-1", "c", {"x": 3}),
    ]
    by_id = await saver.aget_tuple(config)
    assert by_id is not None and by_id.pending_writes == tup.pending_writes


async def test_regular_writes_are_kept_and_special_writes_replaced(saver: RedisCheckpointSaver):
    # The Postgres saver inserts regular writes (a retried task keeps the first)
    # and upserts calls made only of special channels (the last interrupt wins).
    thread = new_thread()
    [config] = await put_chain(saver, thread, 1)
    await saver.aput_writes(config, [("a", "first")], task_id="t")
    await saver.aput_writes(config, [("a", "second")], task_id="t")
    await saver.aput_writes(config, [("__interrupt__", "one")], task_id="t")
    await saver.aput_writes(config, [("__interrupt__", "two")], task_id="t")
    await saver.aput_writes(config, [], task_id="t")
    tup = await saver.aget_tuple(config)
    assert tup is not None
    assert tup.pending_writes == [("t", "__interrupt__", "two"), ("t", "a", "first")]


async def test_alist_orders_newest_first_with_before_and_limit(saver: RedisCheckpointSaver):
    thread = new_thread()
    configs = await put_chain(saver, thread, 6)
    ids = [cp_id(c) for c in configs]

    listed = [cp_id(t.config) async for t in saver.alist(cfg(thread))]
    assert listed == ids[::-1]

    before = [cp_id(t.config) async for t in saver.alist(cfg(thread), before=configs[3])]
    assert before == [ids[2], ids[1], ids[0]]

    limited = [cp_id(t.config) async for t in saver.alist(cfg(thread), limit=2)]
    assert limited == [ids[5], ids[4]]

    both = [cp_id(t.config) async for t in saver.alist(cfg(thread), before=configs[4], limit=2)]
    assert both == [ids[3], ids[2]]

    assert [t async for t in saver.alist(cfg(thread), limit=0)] == []

    one = [t async for t in saver.alist(configs[1])]
    assert [cp_id(t.config) for t in one] == [ids[1]]
    assert one[0].parent_config == configs[0]
    assert [t async for t in saver.alist(configs[1], before=configs[1])] == []


async def test_alist_pages_through_long_histories(client: Redis | RedisCluster):
    # More checkpoints than one ZREVRANGEBYLEX page or one record pipeline (100).
    saver = RedisCheckpointSaver(client)
    thread = new_thread()
    configs = await put_chain(
        saver, thread, 230, metadata=lambda i: {"step": i, "even": i % 2 == 0}
    )
    ids = [cp_id(c) for c in configs][::-1]
    assert [cp_id(t.config) async for t in saver.alist(cfg(thread))] == ids
    assert [cp_id(t.config) async for t in saver.alist(cfg(thread), limit=150)] == ids[:150]
    even = [cp_id(t.config) async for t in saver.alist(cfg(thread), filter={"even": True})]
    assert even == [cp_id(c) for c in configs[228::-2]]
    some = [
        cp_id(t.config)
        async for t in saver.alist(
            cfg(thread), filter={"even": True}, limit=70, before=configs[200]
        )
    ]
    assert some == [cp_id(c) for c in configs[198::-2]][:70]
    # JSON true is not 1.
    assert [t async for t in saver.alist(cfg(thread), filter={"even": 1})] == []


async def test_alist_filters_on_metadata(saver: RedisCheckpointSaver):
    thread = new_thread()
    configs = await put_chain(
        saver,
        thread,
        7,
        metadata=lambda i: {
            "source": "loop" if i % 2 else "input",
            "step": i,
            "parents": {"": f"root-{i % 3}"},
            "tags": ["a", "b"] if i == 6 else ["a"],
        },
    )
    ids = [cp_id(c) for c in configs]

    async def found(**kw: Any) -> list[str]:
        return [cp_id(t.config) async for t in saver.alist(cfg(thread), **kw)]

    assert await found(filter={"source": "loop"}) == [ids[5], ids[3], ids[1]]
    assert await found(filter={"source": "loop"}, limit=2) == [ids[5], ids[3]]
    assert await found(filter={"source": "input", "step": 4}) == [ids[4]]
    # Containment, as Postgres' `metadata @> filter`: nested maps and lists match by part.
    assert await found(filter={"parents": {"": "root-0"}}) == [ids[6], ids[3], ids[0]]
    assert await found(filter={"tags": ["b"]}) == [ids[6]]
    assert await found(filter={"source": "loop"}, before=configs[5]) == [ids[3], ids[1]]
    assert await found(filter={"source": "update"}) == []


async def test_namespaces_are_separate_and_merged_when_none_is_named(
    saver: RedisCheckpointSaver,
):
    thread = new_thread()
    root = await put_chain(saver, thread, 2)
    child = await put_chain(saver, thread, 2, ns="child:task-1")
    root2 = await put_chain(saver, thread, 1)

    latest_child = await saver.aget_tuple(cfg(thread, "child:task-1"))
    assert latest_child is not None and latest_child.config == child[1]
    assert latest_child.parent_config == child[0]
    latest_root = await saver.aget_tuple(cfg(thread))
    assert latest_root is not None and latest_root.config == root2[0]

    only_root = [t.config async for t in saver.alist(cfg(thread))]
    assert only_root == [root2[0], root[1], root[0]]
    everything = [t.config async for t in saver.alist({"configurable": {"thread_id": thread}})]
    assert everything == [root2[0], child[1], child[0], root[1], root[0]]


async def test_alist_without_config_searches_every_thread(
    saver: RedisCheckpointSaver, client: Redis | RedisCluster
):
    marker = uuid.uuid4().hex
    a, b = new_thread(), new_thread()
    await put_chain(saver, a, 2, metadata=lambda i: {"step": i, "marker": marker})
    await put_chain(saver, b, 1, metadata=lambda i: {"step": i, "marker": marker})
    await put_chain(saver, new_thread(), 1)
    # A key of another type under a namespace-set name holds nothing of ours.
    stray = keys_of(new_thread()).cp_namespaces
    await client.hset(stray, "n", 1)
    await client.expire(stray, 60)
    found = [t async for t in saver.alist(None, filter={"marker": marker})]
    assert sorted(t.config["configurable"]["thread_id"] for t in found) == sorted([a, a, b])
    ids = [cp_id(t.config) for t in found]
    assert ids == sorted(ids, reverse=True)


async def test_delete_thread_removes_every_key_of_that_thread_only(
    saver: RedisCheckpointSaver, client: Redis | RedisCluster
):
    gone, kept = new_thread(), new_thread()
    for thread in (gone, kept):
        configs = await put_chain(saver, thread, 3)
        await put_chain(saver, thread, 2, ns="sub:x")
        await saver.aput_writes(configs[-1], [("a", 1), ("__interrupt__", 2)], task_id="t")
    kept_before = await thread_keys(client, kept)
    # 5 records, 2 indexes, 1 writes hash, 1 namespace set.
    assert len(await thread_keys(client, gone)) == len(kept_before) == 9

    await saver.adelete_thread(gone)

    assert await thread_keys(client, gone) == set()
    assert await thread_keys(client, kept) == kept_before
    assert await saver.aget_tuple(cfg(gone)) is None
    assert [t async for t in saver.alist({"configurable": {"thread_id": gone}})] == []
    kept_latest = await saver.aget_tuple(cfg(kept))
    assert kept_latest is not None and kept_latest.pending_writes
    await saver.adelete_thread(gone)  # deleting nothing is fine


async def test_every_key_has_a_ttl_refreshed_by_writes(
    saver: RedisCheckpointSaver, client: Redis | RedisCluster
):
    thread = new_thread()
    configs = await put_chain(saver, thread, 2)
    await put_chain(saver, thread, 1, ns="sub")
    await saver.aput_writes(configs[-1], [("a", 1)], task_id="t")
    found = await thread_keys(client, thread)
    assert len(found) == 7
    for key in found:
        ttl = await client.ttl(key)
        assert 0 < ttl <= TTL_S, key

    k = keys_of(thread)
    await client.expire(k.cp_index(""), 5)
    await client.expire(k.cp_namespaces, 5)
    await put_chain(saver, thread, 1)
    assert await client.ttl(k.cp_index("")) > TTL_S - 60
    assert await client.ttl(k.cp_namespaces) > TTL_S - 60


async def test_a_record_gone_before_its_index_entry_is_skipped(
    saver: RedisCheckpointSaver, client: Redis | RedisCluster
):
    # Records expire one by one while every put refreshes the index: readers must
    # step over ids whose record has expired.
    thread = new_thread()
    configs = await put_chain(saver, thread, 3)
    k = keys_of(thread)
    await client.pexpire(k.cp("", cp_id(configs[2])), 1)
    await client.pexpire(k.cp("", cp_id(configs[0])), 1)
    await asyncio.sleep(0.05)
    latest = await saver.aget_tuple(cfg(thread))
    assert latest is not None and latest.config == configs[1]
    assert [t.config async for t in saver.alist(cfg(thread))] == [configs[1]]


async def test_max_history_prunes_oldest_records_and_their_writes(
    client: Redis | RedisCluster,
):
    saver = RedisCheckpointSaver(client, max_history=3)
    thread = new_thread()
    configs: list[RunnableConfig] = []
    parent = cfg(thread)
    for i in range(6):
        parent = await saver.aput(parent, make_checkpoint(saver, {"n": i}), {"step": i}, {})
        await saver.aput_writes(parent, [("out", i)], task_id="t")
        configs.append(parent)
    await put_chain(saver, thread, 2, ns="sub")

    k = keys_of(thread)
    ids = [cp_id(c) for c in configs]
    assert await client.zrange(k.cp_index(""), 0, -1) == [i.encode() for i in ids[3:]]
    for old in ids[:3]:
        assert not await client.exists(k.cp("", old), k.cp_writes("", old))
    for new in ids[3:]:
        assert await client.exists(k.cp("", new), k.cp_writes("", new)) == 2
    assert [t.config async for t in saver.alist(cfg(thread))] == configs[:2:-1]
    # Another namespace keeps its own history.
    assert len([t async for t in saver.alist(cfg(thread, "sub"))]) == 2


async def test_bytes_sent_per_put_do_not_grow_with_history(
    saver: RedisCheckpointSaver, client: Redis | RedisCluster
):
    thread = new_thread()
    k = keys_of(thread)

    async def net_in() -> int:
        if isinstance(client, RedisCluster):
            node = client.get_node_from_key(k.cp_index(""))
            # One target node: redis-py answers with that node's INFO, not a map by node.
            stats = await client.info("stats", target_nodes=node)
            return int(stats["total_net_input_bytes"])
        return int((await client.info("stats"))["total_net_input_bytes"])

    parent = cfg(thread)
    cost: dict[int, int] = {}
    record_len: dict[int, int] = {}
    for i in range(1, 201):
        # Same state size each time (fixed-width values): only the history grows.
        checkpoint = make_checkpoint(
            saver, {"summary": "x" * 200, "turn": 100_000 + i}, version=f"{i:032}.5"
        )
        metadata: CheckpointMetadata = {"source": "loop", "step": 1000 + i}
        if i in (10, 11, 12, 198, 199, 200):
            before = await net_in()
            parent = await saver.aput(parent, checkpoint, metadata, {})
            cost[i] = await net_in() - before
            record_len[i] = await client.strlen(k.cp("", cp_id(parent)))
        else:
            parent = await saver.aput(parent, checkpoint, metadata, {})
    # Other clients of the server can only add bytes: the least of three puts is
    # the put's own cost (plus one INFO request, the same each time).
    early = min(cost[10], cost[11], cost[12])
    late = min(cost[198], cost[199], cost[200])
    assert early > record_len[10]
    assert late == early
    assert record_len[200] == record_len[10]
    assert await client.zcard(k.cp_index("")) == 200


async def test_thread_ids_must_be_tenant_colon_session(saver: RedisCheckpointSaver):
    checkpoint = make_checkpoint(saver, {"n": 1})
    for bad in ("no-colon", "a:b:c", "a{x}:b", "a:*", ":s"):
        with pytest.raises(ValueError):
            await saver.aput(cfg(bad), checkpoint, {}, {})
        with pytest.raises(ValueError):
            await saver.aget_tuple(cfg(bad))
        with pytest.raises(ValueError):
            await saver.adelete_thread(bad)


async def test_constructor_rejects_bad_arguments(url: str, client: Redis | RedisCluster):
    with pytest.raises(ValueError):
        RedisCheckpointSaver(client, ttl_s=0)
    with pytest.raises(ValueError):
        RedisCheckpointSaver(client, max_history=0)
    text_client = Redis.from_url(url, decode_responses=True) if url.startswith("redis://") else None
    if text_client is not None:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisCheckpointSaver(text_client)
        await text_client.aclose()


def test_sync_api_points_to_the_async_one(saver: RedisCheckpointSaver):
    with pytest.raises(NotImplementedError, match="aget_tuple"):
        saver.get_tuple(cfg(new_thread()))
    with pytest.raises(NotImplementedError, match="alist"):
        list(saver.list(cfg(new_thread())))
    with pytest.raises(NotImplementedError, match="adelete_thread"):
        saver.delete_thread(new_thread())


def test_next_version_increases_as_strings(saver: RedisCheckpointSaver):
    versions = [saver.get_next_version(None, None)]
    for _ in range(20):
        versions.append(saver.get_next_version(versions[-1], None))
    assert versions == sorted(versions)
    assert len(set(versions)) == len(versions)
    assert saver.get_next_version(7, None).startswith(f"{8:032}.")  # type: ignore[arg-type]


# --- a real LangGraph graph on the saver ---------------------------------------------------


class Notes(TypedDict):
    notes: Annotated[list[str], operator.add]
    turns: int


def build_graph(saver: BaseCheckpointSaver[str], interrupt: bool = False) -> Any:
    async def think(state: Notes) -> dict[str, Any]:
        return {"notes": [f"think-{state.get('turns', 0)}"]}

    async def answer(state: Notes) -> dict[str, Any]:
        return {"notes": ["answer"], "turns": state.get("turns", 0) + 1}

    builder = StateGraph(Notes)
    builder.add_node("think", think)
    builder.add_node("answer", answer)
    builder.add_edge(START, "think")
    builder.add_edge("think", "answer")
    builder.add_edge("answer", END)
    return builder.compile(checkpointer=saver, interrupt_before=["answer"] if interrupt else None)


async def test_graph_state_accumulates_across_invocations(
    saver: RedisCheckpointSaver, client: Redis | RedisCluster
):
    graph = build_graph(saver)
    thread = new_thread()
    config = cfg(thread)

    first = await graph.ainvoke({"notes": ["user-1"], "turns": 0}, config)
    assert first == {"notes": ["user-1", "think-0", "answer"], "turns": 1}
    second = await graph.ainvoke({"notes": ["user-2"]}, config)
    assert second["notes"] == ["user-1", "think-0", "answer", "user-2", "think-1", "answer"]
    assert second["turns"] == 2

    # A new saver on the same Redis (another pod) sees the same state.
    other = build_graph(RedisCheckpointSaver(client))
    state = await other.aget_state(config)
    assert state.values == second
    assert state.next == ()

    history = [s async for s in other.aget_state_history(config)]
    # Each invocation: its input, then the input applied, after think, after answer.
    assert [s.metadata["step"] for s in history if s.metadata] == list(range(6, -2, -1))
    assert history[0].values == second
    assert history[-1].metadata is not None and history[-1].metadata["source"] == "input"
    ids = [s.config["configurable"]["checkpoint_id"] for s in history]
    assert ids == sorted(ids, reverse=True)
    assert [s.parent_config for s in history[:-1]] == [s.config for s in history[1:]]

    past = await other.aget_state(history[4].config)
    assert past.values == first
    assert len([s async for s in other.aget_state_history(config, limit=3)]) == 3
    inputs = [s async for s in other.aget_state_history(config, filter={"source": "input"})]
    assert [s.config for s in inputs] == [history[3].config, history[7].config]


async def test_graph_history_matches_langgraphs_in_memory_saver(saver: RedisCheckpointSaver):
    # The reference implementation, driven the same way, must tell the same story.
    thread = new_thread()
    config = cfg(thread)

    async def story(graph: Any) -> list[tuple[Any, ...]]:
        await graph.ainvoke({"notes": ["q1"], "turns": 0}, config)
        await graph.ainvoke(None, config)
        await graph.ainvoke({"notes": ["q2"]}, config)
        return [
            (
                s.values,
                s.next,
                s.metadata and (s.metadata["source"], s.metadata["step"]),
                [(t.name, t.error, t.interrupts) for t in s.tasks],
                s.parent_config is None,
            )
            async for s in graph.aget_state_history(config)
        ]

    ours = await story(build_graph(saver, interrupt=True))
    reference = await story(build_graph(InMemorySaver(), interrupt=True))
    assert len(ours) > 6
    assert ours == reference


async def test_interrupted_graph_resumes_from_its_checkpoint(
    saver: RedisCheckpointSaver, client: Redis | RedisCluster
):
    thread = new_thread()
    config = cfg(thread)
    paused = await build_graph(saver, interrupt=True).ainvoke({"notes": ["q"], "turns": 0}, config)
    assert paused == {"notes": ["q", "think-0"], "turns": 0}

    # Resume through a fresh saver and graph, as a different pod would.
    graph = build_graph(RedisCheckpointSaver(client), interrupt=True)
    state = await graph.aget_state(config)
    assert state.next == ("answer",)
    done = await graph.ainvoke(None, config)
    assert done == {"notes": ["q", "think-0", "answer"], "turns": 1}
    assert (await graph.aget_state(config)).next == ()


async def test_update_state_forks_from_a_past_checkpoint(saver: RedisCheckpointSaver):
    graph = build_graph(saver)
    thread = new_thread()
    config = cfg(thread)
    await graph.ainvoke({"notes": ["a"], "turns": 0}, config)
    await graph.ainvoke({"notes": ["b"]}, config)
    history = [s async for s in graph.aget_state_history(config)]
    first_done = history[4]
    assert first_done.values["turns"] == 1 and first_done.next == ()

    forked = await graph.aupdate_state(first_done.config, {"notes": ["edited"]})
    state = await graph.aget_state(forked)
    assert state.values["notes"] == ["a", "think-0", "answer", "edited"]
    assert state.parent_config == first_done.config
    # The fork is now the thread's latest checkpoint.
    assert (await graph.aget_state(config)).values == state.values
