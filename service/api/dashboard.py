"""The HTML dashboard: server-rendered pages that one small script fills from ``/api/v1``.

Every page is a Jinja2 template (``templates/``) with the navigation bar,
the readiness badge and the footer; ``static/dashboard.js`` fetches the
page's data from the REST API, renders it with DOM calls only (text from the
network is never parsed as HTML) and polls the live pages without reloading.
Actions (retry, cancel, force complete, resend, C-ECHO) are POSTs to the
``/api/v1`` action routes with the session's CSRF token in ``X-CSRF-Token``
(from the page's ``<meta name="csrf-token">``); a viewer gets no action
buttons and no audit page.

Users log in at ``/login`` with their name and password (``radnode users``);
the session cookie is HttpOnly, SameSite=Strict, Secure over HTTPS, and ends
after ``http.session_idle_minutes`` without a request or
``http.session_max_hours`` after the login. ``/logout`` (a POST with the
CSRF token) ends it. Failed logins are throttled and audited.

No front-end build, no CDN: the pages work offline. They show no patient
data: series and studies are named by their UIDs, peers by AE title.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jinja2
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from service import auth
from service.api.auth import (
    SESSION_COOKIE,
    Viewer,
    client_address,
    current_principal,
    require_role,
)

log = logging.getLogger("radnode.api")

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

#: The navigation bar: (path, label, least role).
NAV = (
    ("/", "Live", "viewer"),
    ("/destinations", "Destinations", "viewer"),
    ("/models", "Models", "viewer"),
    ("/rules", "Rules", "viewer"),
    ("/audit", "Audit", "admin"),
)
#: The largest login form accepted, bytes.
MAX_FORM_BYTES = 4096

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
        user = current_principal(request)
        nav = [(href, label) for href, label, role in NAV if user is not None and user.allows(role)]
        context = {"title": title, "page": page, "nav": nav, "path": request.url.path,
                   "asset_version": version, "node": _node(request), "user": user,
                   "csrf_token": user.csrf_token if user is not None else "", **extra}
        return templates.TemplateResponse(request, template, context, headers=HEADERS)

    viewer = [Depends(require_role("viewer"))]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False, dependencies=viewer)
    def live(request: Request) -> HTMLResponse:
        """Recent studies, their series and pipeline stages, refreshed every few seconds."""
        return render(request, "index.html", "Live", "live")

    @app.get("/series/{series_id}", response_class=HTMLResponse, include_in_schema=False,
             dependencies=viewer)
    def series(request: Request, series_id: int) -> HTMLResponse:
        """One series: stages timeline, jobs, results and deliveries."""
        return render(request, "series.html", f"Series {series_id}", "series",
                      series_id=series_id)

    @app.get("/destinations", response_class=HTMLResponse, include_in_schema=False,
             dependencies=viewer)
    def destinations(request: Request) -> HTMLResponse:
        """Destinations with deliveries by state, C-ECHO, and recent deliveries."""
        return render(request, "destinations.html", "Destinations", "destinations")

    @app.get("/models", response_class=HTMLResponse, include_in_schema=False,
             dependencies=viewer)
    def models(request: Request) -> HTMLResponse:
        """Declared models and where they are loaded; worker processes."""
        return render(request, "models.html", "Models", "models")

    @app.get("/rules", response_class=HTMLResponse, include_in_schema=False,
             dependencies=viewer)
    def rules(request: Request) -> HTMLResponse:
        """Routing rules and the fallback in force."""
        return render(request, "rules.html", "Rules", "rules")

    @app.get("/audit", response_class=HTMLResponse, include_in_schema=False,
             dependencies=[Depends(require_role("admin"))])
    def audit(request: Request) -> HTMLResponse:
        """Recent audit events and the export links (admin only)."""
        return render(request, "audit.html", "Audit", "audit")

    throttle = auth.LoginThrottle()
    app.state.login_throttle = throttle

    def login_page(request: Request, *, status: int = 200, message: str = "",
                   notice: str = "", name: str = "", next_path: str = "/") -> HTMLResponse:
        context = {"node": _node(request), "asset_version": version, "message": message,
                   "notice": notice, "name": name, "next": _safe_next(next_path)}
        return templates.TemplateResponse(request, "login.html", context, status_code=status,
                                          headers=HEADERS)

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request, next: str = "/", ended: str = "") -> HTMLResponse:
        """The login form (open to everyone)."""
        return login_page(request, next_path=next,
                          notice="You are logged out." if ended else "")

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        """Check name and password; open a session (cookie) and go to ``next``.

        401 with the form again on a wrong name or password (the same answer
        for both), 429 after too many failures, 403 from another site.
        """
        if not _same_origin(request):
            raise HTTPException(403, "login from another site refused")
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, "login form too large")
        form = dict(parse_qsl(body.decode("utf-8", "replace"), max_num_fields=10))
        name = form.get("name", "").strip()[:64]
        password = form.get("password", "")
        next_path = form.get("next", "/")
        client = client_address(request.scope)
        wait = throttle.retry_after(name, client)
        if wait > 0:
            log.warning("login of a user from %s refused: too many failures", client)
            return login_page(request, status=429, name=name, next_path=next_path,
                              message=f"Too many failed logins: try again in "
                                      f"{int(wait // 60) + 1} min.")
        settings = request.app.state.radnode.settings().http
        done = await run_in_threadpool(
            _login, request, name, password, timedelta(hours=settings.session_max_hours),
            client)
        if done is None:
            throttle.failed(name, client)
            return login_page(request, status=401, name=name, next_path=next_path,
                              message="Unknown user or wrong password.")
        throttle.succeeded(name, client)
        response = RedirectResponse(_safe_next(next_path), status_code=303)
        response.set_cookie(SESSION_COOKIE, done, max_age=int(settings.session_max_hours * 3600),
                            path="/", httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request, who: Viewer) -> Response:
        """End the dashboard session (form POST with its CSRF token) and show the login form."""
        body = await request.body()
        form = dict(parse_qsl(body[:MAX_FORM_BYTES].decode("utf-8", "replace"),
                              max_num_fields=10))
        if who.session_id is None or not auth.check_csrf(who.session_id,
                                                          form.get("csrf_token", "")):
            raise HTTPException(403, "missing or wrong CSRF token")
        await run_in_threadpool(_logout, request, who.session_id)
        response = RedirectResponse("/login?ended=1", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
        return response


def _safe_next(target: str) -> str:
    """``target`` if it is a path on this server, else ``/`` (no open redirect)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if urlsplit(target).netloc or any(ord(c) < 0x20 for c in target):
        return "/"
    return target


def _same_origin(request: Request) -> bool:
    """Whether a login form was posted from this server (against login CSRF, OWASP).

    Browsers say where a request comes from in ``Sec-Fetch-Site``; ``Origin``
    is checked when it names a site (the pages' ``Referrer-Policy:
    no-referrer`` makes it ``null`` for their own forms). Clients that send
    neither (scripts) are let through: they hold the password anyway.
    """
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin", "null")
    return origin == "null" or urlsplit(origin).netloc == request.headers.get("host", "")


def _login(request: Request, name: str, password: str, max_age: timedelta,
           client: str) -> str | None:
    with request.app.state.radnode.session_factory() as session:
        done = auth.login(session, name, password, max_age=max_age, client=client)
        session.commit()
    return done[1] if done is not None else None


def _logout(request: Request, session_id: str) -> None:
    with request.app.state.radnode.session_factory() as session:
        auth.logout(session, session_id)
        session.commit()
