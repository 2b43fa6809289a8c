"""The one rule for text that goes inside a labelled data block of the prompt.

Retrieved memories go in a ``<memory>`` block and the running summary in a
``<summary>`` block; both hold what users once said, so their text must never
open or close a block of its own. :func:`sanitise` neutralises every spelling
of ``<memory``, ``</memory``, ``<summary`` and ``</summary`` a model could read
as one, by writing its ``<`` as ``&lt;``.

How a tag is recognised. Each character is folded on its own: NFKC, then
casefold, then a short table of look-alikes NFKC leaves alone. On that skeleton
the tag is ``<`` + optional whitespace + optional ``/`` + optional whitespace +
the name, followed by a word boundary. Folding:

- dropped: format characters (category Cf: zero-width space, joiners, U+2060..
  U+2064, BOM, soft hyphen, U+180E, the bidi embeddings, overrides, isolates
  and marks, Unicode tag characters), control characters, combining marks
  (Mn, Me: variation selectors, U+0338 overlays) and the Hangul fillers;
- ``<``: U+003C and what NFKC folds to it (U+FE64, U+FF1C), plus look-alikes it
  does not fold: U+2039, U+3008 (and U+2329, which NFKC folds to it), U+FE3F,
  U+27E8, U+276C, U+276E, U+2770, U+02C2, U+1438;
- ``/``: U+002F, U+FF0F (NFKC), U+2215, U+2044, U+29F8, U+2571;
- letters: full-width, mathematical and circled forms fold by NFKC; Cyrillic,
  Greek and small-capital look-alikes of the letters of the two names by the
  table below.

What reaches the prompt is the original text, not the skeleton, with two
changes: format characters and control characters other than tab, newline and
carriage return are removed everywhere (they are invisible, so removing them
loses nothing a reader sees, and they are how hidden instructions and bidi
tricks are smuggled), and the ``<`` of each tag found is written ``&lt;``.
NFKC is not applied to the output: it is lossy (``m²`` becomes ``m2``, ``½``
becomes ``1⁄2``, ``①`` becomes ``1``), and memories should read as written.
One cost: removing U+200D splits emoji joined by it into their parts.

The result depends only on the text, so a block renders the same every turn
(the prefix cache needs that).
"""

from __future__ import annotations

import bisect
import re
import unicodedata

BLOCK_TAGS: tuple[str, ...] = ("memory", "summary")

# Category Cf as of Unicode 14 (Python 3.11); tests/unit/test_sanitise.py checks
# this against the running interpreter's unicodedata, so a newer Unicode that
# adds format characters fails a test instead of passing them silently.
_FORMAT_RANGES: tuple[tuple[int, int], ...] = (
    (0x00AD, 0x00AD), (0x0600, 0x0605), (0x061C, 0x061C), (0x06DD, 0x06DD),
    (0x070F, 0x070F), (0x0890, 0x0891), (0x08E2, 0x08E2), (0x180E, 0x180E),
    (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x2064), (0x2066, 0x206F),
    (0xFEFF, 0xFEFF), (0xFFF9, 0xFFFB), (0x110BD, 0x110BD), (0x110CD, 0x110CD),
    (0x13430, 0x13438), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
)  # fmt: skip
_KEPT_CONTROLS = frozenset("\t\n\r")

# Render blank yet are letters (Lo): dropped from the skeleton only, since they
# also occur in real Korean text.
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0")

_LT_LOOKALIKES = "<\ufe64\uff1c\u2039\u3008\u2329\ufe3f\u27e8\u276c\u276e\u2770\u02c2\u1438"
_SLASH_LOOKALIKES = "/\uff0f\u2215\u2044\u29f8\u2571"

# Look-alikes NFKC does not fold, for the letters of BLOCK_TAGS (m e o r y s u a),
# after casefold (so capitals are covered by their small forms).
_LETTER_LOOKALIKES = str.maketrans(
    {
        "\u0430": "a", "\u0251": "a", "\u03b1": "a", "\u237a": "a",
        "\u0435": "e", "\u04bd": "e", "\u212e": "e", "\uab32": "e",
        "\u043c": "m", "\u1d0d": "m",
        "\u043e": "o", "\u03bf": "o", "\u0585": "o", "\u1d0f": "o", "\u2c9f": "o",
        "\u0433": "r", "\u0280": "r", "\u1d26": "r",
        "\u0443": "y", "\u04af": "y", "\u028f": "y", "\u03b3": "y",
        "\u0455": "s", "\ua731": "s",
        "\u03c5": "u", "\u057d": "u", "\u1d1c": "u",
    }
)  # fmt: skip


def _format_chars() -> frozenset[str]:
    return frozenset(chr(c) for lo, hi in _FORMAT_RANGES for c in range(lo, hi + 1))


_FORMAT = _format_chars()
_CONTROLS = frozenset(chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))) - _KEPT_CONTROLS

# What the output loses: invisible characters only. A character class, not a
# translate table: re is several times faster on non-ASCII text.
_STRIP = re.compile(
    "["
    + "".join(f"{re.escape(chr(lo))}-{re.escape(chr(hi))}" for lo, hi in _FORMAT_RANGES)
    + "".join(re.escape(c) for c in sorted(_CONTROLS))
    + "]"
)


def _fold(ch: str) -> str:
    if ch in _FORMAT or ch in _CONTROLS or ch in _BLANK_LETTERS:
        return ""
    if ch in _LT_LOOKALIKES:
        return "<"
    if ch in _SLASH_LOOKALIKES:
        return "/"
    if unicodedata.category(ch) in ("Mn", "Me"):
        return ""
    folded = unicodedata.normalize("NFKC", ch).casefold().translate(_LETTER_LOOKALIKES)
    # Only the characters above may put a "<" in the skeleton: that is what maps
    # each "<" of the skeleton back to one character of the text.
    return folded.replace("<", "")


class _FoldTable(dict[int, str]):
    """``str.translate`` table computed on first sight of each character; at most
    ``_FOLD_CACHED`` entries are kept, so no text can grow it without bound."""

    def __missing__(self, code: int) -> str:
        folded = _fold(chr(code))
        if len(self) < _FOLD_CACHED:
            self[code] = folded
        return folded


_FOLD_CACHED = 16384
_FOLD = _FoldTable()
for _c in range(0x80):
    _FOLD[_c] = _fold(chr(_c))

_TAG = re.compile(r"<\s*/?\s*(?:" + "|".join(BLOCK_TAGS) + r")\b")
_LT_IN_TEXT = re.compile("[" + re.escape(_LT_LOOKALIKES) + "]")
_LT_IN_SKELETON = re.compile("<")


def skeleton(text: str) -> str:
    """The text as the tag check sees it (see the module docstring)."""
    return text.translate(_FOLD)


def sanitise(text: str) -> str:
    """``text`` made safe to place inside a ``<memory>`` or ``<summary>`` block:
    invisible characters removed, every look-alike of a block tag neutralised."""
    if not _LT_IN_TEXT.search(text):
        # No "<" look-alike, no tag: the common case costs one scan.
        return _STRIP.sub("", text)
    folded = skeleton(text)
    tags = [m.start() for m in _TAG.finditer(folded)]
    if not tags:
        return _STRIP.sub("", text)
    # The k-th "<" of the skeleton is the k-th "<" look-alike of the text.
    lts = [m.start() for m in _LT_IN_SKELETON.finditer(folded)]
    brackets = [m.start() for m in _LT_IN_TEXT.finditer(text)]
    escape = [brackets[bisect.bisect_left(lts, pos)] for pos in tags]
    parts: list[str] = []
    last = 0
    for pos in escape:
        parts.append(text[last:pos])
        parts.append("&lt;")
        last = pos + 1
    parts.append(text[last:])
    return _STRIP.sub("", "".join(parts))
