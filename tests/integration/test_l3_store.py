"""L3 store against real Milvus Lite files (one per module, plus a few short-lived
ones), with the hashing embedder so results are exact and fast."""

from __future__ import annotations

import ast
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from infra.embeddings import HashingEmbedder, OpenAIEmbedder
from infra.errors import Misconfigured, Unavailable
from infra.milvus import (
    AsyncMilvus,
    CollectionSpec,
    FieldSpec,
    FieldType,
    IndexSpec,
    MilvusError,
)
from memory.l3_store import (
    TEXT_MAX_BYTES,
    L3SchemaError,
    L3Store,
    L3Unavailable,
    MemoryRecord,
    batch_id_for,
    collection_spec,
    truncate_utf8,
)
from tests.servers.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
COLLECTION = "l3_test"


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="l3-test")
    yield pool
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def milvus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("milvus")


@pytest.fixture(scope="module")
async def store(milvus_dir: Path, executor: ThreadPoolExecutor) -> AsyncIterator[L3Store]:
    milvus = AsyncMilvus(str(milvus_dir / "l3.db"), None, executor)
    s = L3Store(milvus, HashingEmbedder(384, executor), COLLECTION, 384)
    await s.ensure_collection()
    yield s
    await s.aclose()
    await milvus.close()


def record(
    tenant: str,
    user: str,
    session: str,
    first: int,
    last: int,
    text: str,
    created_at: float = 1_700_000_000.0,
) -> MemoryRecord:
    return MemoryRecord(
        batch_id=batch_id_for(tenant, session, first, last),
        tenant=tenant,
        user_id=user,
        session_id=session,
        first_turn=first,
        last_turn=last,
        text=text,
        created_at=created_at,
    )


# --- batch ids ----------------------------------------------------------------------------


def test_batch_id_is_stable_distinct_and_validated() -> None:
    a = batch_id_for("acme", "s1", 0, 9)
    assert len(a) == 32 and int(a, 16) >= 0
    assert batch_id_for("acme", "s1", 0, 9) == a
    others = {
        batch_id_for("acme", "s1", 10, 19),
        batch_id_for("acme", "s2", 0, 9),
        batch_id_for("acme2", "s1", 0, 9),
        batch_id_for("acme", "s1", 0, 10),
        # No ambiguity at field boundaries.
        batch_id_for("a-b", "c", 1, 2),
        batch_id_for("a", "b-c", 1, 2),
    }
    assert a not in others and len(others) == 6
    # Pinned: rows already in L3 carry ids of this exact format, so a change here
    # would make every retried archive write a duplicate. sha256 needs no hash seed.
    assert a == "82497e0d6680036e40e7dd2f9b63a958"
    for bad in [("", "s", 0, 1), ("t", 's"', 0, 1), ("t", "s", 2, 1), ("t", "s", -1, 1)]:
        with pytest.raises(ValueError):
            batch_id_for(*bad)


def test_truncate_utf8_never_splits_a_character() -> None:
    text = "é" * 40_000  # 80,000 bytes
    cut = truncate_utf8(text)
    assert len(cut.encode("utf-8")) <= TEXT_MAX_BYTES
    assert cut == "é" * (TEXT_MAX_BYTES // 2)
    assert truncate_utf8("short") == "short"
    assert truncate_utf8("bad \ud800 surrogate") == "bad \ufffd surrogate"


# --- writes and reads ---------------------------------------------------------------------


async def test_upsert_twice_keeps_one_row_and_the_last_text(store: L3Store) -> None:
    first = record("t-up", "u1", "s1", 0, 9, "the user likes sailing on lakes")
    await store.upsert_batch(first)
    await store.upsert_batch(first)
    again = record("t-up", "u1", "s1", 0, 9, "the user likes sailing on lakes and rivers")
    await store.upsert_batch(again)
    assert await store.count("t-up") == 1
    [row] = await store.list_batches("t-up", "s1")
    assert row == again


async def test_search_never_leaks_across_tenants_or_users(store: L3Store) -> None:
    topics = ["mountain hiking in the alps", "baking sourdough bread", "learning the cello"]
    for i, topic in enumerate(topics):
        for tenant in ("iso-a", "iso-b"):
            # Near-identical texts in both tenants, same user id in both.
            text = f"user said they love {topic} ({tenant})"
            await store.upsert_batch(record(tenant, "alice", f"s{i}", 0, 9, text))
        await store.upsert_batch(record("iso-a", "bob", f"b{i}", 0, 9, f"bob loves {topic}"))
    leaks = 0
    for query in [*topics, "love", "user said they love baking sourdough bread (iso-b)"]:
        for tenant in ("iso-a", "iso-b"):
            hits = await store.search(tenant, "alice", query, k=10)
            assert len(hits) == 3
            leaks += sum(1 for h in hits if not h.text.endswith(f"({tenant})"))
            rows = {
                r.batch_id: r
                for s in ("s0", "s1", "s2")
                for r in await store.list_batches(tenant, s)
            }
            assert {h.batch_id for h in hits} == set(rows)
            assert all(rows[h.batch_id].user_id == "alice" for h in hits)
    assert leaks == 0
    # The filter, not only the store's post-check, keeps other tenants out: the
    # nearest row overall belongs to iso-b, yet iso-a still gets k hits of its own.
    for k in (1, 2):
        hits = await store.search("iso-a", "alice", "baking sourdough bread (iso-b)", k=k)
        assert len(hits) == k and all(h.text.endswith("(iso-a)") for h in hits)
    bob = await store.search("iso-a", "bob", "cello", k=10)
    assert len(bob) == 3 and all(h.text.startswith("bob") for h in bob)
    assert await store.search("iso-b", "bob", "cello", k=10) == []
    assert await store.search("iso-c", "alice", "cello", k=10) == []


async def test_search_respects_k_and_orders_by_score(store: L3Store) -> None:
    texts = {
        0: "the user's dog is called Biscuit and is a beagle",
        10: "the user prefers window seats on long flights",
        20: "the user is allergic to peanuts",
        30: "the user's beagle Biscuit hates baths",
        40: "the user works night shifts at a hospital",
    }
    for first, text in texts.items():
        await store.upsert_batch(record("rank", "u", "s", first, first + 9, text))
    hits = await store.search("rank", "u", "what is the user's dog Biscuit like", k=3)
    assert len(hits) == 3
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert {hits[0].first_turn, hits[1].first_turn} == {0, 30}
    assert hits[0].score > hits[2].score
    assert all(-1.0 <= s <= 1.0 + 1e-6 for s in scores)
    top = hits[0]
    assert top.session_id == "s" and top.last_turn == top.first_turn + 9
    assert top.text == texts[top.first_turn]
    assert len(await store.search("rank", "u", "beagle", k=1)) == 1
    assert len(await store.search("rank", "u", "beagle", k=50)) == 5
    assert await store.search("rank", "u", "   ", k=3) == []


async def test_count_and_list_batches(store: L3Store) -> None:
    # Inserted out of order; listed by first_turn.
    for first in (20, 0, 10):
        await store.upsert_batch(
            record("cnt", "u1", "s1", first, first + 9, f"batch {first}", created_at=float(first))
        )
    await store.upsert_batch(record("cnt", "u1", "s2", 0, 9, "other session"))
    await store.upsert_batch(record("cnt", "u2", "s3", 0, 9, "other user"))
    assert await store.count("cnt") == 5
    assert await store.count("cnt", user_id="u1") == 4
    assert await store.count("cnt", user_id="u1", session_id="s1") == 3
    assert await store.count("cnt", session_id="s3") == 1
    assert await store.count("cnt", user_id="nobody") == 0
    rows = await store.list_batches("cnt", "s1")
    assert [r.first_turn for r in rows] == [0, 10, 20]
    assert [r.text for r in rows] == ["batch 0", "batch 10", "batch 20"]
    assert rows[1] == record("cnt", "u1", "s1", 10, 19, "batch 10", created_at=10.0)
    assert await store.list_batches("cnt", "missing") == []
    assert await store.list_batches("other-tenant", "s1") == []


async def test_long_text_is_kept_whole_in_pieces(store: L3Store) -> None:
    """Longer than a VARCHAR field and than the embedder's window: stored as
    several pieces, none over either, and read back whole (nothing is cut)."""
    text = "ü" * 40_000 + " tail " + "word " * 3_000
    await store.upsert_batch(record("long", "u", "s", 0, 9, text))
    [row] = await store.list_batches("long", "s")
    assert row.text == text and row.cut is False
    rows = await store.milvus.query(
        store.collection, filter='tenant == "long"', output_fields=["text"], limit=100
    )
    assert len(rows) > 3
    for r in rows:
        assert len(r["text"].encode("utf-8")) <= TEXT_MAX_BYTES
        assert store.embedder.count_tokens(r["text"]) <= store.window


async def test_delete_user(store: L3Store) -> None:
    for i in range(3):
        await store.upsert_batch(record("del", "gone", f"s{i}", 0, 9, f"to forget {i}"))
    await store.upsert_batch(record("del", "stays", "k", 0, 9, "to keep"))
    await store.upsert_batch(record("del2", "gone", "s0", 0, 9, "other tenant, same user id"))
    assert await store.delete_user("del", "gone") == 3
    assert await store.count("del", user_id="gone") == 0
    assert await store.search("del", "gone", "forget", k=5) == []
    assert await store.count("del", user_id="stays") == 1
    assert await store.count("del2", user_id="gone") == 1
    assert await store.delete_user("del", "gone") == 0


# --- refusals -----------------------------------------------------------------------------


BAD_IDS = ["", 'x" or tenant != "', "a b", "t*", "{t}", "t:s", "é", "x" * 129]


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_queries_without_a_valid_tenant_are_refused(store: L3Store, bad: str) -> None:
    with pytest.raises(ValueError):
        await store.search(bad, "u", "anything", k=3)
    with pytest.raises(ValueError):
        await store.count(bad)
    with pytest.raises(ValueError):
        await store.list_batches(bad, "s")
    with pytest.raises(ValueError):
        await store.delete_user(bad, "u")
    with pytest.raises(ValueError):
        await store.search("t", bad, "anything", k=3)
    with pytest.raises(ValueError):
        await store.count("t", user_id=bad)
    with pytest.raises(ValueError):
        await store.list_batches("t", bad)
    rec = record("t", "u", "s", 0, 1, "x")
    for field in ("tenant", "user_id", "session_id", "batch_id"):
        with pytest.raises(ValueError):
            await store.upsert_batch(MemoryRecord(**{**rec.__dict__, field: bad}))


async def test_other_bad_arguments_are_refused(store: L3Store) -> None:
    with pytest.raises(ValueError):
        await store.search(None, "u", "q", k=3)  # type: ignore[arg-type]
    for k in (0, -1, 100_000, True):
        with pytest.raises(ValueError):
            await store.search("t", "u", "q", k=k)
    rec = record("t", "u", "s", 0, 1, "x")
    for change in ({"text": "  "}, {"first_turn": 5}, {"last_turn": -1}, {"batch_id": "b" * 65}):
        with pytest.raises(ValueError):
            await store.upsert_batch(MemoryRecord(**{**rec.__dict__, **change}))
    with pytest.raises(ValueError):
        L3Store(store.milvus, HashingEmbedder(8), COLLECTION, 384)
    with pytest.raises(ValueError):
        L3Store(store.milvus, HashingEmbedder(384), 'bad"name', 384)


# --- collection lifecycle -----------------------------------------------------------------


async def test_the_collection_has_its_fields_and_indexes(store: L3Store) -> None:
    """What infra/milvus.py built from the store's plain description."""
    name = store.collection
    assert name == COLLECTION + "_v2"
    described = await store.milvus.describe_collection(name)
    fields = {f["name"]: f for f in described["fields"]}
    assert list(fields) == [
        "piece_id", "batch_id", "tenant", "user_id", "session_id", "first_turn",
        "last_turn", "kind", "piece", "piece_first", "piece_last", "text", "created_at",
        "vector", "sparse", "codes",
    ]  # fmt: skip
    assert fields["piece_id"]["is_primary"] is True
    assert fields["batch_id"]["params"] == {"max_length": 64}
    assert fields["text"]["params"] == {"max_length": TEXT_MAX_BYTES, "enable_analyzer": "true"}
    assert fields["vector"]["params"] == {"dim": 384}
    assert fields["sparse"].get("is_function_output") is True
    assert [(f["type"].name, f["input_field_names"], f["output_field_names"])
            for f in described["functions"]] == [("BM25", ["text"], ["sparse"])]  # fmt: skip
    types = {n: f["type"].name for n, f in fields.items()}
    assert types == {
        "piece_id": "VARCHAR", "batch_id": "VARCHAR", "tenant": "VARCHAR",
        "user_id": "VARCHAR", "session_id": "VARCHAR", "first_turn": "INT64",
        "last_turn": "INT64", "kind": "VARCHAR", "piece": "INT64", "piece_first": "INT64",
        "piece_last": "INT64", "text": "VARCHAR", "created_at": "DOUBLE",
        "vector": "FLOAT_VECTOR", "sparse": "SPARSE_FLOAT_VECTOR", "codes": "VARCHAR",
    }  # fmt: skip
    assert described["enable_dynamic_field"] is False and described["auto_id"] is False
    assert described["properties"]["tiermem.embedder"] == "hash-v1-384"
    assert described["properties"]["tiermem.chunk_tokens"] == str(store.chunk_tokens)
    assert store.chunk_tokens == 2 * store.window == 2 * store.embedder.max_tokens
    indexes = {}
    for index in await store.milvus.call("list_indexes", name):
        info = await store.milvus.call("describe_index", name, index)
        indexes[info["field_name"]] = (info["index_type"], info["metric_type"])
    assert indexes == {
        "vector": ("AUTOINDEX", "COSINE"),
        "sparse": ("SPARSE_INVERTED_INDEX", "BM25"),
        "tenant": ("INVERTED", "NONE"),
        "user_id": ("INVERTED", "NONE"),
        "session_id": ("INVERTED", "NONE"),
    }


def _parse(path: Path) -> ast.Module:
    """``ast.parse``, tried again on CPython 3.11's spurious "AST constructor
    recursion depth mismatch" SystemError (python/cpython#106905: its depth
    tracking goes wrong now and then in a process with threads; the suite runs
    servers in threads)."""
    for attempt in range(3):
        try:
            return ast.parse(path.read_text(), str(path))
        except SystemError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def test_only_infra_imports_pymilvus() -> None:
    """memory/ reaches Milvus through infra/milvus.py alone."""
    offenders = []
    for path in sorted((ROOT / "memory").rglob("*.py")):
        for node in ast.walk(_parse(path)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "pymilvus"]
    assert offenders == []


def test_collection_spec_refuses_what_milvus_would() -> None:
    spec = collection_spec(384)
    assert [f.name for f in spec.fields if f.primary] == ["piece_id"]
    with pytest.raises(ValueError, match="max_length"):
        FieldSpec("x", FieldType.VARCHAR)
    with pytest.raises(ValueError, match="dim"):
        FieldSpec("v", FieldType.FLOAT_VECTOR)
    with pytest.raises(ValueError, match="primary"):
        CollectionSpec(fields=(FieldSpec("a", FieldType.INT64),))
    with pytest.raises(ValueError, match="unknown"):
        CollectionSpec(
            fields=(FieldSpec("a", FieldType.INT64, primary=True),),
            indexes=(IndexSpec("b", "INVERTED"),),
        )


def test_errors_belong_to_the_tiermem_hierarchy() -> None:
    unavailable, schema, milvus = L3Unavailable("down"), L3SchemaError("dim"), MilvusError("x")
    assert isinstance(unavailable, Unavailable) and isinstance(milvus, Unavailable)
    assert isinstance(schema, Misconfigured)
    assert (unavailable.code, unavailable.http_status, unavailable.retryable) == (
        "memory_unavailable", 503, True,
    )  # fmt: skip
    assert (schema.code, schema.http_status, schema.retryable) == (
        "memory_misconfigured", 500, False,
    )  # fmt: skip
    assert (milvus.code, milvus.http_status, milvus.retryable) == (
        "milvus_unavailable", 503, True,
    )  # fmt: skip
    assert str(unavailable) == "down" and unavailable.message == "down"


async def test_ensure_collection_is_idempotent_and_checks_the_dim(store: L3Store) -> None:
    await store.ensure_collection()
    again = L3Store(store.milvus, HashingEmbedder(384), COLLECTION, 384)
    await again.ensure_collection()
    await again.ensure_collection()
    await store.upsert_batch(record("ens", "u", "s", 0, 9, "seen by both stores"))
    assert await again.count("ens") == 1
    assert await store.ping()
    wrong = L3Store(store.milvus, HashingEmbedder(128), COLLECTION, 128)
    with pytest.raises(L3SchemaError, match="128"):
        await wrong.ensure_collection()


async def test_ensure_collection_refuses_another_embedder_of_the_same_size(
    store: L3Store,
) -> None:
    class OtherSpace(HashingEmbedder):
        def __init__(self) -> None:
            super().__init__(384)
            self.name = "minilm-l6-v2"

    other = L3Store(store.milvus, OtherSpace(), COLLECTION, 384)
    with pytest.raises(L3SchemaError, match="minilm-l6-v2"):
        await other.ensure_collection()
    assert await store.ping()


async def test_rows_survive_close_and_reopen(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    path = str(tmp_path / "nested" / "reopen.db")  # parent created on connect
    started = time.monotonic()
    milvus = AsyncMilvus(path, None, executor)
    s = L3Store(milvus, HashingEmbedder(384, executor), "reopen", 384)
    await s.upsert_batch(record("ro", "u", "s", 0, 9, "persisted across a close"))
    first_open = time.monotonic() - started
    await milvus.close()
    with pytest.raises(L3Unavailable, match="closed"):
        await s.count("ro")
    assert not await s.ping()

    started = time.monotonic()
    milvus = AsyncMilvus(path, None, executor)
    s = L3Store(milvus, HashingEmbedder(384, executor), "reopen", 384)
    try:
        assert await s.count("ro") == 1
        [hit] = await s.search("ro", "u", "persisted", k=3)
        assert hit.text == "persisted across a close"
    finally:
        await milvus.close()
    reopen = time.monotonic() - started
    # Generous bounds: they catch a pathological open (e.g. a model download), not jitter.
    assert first_open < 15.0 and reopen < 15.0


# --- failures -----------------------------------------------------------------------------


async def test_unreachable_milvus_raises_l3unavailable_quickly(
    executor: ThreadPoolExecutor,
) -> None:
    milvus = AsyncMilvus(f"http://127.0.0.1:{free_port()}", None, executor, timeout_s=1.0)
    s = L3Store(milvus, HashingEmbedder(384, executor), COLLECTION, 384)
    started = time.monotonic()
    with pytest.raises(L3Unavailable) as info:
        await s.ensure_collection()
    assert isinstance(info.value.__cause__, MilvusError)
    with pytest.raises(L3Unavailable):
        await s.upsert_batch(record("down", "u", "s", 0, 9, "waits in the outbox"))
    with pytest.raises(L3Unavailable):
        await s.search("down", "u", "q", k=3)
    with pytest.raises(L3Unavailable):
        await s.count("down")
    with pytest.raises(L3Unavailable):
        await s.list_batches("down", "s")
    with pytest.raises(L3Unavailable):
        await s.delete_user("down", "u")
    assert await s.ping() is False
    assert time.monotonic() - started < 5.0
    await milvus.close()


async def test_a_second_process_cannot_open_the_same_lite_file(
    store: L3Store, milvus_dir: Path
) -> None:
    code = (
        "import asyncio, sys\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from infra.milvus import AsyncMilvus, MilvusError\n"
        "async def main():\n"
        f"    m = AsyncMilvus({str(milvus_dir / 'l3.db')!r}, None, ThreadPoolExecutor(1), 2.0)\n"
        "    try:\n"
        "        await m.list_collections()\n"
        "    except MilvusError as exc:\n"
        "        print('refused:', exc)\n"
        "        return\n"
        "    print('opened')\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert stdout.decode().startswith("refused:"), (stdout + stderr[-2000:]).decode()
    assert await store.ping()


async def test_embedding_failure_raises_l3unavailable(store: L3Store) -> None:
    down = OpenAIEmbedder(f"http://127.0.0.1:{free_port()}/v1", "m", 384, timeout_s=1.0)
    # A collection of its own: the shared one is recorded as the hashing embedder's.
    s = L3Store(store.milvus, down, "l3_embedder_down", 384)
    try:
        with pytest.raises(L3Unavailable, match="embedding"):
            await s.upsert_batch(record("emb", "u", "s", 0, 9, "cannot embed this now"))
        with pytest.raises(L3Unavailable):
            await s.search("emb", "u", "query", k=2)
    finally:
        await down.aclose()
    assert await s.count("emb") == 0


async def test_rows_not_yet_flushed_are_flushed_soon_after_the_first_was_written(
    store: L3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Milvus Lite searches unflushed rows far slower: they are flushed at most
    ``LITE_FLUSH_AFTER_S`` after the first of them was written (later batches do
    not put that off), and at once when ``LITE_FLUSH_ROWS`` of them are waiting."""
    import memory.l3_store as l3_store

    assert store.milvus.is_local
    monkeypatch.setattr(l3_store, "LITE_FLUSH_AFTER_S", 0.3)
    loop = asyncio.get_running_loop()
    await store.upsert_batch(record("timed", "u", "s", 0, 9, "the first batch"))
    first = store._flush_timer
    await store.upsert_batch(record("timed", "u", "s", 10, 19, "the second batch"))
    assert first is not None and store._unflushed > 0
    # The second batch left the first one's timer as it was.
    assert store._flush_timer is first and not first.cancelled()
    # Past its deadline (timers run in deadline order, so it has fired), the flush
    # it started is awaited.
    await asyncio.sleep(max(0.0, first.when() - loop.time()) + 0.01)
    if store._flushing is not None:
        await store._flushing
    assert store._unflushed == 0 and store._flush_timer is None
    assert [r.text for r in await store.list_batches("timed", "s")] == [
        "the first batch", "the second batch",
    ]  # fmt: skip
    # Enough rows waiting: flushed by the write that made them enough, timer and all.
    rows = await store.upsert_batch(record("timed", "u", "s", 20, 29, "the third batch"))
    assert store._flush_timer is not None and store._unflushed == rows
    monkeypatch.setattr(l3_store, "LITE_FLUSH_ROWS", rows + 1)
    await store.upsert_batch(record("timed", "u", "s", 30, 39, "the fourth batch"))
    assert store._unflushed == 0 and store._flush_timer is None


async def test_rows_written_while_a_timed_flush_runs_get_the_next_one(store: L3Store) -> None:
    """A timer that fires while the last timed flush still runs arms another, so
    the rows it found are flushed even if no batch comes after them."""
    await store.upsert_batch(record("busy", "u", "s", 0, 9, "the first batch"))
    assert store._flush_timer is not None
    store._flush_timer.cancel()
    running = asyncio.get_running_loop().create_future()
    store._flushing = asyncio.ensure_future(running)
    try:
        store._start_timed_flush()
        assert store._flush_timer is not None and store._unflushed > 0
    finally:
        running.set_result(None)
        await store._flushing
        store._flushing = None
