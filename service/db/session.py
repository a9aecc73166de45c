"""Engines and sessions, built on demand (never at import time: it breaks after fork)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.errors import ConfigError

#: PostgreSQL URL schemes that radnode runs on psycopg 3 (SQLAlchemy's own
#: default driver for ``postgresql://`` would be psycopg2, not installed).
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def utcnow() -> datetime:
    """Return the current time, timezone-aware UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Return ``value`` as aware UTC (SQLite gives naive datetimes back)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def normalize_url(url: str) -> str:
    """Return ``url`` with a plain PostgreSQL scheme mapped to psycopg 3.

    ``postgresql://`` and ``postgres://`` (as libpq, Heroku-style and most
    admins write them) become ``postgresql+psycopg://``; any other URL,
    including one that names its driver, is returned unchanged.
    """
    for scheme in _POSTGRES_SCHEMES:
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url.removeprefix(scheme)
    return url


def describe_url(url: str) -> str:
    """``url`` for logs and messages: the password replaced by ``***``."""
    try:
        return make_url(normalize_url(url)).render_as_string(hide_password=True)
    except ArgumentError:
        return "(an unparsable database URL)"


def make_engine(url: str, *, pool_size: int | None = None,
                pool_timeout_s: float = 30.0, synchronous: str = "FULL") -> Engine:
    """Create an engine for ``url``.

    SQLite gets WAL journaling, ``synchronous=FULL`` (a committed row survives
    power loss; ``synchronous="NORMAL"``: a commit does not flush the WAL, a
    later flush does; only for the SCP's rows, see
    :mod:`service.scp.durability`), a 30 s busy timeout and foreign keys on, so that the SCP's
    association threads, the scheduler and a worker process can share the file.
    PostgreSQL (psycopg 3) gets a connection pool of ``pool_size`` connections
    plus as many again in overflow, checked before use (a restarted server
    does not fail the next request).

    Parameters
    ----------
    url : str
        SQLAlchemy database URL; ``postgresql://`` means psycopg 3.
    pool_size : int, optional
        Connections kept open (PostgreSQL only); SQLAlchemy's 5 if not given.
        The node sizes it for its SCP's association threads.
    pool_timeout_s : float
        Longest wait for a free pooled connection, seconds; then
        ``sqlalchemy.exc.TimeoutError``.
    synchronous : {"FULL", "NORMAL"}
        SQLite's ``PRAGMA synchronous`` (ignored by PostgreSQL).

    Raises
    ------
    ConfigError
        If ``url`` cannot be parsed or names a driver that is not installed.
    ValueError
        If ``synchronous`` is neither ``"FULL"`` nor ``"NORMAL"``.
    """
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
    url = normalize_url(url)
    kwargs: dict[str, Any] = {"future": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    else:
        kwargs["pool_pre_ping"] = True
        kwargs["pool_timeout"] = pool_timeout_s
        if pool_size is not None:
            kwargs["pool_size"] = pool_size
            kwargs["max_overflow"] = pool_size
    try:
        engine = create_engine(url, **kwargs)
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(f"database.url {describe_url(url)}: {exc}") from exc
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Return a session factory whose objects stay usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def check_connection(engine: Engine) -> None:
    """Open one connection and run ``SELECT 1``.

    Raises
    ------
    ConfigError
        If the database cannot be reached or refuses the login; the message
        names the URL (without its password) and the driver's reason.
    """
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise ConfigError(
            f"cannot reach the database at {engine.url.render_as_string(hide_password=True)}: "
            f"{reason[0] if reason else type(exc).__name__}") from exc
