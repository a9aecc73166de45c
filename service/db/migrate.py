"""Run Alembic migrations from code (``radnode db upgrade``, ``check``, ``downgrade``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import SQLAlchemyError

import migrations
from service.db.models import Base
from service.db.session import check_connection, describe_url, make_engine, normalize_url
from service.errors import ConfigError


def alembic_config(url: str) -> Config:
    """Return an Alembic config for ``url`` pointing at radnode's migrations."""
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    cfg.attributes["target_metadata"] = Base.metadata
    return cfg


def head_revision() -> str:
    """The newest revision of radnode's one linear migration history."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None, "radnode ships at least one migration"
    return head


def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at; None for an empty database.

    Raises
    ------
    ConfigError
        If the database cannot be reached.
    """
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None  # not created yet (and not created by asking)
    engine = make_engine(url)
    try:
        check_connection(engine)
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def require_head(url: str) -> None:
    """Check that the database at ``url`` is at the newest revision.

    ``radnode serve`` and ``radnode worker`` call this when
    ``database.auto_upgrade`` is off, so that a node or worker never runs
    against a schema it does not know (an upgrade is its own step).

    Raises
    ------
    ConfigError
        If the database cannot be reached, or is at another revision; the
        message names the command that fixes it.
    """
    current, head = current_revision(url), head_revision()
    if current != head:
        raise ConfigError(
            f"the database at {describe_url(url)} is at revision {current or '(empty)'}, "
            f"this radnode needs {head}: run `radnode db upgrade` first (deploy/README.md, "
            "upgrade procedure)")


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (default: the newest).

    Raises
    ------
    ConfigError
        If the database cannot be reached.
    """
    if url.startswith("sqlite:///"):
        folder = Path(url.removeprefix("sqlite:///")).parent
        if not folder.exists():  # the data directory: private, it will hold patient data
            folder.mkdir(parents=True, mode=0o700)
            folder.chmod(0o700)
    else:
        engine = make_engine(url)
        try:
            check_connection(engine)  # a clear message, not Alembic's traceback
        finally:
            engine.dispose()
    try:
        command.upgrade(alembic_config(url), revision)
    except SQLAlchemyError as exc:
        raise ConfigError(f"cannot upgrade the database at {describe_url(url)}: "
                          f"{str(exc).splitlines()[0]}") from exc


def downgrade(url: str, revision: str) -> None:
    """Downgrade the database at ``url`` to ``revision`` (every migration is reversible).

    Raises
    ------
    ConfigError
        If the database cannot be reached.
    """
    try:
        command.downgrade(alembic_config(url), revision)
    except SQLAlchemyError as exc:
        raise ConfigError(f"cannot downgrade the database at {describe_url(url)}: "
                          f"{str(exc).splitlines()[0]}") from exc
