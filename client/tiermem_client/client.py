"""``Client`` (blocking) and ``AsyncClient`` (asyncio): tiermem's native API."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from types import TracebackType
from typing import Any, Literal

import httpx

from ._http import (
    DEFAULT_TIMEOUT,
    RetryHook,
    RetryPolicy,
    base_headers,
    http_error,
    json_body,
    seg,
    transport_error,
)
from ._sse import SSEParser
from ._turn import TurnMerger, turn_body
from .errors import ConnectionFailed, TiermemError
from .events import DoneEvent, Event, ResetEvent, TokenEvent

log = logging.getLogger("tiermem_client")

Retrieve = Literal["auto", "always", "never"]
Params = Mapping[str, str | int | float | None]


def new_turn_id() -> str:
    """A fresh client-chosen turn id (``[A-Za-z0-9._-]{1,128}``)."""
    return "c" + uuid.uuid4().hex


def _params(params: Params | None) -> dict[str, str | int | float] | None:
    if params is None:
        return None
    return {k: v for k, v in params.items() if v is not None}


def _incomplete() -> ConnectionFailed:
    return ConnectionFailed(
        "stream_incomplete", "the stream ended before done or error", None, retryable=True
    )


def join_text(events: list[Event]) -> str:
    """The reply's text from a turn's events (resets applied)."""
    text = ""
    for ev in events:
        if isinstance(ev, ResetEvent):
            text = ev.text
        elif isinstance(ev, TokenEvent):
            text += ev.text
    return text


class _Base:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int,
        backoff_base: float,
        backoff_max: float,
        headers: Mapping[str, str] | None,
        on_retry: RetryHook | None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.policy = RetryPolicy(max_retries, backoff_base, backoff_max)
        self.on_retry = on_retry
        self._headers = base_headers(api_key, headers)
        self._timeout = timeout

    def _next_delay(self, err: TiermemError, failures: int, what: str) -> float:
        """The wait before the next attempt, or raises ``err`` once retries are spent."""
        if failures > self.policy.max_retries:
            raise err
        delay = self.policy.delay(failures, err.retry_after)
        log.info("%s: %s (attempt %d), retrying in %.2fs", what, err.code, failures, delay)
        if self.on_retry is not None:
            self.on_retry(err, failures, delay)
        return delay

    @staticmethod
    def _failures_after(err: TiermemError, failures: int, merger: TurnMerger) -> int:
        # A stream that broke after giving something new starts the count again:
        # a long reply over a flaky link is not given up on, while a turn that
        # keeps failing the same way is.
        if isinstance(err, ConnectionFailed) and merger.progress:
            return 1
        return failures + 1

    @staticmethod
    def _turn_path(session_id: str) -> str:
        return f"/v1/sessions/{seg(session_id)}/turns"


class Client(_Base):
    """A blocking client. Use it as a context manager (or call ``close``).

    ``timeout`` (seconds or an ``httpx.Timeout``) bounds connecting and each
    read; in a turn's stream a read is the wait between events, so keep it above
    the server's ``TIERMEM_HEARTBEAT_S`` (15 s). ``max_retries`` is how many
    times a request is sent again after a retryable failure (``max_retries=0``:
    never); ``on_retry(error, attempt, delay)`` is called before each."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        backoff_base: float = 0.25,
        backoff_max: float = 8.0,
        headers: Mapping[str, str] | None = None,
        on_retry: RetryHook | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(
            base_url, api_key, timeout, max_retries, backoff_base, backoff_max, headers, on_retry
        )
        self._own = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)

    def close(self) -> None:
        if self._own:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- turns ------------------------------------------------------------------------
    def turn(
        self,
        session_id: str,
        *,
        user_id: str,
        message: str,
        turn_id: str | None = None,
        retrieve: Retrieve = "auto",
        agent: str | None = None,
    ) -> Iterator[Event]:
        """One turn's events as they come (see the README: resumption, retries).
        Ends with the ``DoneEvent``; raises a ``TiermemError`` if the turn fails.
        Closing the iterator early (``break``) closes the stream: the server then
        stores the turn ``interrupted``."""
        tid = turn_id or new_turn_id()
        body = turn_body(user_id, message, tid, retrieve, agent)
        url = self.base_url + self._turn_path(session_id)
        merger = TurnMerger(tid)
        failures = 0
        while True:
            merger.begin_attempt()
            headers = {**self._headers, "Accept": "text/event-stream", **merger.resume_headers()}
            try:
                with self._http.stream(
                    "POST", url, json=body, headers=headers, timeout=self._timeout
                ) as resp:
                    if resp.status_code != 200:
                        resp.read()
                        raise http_error(resp)
                    parser = SSEParser()
                    for line in resp.iter_lines():
                        ev = parser.line(line)
                        if ev is None:
                            continue
                        yield from merger.feed(ev)
                        if merger.finished:
                            return
                raise _incomplete()
            except httpx.TransportError as exc:
                err: TiermemError = transport_error(exc)
            except TiermemError as exc:
                if not exc.retryable:
                    raise
                err = exc
            failures = self._failures_after(err, failures, merger)
            time.sleep(self._next_delay(err, failures, f"turn {tid}"))

    def turn_text(
        self,
        session_id: str,
        *,
        user_id: str,
        message: str,
        turn_id: str | None = None,
        retrieve: Retrieve = "auto",
        agent: str | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """The whole turn: ``(reply text, done data)``."""
        events = list(
            self.turn(
                session_id,
                user_id=user_id,
                message=message,
                turn_id=turn_id,
                retrieve=retrieve,
                agent=agent,
            )
        )
        done = events[-1]
        assert isinstance(done, DoneEvent)
        return join_text(events), done.data

    # --- other routes -----------------------------------------------------------------
    def _request(self, method: str, path: str, params: Params | None = None) -> dict[str, Any]:
        failures = 0
        while True:
            try:
                resp = self._http.request(
                    method,
                    self.base_url + path,
                    params=_params(params),
                    headers=self._headers,
                    timeout=self._timeout,
                )
                if resp.status_code >= 400:
                    raise http_error(resp)
                return json_body(resp)
            except httpx.TransportError as exc:
                err: TiermemError = transport_error(exc)
            except TiermemError as exc:
                if not exc.retryable:
                    raise
                err = exc
            failures += 1
            time.sleep(self._next_delay(err, failures, f"{method} {path}"))

    def session(self, session_id: str) -> dict[str, Any]:
        """``GET /v1/sessions/{id}``: the session as stored (L2)."""
        return self._request("GET", f"/v1/sessions/{seg(session_id)}")

    def history(
        self, session_id: str, before: int | None = None, limit: int = 20
    ) -> dict[str, Any]:
        """``GET /v1/sessions/{id}/turns``: a page of turns, newest first."""
        return self._request("GET", self._turn_path(session_id), {"before": before, "limit": limit})

    def list_sessions(
        self, user_id: str | None = None, cursor: str | None = None, limit: int = 20
    ) -> dict[str, Any]:
        """``GET /v1/sessions``: the tenant's (or one user's) sessions, newest first."""
        return self._request(
            "GET", "/v1/sessions", {"user_id": user_id, "cursor": cursor, "limit": limit}
        )

    def release(self, session_id: str) -> dict[str, Any]:
        """``POST /v1/sessions/{id}/release``: drop the session from the pod's L1."""
        return self._request("POST", f"/v1/sessions/{seg(session_id)}/release")

    def search_memories(self, user_id: str, query: str, k: int = 5) -> dict[str, Any]:
        """``GET /v1/users/{id}/memories``: the user's long-term memories nearest ``query``."""
        return self._request("GET", f"/v1/users/{seg(user_id)}/memories", {"query": query, "k": k})

    def forget_user(self, user_id: str) -> dict[str, Any]:
        """``DELETE /v1/users/{id}``: every session and memory of the user."""
        return self._request("DELETE", f"/v1/users/{seg(user_id)}")

    def forget_memories(self, user_id: str) -> dict[str, Any]:
        """``DELETE /v1/users/{id}/memories``: the user's long-term memories only."""
        return self._request("DELETE", f"/v1/users/{seg(user_id)}/memories")

    def forget_session(self, session_id: str) -> dict[str, Any]:
        """``DELETE /v1/sessions/{id}``: the session, everywhere."""
        return self._request("DELETE", f"/v1/sessions/{seg(session_id)}")

    def agents(self) -> dict[str, Any]:
        """``GET /v1/agents``: the agent profiles."""
        return self._request("GET", "/v1/agents")

    def skills(self) -> dict[str, Any]:
        """``GET /v1/skills``: the skills loaded."""
        return self._request("GET", "/v1/skills")


class AsyncClient(_Base):
    """The asyncio client: the same API as ``Client``, awaited (``turn`` is an
    async iterator). Use it as an async context manager (or ``await aclose()``)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        backoff_base: float = 0.25,
        backoff_max: float = 8.0,
        headers: Mapping[str, str] | None = None,
        on_retry: RetryHook | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            base_url, api_key, timeout, max_retries, backoff_base, backoff_max, headers, on_retry
        )
        self._own = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout)

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # --- turns ------------------------------------------------------------------------
    async def turn(
        self,
        session_id: str,
        *,
        user_id: str,
        message: str,
        turn_id: str | None = None,
        retrieve: Retrieve = "auto",
        agent: str | None = None,
    ) -> AsyncIterator[Event]:
        """One turn's events as they come; see ``Client.turn``. Leaving early:
        close it (``contextlib.aclosing``) so the stream closes at once."""
        tid = turn_id or new_turn_id()
        body = turn_body(user_id, message, tid, retrieve, agent)
        url = self.base_url + self._turn_path(session_id)
        merger = TurnMerger(tid)
        failures = 0
        while True:
            merger.begin_attempt()
            headers = {**self._headers, "Accept": "text/event-stream", **merger.resume_headers()}
            try:
                async with self._http.stream(
                    "POST", url, json=body, headers=headers, timeout=self._timeout
                ) as resp:
                    if resp.status_code != 200:
                        await resp.aread()
                        raise http_error(resp)
                    parser = SSEParser()
                    async for line in resp.aiter_lines():
                        ev = parser.line(line)
                        if ev is None:
                            continue
                        for out in merger.feed(ev):
                            yield out
                        if merger.finished:
                            return
                raise _incomplete()
            except httpx.TransportError as exc:
                err: TiermemError = transport_error(exc)
            except TiermemError as exc:
                if not exc.retryable:
                    raise
                err = exc
            failures = self._failures_after(err, failures, merger)
            await asyncio.sleep(self._next_delay(err, failures, f"turn {tid}"))

    async def turn_text(
        self,
        session_id: str,
        *,
        user_id: str,
        message: str,
        turn_id: str | None = None,
        retrieve: Retrieve = "auto",
        agent: str | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """The whole turn: ``(reply text, done data)``."""
        events = [
            ev
            async for ev in self.turn(
                session_id,
                user_id=user_id,
                message=message,
                turn_id=turn_id,
                retrieve=retrieve,
                agent=agent,
            )
        ]
        done = events[-1]
        assert isinstance(done, DoneEvent)
        return join_text(events), done.data

    # --- other routes -----------------------------------------------------------------
    async def _request(
        self, method: str, path: str, params: Params | None = None
    ) -> dict[str, Any]:
        failures = 0
        while True:
            try:
                resp = await self._http.request(
                    method,
                    self.base_url + path,
                    params=_params(params),
                    headers=self._headers,
                    timeout=self._timeout,
                )
                if resp.status_code >= 400:
                    raise http_error(resp)
                return json_body(resp)
            except httpx.TransportError as exc:
                err: TiermemError = transport_error(exc)
            except TiermemError as exc:
                if not exc.retryable:
                    raise
                err = exc
            failures += 1
            await asyncio.sleep(self._next_delay(err, failures, f"{method} {path}"))

    async def session(self, session_id: str) -> dict[str, Any]:
        """``GET /v1/sessions/{id}``: the session as stored (L2)."""
        return await self._request("GET", f"/v1/sessions/{seg(session_id)}")

    async def history(
        self, session_id: str, before: int | None = None, limit: int = 20
    ) -> dict[str, Any]:
        """``GET /v1/sessions/{id}/turns``: a page of turns, newest first."""
        return await self._request(
            "GET", self._turn_path(session_id), {"before": before, "limit": limit}
        )

    async def list_sessions(
        self, user_id: str | None = None, cursor: str | None = None, limit: int = 20
    ) -> dict[str, Any]:
        """``GET /v1/sessions``: the tenant's (or one user's) sessions, newest first."""
        return await self._request(
            "GET", "/v1/sessions", {"user_id": user_id, "cursor": cursor, "limit": limit}
        )

    async def release(self, session_id: str) -> dict[str, Any]:
        """``POST /v1/sessions/{id}/release``: drop the session from the pod's L1."""
        return await self._request("POST", f"/v1/sessions/{seg(session_id)}/release")

    async def search_memories(self, user_id: str, query: str, k: int = 5) -> dict[str, Any]:
        """``GET /v1/users/{id}/memories``: the user's long-term memories nearest ``query``."""
        return await self._request(
            "GET", f"/v1/users/{seg(user_id)}/memories", {"query": query, "k": k}
        )

    async def forget_user(self, user_id: str) -> dict[str, Any]:
        """``DELETE /v1/users/{id}``: every session and memory of the user."""
        return await self._request("DELETE", f"/v1/users/{seg(user_id)}")

    async def forget_memories(self, user_id: str) -> dict[str, Any]:
        """``DELETE /v1/users/{id}/memories``: the user's long-term memories only."""
        return await self._request("DELETE", f"/v1/users/{seg(user_id)}/memories")

    async def forget_session(self, session_id: str) -> dict[str, Any]:
        """``DELETE /v1/sessions/{id}``: the session, everywhere."""
        return await self._request("DELETE", f"/v1/sessions/{seg(session_id)}")

    async def agents(self) -> dict[str, Any]:
        """``GET /v1/agents``: the agent profiles."""
        return await self._request("GET", "/v1/agents")

    async def skills(self) -> dict[str, Any]:
        """``GET /v1/skills``: the skills loaded."""
        return await self._request("GET", "/v1/skills")
