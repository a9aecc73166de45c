"""Authentication and authorization of every HTTP request.

:class:`AuthMiddleware` authenticates each request before any route runs
(default deny: a route added later is protected without doing anything),
from an ``Authorization: Bearer <token>`` header (API clients, Prometheus)
or the dashboard's session cookie. Only ``/healthz``, the login page and its
stylesheet are open, and ``/metrics`` when ``http.metrics_auth`` is false.
A request without valid credentials gets 401 with ``WWW-Authenticate:
Bearer`` (a browser asking for a page is sent to ``/login`` instead).
A state-changing request authenticated by the session cookie must carry the
session's CSRF token in ``X-CSRF-Token``; bearer-token requests need none
(a browser never adds that header by itself).

Routes then ask for a role with :func:`require_role`::

    @router.get("/deid/mappings", dependencies=[Depends(require_role("admin"))])

or take the :class:`Principal` (``who: Operator``) to name the actor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service import auth

log = logging.getLogger("radnode.api")

#: The dashboard's session cookie.
SESSION_COOKIE = "radnode_session"
#: The header that carries the CSRF token of a dashboard session.
CSRF_HEADER = "x-csrf-token"
#: Paths served without credentials (``/metrics`` too when ``http.metrics_auth`` is false).
OPEN_PATHS = frozenset({"/healthz", "/login", "/static/dashboard.css"})
#: Routes that check the CSRF token themselves (a form field, not a header).
CSRF_IN_FORM = frozenset({"/logout"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Where :class:`Principal` is kept in the ASGI scope's state.
STATE_KEY = "radnode_principal"

#: Documents bearer authentication in the OpenAPI schema (the "Authorize" button of /docs).
bearer_scheme = HTTPBearer(auto_error=False, scheme_name="token",
                           description="An API token from `radnode tokens create`.")


@dataclass(frozen=True)
class Principal:
    """Who made a request.

    Attributes
    ----------
    name, role : str
        The user and their role (``viewer``, ``operator`` or ``admin``).
    method : {"token", "session"}
        A bearer token or the dashboard's session cookie.
    session_id : str or None
        The dashboard session's id (for its CSRF token); None for tokens.
    """

    name: str
    role: str
    method: Literal["token", "session"]
    session_id: str | None = None

    @property
    def actor(self) -> str:
        """The audit trail's actor: ``api:<name>`` (token) or ``web:<name>`` (dashboard)."""
        return f"{'api' if self.method == 'token' else 'web'}:{self.name}"

    @property
    def csrf_token(self) -> str:
        """The CSRF token of the dashboard session ("" for a token)."""
        return auth.csrf_token(self.session_id) if self.session_id else ""

    def allows(self, role: str) -> bool:
        """Whether this principal's role includes ``role``."""
        return auth.role_allows(self.role, role)


def client_address(scope: Scope) -> str:
    """The client's IP address (from the trusted proxy's header when configured)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _settings(scope: Scope) -> Any:
    return scope["app"].state.radnode.settings()


def _authenticate(scope: Scope, request: Request) -> Principal | None:
    """The principal of a request's bearer token or session cookie (None: neither valid)."""
    context = scope["app"].state.radnode
    header = request.headers.get("authorization")
    with context.session_factory() as session:
        if header is not None:
            scheme, _, token = header.partition(" ")
            found = (auth.authenticate_token(session, token.strip())
                     if scheme.lower() == "bearer" else None)
            session.commit()
            if found is None:
                return None
            user, _row = found
            return Principal(user.name, user.role, "token")
        session_id = request.cookies.get(SESSION_COOKIE)
        if not session_id:
            return None
        idle = timedelta(minutes=context.settings().http.session_idle_minutes)
        seen = auth.session_user(session, session_id, idle=idle)
        session.commit()
        if seen is None:
            return None
        user, _web = seen
        return Principal(user.name, user.role, "session", session_id=session_id)


def _wants_page(request: Request) -> bool:
    """A browser navigating to a page (sent to the login form rather than given 401)."""
    path = request.url.path
    return (request.method in ("GET", "HEAD") and "text/html" in request.headers.get("accept", "")
            and not path.startswith("/api/") and path not in ("/metrics", "/openapi.json"))


def unauthorized(detail: str = "authentication required: a valid bearer token or a "
                               "dashboard login") -> JSONResponse:
    """401 with ``WWW-Authenticate: Bearer`` (RFC 6750 3)."""
    return JSONResponse({"detail": detail}, status_code=401,
                        headers={"WWW-Authenticate": "Bearer"})


class AuthMiddleware:
    """ASGI middleware: authenticate every request, check CSRF on cookie-authenticated writes.

    Parameters
    ----------
    app : ASGI application
        The next application (the FastAPI router); its ``state.radnode`` is
        the :class:`service.api.app.ApiContext`.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Authenticate an HTTP request, then pass it on or answer 401, 303 or 403."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in OPEN_PATHS or (path == "/metrics"
                                  and not _settings(scope).http.metrics_auth):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            principal = await run_in_threadpool(_authenticate, scope, request)
        except SQLAlchemyError as exc:  # no database, no credentials to check: not ready
            log.error("cannot check credentials: %s", type(exc).__name__)
            await JSONResponse({"detail": "cannot check credentials: the database is "
                                          "unreachable"}, status_code=503)(scope, receive, send)
            return
        response = self._refusal(request, principal)
        if response is not None:
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})[STATE_KEY] = principal
        await self.app(scope, receive, send)

    @staticmethod
    def _refusal(request: Request, principal: Principal | None) -> Response | None:
        """401 (or 303 to the login form), 403 for a missing CSRF token, or None: go on."""
        if principal is None:
            if _wants_page(request):
                path = request.url.path
                target = quote(path + (f"?{request.url.query}" if request.url.query else ""),
                               safe="/?=&")
                return RedirectResponse(f"/login?next={target}", status_code=303)
            return unauthorized()
        if (principal.method == "session" and request.method not in SAFE_METHODS
                and request.url.path not in CSRF_IN_FORM
                and not auth.check_csrf(principal.session_id or "",
                                        request.headers.get(CSRF_HEADER, ""))):
            return JSONResponse({"detail": "missing or wrong CSRF token (X-CSRF-Token)"},
                                status_code=403)
        return None


def current_principal(request: Request) -> Principal | None:
    """The request's :class:`Principal`, or None on an open path."""
    principal = request.scope.get("state", {}).get(STATE_KEY)
    return principal if isinstance(principal, Principal) else None


def _role_dependency(role: str) -> Callable[..., Principal]:
    def dependency(request: Request, _credentials: Annotated[
            HTTPAuthorizationCredentials | None, Depends(bearer_scheme)] = None) -> Principal:
        principal = current_principal(request)
        if principal is None:  # an open path, or an app built without the middleware
            raise HTTPException(401, "authentication required",
                                headers={"WWW-Authenticate": "Bearer"})
        if not principal.allows(role):
            raise HTTPException(403, f"this needs the {role} role; {principal.name} is "
                                     f"{principal.role}")
        return principal

    dependency.__name__ = f"require_{role}"
    return dependency


_DEPENDENCIES = {role: _role_dependency(role) for role in auth.ROLES}


def require_role(role: auth.Role) -> Callable[..., Principal]:
    """A FastAPI dependency: the request's :class:`Principal` if its role includes ``role``.

    Raises 401 (no principal) or 403 (role too low) when the route runs.
    Use it as ``dependencies=[Depends(require_role("admin"))]`` or through
    :data:`Viewer`, :data:`Operator` and :data:`Admin`.

    Parameters
    ----------
    role : {"viewer", "operator", "admin"}
        The least role allowed.
    """
    return _DEPENDENCIES[role]


Viewer = Annotated[Principal, Depends(require_role("viewer"))]
Operator = Annotated[Principal, Depends(require_role("operator"))]
Admin = Annotated[Principal, Depends(require_role("admin"))]
