"""Which skills' bodies to append to a turn: description keywords + embedding similarity.

Before the turn's LLM call the agent decides which skills of the catalog apply to the
user's message; their bodies go into the log at that turn (DESIGN.md: "a skill's body
... appended into the log at the turn that used them"). ``SkillDetector`` makes that
choice from plain ``(name, description)`` pairs (the catalog the stable prefix shows),
so it does not depend on how skills are stored or loaded.

**Index** (once per catalog, off the turn's path). Each skill is embedded as three
views, all skills in ONE ``embed`` call: its name (hyphens as spaces, "unit
conversion"), its description, and "name: description". The skill's vector is the mean
of its three unit vectors, so ``message . vector`` is the mean cosine over the views
(the name is a sharp summary, the description carries the "use when" cases). Keywords
are extracted from the name and the description: content words, lower-cased, accents
folded, stop-words out (English function words, the boilerplate of skill descriptions
such as "use when the user wants", and generic instruction verbs and adjectives such
as "write", "show", "short", "clear" that say how, not about what), reduced by a small
suffix stemmer (``_stem``). Each keyword weighs its IDF over the catalog scaled to
(0, 1]: ``ln((N + 1) / df) / ln(N + 1)``: a word one skill uses weighs 1, a word all
use almost nothing, on the same scale whatever the catalog's size.

**Detect** (on the turn's path): ONE ``embed`` call for the message (the embedder runs
in its own executor; MiniLM reads the first 254 word pieces), then numpy and a set
intersection per skill:

    similarity_j = mean cosine of the message with skill j's views
    keywords_j   = 1 - exp(-(sum of the IDF weights of skill j's keywords found in
                             the message) / KEYWORD_SATURATION)
    score_j      = similarity_j + keyword_weight * keywords_j

A skill is returned when ``score_j >= threshold`` and ``similarity_j >=
min_similarity`` (keywords alone never trigger a skill the embedding calls unrelated),
best first, at most ``max_active``, none of ``exclude``. A runner-up is kept only when
it scores at least ``second_ratio`` of the best: a second body costs prompt tokens, so
it has to be nearly as convincing as the first.

The keyword term saturates instead of being a fraction of the description's or of the
message's words: a long message (a pasted diff or transcript) must not dilute a clear
keyword ("commit", "minutes"), and a long description must not weaken its own.

The constants were tuned with the bundled MiniLM on the even half of
tests/data/skill_messages.json and checked on the odd half (``python
bench/skill_detector.py --tune`` re-runs the search; the plain run prints accuracy,
precision, recall and latency). With another embedder (hashing, an /embeddings
server) the detector works but the threshold is not tuned for its similarity scale.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from infra.embeddings import Embedder

# Tuned on the even half of tests/data/skill_messages.json with the bundled MiniLM.
DEFAULT_THRESHOLD = 0.20
DEFAULT_KEYWORD_WEIGHT = 0.35
DEFAULT_MIN_SIMILARITY = 0.10
DEFAULT_SECOND_RATIO = 0.85
KEYWORD_SATURATION = 2.0
# Characters of the message read for keywords and sent to the embedder: MiniLM reads
# only its first 254 word pieces (about 1,000-1,500 characters of English) anyway, and
# a pasted 100 kB log must not cost 100 kB of tokenising on the turn's path.
MAX_MESSAGE_CHARS = 2_000

_WORD_RE = re.compile(r"[a-z0-9]+")


def _words(block: str) -> list[str]:
    return block.split()


# English function words, and the words every skill description uses to say when it
# applies ("Use when the user asks for ..."), which say nothing about which skill.
_STOP_WORDS = frozenset(
    _words(
        """
    a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing done down during
    each either etc few for from further get gets getting got had has have having he her
    here hers him his how i if in into is it its itself just me more most my myself no
    nor not now of off on once one only or other our ours out over own same she should
    so some such than that the their theirs them then there these they this those
    through to too under until up very was we were what when where which while who whom
    why will with would you your yours yourself eg ie e g vs via per use used uses using
    user users want wants wanted wanting need needs needed ask asks asked asking help
    helps like make makes made way ways thing things something anything whether want
    please pls thanks thank hi hello hey ok okay let lets may might must shall also
    someone somebody new many much lot lots well really
    """
    )
    # Generic verbs and adjectives of instructions: they say how, not about what.
    + _words(
        """
    write writes writing written give gives show shows say says tell see keep keeps
    turn turns put take takes go look find try know list lists return returns explain
    explains follow follows handle handles handling check checks checked read reads
    open call improve improves improved complete completed share shares shared fit
    change changes different another number right without long short clear rough
    sense sensible time times work works point points type typed text value values
    pattern patterns project projects body line lines year years system systems
    structure structured focus focused missing
    """
    )
)


def _fold(text: str) -> str:
    """Lower-case, accents removed ("résumé" -> "resume")."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()


def _undouble(word: str) -> str:
    """'formatt' -> 'format', 'shipp' -> 'ship' (a doubled consonant a suffix left)."""
    if len(word) >= 4 and word[-1] == word[-2] and word[-1] not in "aeiouls":
        return word[:-1]
    return word


def _stem(word: str) -> str:
    """A light suffix stemmer: plural, -ing, -ed, -ation/-ate, -able/-ible, -ly, -e,
    and -ize folded to -ise. Both the descriptions and the messages go through it, so
    it only needs to map the forms of one word to one key, not to produce real roots."""
    if len(word) <= 3 or word.isdigit():
        return word
    if len(word) > 5:
        word = word.replace("iz", "is")  # organize -> organise (not "size")
    if word.endswith("tten"):
        word = word[:-3]  # written -> writ, rewritten -> rewrit (as write, rewrite)
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith(("sses", "xes", "ches", "shes")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        word = word[:-1]
    for suffix in ("ation", "ing", "ed", "ly", "able", "ible", "ate"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            word = word[: -len(suffix)]
            if suffix in ("ing", "ed"):
                word = _undouble(word)
            break
    if word.endswith("e") and len(word) > 4:
        word = word[:-1]
    return word


def content_stems(text: str) -> list[str]:
    """Stems of ``text``'s content words, in order (duplicates kept)."""
    out: list[str] = []
    for word in _WORD_RE.findall(_fold(text)):
        if word in _STOP_WORDS or len(word) < 2 or word.isdigit():
            continue
        stem = _stem(word)
        if stem not in _STOP_WORDS:
            out.append(stem)
    return out


def skill_views(name: str, description: str) -> list[str]:
    """The texts one skill is embedded as; its vector is their mean."""
    words = name.replace("-", " ").replace("_", " ")
    return [words, description, f"{words}: {description}"]


def keyword_weights(skills: Sequence[tuple[str, str]]) -> tuple[dict[str, float], ...]:
    """Per skill: its keywords (stems of name and description) and their IDF weight
    over this catalog, ``ln((N + 1) / df) / ln(N + 1)`` in (0, 1]."""
    sets = [
        set(content_stems(name.replace("-", " ")) + content_stems(description))
        for name, description in skills
    ]
    df: dict[str, int] = {}
    for stems in sets:
        for stem in stems:
            df[stem] = df.get(stem, 0) + 1
    n = len(sets)
    scale = math.log(n + 1) if n else 1.0
    return tuple(
        {stem: math.log((n + 1) / df[stem]) / scale for stem in sorted(stems)} for stems in sets
    )


@dataclass(frozen=True)
class Detection:
    """One skill chosen for a message. ``score`` is what the threshold applies to,
    ``similarity + keyword_weight * keyword term``; ``similarity`` is the mean cosine
    with the skill's views; ``keyword_hits`` are the matched keywords (stems),
    heaviest first."""

    name: str
    score: float
    keyword_hits: tuple[str, ...]
    similarity: float


@dataclass(frozen=True)
class Scores:
    """Every indexed skill's figures for one message, in catalog order."""

    names: tuple[str, ...]
    similarity: np.ndarray
    keyword_mass: np.ndarray  # sum of the IDF weights of the matched keywords
    score: np.ndarray
    hits: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class _Catalog:
    """What ``index`` computed, replaced as a whole (``detect`` never sees a mix)."""

    names: tuple[str, ...]
    vectors: np.ndarray  # (skills, dim): mean of each skill's unit view vectors
    keywords: tuple[dict[str, float], ...]
    # stem -> (skill index, weight) of every skill that has it: a message's keyword
    # pass costs its own words, whatever the catalog's size.
    postings: dict[str, tuple[tuple[int, float], ...]]

    @classmethod
    def build(
        cls, names: tuple[str, ...], vectors: np.ndarray, keywords: tuple[dict[str, float], ...]
    ) -> _Catalog:
        postings: dict[str, list[tuple[int, float]]] = {}
        for i, weights in enumerate(keywords):
            for stem, weight in weights.items():
                postings.setdefault(stem, []).append((i, weight))
        return cls(names, vectors, keywords, {k: tuple(v) for k, v in postings.items()})


class SkillDetector:
    """Chooses the skills whose bodies a turn appends; see the module docstring.

    ``index`` once per catalog (one ``embed`` call of 3 texts per skill), ``detect``
    per turn (one ``embed`` call of the message). ``index`` may run again with a new
    catalog; a ``detect`` running meanwhile uses either the old or the new one (calls
    of ``index`` must not overlap: the last to finish wins).
    Both raise what the embedder raises (``EmbeddingError``); a failed ``index``
    keeps the previous catalog.
    """

    def __init__(
        self,
        embedder: Embedder,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        max_active: int = 2,
        keyword_weight: float = DEFAULT_KEYWORD_WEIGHT,
        min_similarity: float = DEFAULT_MIN_SIMILARITY,
        second_ratio: float = DEFAULT_SECOND_RATIO,
    ) -> None:
        if max_active < 0:
            raise ValueError("max_active must be >= 0")
        if keyword_weight < 0:
            raise ValueError("keyword_weight must be >= 0")
        if not 0.0 <= second_ratio <= 1.0:
            raise ValueError("second_ratio must be within [0, 1]")
        self.embedder = embedder
        self.threshold = threshold
        self.max_active = max_active
        self.keyword_weight = keyword_weight
        self.min_similarity = min_similarity
        self.second_ratio = second_ratio
        self._catalog = _Catalog.build((), np.zeros((0, embedder.dim), dtype=np.float32), ())

    @property
    def names(self) -> tuple[str, ...]:
        """The indexed skills, in index order."""
        return self._catalog.names

    def keywords(self, name: str) -> dict[str, float]:
        """The keywords (stems) of one indexed skill and their IDF weights."""
        catalog = self._catalog
        return dict(catalog.keywords[catalog.names.index(name)])

    async def index(self, skills: Sequence[tuple[str, str]]) -> None:
        """Embed every skill's views (one ``embed`` call) and extract the keywords.

        Duplicate names are an error: the registry owns uniqueness, and keeping one
        of two silently would make detection depend on order."""
        pairs = [(str(name), str(description)) for name, description in skills]
        names = tuple(name for name, _ in pairs)
        if len(set(names)) != len(names):
            raise ValueError("duplicate skill names in the catalog")
        dim = self.embedder.dim
        if not pairs:
            self._catalog = _Catalog.build((), np.zeros((0, dim), dtype=np.float32), ())
            return
        texts = [view for name, description in pairs for view in skill_views(name, description)]
        flat = np.asarray(await self.embedder.embed(texts), dtype=np.float32)
        per_skill = len(texts) // len(pairs)
        vectors = flat.reshape(len(pairs), per_skill, dim).mean(axis=1)
        self._catalog = _Catalog.build(names, vectors, keyword_weights(pairs))

    async def detect(
        self,
        message: str,
        *,
        exclude: Collection[str] = (),
        vector: Sequence[float] | np.ndarray | None = None,
    ) -> list[Detection]:
        """The skills for ``message``, best first: score >= threshold, similarity >=
        min_similarity, at most ``max_active``, none of ``exclude`` (bodies already in
        the live context). Cost: one ``embed`` call, a (skills x dim) product.

        ``vector``: the message's embedding by the same embedder when the turn already
        has it (agent routing, L3 search); then no embedding is computed here. MiniLM
        reads only the first 254 word pieces, so the vector of the whole message and
        of its first MAX_MESSAGE_CHARS characters are the same for ordinary text."""
        catalog = self._catalog
        if not catalog.names or self.max_active == 0:
            return []
        text = message[:MAX_MESSAGE_CHARS]
        if not text.strip():
            return []
        if vector is None:
            (vector,) = await self.embedder.embed([text])
        array = np.asarray(vector, dtype=np.float32)
        if array.shape != (catalog.vectors.shape[1],):
            raise ValueError(
                f"vector has shape {array.shape}, expected ({catalog.vectors.shape[1]},)"
            )
        return self.select(self.scores(array, text), exclude)

    def scores(self, vector: np.ndarray, text: str) -> Scores:
        """Every skill's figures for a message already embedded as ``vector``
        (``text`` is the message as embedded, at most MAX_MESSAGE_CHARS)."""
        catalog = self._catalog
        similarity = catalog.vectors @ vector
        mass = np.zeros(len(catalog.names), dtype=np.float32)
        matched: dict[int, list[tuple[float, str]]] = {}
        for stem in set(content_stems(text)):
            for i, weight in catalog.postings.get(stem, ()):
                mass[i] += weight
                matched.setdefault(i, []).append((weight, stem))
        hits = tuple(
            tuple(k for _, k in sorted(matched.get(i, ()), reverse=True))
            for i in range(len(catalog.names))
        )
        score = similarity + self.keyword_weight * (1.0 - np.exp(-mass / KEYWORD_SATURATION))
        return Scores(catalog.names, similarity, mass, score, hits)

    def select(self, scores: Scores, exclude: Collection[str] = ()) -> list[Detection]:
        """Apply threshold, similarity floor, ``exclude``, ``max_active`` and the
        runner-up ratio to one message's scores."""
        out: list[Detection] = []
        for i in np.argsort(-scores.score, kind="stable"):
            name = scores.names[i]
            if name in exclude:
                continue
            score = float(scores.score[i])
            if score < self.threshold:
                break
            if out and self.second_ratio > 0 and score < self.second_ratio * out[0].score:
                break
            similarity = float(scores.similarity[i])
            if similarity < self.min_similarity:
                continue
            out.append(Detection(name, score, scores.hits[i], similarity))
            if len(out) >= self.max_active:
                break
        return out
