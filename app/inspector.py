"""The web inspector at ``/ui/``: plain static files (app/ui/), no build step.

The files hold no data and are served to anyone: a browser cannot send the API key
on a page load. Everything the page shows comes from the JSON API, which checks the
key the user types into the page (kept in the tab's sessionStorage, see
app/ui/inspector.js). A strict Content-Security-Policy allows only the page's own
script and sheet and calls to this origin, so stored text that looks like markup
can never run, even if a future change rendered it as HTML. ``TIERMEM_UI=false``
turns the route off (404).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

UI_DIR = Path(__file__).with_name("ui")

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Assets change with the package: the browser asks again (a 304 is cheap).
    "Cache-Control": "no-cache",
}


class InspectorFiles(StaticFiles):
    """app/ui/, with the headers above on every answer."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount_inspector(app: FastAPI) -> None:
    async def to_index() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    # redirect_slashes is off (app/main.py): "/ui" is sent to "/ui/" here.
    app.add_api_route("/ui", to_index, methods=["GET"], include_in_schema=False)
    app.mount("/ui", InspectorFiles(directory=UI_DIR, html=True), name="ui")
