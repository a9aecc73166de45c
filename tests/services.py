"""The machine's PostgreSQL and Redis, as the production path uses them.

Each test gets its own PostgreSQL database (created, then dropped) and its own
Redis key prefix (its keys deleted afterwards), so tests never see each
other's rows or messages. The servers are the machine's own (127.0.0.1:5432
with trust auth, 127.0.0.1:6379); ``RADNODE_TEST_POSTGRES`` and
``RADNODE_TEST_REDIS`` point elsewhere. When a server is down, the test is
skipped locally but fails when ``CI`` is set (``.ci/run`` starts them).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import missing

#: The maintenance database a test connects to in order to create its own.
POSTGRES_ADMIN_URL = os.environ.get("RADNODE_TEST_POSTGRES",
                                    "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("RADNODE_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _admin_connection():  # type: ignore[no-untyped-def]
    import psycopg

    try:
        return psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        missing(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {exc}")
        raise


def sqlalchemy_url(database: str) -> str:
    """The SQLAlchemy URL of ``database`` on the test server (radnode's form)."""
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{database}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """URL of a new, empty PostgreSQL database, dropped after the test."""
    name = f"radnode_test_{uuid.uuid4().hex[:12]}"
    with _admin_connection() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield sqlalchemy_url(name)
    finally:
        with _admin_connection() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_broker() -> Iterator[tuple[str, str]]:
    """``(url, key_prefix)``: the machine's Redis and a key prefix of this test's own.

    Every key under the prefix is deleted afterwards.
    """
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        missing(f"Redis is not reachable at {REDIS_URL}: {exc}")
    prefix = f"radnode-test-{uuid.uuid4().hex[:12]}:"
    try:
        yield REDIS_URL, prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
