"""``POST /v1/sessions/{session_id}/turns``: one chat turn, streamed as SSE.

The turn runs in a task of its own, decoupled from the HTTP response: if the
client goes away, generation stops (the upstream LLM request is closed) but the
turn still commits what was generated, marked ``interrupted``. Bad input is
refused here, before anything touches Redis, Milvus or the LLM. Tenant rate
limits (app/ratelimit.py) are checked after the input is known to be good, so a
refused request never costs the tenant a turn; a stream slot is held by the
turn's task until the turn is committed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Header
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import StreamingResponse

from app.deps import RateLimiterDep, ServicesDep, SessionId, TenantDep
from app.errors import ApiError, sse_error
from app.logging_setup import session_var, tenant_var
from app.ratelimit import RateLimiter, StreamLease
from app.services import Services
from app.sse import event_stream, relay
from graph.events import TurnEvent
from graph.guard import check_message
from graph.state import TurnControl, TurnInput
from infra.errors import TiermemError
from memory.keys import ID_PATTERN, InvalidId, validate_id

log = logging.getLogger("tiermem.turns")

router = APIRouter()


class TurnRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(pattern=ID_PATTERN, description="[A-Za-z0-9._-]{1,128}")
    message: str = Field(description="The user's message")
    turn_id: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="Client-chosen id; a retry with the same id is stored at most once",
    )
    retrieve: Literal["auto", "always", "never"] = "auto"
    agent: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$",
        description="The agent profile of a new session (a name, or 'auto'); "
        "later turns are answered by the session's own",
    )


def _binding(tenant: str, session_id: str, nonce: str) -> str:
    return hashlib.sha256(f"{tenant}\0{session_id}\0{nonce}".encode()).hexdigest()[:8]


def issue_turn_id(tenant: str, session_id: str) -> str:
    """A server-chosen turn id, bound to its tenant and session: a random part and
    a hash of (tenant, session, that part). No secret is needed, since a client
    that forges one can only name its own session; an id seen in another
    session's stream does not verify here."""
    nonce = uuid.uuid4().hex[:24]
    return nonce + _binding(tenant, session_id, nonce)


def issued_for(turn_id: str, tenant: str, session_id: str) -> bool:
    return len(turn_id) == 32 and hmac.compare_digest(
        turn_id[24:], _binding(tenant, session_id, turn_id[:24])
    )


def _turn_id_from_last_event(last_event_id: str) -> str:
    turn_id, sep, seq = last_event_id.rpartition(":")
    if not sep or not seq.isdigit():
        raise ApiError(400, "invalid_last_event_id", "Last-Event-ID must be '<turn_id>:<seq>'")
    try:
        return validate_id(turn_id, "Last-Event-ID turn id")
    except InvalidId as exc:
        raise ApiError(400, "invalid_last_event_id", str(exc)) from exc


@router.post(
    "/v1/sessions/{session_id}/turns",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "SSE stream"}},
)
async def post_turn(
    session_id: SessionId,
    body: TurnRequest,
    tenant: TenantDep,
    services: ServicesDep,
    limiter: RateLimiterDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    started = time.perf_counter()
    refuse_if_draining(services)
    check_message(body.message, services.settings.max_message_chars)
    if body.agent not in (None, "auto") and body.agent not in services.agents.profiles:
        raise ApiError(422, "unknown_agent", f"no agent {body.agent!r}; GET /v1/agents lists them")
    turn_id = body.turn_id
    if last_event_id:
        resumed = _turn_id_from_last_event(last_event_id)
        if turn_id is not None and turn_id != resumed:
            raise ApiError(
                400, "turn_id_mismatch", "turn_id and Last-Event-ID name different turns"
            )
        if turn_id is None and not issued_for(resumed, tenant, session_id):
            # Not an id this service issued for this session, and the body does
            # not claim it as the client's own: a foreign (or forged) event id.
            raise ApiError(
                409,
                "foreign_last_event_id",
                "Last-Event-ID names no turn of this session; to resume a turn whose "
                "id you chose, send the same turn_id in the body",
            )
        turn_id = resumed
    inp = TurnInput(
        tenant=tenant,
        session_id=session_id,
        user_id=body.user_id,
        message=body.message,
        turn_id=turn_id or issue_turn_id(tenant, session_id),
        retrieve=body.retrieve,
        client_turn_id=turn_id is not None,
        agent=body.agent,
    )
    # A session belongs to the user of its first turn: another user's turn is a
    # 409 session_user_mismatch here, before the stream starts (free on an L1
    # hit; on a miss this is the turn's one load).
    await services.sessions.check_owner(tenant, session_id, body.user_id)
    queue, control, task = await launch_turn(services, limiter, inp, started)
    return event_stream(_stream(services, inp, queue, control, task))


def refuse_if_draining(services: Services) -> None:
    """A pod shutting down takes no new turn: 503 ``draining`` with Retry-After."""
    if services.draining:
        raise ApiError(503, "draining", "this pod is shutting down; retry", {"Retry-After": "2"})


async def admit(limiter: RateLimiter | None, tenant: str) -> StreamLease | None:
    """The tenant's limits (one Redis round trip when any is on): a lease on a
    stream slot, or None when streams are not limited."""
    # RateLimited (429) and RateLimitUnavailable (503) carry their codes and
    # Retry-After: app/errors.py turns them into the response.
    return None if limiter is None else await limiter.admit(tenant)


async def launch_turn(
    services: Services, limiter: RateLimiter | None, inp: TurnInput, started: float
) -> tuple[asyncio.Queue[TurnEvent | None], TurnControl, asyncio.Task[None]]:
    """Admits a validated turn (tenant limits) and starts it: its events come on
    the queue, then None. Shared by every front that runs turns (the native SSE
    route, the OpenAI-compatible route)."""
    lease = await admit(limiter, inp.tenant)
    tenant_var.set(inp.tenant)
    session_var.set(inp.session_id)
    # The turn starts now, and the response once the turn is under way
    # (TurnControl.underway): its LLM request goes out before the response
    # start, whose cost then overlaps the LLM's prefill.
    queue, control, task = _start_turn(services, inp, started, lease)
    await control.underway.wait()
    return queue, control, task


def _start_turn(
    services: Services, inp: TurnInput, started: float, lease: StreamLease | None
) -> tuple[asyncio.Queue[TurnEvent | None], TurnControl, asyncio.Task[None]]:
    """The turn's task, decoupled from the HTTP response: it commits what was
    generated even when the client is gone."""
    queue: asyncio.Queue[TurnEvent | None] = asyncio.Queue()
    control = TurnControl(emit=queue.put_nowait)
    task = spawn_in_flight(
        services, control, lease, lambda: _produce(services, inp, control, queue, started)
    )
    return queue, control, task


def spawn_in_flight(
    services: Services,
    control: TurnControl,
    lease: StreamLease | None,
    work: Callable[[], Awaitable[None]],
) -> asyncio.Task[None]:
    """``work`` in a task of its own, counted as a turn in flight (the drain
    waits for it, and stops it through ``control`` at its deadline), holding
    its stream slot (if streams are limited) until it ends."""
    services.controls.add(control)
    if lease is not None:
        lease.claim()
    task = asyncio.create_task(_holding(lease, work))
    services.turn_tasks.add(task)
    services.refresh_gauges()

    def _finished(t: asyncio.Task[None]) -> None:
        control.underway.set()  # ended before its LLM request (an error, a replay)
        services.turn_tasks.discard(t)
        services.controls.discard(control)
        services.refresh_gauges()

    task.add_done_callback(_finished)
    return task


async def _stream(
    services: Services,
    inp: TurnInput,
    queue: asyncio.Queue[TurnEvent | None],
    control: TurnControl,
    task: asyncio.Task[None],
) -> AsyncIterator[bytes]:
    try:
        async for chunk in relay(queue, inp.turn_id, services.settings.heartbeat_s):
            yield chunk
    finally:
        stop_if_running(task, control)


def stop_if_running(task: asyncio.Task[None], control: TurnControl) -> None:
    """The stream of a turn ends: if the client went away (or the response was
    cancelled) while it runs, generation stops; the task still commits what it has."""
    if not task.done():
        control.stop("client_disconnected")


async def _holding(lease: StreamLease | None, work: Callable[[], Awaitable[None]]) -> None:
    """The work (a turn), holding its stream slot (if streams are limited) until
    it has committed; the slot is released after the stream's last event."""
    if lease is None:
        await work()
        return
    async with lease.held():
        await work()


async def _produce(
    services: Services,
    inp: TurnInput,
    control: TurnControl,
    queue: asyncio.Queue[TurnEvent | None],
    started: float,
) -> None:
    try:
        await services.runner.run(inp, control, started)
    except TiermemError as exc:
        # Bad input the app let through, Redis past the commit deadline...: the
        # stream ends with the error's own code and retry hint.
        services.metrics.errors.labels(exc.code).inc()
        log.error("turn not stored: %s: %s", exc.code, exc.message)
        queue.put_nowait(sse_error(exc, turn_id=inp.turn_id))
    except Exception as exc:
        services.metrics.errors.labels("internal").inc()
        log.exception("turn failed")
        queue.put_nowait(sse_error(exc, turn_id=inp.turn_id))
    finally:
        queue.put_nowait(None)
