"""The root of tiermem's exception hierarchy.

Every error tiermem raises on purpose is a ``TiermemError``: it carries a stable
machine-readable ``code``, the HTTP status it maps to, and whether the same
request may simply be retried. The packages subclass it (infra: Redis, Milvus,
LLM, embeddings; memory: L2 and L3 stores; graph: turn input; app: auth, rate
limits) and app/ translates the whole family in one place, found along the
exception's ``__mro__`` as Starlette does. So the status lives in the class that
knows the failure, while only app/ knows HTTP and SSE framing.

It sits in infra/ because infra/ is the lowest layer: every package may import
it, and it imports nothing of tiermem.

Class attributes are the family's defaults; an instance may override any of
them (``LLMError`` sets ``code`` and ``retryable`` per failure).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar


class TiermemError(Exception):
    """An error with a code, an HTTP status and a retry hint."""

    code: str = "internal_error"
    http_status: int = 500
    retryable: bool = False
    # Extra response headers (Retry-After, WWW-Authenticate).
    headers: Mapping[str, str] = MappingProxyType({})
    default_message: ClassVar[str] = "internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        http_status: int | None = None,
        retryable: bool | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.message = message if message is not None else self.default_message
        super().__init__(self.message)
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status
        if retryable is not None:
            self.retryable = retryable
        if headers is not None:
            self.headers = dict(headers)


class InvalidInput(TiermemError):
    """The caller sent something tiermem refuses; retrying it unchanged fails again."""

    code = "invalid_request"
    http_status = 422
    default_message = "the request is not valid"


class Unavailable(TiermemError):
    """A backing service (Redis, Milvus, the LLM) could not serve now; retry later."""

    code = "unavailable"
    http_status = 503
    retryable = True
    default_message = "a backing service is unavailable; retry"


class Conflict(TiermemError):
    """The request conflicts with the stored state (another writer, another user)."""

    code = "conflict"
    http_status = 409
    default_message = "the request conflicts with the stored state"


class Misconfigured(TiermemError):
    """A configuration error an operator must fix; retrying does not help."""

    code = "misconfigured"
    http_status = 500
    default_message = "tiermem is misconfigured"


__all__ = ["Conflict", "InvalidInput", "Misconfigured", "TiermemError", "Unavailable"]
