"""From the pieces a hybrid search returned to ranked batches and the turns they
carry.

Milvus ranks pieces: chunks of several turns (as many as fit the embedder's
window) and summaries. A chunk says where to look, not which turn answers, and a
chunk's BM25 score mixes the words of all its turns (a chunk where several turns
each share a word with the query beats one whose single turn holds the rare
word asked about). So the ranking is finished here, at turn granularity, over the
few dozen candidate pieces:

- every turn of a candidate chunk gets the chunk's fused rank (dense + BM25, from
  Milvus' RRF) and a BM25 score of its own among the candidate turns (``_bm25``:
  the query's words, weighted by their rarity among the candidates);
- a turn scores ``1/(60 + chunk rank) + 1/(60 + its BM25 rank)`` (reciprocal rank
  fusion again; the second term only when it shares a word with the query); a
  summary piece scores by its own rank;
- a batch scores by its best turn or summary, and carries its best turns (at most
  ``MAX_TURNS``; those whose lexical score is within half of its best), or, when
  none of its turns shares a word with the query (it matched by meaning alone),
  its best chunk whole: nothing cheap says which of those turns it was.

All of it is arithmetic on a few dozen short texts: well under a millisecond.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

MAX_TURNS = 2
RRF_K = 60
_BM25_K1 = 1.2
_BM25_B = 0.75
_WORD = re.compile(r"\w+", re.UNICODE)
# Words that match everything: function words, and the transcript's own labels.
_STOP_WORDS = (
    "a an and are as at be but by can did do does for from had has have he her his how "
    "i if in is it its me my of on or our she so that the their them there they this to "
    "was we were what when where which who why will with would you your user assistant "
    "turn about tell remember said say know"
)
_STOP = frozenset(_STOP_WORDS.split())


def terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


@dataclass(frozen=True)
class Candidate:
    """A piece the search returned, in fused order (``rank`` from 0)."""

    batch_id: str
    rank: int
    summary: bool
    turns: tuple[tuple[int, str], ...]  # a chunk's turns; () for a summary
    text: str


@dataclass
class RankedBatch:
    batch_id: str
    score: float
    lexical: float = 0.0  # its best turn's BM25 score: breaks ties of ``score``
    turns: list[tuple[int, str]] = field(default_factory=list)
    summary: str | None = None


def _idf(query: list[str], docs: list[list[str]]) -> dict[str, float]:
    """BM25's IDF of each query word over ``docs`` themselves."""
    n = len(docs)
    wanted = set(query)
    df = Counter(w for d in docs for w in set(d) if w in wanted)
    return {w: math.log(1.0 + (n - df[w] + 0.5) / (df[w] + 0.5)) for w in wanted}


def _bm25(idf: dict[str, float], docs: list[list[str]]) -> list[float]:
    """Okapi BM25 of each doc for the query whose word weights are ``idf``."""
    if not docs or not idf:
        return [0.0] * len(docs)
    avg = sum(len(d) for d in docs) / len(docs) or 1.0
    scores = []
    for d in docs:
        tf = Counter(w for w in d if w in idf)
        norm = _BM25_K1 * (1 - _BM25_B + _BM25_B * len(d) / avg)
        scores.append(sum(idf[w] * tf[w] * (_BM25_K1 + 1) / (tf[w] + norm) for w in tf))
    return scores


def _coverage(idf: dict[str, float], docs: list[list[str]]) -> list[float]:
    """Per doc, the share of the query's IDF weight it contains."""
    total = sum(idf.values()) or 1.0
    return [sum(idf[w] for w in idf.keys() & set(d)) / total for d in docs]


def rank(query: str, candidates: list[Candidate], k: int) -> list[RankedBatch]:
    """The ``k`` best batches of ``candidates`` (see the module docstring)."""
    turn_keys: list[tuple[str, int]] = []
    turn_text: dict[tuple[str, int], str] = {}
    turn_rank: dict[tuple[str, int], int] = {}
    for c in candidates:
        for turn, text in c.turns:
            key = (c.batch_id, turn)
            if key in turn_text:
                # Another part of a long turn: one turn, its best rank.
                turn_text[key] += text
                turn_rank[key] = min(turn_rank[key], c.rank)
            else:
                turn_keys.append(key)
                turn_text[key] = text
                turn_rank[key] = c.rank
    docs = [terms(turn_text[t]) for t in turn_keys]
    idf = _idf(terms(query), docs)
    lexical = dict(zip(turn_keys, _bm25(idf, docs), strict=True))
    coverage = dict(zip(turn_keys, _coverage(idf, docs), strict=True))
    by_lexical = sorted((t for t in turn_keys if lexical[t] > 0), key=lambda t: -lexical[t])
    lex_rank = {t: i for i, t in enumerate(by_lexical)}

    def score(key: tuple[str, int]) -> float:
        s = 1.0 / (RRF_K + turn_rank[key] + 1)
        if key in lex_rank:
            # Weighed by how much of the query the turn holds: a turn that shares
            # one common word of it (a near miss on the same subject) must not
            # outrank a chunk that matched the question's meaning.
            s += coverage[key] / (RRF_K + lex_rank[key] + 1)
        return s

    batches: dict[str, RankedBatch] = {}
    best_chunk: dict[str, Candidate] = {}
    for c in candidates:
        b = batches.setdefault(c.batch_id, RankedBatch(c.batch_id, 0.0))
        if c.summary:
            b.score = max(b.score, 1.0 / (RRF_K + c.rank + 1))
            b.summary = b.summary or c.text
        else:
            best_chunk.setdefault(c.batch_id, c)
    for key in turn_keys:
        b = batches[key[0]]
        b.score = max(b.score, score(key))
        b.lexical = max(b.lexical, lexical[key])
    ranked = sorted(batches.values(), key=lambda b: (-b.score, -b.lexical))[:k]
    for b in ranked:
        mine = [t for t in turn_keys if t[0] == b.batch_id]
        hits = sorted((t for t in mine if lexical[t] > 0), key=lambda t: -score(t))
        if hits:
            top = lexical[max(hits, key=lambda t: lexical[t])]
            keep = [t for t in hits if lexical[t] >= top / 2][:MAX_TURNS]
            b.turns = sorted((t[1], turn_text[t]) for t in keep)
        elif b.batch_id in best_chunk:
            chunk = best_chunk[b.batch_id]
            b.turns = [
                (t, turn_text[(b.batch_id, t)]) for t in dict.fromkeys(n for n, _ in chunk.turns)
            ]
    return ranked
