"""How an archived batch becomes the pieces L3 indexes, and back.

A batch is its transcript (``memory.summaries.transcript``: ``[turn N] user: ...``
lines) and, optionally, a summary. L3 embeds neither whole: the transcript of ten
turns is far longer than an embedding model reads (all-MiniLM-L6-v2 reads 254
word pieces; the median batch measured 1,488), and a vector of a cut text sees its
first turns only. So the transcript is cut into **chunks** of whole turns (two
embedder windows of them by default), and each turn is embedded on its own (a
turn longer than the window is split at word boundaries into parts, a chunk
each): nothing an embedding reads is cut. The summary, when there is one, is a
piece of its own. Every piece is one row (one dense vector: the mean direction
of its turns' vectors; one BM25 sparse vector; its exact text; its turns' codes);
chunks tile the transcript exactly, so the batch's text is their concatenation
and nothing of it is lost or cut.

Everything here is a pure function of the text, the window and the counter: the
same batch always gives the same pieces with the same keys, so a retried archive
upserts the rows it wrote before, never new ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

TURNS = "turns"
SUMMARY = "summary"
# A piece's text stays well under Milvus' VARCHAR cap whatever its token count (a
# long run of characters the tokenizer maps to few tokens).
PIECE_MAX_CHARS = 4_000

_TURN_START = re.compile(r"^\[turn (\d+)\] user: ", re.MULTILINE)
_TURN_PREFIX = re.compile(r"^\[turn \d+\] ", re.MULTILINE)
_WORDS = re.compile(r"\S+\s*|\s+")


@dataclass(frozen=True)
class Piece:
    kind: str  # TURNS or SUMMARY
    no: int  # position among the batch's pieces of its kind, from 0
    first: int  # turns it holds (a summary: the whole batch)
    last: int
    text: str  # exact text; chunks of a batch concatenate to its transcript


def piece_id(batch_id: str, kind: str, no: int) -> str:
    """The row key of a piece: derived from the batch id, so stable across retries."""
    return f"{batch_id}-{'t' if kind == TURNS else 's'}{no}"


def split_text(text: str, first: int, last: int) -> tuple[str | None, list[tuple[int, str]]]:
    """``(summary, segments)`` of a batch's stored text.

    ``segments`` are ``(turn, exact substring)``, one per turn, found at the
    ``[turn N] user:`` lines for N = first, first+1, ... in order (so a line of a
    message that imitates another turn stays text). What precedes the first turn
    is the summary (the archiver writes ``summary + "\\n\\n" + transcript``). A
    text with no turn lines is one segment of the whole batch (turn ``first``).
    """
    starts: list[tuple[int, int]] = []
    pos = 0
    for want in range(first, last + 1):
        # str.find, not a regex scan: this runs on every candidate row of every
        # search (about 60 a search at k = 10), and is three times faster.
        marker = f"[turn {want}] user: "
        at = text.find(marker, pos)
        while at > 0 and text[at - 1] != "\n":
            at = text.find(marker, at + 1)
        if at < 0:
            break
        starts.append((want, at))
        pos = at + len(marker)
    if not starts:
        return None, [(first, text)]
    head = text[: starts[0][1]]
    summary = head.removesuffix("\n\n").strip() or None
    segments = []
    for i, (turn, start) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else len(text)
        segments.append((turn, text[start:end]))
    return summary, segments


def embedding_text(text: str) -> str:
    """What is embedded of a piece: its text without the ``[turn N]`` labels
    (numbers that would pull every query with a number towards every chunk)."""
    return _TURN_PREFIX.sub("", text).strip()


def chunk(
    segments: list[tuple[int, str]],
    count: Callable[[str], int],
    window: int,
    row_tokens: int | None = None,
) -> list[Piece]:
    """Whole segments packed greedily into chunks of at most ``row_tokens`` tokens
    (default: ``window``), as ``count`` counts ``embedding_text``; a segment over
    the ``window`` (what one embedding reads) is split at word boundaries into
    parts of its own. So every turn of a chunk, and every part, fits the window.
    Concatenated in order, the chunks' texts are the segments'."""
    if window < 8:
        raise ValueError("window must be at least 8 tokens")
    rows = window if row_tokens is None else row_tokens
    if rows < window:
        raise ValueError("row_tokens must be at least the window")
    pieces: list[Piece] = []
    buf: list[tuple[int, str]] = []
    used = 0

    def flush() -> None:
        nonlocal buf, used
        if buf:
            text = "".join(s for _, s in buf)
            pieces.append(Piece(TURNS, len(pieces), buf[0][0], buf[-1][0], text))
        buf, used = [], 0

    for turn, seg in segments:
        n = count(embedding_text(seg))
        if n <= window and len(seg) <= PIECE_MAX_CHARS:
            if used + n > rows or sum(len(s) for _, s in buf) + len(seg) > PIECE_MAX_CHARS:
                flush()
            buf.append((turn, seg))
            used += n
            continue
        flush()
        for part in _split_long(seg, count, window):
            pieces.append(Piece(TURNS, len(pieces), turn, turn, part))
    flush()
    return pieces


def _split_long(seg: str, count: Callable[[str], int], window: int) -> list[str]:
    """``seg`` in consecutive parts of at most ``window`` tokens and
    ``PIECE_MAX_CHARS`` characters, cut after whitespace where it can be."""
    parts: list[str] = []
    cur = ""
    cur_n = 0
    for m in _WORDS.finditer(seg):
        word = m.group(0)
        # A "word" beyond either limit on its own is cut by characters.
        while len(word) > PIECE_MAX_CHARS // 2 or count(word) > window // 2:
            head, word = _halve(word, count, window)
            if cur:
                parts.append(cur)
                cur, cur_n = "", 0
            parts.append(head)
        n = count(word)
        if cur and (cur_n + n > window or len(cur) + len(word) > PIECE_MAX_CHARS):
            parts.append(cur)
            cur, cur_n = "", 0
        cur += word
        cur_n += n
    if cur:
        parts.append(cur)
    return parts


def _halve(word: str, count: Callable[[str], int], window: int) -> tuple[str, str]:
    """The longest head of ``word`` within half the window and half the character
    cap (at least one character), and the rest."""
    lo, hi = 1, min(len(word), PIECE_MAX_CHARS // 2)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(word[:mid]) <= window // 2:
            lo = mid
        else:
            hi = mid - 1
    return word[:lo], word[lo:]


def summary_pieces(
    summary: str, first: int, last: int, count: Callable[[str], int], window: int
) -> list[Piece]:
    """The summary as pieces that fit the window (one, for any sane summary)."""
    if count(summary) <= window and len(summary) <= PIECE_MAX_CHARS:
        parts = [summary]
    else:
        parts = _split_long(summary, count, window)
    return [Piece(SUMMARY, i, first, last, p) for i, p in enumerate(parts)]


def turns_of(piece: Piece) -> list[tuple[int, str]]:
    """The turns a chunk holds, with their text: its ``[turn N]`` segments; for a
    chunk without one (a later part of a long turn, or free text) the chunk itself
    as its one turn when it holds one turn, else nothing."""
    if piece.kind != TURNS:
        return []
    _, segments = split_text(piece.text, piece.first, piece.last)
    if len(segments) == 1 and not _TURN_START.match(segments[0][1]):
        return [(piece.first, piece.text)] if piece.first == piece.last else []
    return segments


def units(piece: Piece) -> list[str]:
    """What is embedded of a piece, one vector each: a chunk's turns (``turns_of``),
    or the piece whole (a summary, a part of a long turn, free text). Each fits the
    embedder's window (a chunk may hold more than one window of turns). A piece's
    own vector is the mean direction of its units' vectors; the units' vectors,
    coded, are its turn codes (memory/l3_codes.py)."""
    turns = turns_of(piece)
    return [embedding_text(text) for _, text in turns] if turns else [embedding_text(piece.text)]
