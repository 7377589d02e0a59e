"""The interactive API docs (``/docs``, ``/redoc``) with their scripts served from here, not from a CDN.

FastAPI's own pages load Swagger UI and ReDoc from cdn.jsdelivr.net, so they stay blank on a machine without internet
access (where a model server often runs). The ``fastapi-offline`` package ships both bundles; only its static
folder is used. Without it the pages fall back to FastAPI's CDN ones.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_ASSETS = "/docs-assets"
# The pages run inline scripts (a script policy would need 'unsafe-inline'): no framing, no sniffing, no referrer.
DOCS_HEADERS = {"Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def assets_folder() -> Path | None:
    """The folder holding ``swagger-ui-bundle.js``, ``swagger-ui.css`` and ``redoc.standalone.js``, if installed."""
    spec = importlib.util.find_spec("fastapi_offline")
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "static"
        if all((folder / name).is_file() for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js")):
            return folder
    return None


def install_docs(app: FastAPI, folder: Path) -> None:
    """Serve ``/docs``, its OAuth2 redirect and ``/redoc`` with the bundles in ``folder`` (the app was built with
    ``docs_url=None, redoc_url=None``)."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=folder), name="docs-assets")
    favicon = f"{DOCS_ASSETS}/favicon.png" if (folder / "favicon.png").is_file() else None

    def under_root(request: Request, path: str) -> str:
        return request.scope.get("root_path", "").rstrip("/") + path

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return _guarded(get_swagger_ui_html(
            openapi_url=under_root(request, app.openapi_url), title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=under_root(request, "/docs/oauth2-redirect"),
            swagger_js_url=under_root(request, f"{DOCS_ASSETS}/swagger-ui-bundle.js"),
            swagger_css_url=under_root(request, f"{DOCS_ASSETS}/swagger-ui.css"),
            **({"swagger_favicon_url": under_root(request, favicon)} if favicon else {}),
            swagger_ui_parameters=app.swagger_ui_parameters,
        ))

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return _guarded(get_swagger_ui_oauth2_redirect_html())

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return _guarded(get_redoc_html(
            openapi_url=under_root(request, app.openapi_url), title=f"{app.title} - ReDoc",
            redoc_js_url=under_root(request, f"{DOCS_ASSETS}/redoc.standalone.js"),
            **({"redoc_favicon_url": under_root(request, favicon)} if favicon else {}),
            with_google_fonts=False,
        ))


def _guarded(page: HTMLResponse) -> HTMLResponse:
    page.headers.update(DOCS_HEADERS)
    return page
