"""From the pieces a hybrid search returned to ranked batches and the turns they
carry.

Milvus ranks pieces: chunks of several turns (as many as fit the embedder's
window) and summaries. A chunk says where to look, not which turn answers, and a
chunk's BM25 score mixes the words of all its turns (a chunk where several turns
each share a word with the query beats one whose single turn holds the rare
word asked about). So the ranking is finished here, at turn granularity, over the
few dozen candidate pieces:

- every turn of a candidate chunk gets a dense rank of its own among the
  candidate turns, from its turn code (memory/l3_codes.py: the turn's own
  vector at two bits a dimension, scored with the query's vector), and a BM25
  score of its own among the candidate turns (``_lexical``: the query's words,
  weighted by their rarity among the candidates);
- a turn scores ``1/(60 + dense rank) + coverage/(60 + its BM25 rank)``
  (reciprocal rank fusion again; the second term only when it shares a word with
  the query, weighed by how much of the query it holds); a summary piece scores
  the same way, by its own code;
- a batch scores by its best turn or summary and carries that one turn: the
  prompt and the memory event get the turn that matched, not its neighbours
  (measured on the recall bench, a second turn per batch bought less recall than
  the same characters spent on another batch's best turn).

Pieces without codes (rows written before turn codes existed) rank as they did:
a turn takes its chunk's fused rank (dense + BM25, from Milvus' RRF) instead of a
dense rank of its own, a batch carries up to ``MAX_TURNS`` turns (those whose
lexical score is within half of its best), or, when none of its turns shares a
word with the query (it matched by meaning alone), its best chunk whole: nothing
cheap says which of those turns it was.

All of it is arithmetic on a few hundred short texts: 1-3 ms.
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
    # The query's score against each turn's code (a summary: its one code), in
    # ``turns`` order; () when the piece has no codes.
    dense: tuple[float, ...] = ()


@dataclass
class RankedBatch:
    batch_id: str
    score: float
    lexical: float = 0.0  # its best turn's BM25 score: breaks ties of ``score``
    turns: list[tuple[int, str]] = field(default_factory=list)
    summary: str | None = None


def _lexical(query: list[str], texts: list[str]) -> tuple[list[float], list[float]]:
    """Okapi BM25 of each text for the query words, and the share of the query's
    IDF weight it holds (its coverage), both with IDF over ``texts`` themselves.

    Cheap on a few hundred turns: only a text holding a query word as a substring
    is tokenised (the others cannot hold it as a word and score 0), and a text's
    length, for BM25's length normalisation, is counted in characters."""
    n = len(texts)
    wanted = set(query)
    bm25, coverage = [0.0] * n, [0.0] * n
    if not wanted or not n:
        return bm25, coverage
    counts: dict[int, Counter[str]] = {}
    for i, text in enumerate(texts):
        low = text.lower()
        if any(w in low for w in wanted):
            tf = Counter(w for w in _WORD.findall(low) if w in wanted)
            if tf:
                counts[i] = tf
    df = Counter(w for tf in counts.values() for w in tf)
    idf = {w: math.log(1.0 + (n - df[w] + 0.5) / (df[w] + 0.5)) for w in wanted}
    total = sum(idf.values()) or 1.0
    avg = sum(len(t) for t in texts) / n or 1.0
    for i, tf in counts.items():
        norm = _BM25_K1 * (1 - _BM25_B + _BM25_B * len(texts[i]) / avg)
        bm25[i] = sum(idf[w] * c * (_BM25_K1 + 1) / (c + norm) for w, c in tf.items())
        coverage[i] = sum(idf[w] for w in tf) / total
    return bm25, coverage


def rank(query: str, candidates: list[Candidate], k: int) -> list[RankedBatch]:
    """The ``k`` best batches of ``candidates`` (see the module docstring)."""
    turn_keys: list[tuple[str, int]] = []
    turn_text: dict[tuple[str, int], str] = {}
    turn_rank: dict[tuple[str, int], int] = {}
    turn_dense: dict[tuple[str, int], float] = {}
    summary_dense: dict[int, float] = {}  # candidate index -> its code's score
    for i, c in enumerate(candidates):
        if c.summary and len(c.dense) == 1:
            summary_dense[i] = c.dense[0]
        dense = c.dense if len(c.dense) == len(c.turns) else ()
        for j, (turn, text) in enumerate(c.turns):
            key = (c.batch_id, turn)
            if key in turn_text:
                # Another part of a long turn: one turn, its best rank and score.
                turn_text[key] += text
                turn_rank[key] = min(turn_rank[key], c.rank)
            else:
                turn_keys.append(key)
                turn_text[key] = text
                turn_rank[key] = c.rank
            if dense:
                turn_dense[key] = max(turn_dense.get(key, dense[j]), dense[j])
    bm25, cover = _lexical(terms(query), [turn_text[t] for t in turn_keys])
    lexical = dict(zip(turn_keys, bm25, strict=True))
    coverage = dict(zip(turn_keys, cover, strict=True))
    by_lexical = sorted((t for t in turn_keys if lexical[t] > 0), key=lambda t: -lexical[t])
    lex_rank = {t: i for i, t in enumerate(by_lexical)}
    # One dense ranking of every coded turn and summary among the candidates.
    coded: list[tuple[float, tuple[str, int] | int]] = [
        *((v, t) for t, v in turn_dense.items()),
        *((v, i) for i, v in summary_dense.items()),
    ]
    coded.sort(key=lambda item: -item[0])
    dense_rank = {key: r for r, (_, key) in enumerate(coded)}

    def score(key: tuple[str, int]) -> float:
        s = 1.0 / (RRF_K + dense_rank.get(key, turn_rank[key]) + 1)
        if key in lex_rank:
            # Weighed by how much of the query the turn holds: a turn that shares
            # one common word of it (a near miss on the same subject) must not
            # outrank a chunk that matched the question's meaning.
            s += coverage[key] / (RRF_K + lex_rank[key] + 1)
        return s

    batches: dict[str, RankedBatch] = {}
    best_chunk: dict[str, Candidate] = {}
    for i, c in enumerate(candidates):
        b = batches.setdefault(c.batch_id, RankedBatch(c.batch_id, 0.0))
        if c.summary:
            b.score = max(b.score, 1.0 / (RRF_K + dense_rank.get(i, c.rank) + 1))
            b.summary = b.summary or c.text
        else:
            best_chunk.setdefault(c.batch_id, c)
    scored = {key: score(key) for key in turn_keys}
    turns_of: dict[str, list[tuple[str, int]]] = {}
    for key in turn_keys:
        turns_of.setdefault(key[0], []).append(key)
        b = batches[key[0]]
        b.score = max(b.score, scored[key])
        b.lexical = max(b.lexical, lexical[key])
    ranked = sorted(batches.values(), key=lambda b: (-b.score, -b.lexical))[:k]
    for b in ranked:
        mine = turns_of.get(b.batch_id, [])
        hits = sorted((t for t in mine if lexical[t] > 0), key=lambda t: -scored[t])
        coded_turns = [t for t in mine if t in turn_dense]
        if coded_turns:
            best = max(coded_turns, key=scored.__getitem__)
            b.turns = [(best[1], turn_text[best])]
        elif hits:
            top = lexical[max(hits, key=lambda t: lexical[t])]
            keep = [t for t in hits if lexical[t] >= top / 2][:MAX_TURNS]
            b.turns = sorted((t[1], turn_text[t]) for t in keep)
        elif b.batch_id in best_chunk:
            chunk = best_chunk[b.batch_id]
            b.turns = [
                (t, turn_text[(b.batch_id, t)]) for t in dict.fromkeys(n for n, _ in chunk.turns)
            ]
    return ranked
