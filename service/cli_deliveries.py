"""``radnode deliveries``: list deliveries, resend results, retry failed deliveries.

These commands work on the database; a running node picks the changes up on
its next delivery tick (no restart, nothing else to signal).
"""

from __future__ import annotations

from pathlib import Path

import click
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings, load_settings
from service.errors import ConfigError

config_option = click.option(
    "--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
    help="YAML configuration file (keys documented in README).",
)
data_dir_option = click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False))


def open_database(config_file: Path | None, data_dir: Path | None, *,
                  upgrade: bool = False) -> tuple[Settings, sessionmaker[Session]]:
    """The settings and a session factory on the node's database, for a CLI command.

    Parameters
    ----------
    config_file, data_dir : pathlib.Path or None
        As given to ``--config`` and ``--data-dir``.
    upgrade : bool
        Run the migrations first when ``database.auto_upgrade`` allows it
        (for commands that may come before the first ``radnode serve``).

    Raises
    ------
    click.ClickException
        If the configuration is invalid.
    """
    from service.db import migrate
    from service.db.session import make_engine, make_session_factory

    try:
        settings = load_settings(config_file, data_dir=data_dir)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if upgrade and settings.database.auto_upgrade:
        migrate.upgrade(settings.database_url)
    return settings, make_session_factory(make_engine(settings.database_url))


def _factory(config_file: Path | None, data_dir: Path | None) -> tuple[sessionmaker[Session],
                                                                         set[str]]:
    settings, factory = open_database(config_file, data_dir)
    return factory, {d.name for d in settings.destinations}


@click.group()
def deliveries() -> None:
    """Result deliveries: list, resend, retry."""


@deliveries.command("list")
@config_option
@data_dir_option
@click.option("--state", type=click.Choice(["pending", "sending", "sent", "committed",
                                            "failed"]))
@click.option("--destination", help="Destination name.")
@click.option("--study", "study_uid", help="Study Instance UID.")
@click.option("--limit", default=50, show_default=True, help="Newest first.")
def list_deliveries(config_file: Path | None, data_dir: Path | None, state: str | None,
                    destination: str | None, study_uid: str | None, limit: int) -> None:
    """Show deliveries: result, destination, state, attempts, last status, error."""
    from rich.console import Console
    from rich.table import Table

    from service.db import repository

    factory, _ = _factory(config_file, data_dir)
    table = Table(title="radnode deliveries")
    for column in ("id", "kind", "SOP Instance UID", "destination", "state", "tries", "status",
                   "sent", "committed", "error"):
        table.add_column(column, overflow="fold")
    with factory() as session:
        rows = repository.find_deliveries(session=session, state=state, destination=destination,
                                          study_instance_uid=study_uid, limit=limit)
        for d in rows:
            colour = {"failed": "red", "committed": "green", "sent": "green"}.get(d.state)
            table.add_row(
                str(d.id), d.result.kind, d.result.sop_instance_uid, d.destination,
                f"[{colour}]{d.state}[/]" if colour else d.state, str(d.attempts),
                "-" if d.status is None else f"0x{d.status:04X}",
                d.sent_at.strftime("%Y-%m-%d %H:%M:%S") if d.sent_at else "-",
                d.committed_at.strftime("%Y-%m-%d %H:%M:%S") if d.committed_at else "-",
                (d.error or "")[:120],
            )
    Console().print(table)


@deliveries.command("resend")
@config_option
@data_dir_option
@click.argument("ids", nargs=-1, type=int)
@click.option("--study", "study_uid", help="Every result of this Study Instance UID.")
@click.option("--to", "destination",
              help="Only to this destination; with --study also to one the results never "
                   "went to.")
def resend(config_file: Path | None, data_dir: Path | None, ids: tuple[int, ...],
           study_uid: str | None, destination: str | None) -> None:
    """Send results again: deliveries IDS, or a whole study's results (--study)."""
    from service import actions, audit

    if not ids and not study_uid:
        raise click.UsageError("give delivery ids or --study UID")
    factory, names = _factory(config_file, data_dir)
    if destination is not None and destination not in names:
        raise click.ClickException(f"no destination named {destination!r} is configured "
                                   f"(configured: {', '.join(sorted(names)) or 'none'})")
    actor = audit.cli_actor()
    count = 0
    with factory() as session:
        try:
            if ids:
                count += len(actions.resend_deliveries(session, ids, actor=actor,
                                                       destination=destination).ids)
            if study_uid:
                count += len(actions.resend_study(session, study_uid, actor=actor,
                                                  destination=destination).ids)
        except actions.ActionError as exc:
            raise click.ClickException(str(exc)) from exc
        session.commit()
    click.echo(f"{count} deliver{'y' if count == 1 else 'ies'} scheduled")


@deliveries.command("retry")
@config_option
@data_dir_option
@click.option("--destination", help="Only deliveries to this destination.")
def retry(config_file: Path | None, data_dir: Path | None, destination: str | None) -> None:
    """Try every failed delivery again (attempts start from zero)."""
    from service import actions, audit

    factory, _ = _factory(config_file, data_dir)
    with factory() as session:
        outcome = actions.retry_failed_deliveries(session, actor=audit.cli_actor(),
                                                  destination=destination)
        session.commit()
    count = len(outcome.ids)
    click.echo(f"{count} failed deliver{'y' if count == 1 else 'ies'} scheduled again")
