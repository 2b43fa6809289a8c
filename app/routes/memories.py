"""Search of a user's long-term (L3) memories, always within the caller's tenant."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from app.deps import ServicesDep, TenantDep
from graph.guard import check_message
from memory.keys import ID_PATTERN
from memory.l3_store import memory_hit_json

router = APIRouter()


@router.get("/v1/users/{user_id}/memories")
async def search_memories(
    user_id: Annotated[str, Path(pattern=ID_PATTERN)],
    tenant: TenantDep,
    services: ServicesDep,
    query: Annotated[str, Query(min_length=1, max_length=4000)],
    k: Annotated[int, Query(ge=1, le=50)] = 5,
) -> Any:
    check_message(query, services.settings.max_message_chars)
    # L3Unavailable is a 503 memory_unavailable (app/errors.py).
    hits = await services.l3.search(tenant, user_id, query, k)
    return {"user_id": user_id, "memories": [memory_hit_json(h) for h in hits]}
