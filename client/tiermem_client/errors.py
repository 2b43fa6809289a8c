"""The errors the client raises: ``TiermemError`` and one subclass per kind.

An error answered as HTTP (before a stream started, or by any other route)
carries its HTTP ``status``; an ``error`` event that ended a stream has
``status`` None and the stream's ``retryable`` flag. ``data`` is the JSON the
server sent (the HTTP body, or the event's data), when there was one.
"""

from __future__ import annotations

from typing import Any


class TiermemError(Exception):
    """An error from tiermem (or from reaching it): ``code`` is the server's
    stable code (README, *Errors*), or the client's own for transport failures
    (``connection_failed``, ``stream_incomplete``, ``protocol_error``)."""

    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.data = data

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
            f"status={self.status!r}, retryable={self.retryable!r})"
        )


class AuthError(TiermemError):
    """401 (or 403): no key, an unknown or a revoked key."""


class NotFound(TiermemError):
    """404: no such route, session, ..."""


class MethodNotAllowed(TiermemError):
    """405: the server has no such operation on that path (an older server)."""


class InvalidRequest(TiermemError):
    """400, 408, 413, 422, 431: the request breaks a rule; sending it again as
    it is will fail again."""


class Conflict(TiermemError):
    """409: e.g. ``session_user_mismatch``, ``foreign_last_event_id``."""


class RateLimited(TiermemError):
    """429: a tenant limit; ``retry_after`` says when to come back. Raised once
    the client's own retries are spent."""


class Unavailable(TiermemError):
    """502/503/504 or a retryable stream error (draining, storage, LLM), raised
    once the client's retries are spent."""


class ServerError(TiermemError):
    """500 and other server errors that retrying will not fix."""


class ConnectionFailed(Unavailable):
    """tiermem could not be reached, or a stream kept breaking, past the retries."""


class ProtocolError(TiermemError):
    """The server sent something this client cannot read."""


# The HTTP status each server code is answered with (README, *Errors*): used to
# pick the class of an error that came as a stream event, which has no status.
CODE_STATUS: dict[str, int] = {
    "invalid_json": 400,
    "bad_request": 400,
    "invalid_last_event_id": 400,
    "turn_id_mismatch": 400,
    "unauthorized": 401,
    "not_found": 404,
    "session_not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "foreign_last_event_id": 409,
    "session_user_mismatch": 409,
    "body_too_large": 413,
    "message_too_long": 413,
    "invalid_request": 422,
    "invalid_id": 422,
    "empty_message": 422,
    "invalid_message": 422,
    "invalid_encoding": 422,
    "unknown_agent": 422,
    "rate_limited": 429,
    "too_many_streams": 429,
    "headers_too_large": 431,
    "internal_error": 500,
    "memory_misconfigured": 500,
    "durability_misconfigured": 500,
    "draining": 503,
    "storage_unavailable": 503,
    "durability_timeout": 503,
    "memory_unavailable": 503,
    "milvus_unavailable": 503,
    "embedding_unavailable": 503,
    "rate_limit_unavailable": 503,
    "llm_timeout": 502,
    "llm_connect": 502,
    "llm_http": 502,
    "llm_protocol": 502,
}

# HTTP statuses a request is sent again for (with Retry-After honoured).
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})


def error_class(status: int | None, code: str = "") -> type[TiermemError]:
    """The subclass for an HTTP status (or, without one, for the server's code)."""
    if status is None:
        status = CODE_STATUS.get(code)
        if status is None:
            return ServerError
    if status in (401, 403):
        return AuthError
    if status == 404:
        return NotFound
    if status == 405:
        return MethodNotAllowed
    if status == 409:
        return Conflict
    if status == 429:
        return RateLimited
    if status in (502, 503, 504):
        return Unavailable
    if 400 <= status < 500:
        return InvalidRequest
    return ServerError
