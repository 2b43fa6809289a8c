"""Session reads and release."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from app.deps import ServicesDep, SessionId, TenantDep
from app.errors import ApiError
from memory.history import DEFAULT_PAGE, MAX_PAGE, read_history
from memory.keys import ID_PATTERN
from memory.l2_store import L2Error
from memory.sessions import StorageUnavailable

router = APIRouter()


def _cursor(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        cursor = float(value)
    except ValueError:
        raise ApiError(
            422, "invalid_cursor", "cursor must be a next_cursor this route gave"
        ) from None
    if cursor != cursor or cursor in (float("inf"), float("-inf")):
        raise ApiError(422, "invalid_cursor", "cursor must be a next_cursor this route gave")
    return cursor


@router.get("/v1/sessions")
async def list_sessions(
    tenant: TenantDep,
    services: ServicesDep,
    user_id: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
) -> Any:
    """The tenant's sessions (or one user's), newest first, from an index kept in
    Redis (no SCAN): ``limit`` of them created before ``cursor``; pass
    ``next_cursor`` for the next page (null at the end)."""
    try:
        found, nxt = await services.l2.list_sessions(tenant, user_id, _cursor(cursor), limit)
    except L2Error as exc:
        raise StorageUnavailable(str(exc)) from exc
    return {
        "sessions": [{"session_id": s, "created_at": created} for s, created in found],
        "next_cursor": repr(nxt) if nxt is not None else None,
    }


@router.get("/v1/sessions/{session_id}")
async def get_session(session_id: SessionId, tenant: TenantDep, services: ServicesDep) -> Any:
    """The session as stored in L2: counters, version, running summary and the
    unarchived turns."""
    # An L2Error is a 503 storage_unavailable (app/errors.py).
    state = await services.l2.load(tenant, session_id, scope="unarchived")
    if state is None:
        raise ApiError(404, "session_not_found", f"no session {session_id!r}")
    unarchived = [t for t in state.turns if t.index > state.archived_upto]
    return {
        "session_id": session_id,
        "user_id": state.user_id,
        "version": state.version,
        "turn_count": state.turn_count,
        "archived_upto": state.archived_upto,
        "unarchived_count": state.unarchived,
        "running_summary": state.summary,
        "context_start": state.context_start,
        "prefix_version": state.prefix_version,
        "created_at": state.created_at,
        "updated_at": state.updated_at,
        "in_l1": (tenant, session_id) in services.l1,
        "unarchived_turns": [
            {
                "turn": t.index,
                "turn_id": t.turn_id,
                # The turn as stored: user message, assistant messages (with
                # any tool_calls) and tool results, in OpenAI format.
                "messages": t.messages,
                # Shorthands of the above: the user's message, the reply text.
                "user": t.user,
                "assistant": t.assistant,
                "status": t.status,
                "created_at": t.created_at,
            }
            for t in unarchived
        ],
    }


@router.get("/v1/sessions/{session_id}/turns")
async def get_session_turns(
    session_id: SessionId,
    tenant: TenantDep,
    services: ServicesDep,
    before: Annotated[int | None, Query(ge=1)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
) -> Any:
    """Every turn of the session, archived ones included, newest first: the
    ``limit`` turns before turn ``before`` (the newest without it). Pass
    ``next_before`` as ``before`` for the next, older page; it is null at turn 1.
    Turns come from L2 while its log holds them (``source: "l2"``, with their
    ``usage``, ``skills`` and ``memory_hits``), else rebuilt from their batch's
    transcript in L3 (``source: "l3"``; see memory/history.py). ``tiers`` says
    where each lives: L1 of the pod that answers, L2, L3."""
    page = await read_history(
        services.l2, services.l3, tenant, session_id, before=before, limit=limit
    )
    if page is None:
        raise ApiError(404, "session_not_found", f"no session {session_id!r}")
    live = services.l1.peek(tenant, session_id)
    in_l1 = {t.index for t in live.turns} if live is not None else set()
    for t in page.turns:
        # Where the turn lives now: this pod's L1 (the turns its context holds),
        # the L2 log, an archived batch in L3.
        t["tiers"] = {"l1": t["turn"] in in_l1, "l2": t["source"] == "l2",
                      "l3": t["archived"] and t["source"] != "missing"}  # fmt: skip
    return {
        "session_id": session_id,
        "in_l1": live is not None,
        "turn_count": page.turn_count,
        "archived_upto": page.archived_upto,
        "turns": page.turns,
        "next_before": page.next_before,
    }


@router.post("/v1/sessions/{session_id}/release")
async def release_session(session_id: SessionId, tenant: TenantDep, services: ServicesDep) -> Any:
    """Drops the session from this pod's L1. Its unarchived tail stays in L2 (with
    its TTL); the next turn, on any pod, reloads it and keeps appending."""
    dropped = services.l1.drop(tenant, session_id)
    services.refresh_gauges()
    return {"session_id": session_id, "released": dropped}
