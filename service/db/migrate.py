"""Run Alembic migrations from code (``radnode db upgrade``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations
from service.db.models import Base


def alembic_config(url: str) -> Config:
    """Return an Alembic config for ``url`` pointing at radnode's migrations."""
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["target_metadata"] = Base.metadata
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (default: the newest).

    Raises
    ------
    sqlalchemy.exc.OperationalError
        If the database cannot be reached.
    """
    if url.startswith("sqlite:///"):
        folder = Path(url.removeprefix("sqlite:///")).parent
        if not folder.exists():  # the data directory: private, it will hold patient data
            folder.mkdir(parents=True, mode=0o700)
            folder.chmod(0o700)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Downgrade the database at ``url`` to ``revision``."""
    command.downgrade(alembic_config(url), revision)
