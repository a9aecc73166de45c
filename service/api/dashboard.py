"""The HTML dashboard: server-rendered pages that one small script fills from ``/api/v1``.

Every page is a Jinja2 template (``templates/``) with the navigation bar,
the readiness badge and the footer; ``static/dashboard.js`` fetches the
page's data from the REST API, renders it with DOM calls only (text from the
network is never parsed as HTML) and polls the live pages without reloading.
Actions (retry, cancel, force complete, resend, C-ECHO) are POSTs to the
``/api/v1`` action routes; when the API answers 401 the script asks once for
a bearer token and keeps it in the tab's ``sessionStorage``.

No front-end build, no CDN: the pages work offline. They show no patient
data: series and studies are named by their UIDs, peers by AE title.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

#: The navigation bar: (path, label).
NAV = (
    ("/", "Live"),
    ("/destinations", "Destinations"),
    ("/models", "Models"),
    ("/rules", "Rules"),
    ("/audit", "Audit"),
)

#: Scripts and styles come from this server only; no inline script runs, so
#: text that reaches a page from the network cannot execute even if it were
#: ever inserted as markup.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)

HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _asset_version() -> str:
    """A short hash of the static files, appended to their URLs to defeat stale caches."""
    digest = hashlib.sha256()
    for path in sorted(STATIC.glob("*")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _node(request: Request) -> dict[str, str]:
    """The node's AE title and configuration version for the header ("" if unknown)."""
    context = getattr(request.app.state, "radnode", None)
    if context is None:
        return {"ae_title": "", "config_version": ""}
    try:
        settings = context.settings()
        return {"ae_title": settings.dicom.ae_title,
                "config_version": settings.config_version}
    except Exception:  # the header must render even while settings are being reloaded
        return {"ae_title": "", "config_version": ""}


def mount(app: FastAPI) -> None:
    """Add the dashboard's pages and static files to ``app``.

    Pages: ``/`` (live view of recent studies), ``/series/{id}``,
    ``/destinations``, ``/models``, ``/rules`` and ``/audit``; static files
    under ``/static``. None of them is part of the OpenAPI schema.

    Parameters
    ----------
    app : fastapi.FastAPI
        The node's application (:func:`service.api.app.create_app`).
    """
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                                     trim_blocks=True, lstrip_blocks=True)
    templates = Jinja2Templates(env=environment)
    version = _asset_version()
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    def render(request: Request, template: str, title: str, page: str,
               **extra: Any) -> HTMLResponse:
        context = {"title": title, "page": page, "nav": NAV, "path": request.url.path,
                   "asset_version": version, "node": _node(request), **extra}
        return templates.TemplateResponse(request, template, context, headers=HEADERS)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def live(request: Request) -> HTMLResponse:
        """Recent studies, their series and pipeline stages, refreshed every few seconds."""
        return render(request, "index.html", "Live", "live")

    @app.get("/series/{series_id}", response_class=HTMLResponse, include_in_schema=False)
    def series(request: Request, series_id: int) -> HTMLResponse:
        """One series: stages timeline, jobs, results and deliveries."""
        return render(request, "series.html", f"Series {series_id}", "series",
                      series_id=series_id)

    @app.get("/destinations", response_class=HTMLResponse, include_in_schema=False)
    def destinations(request: Request) -> HTMLResponse:
        """Destinations with deliveries by state, C-ECHO, and recent deliveries."""
        return render(request, "destinations.html", "Destinations", "destinations")

    @app.get("/models", response_class=HTMLResponse, include_in_schema=False)
    def models(request: Request) -> HTMLResponse:
        """Declared models and where they are loaded; worker processes."""
        return render(request, "models.html", "Models", "models")

    @app.get("/rules", response_class=HTMLResponse, include_in_schema=False)
    def rules(request: Request) -> HTMLResponse:
        """Routing rules and the fallback in force."""
        return render(request, "rules.html", "Rules", "rules")

    @app.get("/audit", response_class=HTMLResponse, include_in_schema=False)
    def audit(request: Request) -> HTMLResponse:
        """Recent audit events and the export links."""
        return render(request, "audit.html", "Audit", "audit")
