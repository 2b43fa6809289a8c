"""The FastAPI application: routes, error translation, limits, lifespan."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.errors import install_error_handlers
from app.inspector import mount_inspector
from app.limits import BodySizeLimit
from app.mcp_server import McpApp
from app.routes import agents, forget, memories, openai, probes, sessions, skills, turns
from app.services import Services
from infra.settings import Settings

# Allocations between two collections of the youngest generation (see lifespan).
YOUNG_GC_THRESHOLD = 20_000


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    settings = settings or Settings()
    services = services or Services(settings)
    mcp = McpApp(services)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await services.start()
        # What start-up built (modules, the tokenizer, clients: some 200k
        # objects) lives as long as the process: keep it out of the collector,
        # or every full collection walks it again on the event loop (a full
        # collection over it took about 90 ms here).
        gc.collect()
        gc.freeze()
        # A turn allocates thousands of short-lived containers (LangGraph's
        # configs and channels, events, Redis replies). At Python's default
        # threshold (700) the collector ran a few times a turn, and its
        # generation-1 passes, over what had not died yet, took 3-7 ms each on
        # the event loop: 80 such pauses in a 200-session benchmark level. At
        # this threshold most of a turn's objects are freed before a
        # collection looks at them (3 pauses over 2 ms in the same level).
        gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
        try:
            # The MCP server's session manager serves /mcp while it runs.
            async with mcp.lifespan():
                yield
        finally:
            await services.stop()

    app = FastAPI(
        title="tiermem",
        version="0.1.0",
        description="Three-tier memory for LLM chat agents, streamed over SSE.",
        lifespan=lifespan,
        # The interactive docs and the schema: on by default (development); an
        # operator turns them off with TIERMEM_DOCS=false.
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
        openapi_url="/openapi.json" if settings.docs else None,
        # "/v1/sessions/" is a session id left empty, not the listing: a 404, not
        # a redirect to another route.
        redirect_slashes=False,
    )
    app.state.services = services
    install_error_handlers(app)
    app.include_router(turns.router)
    app.include_router(sessions.router)
    app.include_router(memories.router)
    app.include_router(probes.router)
    app.include_router(agents.router)
    app.include_router(skills.router)
    app.include_router(forget.router)
    app.include_router(openai.router)
    # MCP (Streamable HTTP, stateless) behind the same API keys: app/mcp_server.py.
    app.router.routes.append(mcp.route)
    if settings.ui:
        mount_inspector(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
