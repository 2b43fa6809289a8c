"""Embeddings through the cache layer: a vector per (model, text), kept long.

Wraps any ``Embedder`` (infra/embeddings.py) and is one itself, so archiving (L3
pieces), retrieval (the query) and the skills detector all use it without knowing.
A batch costs one L2 round trip for what L1 lacks, then one ``embed`` call for
the texts still missing, then one write. The key is the model's name, its
dimension and the SHA-256 of the text: no text is stored, only float32 vectors.
Entries are shared by every tenant (decision: a vector is a pure function of the
model and the text, and sharing is what makes the cache pay); the text cannot be
read back from the key. No single flight here: a duplicated embedding costs
milliseconds, a lease round trip would cost as much.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from infra.embeddings import Embedder, close_embedder
from memory.cache import Cache, Scope

# Every tenant's: see the module docstring.
SHARED = Scope(None)


class CachingEmbedder:
    """An ``Embedder`` answering from the cache where it can."""

    def __init__(self, inner: Embedder, cache: Cache) -> None:
        self.inner = inner
        self.cache = cache
        self.name = inner.name
        self.dim = inner.dim
        self.max_tokens = inner.max_tokens

    def __getattr__(self, attr: str) -> Any:
        # What a particular embedder has beyond the protocol (warmup, loaded).
        return getattr(self.inner, attr)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def _parts(self, text: str) -> dict[str, Any]:
        return {"model": self.name, "dim": self.dim,
                "text": hashlib.sha256(text.encode()).hexdigest()}  # fmt: skip

    async def embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return await self.inner.embed(texts)
        parts = [self._parts(t) for t in texts]
        cached = await self.cache.get_many("embedding", SHARED, parts)
        if cached is None:
            return await self.inner.embed(texts)
        out: list[list[float] | None] = [None] * len(texts)
        todo: dict[str, list[int]] = {}
        for i, raw in enumerate(cached):
            vector = _decode(raw, self.dim) if raw is not None else None
            if vector is None:
                todo.setdefault(texts[i], []).append(i)
            else:
                out[i] = vector
        if todo:
            fresh = await self.inner.embed(list(todo))
            items = []
            for where, vector in zip(todo.values(), fresh, strict=True):
                for i in where:
                    out[i] = vector
                items.append((parts[where[0]], np.asarray(vector, dtype=np.float32).tobytes()))
            await self.cache.put_many("embedding", SHARED, items)
        return [v for v in out if v is not None]

    async def aclose(self) -> None:
        await close_embedder(self.inner)


def _decode(raw: bytes, dim: int) -> list[float] | None:
    if len(raw) != dim * 4:
        return None  # another layout (or a corrupt entry): embed again
    return [float(x) for x in np.frombuffer(raw, dtype=np.float32)]
