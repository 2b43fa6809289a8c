"""Liveness, readiness and metrics: unauthenticated, for kubelet and Prometheus."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import ServicesDep

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(services: ServicesDep) -> JSONResponse:
    """Ready only when Redis and Milvus answer, and never once draining."""
    if services.draining:
        return JSONResponse({"ready": False, "draining": True}, status_code=503)
    checks = await services.ready()
    ok = checks["redis"] and (checks["milvus"] or not services.settings.ready_requires_milvus)
    return JSONResponse({"ready": ok, **checks}, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(services: ServicesDep) -> Response:
    services.refresh_gauges()
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
