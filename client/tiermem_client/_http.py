"""What the sync and async clients share: request building, HTTP errors,
the retry policy."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from .errors import RETRYABLE_STATUS, ConnectionFailed, ProtocolError, TiermemError, error_class

__version__ = "0.1.0"

DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
# The longest Retry-After the client waits for (a longer one is cut to this).
MAX_RETRY_AFTER_S = 60.0

RetryHook = Callable[[TiermemError, int, float], None]
"""Called before each retry with the error, the attempt number that failed (1 =
the first) and the seconds the client will wait."""


def seg(value: str) -> str:
    """One path segment, percent-encoded."""
    return quote(str(value), safe="")


def base_headers(api_key: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    headers = {"User-Agent": f"tiermem-client/{__version__}", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    headers.update(extra or {})
    return headers


def retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def http_error(resp: httpx.Response) -> TiermemError:
    """The error for a non-2xx answer (its body read already)."""
    code, message, data = f"http_{resp.status_code}", resp.reason_phrase, None
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        data = body
        err = body.get("error")
        if isinstance(err, dict):
            code = str(err.get("code") or code)
            message = str(err.get("message") or message)
    cls = error_class(resp.status_code, code)
    return cls(
        code,
        message,
        resp.status_code,
        retryable=resp.status_code in RETRYABLE_STATUS,
        retry_after=retry_after(resp.headers.get("Retry-After")),
        data=data,
    )


def json_body(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError as exc:
        raise ProtocolError(
            "protocol_error", f"the answer is not JSON: {resp.text[:200]!r}", resp.status_code
        ) from exc
    if not isinstance(body, dict):
        raise ProtocolError("protocol_error", "the answer is not a JSON object", resp.status_code)
    return body


def transport_error(exc: httpx.TransportError) -> ConnectionFailed:
    err = ConnectionFailed(
        "connection_failed", f"{type(exc).__name__}: {exc}", None, retryable=True
    )
    err.__cause__ = exc
    return err


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter: attempt n waits ``base * 2**(n-1)``
    capped at ``cap``, of which a random half ("equal jitter"); a server's
    Retry-After is waited for at least (up to ``MAX_RETRY_AFTER_S``)."""

    max_retries: int = 3
    base: float = 0.25
    cap: float = 8.0

    def delay(self, failures: int, after: float | None) -> float:
        d = min(self.cap, self.base * 2.0 ** max(failures - 1, 0))
        d = d / 2 + random.uniform(0, d / 2)
        if after is not None:
            d = max(d, min(after, MAX_RETRY_AFTER_S))
        return d
