"""The one place errors become HTTP, and the one place they become SSE.

HTTP: ``{"error": {"code", "message"}}`` with the status the error's class says.
Every error tiermem raises on purpose is an ``infra.errors.TiermemError``; one
handler serves the whole family (Starlette finds handlers along the exception's
``__mro__``), so a new error class needs no new handler. FastAPI's validation
errors and Starlette's HTTP errors get the same body.

SSE: once a stream has started, an error is the turn's last event,
``{"error": {"code", "message"}, "retryable": bool}`` (``sse_error``).

Codes (the README lists each with its status): see ``infra.errors`` and its
subclasses in every package.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from graph.events import Error
from infra.errors import TiermemError

log = logging.getLogger("tiermem.http")


class ApiError(TiermemError):
    """An error the HTTP layer itself decides (a bad header, a draining pod)."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message, code=code, http_status=status, retryable=status >= 500,
                         headers=headers)  # fmt: skip


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(
        error_body(code, message, **extra), status_code=status, headers=dict(headers or {})
    )


def sse_error(exc: BaseException, **turn: Any) -> Error:
    """The ``error`` event that ends a stream an exception cut short."""
    if isinstance(exc, TiermemError):
        return Error(exc.code, exc.message, exc.retryable, turn)
    return Error("internal_error", "internal error; retry", True, turn)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str]:
    errors = exc.errors()
    if not errors:
        return "invalid_request", "the request is not valid"
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "json_invalid":
        return "invalid_json", "the body is not valid JSON"
    msg = first.get("msg", "invalid value")
    return "invalid_request", f"{loc}: {msg}" if loc else msg


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TiermemError)
    async def _tiermem(_req: Request, exc: TiermemError) -> JSONResponse:
        if exc.http_status >= 500:
            log.warning("request failed: %s (%s)", exc.code, exc.message)
        return error_response(exc.http_status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        code, message = _describe_validation(exc)
        return error_response(422 if code != "invalid_json" else 400, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {
            400: "bad_request",
            404: "not_found",
            405: "method_not_allowed",
            408: "request_timeout",
            413: "body_too_large",
        }.get(exc.status_code, "http_error")
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            code = "invalid_json"
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error")
