"""The playground: a static page at ``/`` and ``/playground`` that runs jobs through the job API and draws them live.

The page is plain HTML/CSS/JS under ``app/static`` (no build step, nothing fetched from outside); it talks only to
the public HTTP API (``POST /jobs``, ``GET /jobs/{id}/events``), so it needs no routes of its own beyond these.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static"

# Same-origin only: the page may not load or send anything to another host.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


class RevalidatedStaticFiles(StaticFiles):
    """The page's assets, revalidated on each load like the page itself (ETag / Last-Modified, so a 304 costs little):
    after an upgrade a browser never runs the old scripts with the new page. They carry the page's headers too: the
    page itself is also served as ``/static/index.html``, and must not be framed or run scripts from elsewhere there."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


@router.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)  # HEAD: link checkers, uptime probes
@router.api_route("/playground", methods=["GET", "HEAD"], response_class=HTMLResponse)
async def playground() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"), headers=HEADERS)


def install_playground(app: FastAPI) -> None:
    """Serve the page and its assets (``/static/...``); neither appears in the OpenAPI document."""
    app.include_router(router)
    app.mount("/static", RevalidatedStaticFiles(directory=STATIC), name="static")
