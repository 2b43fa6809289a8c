"""Dependencies the routes declare: the app's services, the caller's tenant and
the tenant rate limiter."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Path, Request

from app.ratelimit import RateLimiter
from app.services import Services
from memory.keys import ID_PATTERN


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def get_tenant(
    request: Request,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> str:
    services: Services = request.app.state.services
    if services.auth is None:
        return services.settings.default_tenant
    # An AuthError is a TiermemError: 401 with a Bearer challenge (app/errors.py).
    return services.auth.tenant_for(authorization)


async def get_rate_limiter(request: Request) -> RateLimiter | None:
    """The app's limiter, or None when both limits are off (then it costs nothing).

    Async, like the other dependencies: FastAPI runs a sync dependency in its
    thread pool, a hop per request for no work at all."""
    services: Services = request.app.state.services
    return services.rate_limiter


ServicesDep = Annotated[Services, Depends(get_services)]
TenantDep = Annotated[str, Depends(get_tenant)]
RateLimiterDep = Annotated[RateLimiter | None, Depends(get_rate_limiter)]

# Path parameters several routes share, validated before any handler runs.
SessionId = Annotated[str, Path(pattern=ID_PATTERN, description="[A-Za-z0-9._-]{1,128}")]
UserId = Annotated[str, Path(pattern=ID_PATTERN, description="[A-Za-z0-9._-]{1,128}")]
