"""``tiermem serve``: one uvicorn process (uvloop, httptools) that drains on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from types import FrameType

import uvicorn

from app.limits import http_protocol
from app.logging_setup import setup_logging
from app.main import create_app
from app.services import Services
from infra.settings import Settings


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, marks the app draining before uvicorn starts shutting
    down: /readyz turns 503 at once and new turns get 503 + Retry-After, while
    in-flight streams get ``TIERMEM_DRAIN_TIMEOUT_S`` to finish."""

    def __init__(self, config: uvicorn.Config, services: Services) -> None:
        super().__init__(config)
        self.services = services

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.services.draining or not self.started:
            # A second signal (or one during start-up): stop now.
            super().handle_exit(sig, frame)
            return
        # Keep listening while draining, so /readyz can answer 503 and new turns
        # get 503 + Retry-After; uvicorn's own shutdown starts once the in-flight
        # turns are done (or stopped at the drain deadline).
        self.services.begin_drain()
        self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit(sig))

    async def _drain_then_exit(self, sig: int) -> None:
        await self.services.wait_turns(self.services.settings.drain_timeout_s + 2)
        super().handle_exit(sig, None)


def serve(host: str | None, port: int | None) -> int:
    overrides: dict[str, object] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    settings = Settings(**overrides)  # type: ignore[arg-type]
    setup_logging(settings.log_format, settings.log_level)
    services = Services(settings)
    app = create_app(settings, services)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        # httptools, with header and body read deadlines (app/limits.py).
        http=http_protocol(settings),
        lifespan="on",
        log_config=None,
        access_log=False,
        # Our own drain stops generation at drain_timeout_s; uvicorn's deadline
        # is a backstop a little after it.
        timeout_graceful_shutdown=int(settings.drain_timeout_s + 5),
    )
    server = DrainingServer(config, services)
    # uvicorn re-raises the signal it caught once it has shut down, which would
    # end the process with -SIGTERM after a clean drain. A drain that finished
    # is a success: exit 0, as Kubernetes expects.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    return 0 if server.started else 1


def describe_llm(settings: Settings) -> int:
    """Prints what answers turns with these settings; 1 where TIERMEM_LLM=engine
    asks for an engine that is not there."""
    from infra.engine import engine_status

    if settings.llm_url:
        print(f"OpenAI-compatible server(s): {settings.llm_url}")
        return 0
    if settings.llm == "dev":
        print("the offline development LLM (TIERMEM_LLM=dev)")
        return 0
    status = engine_status(settings)
    if status.usable:
        print(f"the embedded engine: {status.reason} (python {status.python})")
        return 0
    print(f"the offline development LLM: {status.reason}")
    return 1 if settings.llm == "engine" else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tiermem", description="tiermem memory service")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the HTTP service")
    p_serve.add_argument("--host", default=None, help="bind address (TIERMEM_HOST)")
    p_serve.add_argument("--port", type=int, default=None, help="port (TIERMEM_PORT)")
    sub.add_parser(
        "reindex",
        help="rebuild L3 batches of the schema before pieces (resumable; stop the "
        "service first on Milvus Lite)",
    )
    sub.add_parser("llm", help="say what `tiermem serve` would answer with, and why")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args.host, args.port)
    if args.command == "llm":
        return describe_llm(Settings())
    if args.command == "reindex":
        from app import reindex_cmd

        settings = Settings()
        setup_logging(settings.log_format, settings.log_level)
        return reindex_cmd.main(settings)
    return 2


if __name__ == "__main__":
    sys.exit(main())
