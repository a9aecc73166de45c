"""Authentication and authorization of the HTTP API and dashboard, in process.

FastAPI's TestClient on a real, migrated SQLite database; users and tokens
are made with the real ``radnode users``/``radnode tokens`` commands (click's
runner) or :mod:`service.auth`. HTTPS is served by the real uvicorn server
with a certificate made by openssl.
"""

from __future__ import annotations

import logging
import re
import shutil
import sqlite3
import ssl
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from starlette.routing import Mount, Route

from service import audit, auth
from service.api.app import ApiContext, create_app
from service.api.auth import SESSION_COOKIE
from service.api.server import ApiServer
from service.cli import main
from service.config import Settings, dump_settings, load_settings
from service.db.models import ApiToken, User, WebSession
from service.db.session import utcnow
from service.errors import ConfigError
from service.metrics import NodeMetrics
from tests.unit.conftest import DESTINATIONS
from tests.unit.test_actions_audit import make_job, make_series

PASSWORD = "correct horse battery staple"
#: Paths that answer without credentials.
OPEN = {"/healthz", "/login"}


def app_for(settings: Settings, factory: sessionmaker[Session], *,
            dashboard: bool = True) -> FastAPI:
    metrics = NodeMetrics(lambda: settings, factory)
    context = ApiContext(settings=lambda: settings, session_factory=factory,
                         render_metrics=metrics.render, echo=lambda d, ae: 0)
    return create_app(context, dashboard=dashboard)


@pytest.fixture
def app(settings: Settings, session_factory: sessionmaker[Session]) -> FastAPI:
    return app_for(settings, session_factory)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "200"})  # rich tables unwrapped


def cli(settings: Settings, *args: str, stdin: str | None = None) -> Any:
    result = runner().invoke(main, [*args, "--data-dir", str(settings.data_dir)],
                                input=stdin, catch_exceptions=False)
    return result


def add_user(settings: Settings, name: str, role: str, password: str | None = PASSWORD) -> None:
    args = ["users", "add", name, "--role", role]
    args += ["--password-stdin"] if password is not None else ["--no-password"]
    result = cli(settings, *args, stdin=f"{password}\n" if password is not None else None)
    assert result.exit_code == 0, result.output


def new_token(settings: Settings, user: str, *extra: str) -> str:
    result = runner().invoke(main, ["tokens", "create", user, "--data-dir",
                                       str(settings.data_dir), *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert auth.TOKEN_RE.match(token), token
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def tokens(settings: Settings) -> dict[str, str]:
    """One user of each role, with a password and a token each."""
    out = {}
    for role in auth.ROLES:
        add_user(settings, role, role)
        out[role] = new_token(settings, role)
    return out


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def every_request(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route and mount of the application, included routers too."""
    requests: list[tuple[str, str]] = []

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            if isinstance(route, APIRoute | Route):
                for method in sorted(route.methods or {"GET"}):
                    requests.append((method, prefix + concrete(route.path)))
            elif isinstance(route, Mount):
                requests.append(("GET", f"{prefix}{route.path}/dashboard.js"))
            elif hasattr(route, "original_router"):  # FastAPI's include_router
                walk(route.original_router.routes, prefix + route.include_context.prefix)
            else:  # a new kind of route: this walk must learn it
                raise AssertionError(f"unknown route type {route!r}")

    walk(list(app.routes), "")
    return requests


# -- no credentials -------------------------------------------------------------------------


def test_every_route_but_healthz_and_login_needs_credentials(client: TestClient,
                                                             app: FastAPI) -> None:
    requests = every_request(app)
    paths = {path for _, path in requests}
    # the walk sees what it must: API, probes, docs, dashboard pages, static files
    assert {"/api/v1/studies", "/api/v1/jobs/1/retry", "/api/v1/audit/export", "/readyz",
            "/metrics", "/docs", "/openapi.json", "/", "/audit", "/logout",
            "/static/dashboard.js", "/healthz", "/login"} <= paths
    for method, path in requests:
        response = client.request(method, path)
        if path in OPEN:  # (an empty login form is a failed login: 401, but no challenge)
            assert "www-authenticate" not in response.headers, (method, path)
            continue
        assert response.status_code == 401, (method, path, response.status_code)
        assert response.headers["www-authenticate"] == "Bearer", (method, path)
        if method != "HEAD":
            assert set(response.json()) == {"detail"}, (method, path)  # nothing else leaks
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/static/dashboard.css").status_code == 200  # the login page's style


def test_a_browser_is_sent_to_the_login_form(client: TestClient) -> None:
    page = client.get("/series/3?x=1", headers={"Accept": "text/html"}, follow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"] == "/login?next=/series/3?x=1"
    api = client.get("/api/v1/studies", headers={"Accept": "text/html"})
    assert api.status_code == 401  # the API never redirects


@pytest.mark.parametrize("header", [
    "Bearer rn_00000000_" + "A" * 43,            # well formed, unknown
    "Bearer not-a-token",
    "Bearer ",
    "Basic YWRtaW46cGFzcw==",
    "rn_00000000_" + "A" * 43,                  # no scheme
])
def test_invalid_tokens_are_refused(client: TestClient, tokens: dict[str, str],
                                    header: str) -> None:
    response = client.get("/api/v1/studies", headers={"Authorization": header})
    assert response.status_code == 401, header
    assert response.headers["www-authenticate"] == "Bearer"


def test_revoked_expired_and_disabled_tokens_are_refused(
    client: TestClient, settings: Settings, session_factory: sessionmaker[Session],
    tokens: dict[str, str]
) -> None:
    admin = tokens["admin"]
    assert client.get("/api/v1/studies", headers=bearer(admin)).status_code == 200
    # a token one character off
    other = admin[:-1] + ("A" if admin[-1] != "A" else "B")
    assert client.get("/api/v1/studies", headers=bearer(other)).status_code == 401

    # revoked with the CLI
    with session_factory() as session:
        row = session.scalar(select(ApiToken).where(
            ApiToken.token_hash == auth.sha256_hex(admin)))
        assert row is not None
        token_id = row.id
    revoked = cli(settings, "tokens", "revoke", str(token_id))
    assert revoked.exit_code == 0 and f"token {token_id}" in revoked.output
    assert client.get("/api/v1/studies", headers=bearer(admin)).status_code == 401

    # expired
    short = new_token(settings, "operator", "--expires-days", "1")
    assert client.get("/api/v1/studies", headers=bearer(short)).status_code == 200
    with session_factory() as session:
        session.execute(update(ApiToken).where(ApiToken.token_hash == auth.sha256_hex(short))
                        .values(expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()
    assert client.get("/api/v1/studies", headers=bearer(short)).status_code == 401

    # the user disabled: every token of theirs refused, enabling does not revive them
    viewer = tokens["viewer"]
    assert client.get("/api/v1/studies", headers=bearer(viewer)).status_code == 200
    assert cli(settings, "users", "disable", "viewer").exit_code == 0
    assert client.get("/api/v1/studies", headers=bearer(viewer)).status_code == 401
    assert cli(settings, "users", "enable", "viewer").exit_code == 0
    assert client.get("/api/v1/studies", headers=bearer(viewer)).status_code == 401
    fresh = new_token(settings, "viewer")
    assert client.get("/api/v1/studies", headers=bearer(fresh)).status_code == 200


# -- roles ----------------------------------------------------------------------------------


def test_roles(client: TestClient, session_factory: sessionmaker[Session],
               tokens: dict[str, str]) -> None:
    series = make_series(session_factory, study_uid="1.2.3", calling_ae="CT", at=utcnow())
    job = make_job(session_factory, series, "failed", created=utcnow())
    viewer, operator, admin = (bearer(tokens[r]) for r in ("viewer", "operator", "admin"))

    for headers in (viewer, operator, admin):
        for path in ("/api/v1/studies", "/api/v1/series", f"/api/v1/jobs/{job}",
                     "/api/v1/deliveries", "/api/v1/models", "/readyz", "/metrics",
                     "/openapi.json", "/docs"):
            assert client.get(path, headers=headers).status_code == 200, path

    # viewer: no action, no audit trail
    for path in (f"/api/v1/jobs/{job}/retry", f"/api/v1/series/{series}/complete",
                 "/api/v1/deliveries/retry-failed", "/api/v1/destinations/PACS/echo"):
        refused = client.post(path, headers=viewer)
        assert refused.status_code == 403, path
        assert refused.json()["detail"] == "this needs the operator role; viewer is viewer"
    for path in ("/api/v1/audit", "/api/v1/audit/export"):
        assert client.get(path, headers=viewer).status_code == 403, path
        assert client.get(path, headers=operator).status_code == 403, path  # admin only
        assert client.get(path, headers=admin).status_code == 200, path
    with session_factory() as session:
        assert [e.action for e in audit.events(session)
                if not e.action.startswith(("user.", "token."))] == []

    # operator acts, audited as api:operator
    retried = client.post(f"/api/v1/jobs/{job}/retry", headers=operator)
    assert retried.status_code == 200, retried.text
    echo = client.post("/api/v1/destinations/PACS/echo", headers=admin)
    assert echo.status_code == 200 and echo.json()["ok"] is True
    events = client.get("/api/v1/audit", headers=admin).json()["items"]
    assert [(e["actor"], e["action"]) for e in events[:2]] == [
        ("api:admin", "destination.echo"), ("api:operator", "job.retry")]

    me = client.get("/api/v1/me", headers=operator).json()
    assert me == {"name": "operator", "role": "operator", "method": "token",
                  "actor": "api:operator"}


def test_role_change_takes_effect_on_the_next_request(
    client: TestClient, settings: Settings, tokens: dict[str, str]
) -> None:
    viewer = bearer(tokens["viewer"])
    assert client.get("/api/v1/audit", headers=viewer).status_code == 403
    assert cli(settings, "users", "set-role", "viewer", "admin").exit_code == 0
    assert client.get("/api/v1/audit", headers=viewer).status_code == 200


def test_openapi_documents_bearer_tokens(client: TestClient, tokens: dict[str, str]) -> None:
    schema = client.get("/openapi.json", headers=bearer(tokens["viewer"])).json()
    assert schema["components"]["securitySchemes"]["token"] == {
        "type": "http", "scheme": "bearer",
        "description": "An API token from `radnode tokens create`."}
    assert {"token": []} in schema["paths"]["/api/v1/jobs/{job_id}/retry"]["post"]["security"]


# -- /metrics -------------------------------------------------------------------------------


def test_metrics_open_or_protected_by_config(settings: Settings,
                                             session_factory: sessionmaker[Session],
                                             tokens: dict[str, str]) -> None:
    with TestClient(app_for(settings, session_factory)) as client:
        assert client.get("/metrics").status_code == 401
        scraped = client.get("/metrics", headers=bearer(tokens["viewer"]))
        assert scraped.status_code == 200 and "radnode_jobs" in scraped.text
    open_settings = settings.model_copy(update={"http": settings.http.model_copy(
        update={"metrics_auth": False})})
    with TestClient(app_for(open_settings, session_factory)) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/api/v1/studies").status_code == 401  # only /metrics is open


# -- tokens at rest and the CLI -------------------------------------------------------------


def test_tokens_and_passwords_are_stored_hashed(settings: Settings,
                                                session_factory: sessionmaker[Session],
                                                tokens: dict[str, str]) -> None:
    database = Path(settings.database_url.removeprefix("sqlite:///"))
    connection = sqlite3.connect(database)
    try:
        dump = "\n".join(connection.iterdump())
    finally:
        connection.close()
    for token in tokens.values():
        secret = token.split("_", 2)[2]
        assert secret not in dump
        assert auth.sha256_hex(token) in dump
    assert PASSWORD not in dump
    with session_factory() as session:
        hashes = [u.password_hash for u in session.scalars(select(User))]
    assert len(hashes) == 3 and all(h and h.startswith("$argon2id$") for h in hashes)
    assert len(set(hashes)) == 3  # salted
    # nor in the settings handed to a worker
    dump_settings(settings, settings.data_dir / "worker.yaml")
    text = (settings.data_dir / "worker.yaml").read_text()
    assert "users" not in text and "rn_" not in text


def test_cli_users_and_tokens(settings: Settings, session_factory: sessionmaker[Session],
                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    add_user(settings, "pacsadmin", "admin")
    add_user(settings, "prometheus", "viewer", password=None)
    taken = cli(settings, "users", "add", "pacsadmin", "--role", "viewer", "--no-password")
    assert taken.exit_code != 0 and "already exists" in taken.output
    short = cli(settings, "users", "add", "x", "--role", "viewer", "--password-stdin",
                stdin="short\n")
    assert short.exit_code != 0 and "at least 12 characters" in short.output
    bad = cli(settings, "users", "add", "a b", "--role", "viewer", "--no-password")
    assert bad.exit_code != 0 and "invalid" in bad.output
    role = cli(settings, "users", "add", "y", "--role", "root", "--no-password")
    assert role.exit_code != 0  # click refuses the choice

    created = runner().invoke(main, ["tokens", "create", "prometheus", "--label", "scrape",
                                        "--expires-days", "30", "--data-dir",
                                        str(settings.data_dir)])
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    assert auth.TOKEN_RE.match(token)
    assert "shown only now" in created.stderr and token not in created.stderr
    listed = cli(settings, "tokens", "list")
    assert listed.exit_code == 0
    prefix = token.split("_")[1]
    assert f"rn_{prefix}_…" in listed.output and "scrape" in listed.output
    assert "active" in listed.output and token.split("_", 2)[2] not in listed.output
    assert cli(settings, "tokens", "list", "--user", "nobody").exit_code != 0

    users = cli(settings, "users", "list")
    assert re.search(r"pacsadmin\s*│\s*admin\s*│\s*yes\s*│\s*0", users.output), users.output
    assert re.search(r"prometheus\s*│\s*viewer\s*│\s*no\s*│\s*1", users.output), users.output

    with session_factory() as session:
        token_id = session.scalars(select(ApiToken.id)).one()
    assert cli(settings, "tokens", "revoke", str(token_id)).exit_code == 0
    assert "revoked" in cli(settings, "tokens", "list", "--user", "prometheus").output
    assert cli(settings, "tokens", "revoke", "999").exit_code != 0
    assert cli(settings, "users", "set-role", "nobody", "admin").exit_code != 0

    changed = cli(settings, "users", "password", "pacsadmin", "--password-stdin",
                  stdin="another long password\n")
    assert changed.exit_code == 0, changed.output
    with session_factory() as session:
        user = session.scalar(select(User).where(User.name == "pacsadmin"))
        assert user is not None and auth.verify_password(user.password_hash,
                                                         "another long password")
        events = audit.events(session)
    me = audit.cli_actor()
    assert [(e.actor, e.action, e.target_id) for e in events] == [
        (me, "user.add", "pacsadmin"), (me, "user.add", "prometheus"),
        (me, "token.create", str(token_id)), (me, "token.revoke", str(token_id)),
        (me, "user.password", "pacsadmin")]
    assert events[2].detail["label"] == "scrape" and events[2].detail["prefix"] == prefix
    logged = caplog.text
    assert token not in logged and PASSWORD not in logged and "another long" not in logged


def test_users_add_migrates_a_new_database(tmp_path: Path, settings: Settings) -> None:
    fresh = tmp_path / "fresh"
    result = runner().invoke(main, ["users", "add", "first", "--role", "admin",
                                       "--no-password", "--data-dir", str(fresh)])
    assert result.exit_code == 0, result.output
    assert (fresh / "radnode.db").is_file()


# -- dashboard login, CSRF, logout ----------------------------------------------------------


def login(client: TestClient, name: str, password: str = PASSWORD,
          next_path: str = "/") -> httpx.Response:
    return client.post("/login", data={"name": name, "password": password, "next": next_path},
                       follow_redirects=False)


def csrf(page: httpx.Response) -> str:
    found = re.search(r'<meta name="csrf-token" content="([0-9a-f]{64})">', page.text)
    assert found, page.text[:500]
    return found[1]


def test_dashboard_login_csrf_and_logout(client: TestClient, tokens: dict[str, str],
                                         session_factory: sessionmaker[Session]) -> None:
    form = client.get("/login?next=/destinations")
    assert form.status_code == 200 and 'name="password"' in form.text
    assert 'value="/destinations"' in form.text

    wrong = login(client, "operator", "wrong password!!")
    assert wrong.status_code == 401 and "Unknown user or wrong password" in wrong.text
    unknown = login(client, "nobody", PASSWORD)
    assert unknown.status_code == 401 and "Unknown user or wrong password" in unknown.text
    assert SESSION_COOKIE not in client.cookies

    done = login(client, "operator", next_path="/destinations")
    assert done.status_code == 303 and done.headers["location"] == "/destinations"
    cookie = done.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP here; see the HTTPS test
    session_id = client.cookies[SESSION_COOKIE]

    page = client.get("/destinations")
    assert page.status_code == 200
    token = csrf(page)
    assert 'data-role="operator"' in page.text and ">operator<" in page.text
    assert 'href="/audit"' not in page.text  # admin only
    assert client.get("/audit").status_code == 403
    assert client.get("/api/v1/audit").status_code == 403

    # an action from the page: the session cookie alone is not enough
    echo = "/api/v1/destinations/PACS/echo"
    assert client.post(echo).status_code == 403
    assert client.post(echo, headers={"X-CSRF-Token": "0" * 64}).status_code == 403
    allowed = client.post(echo, headers={"X-CSRF-Token": token})
    assert allowed.status_code == 200, allowed.text
    assert client.get("/api/v1/me").json()["actor"] == "web:operator"

    # logout needs the CSRF token too, then the session is gone for good
    assert client.post("/logout", data={"csrf_token": "x"}).status_code == 403
    out = client.post("/logout", data={"csrf_token": token}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/login?ended=1"
    assert SESSION_COOKIE not in client.cookies
    replay = TestClient(client.app, cookies={SESSION_COOKIE: session_id})
    assert replay.get("/api/v1/studies").status_code == 401
    with session_factory() as session:
        assert session.scalars(select(WebSession)).all() == []
        events = [(e.actor, e.action, e.target_id) for e in audit.events(session)
                  if e.action.startswith(("auth.", "destination."))]
    assert events == [
        ("anonymous@testclient", "auth.login_failed", "operator"),
        ("anonymous@testclient", "auth.login_failed", ""),   # an unknown name is not kept
        ("web:operator", "auth.login", "operator"),
        ("web:operator", "destination.echo", "PACS"),
        ("web:operator", "auth.logout", "operator")]


def test_viewer_page_has_no_action_role_and_bearer_needs_no_csrf(
    client: TestClient, tokens: dict[str, str]
) -> None:
    assert login(client, "viewer").status_code == 303
    page = client.get("/")
    assert 'data-role="viewer"' in page.text
    assert client.post("/api/v1/deliveries/retry-failed",
                       headers={"X-CSRF-Token": csrf(page)}).status_code == 403  # role
    with TestClient(client.app) as api:  # a script: token, no cookie, no CSRF
        response = api.post("/api/v1/deliveries/retry-failed", headers=bearer(tokens["operator"]))
        assert response.status_code == 200, response.text


def test_admin_sees_the_audit_page(client: TestClient, tokens: dict[str, str]) -> None:
    assert login(client, "admin").status_code == 303
    page = client.get("/audit")
    assert page.status_code == 200 and 'href="/audit"' in page.text
    assert client.get("/api/v1/audit/export").status_code == 200


def test_sessions_expire(client: TestClient, tokens: dict[str, str],
                         session_factory: sessionmaker[Session]) -> None:
    assert login(client, "viewer").status_code == 303
    assert client.get("/api/v1/studies").status_code == 200
    with session_factory() as session:  # idle longer than http.session_idle_minutes (30)
        session.execute(update(WebSession).values(last_seen_at=utcnow() - timedelta(minutes=31)))
        session.commit()
    assert client.get("/api/v1/studies").status_code == 401
    with session_factory() as session:
        assert session.scalars(select(WebSession)).all() == []  # deleted when found idle

    assert login(client, "viewer").status_code == 303
    with session_factory() as session:  # past the absolute end
        session.execute(update(WebSession).values(expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()
    assert client.get("/api/v1/studies").status_code == 401

    assert login(client, "viewer").status_code == 303
    with session_factory() as session:
        (row,) = session.scalars(select(WebSession)).all()
        max_age = row.expires_at - row.created_at
    assert max_age == timedelta(hours=12)


def test_password_change_and_disable_end_sessions(client: TestClient, settings: Settings,
                                                  tokens: dict[str, str]) -> None:
    assert login(client, "operator").status_code == 303
    assert cli(settings, "users", "password", "operator", "--password-stdin",
               stdin="a brand new password\n").exit_code == 0
    assert client.get("/api/v1/studies").status_code == 401
    assert login(client, "operator").status_code == 401  # the old password
    assert login(client, "operator", "a brand new password").status_code == 303
    assert client.get("/api/v1/studies").status_code == 200
    assert cli(settings, "users", "disable", "operator").exit_code == 0
    assert client.get("/api/v1/studies").status_code == 401
    assert login(client, "operator", "a brand new password").status_code == 401
    token_only = cli(settings, "users", "add", "bot", "--role", "admin", "--no-password")
    assert token_only.exit_code == 0
    assert login(client, "bot", "").status_code == 401


def test_failed_logins_are_throttled(client: TestClient, tokens: dict[str, str]) -> None:
    for _ in range(5):
        assert login(client, "admin", "not the password").status_code == 401
    throttled = login(client, "admin")  # even the right password, for a while
    assert throttled.status_code == 429 and "Too many failed logins" in throttled.text
    assert login(client, "viewer").status_code == 303  # another name is not locked


def test_login_throttle_window() -> None:
    now = [0.0]
    throttle = auth.LoginThrottle(per_name=3, per_client=5, window_s=60, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.retry_after("a", "10.0.0.1") == 0
        throttle.failed("a", "10.0.0.1")
    assert throttle.retry_after("a", "10.0.0.1") == 60
    assert throttle.retry_after("a", "10.0.0.2") == 0  # another client
    now[0] = 30
    assert throttle.retry_after("a", "10.0.0.1") == 30
    throttle.failed("b", "10.0.0.1")
    throttle.failed("c", "10.0.0.1")
    assert throttle.retry_after("d", "10.0.0.1") == 30  # five failures from the client
    now[0] = 60.5
    assert throttle.retry_after("a", "10.0.0.1") == 0
    throttle.succeeded("b", "10.0.0.1")


def test_login_refuses_other_sites_and_open_redirects(client: TestClient,
                                                      tokens: dict[str, str]) -> None:
    refused = client.post("/login", data={"name": "admin", "password": PASSWORD},
                          headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403
    for site in ("cross-site", "same-site"):
        refused = client.post("/login", data={"name": "admin", "password": PASSWORD},
                              headers={"Sec-Fetch-Site": site, "Origin": "null"})
        assert refused.status_code == 403, site
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:1"):
        done = login(client, "admin", next_path=target)
        assert done.status_code == 303 and done.headers["location"] == "/", target
    too_big = client.post("/login", content=b"name=" + b"a" * 5000,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert too_big.status_code == 413


# -- configuration --------------------------------------------------------------------------


def test_config_users_key_is_refused_with_a_pointer(tmp_path: Path) -> None:
    config = tmp_path / "radnode.yaml"
    config.write_text("http:\n  users:\n    - {name: a, token: '0123456789abcdef'}\n")
    with pytest.raises(ConfigError, match="radnode users add"):
        load_settings(config, data_dir=tmp_path)
    with pytest.raises(ConfigError, match="both cert_file and key_file"):
        load_settings(data_dir=tmp_path, http={"tls": {"cert_file": str(config)}})
    defaults = load_settings(data_dir=tmp_path, destinations=DESTINATIONS).http
    assert (defaults.metrics_auth, defaults.session_idle_minutes,
            defaults.session_max_hours, defaults.trusted_proxies) == (True, 30.0, 12.0, [])


# -- HTTPS ----------------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is missing (apt-get install openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_https_with_secure_cookie(settings: Settings, session_factory: sessionmaker[Session],
                                  tokens: dict[str, str], certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    tls = load_settings(data_dir=settings.data_dir, destinations=DESTINATIONS,
                        http={"tls": {"cert_file": str(cert), "key_file": str(key)}})
    assert tls.http.tls.enabled
    server = ApiServer(app_for(tls, session_factory), "127.0.0.1", 0,
                       cert_file=tls.http.tls.cert_file, key_file=tls.http.tls.key_file)
    server.start()
    try:
        base = f"https://127.0.0.1:{server.port}"
        trust = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=base, verify=trust, timeout=30,
                          follow_redirects=True) as client:
            assert client.get("/healthz").json() == {"status": "alive"}
            assert client.get("/api/v1/studies").status_code == 401
            assert client.get("/api/v1/studies",
                              headers=bearer(tokens["viewer"])).status_code == 200
            done = client.post("/login", data={"name": "viewer", "password": PASSWORD})
            assert done.history and "Secure" in done.history[0].headers["set-cookie"]
            assert done.status_code == 200 and 'data-role="viewer"' in done.text
        with pytest.raises(httpx.ConnectError):  # the certificate is checked
            httpx.get(f"{base}/healthz", timeout=10)
        with pytest.raises(httpx.TransportError):  # no plain HTTP on the TLS port
            httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=10)
    finally:
        server.stop()
