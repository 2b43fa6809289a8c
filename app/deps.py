"""Dependencies the routes declare: the app's services, the caller's tenant and
the tenant rate limiter."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from app.auth import AuthError
from app.errors import ApiError
from app.ratelimit import RateLimiter
from app.services import Services


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
    try:
        return services.auth.tenant_for(authorization)
    except AuthError as exc:
        raise ApiError(401, "unauthorized", str(exc), {"WWW-Authenticate": "Bearer"}) from exc


async def get_rate_limiter(request: Request) -> RateLimiter | None:
    """The app's limiter, or None when both limits are off (then it costs nothing).

    Async, like the other dependencies: FastAPI runs a sync dependency in its
    thread pool, a hop per request for no work at all.

    Built on first use rather than at import or app creation: it needs the
    Redis client, which exists only once the lifespan has started the services.
    """
    state = request.app.state
    if not hasattr(state, "rate_limiter"):
        services: Services = request.app.state.services
        state.rate_limiter = RateLimiter.from_settings(
            services.settings, services.redis, services.metrics
        )
    limiter: RateLimiter | None = state.rate_limiter
    return limiter


ServicesDep = Annotated[Services, Depends(get_services)]
TenantDep = Annotated[str, Depends(get_tenant)]
RateLimiterDep = Annotated[RateLimiter | None, Depends(get_rate_limiter)]
