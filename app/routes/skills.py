"""The Agent Skills this service offers (memory/skills.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.deps import ServicesDep, TenantDep

router = APIRouter()


@router.get("/v1/skills")
async def list_skills(tenant: TenantDep, services: ServicesDep) -> Any:
    """Every skill loaded (name, description, version: a hash of its files) and
    the stable prefix version a new session of the default agent gets, which the
    skills catalog is part of. Skills are the same for every tenant."""
    return {
        "skills": [
            {"name": s.name, "description": s.description, "version": s.version}
            for s in services.skills.skills
        ],
        "prefix_version": services.context.current_version(),
    }
