"""Forgetting on request (memory/forget.py): each route says what it removed, is
idempotent, and is logged without content."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from app.deps import ServicesDep, TenantDep
from memory.keys import ID_PATTERN

router = APIRouter()

UserId = Annotated[str, Path(pattern=ID_PATTERN)]
SessionId = Annotated[str, Path(pattern=ID_PATTERN)]


@router.delete("/v1/users/{user_id}/memories")
async def forget_user_memories(user_id: UserId, tenant: TenantDep, services: ServicesDep) -> Any:
    """The user's long-term memories (L3 rows) and the cached retrievals of the
    user's sessions; the sessions themselves stay."""
    return await services.forgetter.user_memories(tenant, user_id)


@router.delete("/v1/sessions/{session_id}")
async def forget_session(session_id: SessionId, tenant: TenantDep, services: ServicesDep) -> Any:
    """The session: its L2 keys, its L1 copies on every pod, its L3 batches."""
    return await services.forgetter.session(tenant, session_id)


@router.delete("/v1/users/{user_id}")
async def forget_user(user_id: UserId, tenant: TenantDep, services: ServicesDep) -> Any:
    """Everything of the user in the caller's tenant: every session, every memory."""
    return await services.forgetter.user(tenant, user_id)
