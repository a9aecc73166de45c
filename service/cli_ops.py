"""Operations from the shell: ``radnode status``, ``retry``, ``cancel``, ``complete``, ``audit``.

They work on the database directly (the same actions as the HTTP API, see
:mod:`service.actions`), so they work while the node runs or is stopped; a
running node picks changes up on its next tick. Every change is audited as
``cli:<operating-system user>``.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import click
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.cli_deliveries import config_option, data_dir_option, open_database
from service.config import Settings

_open = open_database


def _act(config_file: Path | None, data_dir: Path | None,
         action: Callable[[Session, str], Any]) -> None:
    from service import actions, audit

    _, factory = _open(config_file, data_dir)
    with factory() as session:
        try:
            outcome = action(session, audit.cli_actor())
        except actions.ActionError as exc:
            raise click.ClickException(str(exc)) from exc
        session.commit()
    click.echo(outcome.message)


def _on_job(action: Callable[..., Any], job_id: int, session: Session, actor: str) -> Any:
    return action(session, job_id, actor=actor)


@click.command()
@config_option
@data_dir_option
@click.argument("job_ids", nargs=-1, type=int, required=True)
def retry(config_file: Path | None, data_dir: Path | None, job_ids: tuple[int, ...]) -> None:
    """Run finished jobs JOB_IDS again (each as a new job on the same series)."""
    from service import actions

    for job_id in job_ids:
        _act(config_file, data_dir, partial(_on_job, actions.retry_job, job_id))


@click.command()
@config_option
@data_dir_option
@click.argument("job_ids", nargs=-1, type=int, required=True)
def cancel(config_file: Path | None, data_dir: Path | None, job_ids: tuple[int, ...]) -> None:
    """Cancel pending, queued or running jobs JOB_IDS."""
    from service import actions

    for job_id in job_ids:
        _act(config_file, data_dir, partial(_on_job, actions.cancel_job, job_id))


@click.command()
@config_option
@data_dir_option
@click.argument("series_id", type=int)
def complete(config_file: Path | None, data_dir: Path | None, series_id: int) -> None:
    """Force series SERIES_ID (the id in ``radnode status``/API) complete now."""
    from service import actions

    _act(config_file, data_dir,
         lambda session, actor: actions.force_complete(session, series_id, actor=actor))


def _parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date or time") from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@click.group()
def audit() -> None:
    """The audit trail: associations, jobs, deliveries and operator actions."""


@audit.command("export")
@config_option
@data_dir_option
@click.option("--since", help="From this date/time (ISO 8601, UTC if no offset), inclusive.")
@click.option("--until", help="Before this date/time (ISO 8601, UTC if no offset); a bare "
                              "date means the end of that day.")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv",
              show_default=True, help="CSV with a header, or JSON lines.")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False),
              help="Write to this file [standard output].")
def audit_export(config_file: Path | None, data_dir: Path | None, since: str | None,
                 until: str | None, fmt: str, output: Path | None) -> None:
    """Write the audit trail for a date range as CSV or JSON lines."""
    from service import audit as trail

    start = _parse_time(since)
    end = _parse_time(until)
    if until is not None and end is not None and len(until) == 10:  # a bare date
        end += timedelta(days=1)
    _, factory = _open(config_file, data_dir)
    with factory() as session:
        rows = trail.events(session, since=start, until=end)
        chunks = trail.export(rows, "json" if fmt == "json" else "csv")
        if output is None:
            for chunk in chunks:
                sys.stdout.write(chunk)
        else:
            with output.open("w", encoding="utf-8", newline="") as file:
                for chunk in chunks:
                    file.write(chunk)
    click.echo(f"{len(rows)} audit event(s)", err=True)


def status_tables(settings: Settings, session: Session) -> list[Any]:
    """The renderables of ``radnode status``: pipeline counts, recent series, failures."""
    from rich.table import Table

    from service.db.models import Association, Delivery, Job, Series

    def counts(column: Any, *where: Any) -> dict[str, int]:
        query = select(column, func.count()).group_by(column)
        for condition in where:
            query = query.where(condition)
        return {str(key): int(value) for key, value in session.execute(query)}

    series = counts(Series.state)
    jobs = counts(Job.state)
    deliveries = counts(Delivery.state)
    depth = counts(Job.priority, Job.state.in_(("pending", "queued")))
    probe = settings.spool_dir if settings.spool_dir.exists() else settings.data_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free_mib = shutil.disk_usage(probe).free >> 20
    summary = Table(title="radnode status", show_header=True)
    for column in ("series receiving", "complete", "jobs queued (STAT/routine)", "running",
                   "succeeded", "failed", "deliveries pending", "sent", "committed", "failed ",
                   "spool free"):
        summary.add_column(column, justify="right")
    failed_jobs = jobs.get("failed", 0)
    failed_deliveries = deliveries.get("failed", 0)
    summary.add_row(
        str(series.get("receiving", 0)), str(series.get("complete", 0)),
        f"{depth.get('stat', 0)}/{depth.get('routine', 0)}", str(jobs.get("running", 0)),
        str(jobs.get("succeeded", 0)),
        f"[red]{failed_jobs}[/]" if failed_jobs else "0",
        str(deliveries.get("pending", 0) + deliveries.get("sending", 0)),
        str(deliveries.get("sent", 0)), str(deliveries.get("committed", 0)),
        f"[red]{failed_deliveries}[/]" if failed_deliveries else "0",
        f"{free_mib} MiB" + (" [red](below reserve)[/]"
                             if free_mib < settings.storage.min_free_mb else ""))

    recent = Table(title="recent series", show_header=True)
    for column in ("id", "Series Instance UID", "mod.", "from AE", "inst.", "state", "jobs"):
        recent.add_column(column, overflow="fold")
    for row in session.scalars(select(Series).order_by(Series.last_received_at.desc()).limit(8)):
        job_text = ", ".join(
            f"{j.id}:{j.model_name} " + (f"[red]{j.state}[/]" if j.state == "failed" else j.state)
            for j in row.jobs) or "-"
        recent.add_row(str(row.id), row.series_instance_uid, row.modality, row.calling_ae_title,
                       str(row.instance_count), row.state, job_text)

    problems = Table(title="failures (newest first)", show_header=True)
    for column in ("what", "id", "when", "reason"):
        problems.add_column(column, overflow="fold")
    for job in session.scalars(select(Job).where(Job.state == "failed")
                               .order_by(Job.id.desc()).limit(5)):
        problems.add_row("job", str(job.id),
                         job.finished_at.strftime("%Y-%m-%d %H:%M:%S") if job.finished_at
                         else "-", (job.error or "")[:160])
    for delivery in session.scalars(select(Delivery).where(Delivery.state == "failed")
                                    .order_by(Delivery.id.desc()).limit(5)):
        problems.add_row(f"delivery to {delivery.destination}", str(delivery.id),
                         delivery.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                         (delivery.error or "")[:160])
    last = session.scalars(select(Association).order_by(Association.id.desc()).limit(1)).first()
    tables: list[Any] = [summary, recent]
    if problems.row_count:
        tables.append(problems)
    if last is not None:
        tables.append(f"last association: AE {last.calling_ae_title} from {last.peer_address}, "
                      f"{last.outcome}, {last.instances} instance(s), ended "
                      f"{last.ended_at:%Y-%m-%d %H:%M:%S} UTC" if last.ended_at else "")
    return tables


@click.command()
@config_option
@data_dir_option
@click.option("--watch", is_flag=True, help="Refresh every 2 s until Ctrl-C.")
def status(config_file: Path | None, data_dir: Path | None, watch: bool) -> None:
    """Show at a glance: series, queue depth, jobs, deliveries, failures, spool space."""
    from rich.console import Console, Group
    from rich.live import Live

    settings, factory = _open(config_file, data_dir)

    def render() -> Group:
        with factory() as session:
            return Group(*status_tables(settings, session))

    console = Console()
    if not watch:
        console.print(render())
        return
    with Live(render(), console=console, refresh_per_second=1) as live:
        try:
            while True:
                time.sleep(2)
                live.update(render())
        except KeyboardInterrupt:
            pass
