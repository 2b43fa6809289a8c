"""The agent profiles of this service (graph/agents.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.deps import ServicesDep, TenantDep

router = APIRouter()


@router.get("/v1/agents")
async def list_agents(tenant: TenantDep, services: ServicesDep) -> Any:
    """Each agent's name, description, tool mask and skills, the default one, and
    the prefix version a new session of each gets."""
    agents = services.agents
    return {
        "agents": [
            {**a.public(), "prefix_version": services.context.current_version(a.name)}
            for a in agents.profiles.values()
        ],
        "default": agents.default,
    }
