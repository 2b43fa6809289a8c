"""``POST /v1/sessions/{session_id}/turns``: one chat turn, streamed as SSE.

The turn runs in a task of its own, decoupled from the HTTP response: if the
client goes away, generation stops (the upstream LLM request is closed) but the
turn still commits what was generated, marked ``interrupted``. Bad input is
refused here, before anything touches Redis, Milvus or the LLM.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import StreamingResponse

from app.deps import ServicesDep, TenantDep
from app.errors import ApiError
from app.logging_setup import session_var, tenant_var
from app.services import Services
from app.sse import event_stream, relay
from graph.guard import InputRejected, check_message
from graph.nodes import StorageUnavailable
from graph.state import TurnControl, TurnInput
from memory.keys import ID_PATTERN, InvalidId, validate_id

log = logging.getLogger("tiermem.turns")

router = APIRouter()

SessionId = Annotated[str, Path(pattern=ID_PATTERN, description="[A-Za-z0-9._-]{1,128}")]


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
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    started = time.perf_counter()
    if services.draining:
        raise ApiError(503, "draining", "this pod is shutting down; retry", {"Retry-After": "2"})
    check_message(body.message, services.settings.max_message_chars)
    turn_id = body.turn_id
    if last_event_id:
        resumed = _turn_id_from_last_event(last_event_id)
        if turn_id is not None and turn_id != resumed:
            raise ApiError(
                400, "turn_id_mismatch", "turn_id and Last-Event-ID name different turns"
            )
        turn_id = resumed
    inp = TurnInput(
        tenant=tenant,
        session_id=session_id,
        user_id=body.user_id,
        message=body.message,
        turn_id=turn_id or uuid.uuid4().hex,
        retrieve=body.retrieve,
        client_turn_id=turn_id is not None,
    )
    tenant_var.set(tenant)
    session_var.set(session_id)
    return event_stream(_stream(services, inp, started))


async def _stream(services: Services, inp: TurnInput, started: float) -> AsyncIterator[bytes]:
    control = TurnControl()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    services.controls.add(control)
    task = asyncio.create_task(_produce(services, inp, control, queue, started))
    services.turn_tasks.add(task)
    services.refresh_gauges()

    def _finished(t: asyncio.Task[None]) -> None:
        services.turn_tasks.discard(t)
        services.controls.discard(control)
        services.refresh_gauges()

    task.add_done_callback(_finished)
    try:
        async for chunk in relay(queue, inp.turn_id, services.settings.heartbeat_s):
            yield chunk
    finally:
        if not task.done():
            # The client went away (or the response was cancelled): stop
            # generating; the task still commits what it has.
            control.stop("client_disconnected")


async def _produce(
    services: Services,
    inp: TurnInput,
    control: TurnControl,
    queue: asyncio.Queue[dict[str, Any] | None],
    started: float,
) -> None:
    try:
        async for event in services.runner.stream(inp, control, started):
            queue.put_nowait(event)
    except InputRejected as exc:
        queue.put_nowait(_error(exc.code, exc.message, retryable=False))
    except StorageUnavailable as exc:
        services.metrics.errors.labels("storage").inc()
        log.error("turn not stored: Redis unavailable: %s", exc)
        queue.put_nowait(
            _error("storage_unavailable", "session storage unavailable; retry", retryable=True)
        )
    except Exception:
        services.metrics.errors.labels("internal").inc()
        log.exception("turn failed")
        queue.put_nowait(_error("internal_error", "internal error; retry", retryable=True))
    finally:
        queue.put_nowait(None)


def _error(code: str, message: str, *, retryable: bool) -> dict[str, Any]:
    return {"event": "error", "data": {"error": {"code": code, "message": message},
                                       "retry": retryable}}  # fmt: skip
