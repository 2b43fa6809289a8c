"""L3 finds what was said: any turn of a batch, by meaning or by a rare word, with
the real MiniLM embedder and Milvus Lite's BM25; one batch's rows stay its rows;
the schema before pieces keeps answering until ``tiermem reindex`` rebuilds it."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from infra.embeddings import MiniLMEmbedder, minilm_available
from infra.milvus import AsyncMilvus
from memory import l3_codes, l3_pieces
from memory.l3_reindex import reindex
from memory.l3_store import (
    CODES,
    REINDEXED_PROPERTY,
    V2_SUFFIX,
    L3SchemaError,
    L3Store,
    MemoryRecord,
    batch_id_for,
    collection_spec,
    legacy_collection_spec,
    pieces_of,
)
from memory.metrics import Metrics
from memory.models import Turn
from memory.summaries import transcript

ok, why = minilm_available()
pytestmark = pytest.mark.skipif(not ok, reason=f"the MiniLM model is not installed: {why}")

FILLER = [
    ("What is a good recipe for lentil soup?", "Simmer lentils with onion and cumin."),
    ("How long should I boil pasta?", "About nine minutes for spaghetti."),
    ("Can you suggest a side dish for roast chicken?", "Roasted carrots work well."),
    ("Is olive oil fine for frying?", "Yes, for medium heat."),
    ("What herbs go with tomatoes?", "Basil and oregano."),
    ("How do I keep bread fresh?", "Wrap it in cloth and keep it dry."),
    ("Which spices suit a curry?", "Turmeric, coriander and garam masala."),
    ("Should I salt the water for rice?", "A pinch is enough."),
    ("How ripe should bananas be for bread?", "Very ripe, with brown spots."),
]


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as ex:
        yield ex


@pytest.fixture(scope="module")
async def milvus(
    tmp_path_factory: pytest.TempPathFactory, executor: ThreadPoolExecutor
) -> AsyncIterator[AsyncMilvus]:
    m = AsyncMilvus(str(tmp_path_factory.mktemp("recall") / "l3.db"), None, executor)
    yield m
    await m.close()


@pytest.fixture(scope="module")
async def store(milvus: AsyncMilvus, executor: ThreadPoolExecutor) -> L3Store:
    embedder = MiniLMEmbedder(executor)
    await embedder.warmup()
    s = L3Store(milvus, embedder, "recall", 384, metrics=Metrics(), cpu=executor)
    await s.ensure_collection()
    return s


def _batch(
    tenant: str, user: str, session: str, first: int, pairs: list[tuple[str, str]]
) -> MemoryRecord:
    turns = [Turn.of_text(first + i, f"t{i}", u, a) for i, (u, a) in enumerate(pairs)]
    last = first + len(pairs) - 1
    return MemoryRecord(
        batch_id=batch_id_for(tenant, session, first, last), tenant=tenant, user_id=user,
        session_id=session, first_turn=first, last_turn=last, text=transcript(turns),
        created_at=1.0, summary="",
    )  # fmt: skip


async def _user_with_batches(
    store: L3Store, planted: dict[int, tuple[str, str]]
) -> tuple[str, str, dict[int, str]]:
    """Four batches of cooking talk for a new user; batch n's 6th turn replaced by
    ``planted[n]``. Returns the tenant, the user and batch ids by n."""
    tenant, user = "t" + uuid.uuid4().hex[:8], "u" + uuid.uuid4().hex[:6]
    ids = {}
    for n in range(4):
        pairs = [FILLER[(n + i) % len(FILLER)] for i in range(10)]
        if n in planted:
            pairs[5] = planted[n]
        rec = _batch(tenant, user, f"s{n}", 1, pairs)
        await store.upsert_batch(rec)
        ids[n] = rec.batch_id
    return tenant, user, ids


async def test_a_fact_in_the_middle_of_a_batch_is_found_by_its_meaning(store: L3Store) -> None:
    planted = {2: ("By the way, my sailboat is moored in Brest harbour.", "Lovely spot.")}
    tenant, user, ids = await _user_with_batches(store, planted)
    # No word in common with the batch's first turns, nor with the planted one.
    hits = await store.search(tenant, user, "Where do I dock my yacht?", 3)
    assert hits[0].batch_id == ids[2]
    # It says which turn matched, with its text; the prompt gets that, not the batch.
    matched = {m.turn: m.text for m in hits[0].matches}
    assert 6 in matched and "Brest" in matched[6]
    assert "Brest" in hits[0].text and len(hits[0].text) < 2_000
    assert hits[0].first_turn == 1 and hits[0].last_turn == 10
    # Batches come once each.
    assert len({h.batch_id for h in hits}) == len(hits)


async def test_a_rare_word_is_found_by_bm25_where_the_vectors_miss_it(store: L3Store) -> None:
    # Look-alike codes in the other batches: one vector is as near as another, and
    # only the exact token tells the right batch.
    planted = {
        n: (f"Note my parcel tracking code: {code}.", "Noted.")
        for n, code in enumerate(["QX7713ZB", "QX7731ZB", "QX3177ZB", "XQ7731BZ"])
    }
    tenant, user, ids = await _user_with_batches(store, planted)
    query = "QX7731ZB"
    hits = await store.search(tenant, user, query, 1)
    assert [h.batch_id for h in hits] == [ids[1]]
    assert [m.turn for m in hits[0].matches if "QX7731ZB" in m.text] == [6]
    # The dense list alone does not put it first: the BM25 list is what found it.
    [vector] = await store.embedder.embed([query])
    dense = await store.milvus.search(
        store.collection, [vector], filter=f'tenant == "{tenant}" and user_id == "{user}"',
        limit=50, output_fields=["batch_id"], anns_field="vector",
    )  # fmt: skip
    assert dense[0][0]["entity"]["batch_id"] != ids[1]


async def test_a_batch_archived_twice_has_exactly_its_rows(store: L3Store) -> None:
    tenant, user = "t" + uuid.uuid4().hex[:8], "alice"
    rec = _batch(tenant, user, "s", 11, [FILLER[i % 9] for i in range(10)])
    rec = MemoryRecord(**{**rec.__dict__, "summary": "The user asked about cooking."})
    expected = {
        l3_pieces.piece_id(rec.batch_id, p.kind, p.no)
        for p in pieces_of(rec, store.embedder.count_tokens, store.window, store.chunk_tokens)
    }
    for _ in range(3):  # the first archive, and two retries after crashes
        assert await store.upsert_batch(rec) == len(expected)
    rows = await store.milvus.query(
        store.collection, filter=f'tenant == "{tenant}"', output_fields=["piece_id"],
        limit=100, consistency_level="Strong",
    )  # fmt: skip
    assert {r["piece_id"] for r in rows} == expected and len(rows) == len(expected)
    assert await store.count(tenant) == 1
    [back] = await store.list_batches(tenant, "s")
    assert back.text == f"The user asked about cooking.\n\n{rec.text}"


async def test_other_tenants_and_users_find_nothing(store: L3Store) -> None:
    planted = {0: ("My locker code is ZEBRA-4451.", "Noted.")}
    tenant, user, _ = await _user_with_batches(store, planted)
    assert await store.search(tenant, user, "ZEBRA-4451 locker code", 5)
    assert await store.search(tenant, "mallory", "ZEBRA-4451 locker code", 5) == []
    assert await store.search("other" + tenant, user, "ZEBRA-4451 locker code", 5) == []


async def test_the_schema_before_pieces_answers_until_reindexed(
    milvus: AsyncMilvus, executor: ThreadPoolExecutor
) -> None:
    """A collection written by the one-row-per-batch schema: searched, listed and
    counted beside the pieces; ``reindex`` rebuilds it (twice is harmless), marks
    it, and then it is no longer read."""
    embedder = MiniLMEmbedder(executor)
    name = "before" + uuid.uuid4().hex[:6]
    await milvus.create_collection(
        name, legacy_collection_spec(384), properties={"tiermem.embedder": embedder.name}
    )
    await milvus.create_indexes(name, legacy_collection_spec(384).indexes)
    await milvus.load_collection(name)
    old = [
        _batch("acme", "bob", "s1", 1, [FILLER[i] for i in range(5)]),
        _batch("acme", "bob", "s1", 6, [("My cat is called Miso.", "Cute."), FILLER[0]]),
    ]
    rows = []
    for rec in old:
        text = f"Bob talked about food.\n\n{rec.text}"
        [vec] = await embedder.embed([text])
        rows.append({
            "batch_id": rec.batch_id, "tenant": "acme", "user_id": "bob", "session_id": "s1",
            "first_turn": rec.first_turn, "last_turn": rec.last_turn, "text": text,
            "created_at": 1.0, "vector": vec,
        })  # fmt: skip
    await milvus.upsert(name, rows)
    store = L3Store(milvus, embedder, name, 384, cpu=executor)
    await store.ensure_collection()
    assert store.reads_legacy
    assert await store.count("acme", user_id="bob") == 2
    hits = await store.search("acme", "bob", "what is my cat's name?", 2)
    assert hits[0].batch_id == old[1].batch_id and "Miso" in hits[0].text
    listed = await store.list_batches("acme", "s1")
    assert [b.first_turn for b in listed] == [1, 6]

    report = await reindex(store)
    assert (report.batches, report.rebuilt, report.skipped, report.marked) == (2, 2, 0, True)
    described = await milvus.describe_collection(name)
    assert described["properties"][REINDEXED_PROPERTY] == store.collection
    again = L3Store(milvus, embedder, name, 384, cpu=executor)
    await again.ensure_collection()
    assert not again.reads_legacy
    assert await again.count("acme", user_id="bob") == 2
    hits = await again.search("acme", "bob", "what is my cat's name?", 2)
    assert hits[0].batch_id == old[1].batch_id
    assert [m.turn for m in hits[0].matches][:1] == [6]
    rebuilt = await again.list_batches("acme", "s1")
    assert [(b.first_turn, b.summary) for b in rebuilt] == [
        (1, "Bob talked about food."),
        (6, "Bob talked about food."),
    ]
    assert [b.text for b in rebuilt] == [r["text"] for r in rows]
    # Resumable and idempotent: a second run finds everything done.
    second = await reindex(again)
    assert (second.rebuilt, second.skipped) == (0, 2)


async def test_what_the_model_would_cut_of_a_query_is_counted(store: L3Store) -> None:
    assert store.metrics is not None
    metric = store.metrics.registry
    before = metric.get_sample_value("tiermem_embedding_tokens_cut_total", {"what": "query"})
    await store.search("t-cut", "u", "short question", 1)
    after_short = metric.get_sample_value("tiermem_embedding_tokens_cut_total", {"what": "query"})
    assert (after_short or 0) == (before or 0)
    long_query = "sailing " * (store.embedder.max_tokens + 40)
    await store.search("t-cut", "u", long_query, 1)
    after = metric.get_sample_value("tiermem_embedding_tokens_cut_total", {"what": "query"})
    over = store.embedder.count_tokens(long_query) - store.embedder.max_tokens
    assert over >= 40 and (after or 0) - (before or 0) == over


async def test_the_turn_that_answers_comes_alone_among_near_misses_of_its_chunk(
    store: L3Store,
) -> None:
    """A question that shares no word with its answer, whose chunk also holds turns
    on the same subject: the turn codes pick the answer, and it comes alone."""
    tenant, user = "t" + uuid.uuid4().hex[:8], "u" + uuid.uuid4().hex[:6]
    pairs = [FILLER[i % len(FILLER)] for i in range(10)]
    pairs[4] = ("My colleague's daughter sings in a choir.", "Nice.")
    pairs[5] = ("I have started taking cello lessons on Tuesday evenings.", "Enjoy!")
    pairs[6] = ("The school band is giving a concert on Friday.", "Have fun.")
    rec = _batch(tenant, user, "s", 1, pairs)
    await store.upsert_batch(rec)
    chunks = pieces_of(rec, store.embedder.count_tokens, store.window, store.chunk_tokens)
    [holder] = [p for p in chunks if p.first <= 6 <= p.last]
    assert {5, 6, 7} <= set(range(holder.first, holder.last + 1))  # one chunk holds all three
    [hit] = await store.search(tenant, user, "Which stringed instrument am I learning?", 1)
    assert [m.turn for m in hit.matches] == [6]
    assert "cello" in hit.matches[0].text and "choir" not in hit.text and "band" not in hit.text


async def test_each_chunk_row_carries_a_code_for_each_of_its_turns(store: L3Store) -> None:
    tenant, user = "t" + uuid.uuid4().hex[:8], "u" + uuid.uuid4().hex[:6]
    rec = _batch(tenant, user, "s", 1, [FILLER[i % len(FILLER)] for i in range(10)])
    rec = MemoryRecord(**{**rec.__dict__, "summary": "The user asked about cooking."})
    await store.upsert_batch(rec)
    rows = await store.milvus.query(
        store.collection, filter=f'tenant == "{tenant}"', limit=100, consistency_level="Strong",
        output_fields=["kind", "piece", "piece_first", "piece_last", "text", "codes"],
    )  # fmt: skip
    assert rows
    for row in rows:
        piece = l3_pieces.Piece(row["kind"], row["piece"], row["piece_first"],
                                row["piece_last"], row["text"])  # fmt: skip
        units = l3_pieces.units(piece)
        vectors = await store.embedder.embed(units)
        # The codes are the signs of each unit's own vector, in order.
        assert row["codes"] == l3_codes.encode(vectors)
        assert len(l3_codes.scores(vectors[0], row["codes"], 384)) == len(units)
        if piece.kind == l3_pieces.TURNS:
            assert len(units) == piece.last - piece.first + 1


async def test_a_collection_from_before_turn_codes_keeps_answering(
    milvus: AsyncMilvus, executor: ThreadPoolExecutor
) -> None:
    """A pieces collection created before the codes field: written without codes,
    ranked by chunk, still finds and says which turn matched."""
    embedder = MiniLMEmbedder(executor)
    base = "nocodes" + uuid.uuid4().hex[:6]
    spec = collection_spec(384)
    before = dataclasses.replace(spec, fields=tuple(f for f in spec.fields if f.name != CODES))
    # As the default before codes filled it: chunks of one window.
    properties = {"tiermem.embedder": embedder.name, "tiermem.chunk_tokens": "254"}
    await milvus.create_collection(base + V2_SUFFIX, before, properties=properties)
    await milvus.create_indexes(base + V2_SUFFIX, before.indexes)
    store = L3Store(milvus, embedder, base, 384, cpu=executor)
    await store.ensure_collection()
    # The default setting follows the collection; an explicit other one is refused.
    assert (store.chunk_tokens, store.window) == (254, 254)
    with pytest.raises(L3SchemaError, match="chunks of 254 tokens"):
        await L3Store(milvus, embedder, base, 384, chunk_tokens=508).ensure_collection()
    planted = {2: ("By the way, my sailboat is moored in Brest harbour.", "Lovely spot.")}
    tenant, user, ids = await _user_with_batches(store, planted)
    hits = await store.search(tenant, user, "Brest harbour sailboat", 2)
    assert hits[0].batch_id == ids[2]
    assert 6 in {m.turn for m in hits[0].matches}
