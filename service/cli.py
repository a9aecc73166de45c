"""``radnode``: the command line (serve, worker, send, echo, db, config, demo, operations)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from service.cli_deid import deid
from service.cli_deliveries import deliveries, resend
from service.cli_ops import audit, cancel, complete, retry, status
from service.cli_rules import rules
from service.cli_users import tokens, users
from service.config import Destination, DicomSettings, Settings, load_settings
from service.errors import ConfigError
from service.logging import configure

log = logging.getLogger("radnode")

config_option = click.option(
    "--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
    help="YAML configuration file (keys documented in README).",
)


def _settings(config_file: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config_file, **overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _comma_list(value: str | None) -> list[str]:
    """``"a, b,"`` → ``["a", "b"]``; None or empty → ``[]``."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _destination(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
    try:
        if isinstance(value, tuple):
            return tuple(Destination.parse(v) for v in value)
        return Destination.parse(value) if value is not None else None
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.group()
@click.version_option(package_name="radnode")
def main() -> None:
    """radnode: a DICOM node that runs AI models on received series and returns SEG + SR."""


@main.command()
@config_option
@click.option("--ae-title", help="The node's AE title [RADNODE].")
@click.option("--host", help="Address to listen on [0.0.0.0].")
@click.option("--port", type=int, help="DICOM port [11112].")
@click.option("--tls-port", type=int,
              help="DICOM TLS port (needs dicom.tls in the config file) [2762].")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Spool, results, database and embedded broker [./radnode-data].")
@click.option("--destination", "destinations", multiple=True, callback=_destination,
              metavar="AET@HOST:PORT", help="Where results go (repeatable).")
@click.option("--quiet-period", type=float,
              help="Seconds without a new instance before a series is complete [5].")
@click.option("--no-worker", is_flag=True, help="Do not start the embedded Celery worker.")
@click.option("--http-host", help="Address of the HTTP API and dashboard [127.0.0.1].")
@click.option("--http-port", type=int,
              help="Port of the HTTP API and dashboard [8104]; 0: any free port.")
@click.option("--no-http", is_flag=True, help="Serve no HTTP API, dashboard or metrics.")
def serve(config_file: Path | None, ae_title: str | None, host: str | None, port: int | None,
          tls_port: int | None, data_dir: Path | None, destinations: tuple[Destination, ...],
          quiet_period: float | None, no_worker: bool, http_host: str | None,
          http_port: int | None, no_http: bool) -> None:
    """Run the node: DICOM SCP, completion, routing, job queue, delivery (and a worker).

    SIGHUP, or a change to the config file, reloads rules, fallback,
    destinations, completion, delivery and retention without dropping
    associations.
    """
    from service.node import Node

    def build() -> Settings:
        base = load_settings(config_file)
        dicom = base.dicom.model_copy(update={k: v for k, v in {
            "ae_title": ae_title, "host": host, "port": port}.items() if v is not None})
        if tls_port is not None:
            if dicom.tls is None:
                raise ConfigError("--tls-port needs dicom.tls (cert_file, key_file) in the "
                                  "configuration")
            dicom.tls = dicom.tls.model_copy(update={"port": tls_port})
        try:  # the flags against the rest of the section (aes, tls)
            dicom = DicomSettings.model_validate(dicom.model_dump())
        except ValidationError as exc:
            raise ConfigError("; ".join(e["msg"] for e in exc.errors())) from exc
        completion = base.completion.model_copy(
            update={"quiet_period_s": quiet_period} if quiet_period is not None else {})
        broker = base.broker.model_copy(update={"embedded_worker": False} if no_worker else {})
        http = base.http.model_copy(update={k: v for k, v in {
            "host": http_host, "port": http_port,
            "enabled": False if no_http else None}.items() if v is not None})
        return load_settings(
            config_file, dicom=dicom, completion=completion, broker=broker, data_dir=data_dir,
            destinations=list(destinations) or None, http=http,
        )

    try:
        settings = build()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    configure(settings.log_level)
    node = Node(settings, reload=build, config_file=config_file)
    node.handle_signals()  # a SIGTERM during start-up drains as well
    try:
        node.start()
    except (OSError, ConfigError) as exc:
        node.stop()
        raise click.ClickException(f"cannot start: {exc}") from exc
    node.serve_forever()


@main.command()
@config_option
@click.option("--queues", help="Comma-separated queues to consume [worker.queues: gpu].")
@click.option("--concurrency", type=int,
              help="Worker processes [worker.concurrency: 1] (CPU); with --gpus, one per GPU.")
@click.option("--gpus", metavar="INDEX[,INDEX...]",
              help="GPUs to use, e.g. 0,1: one worker process per GPU, pinned with "
                   "CUDA_VISIBLE_DEVICES (needs a CUDA build of torch).")
def worker(config_file: Path | None, queues: str | None, concurrency: int | None,
           gpus: str | None) -> None:
    """Run a Celery worker that analyses series (needs the worker extras: torch).

    On a machine other than the node's, the node's data directory must be
    mounted at ``data_dir`` (deploy/README.md); the worker refuses to start
    without it, or with a database that is not at the newest revision.
    """
    from service.db import migrate
    from service.node import check_shared_data_dir, die_with_parent

    if os.environ.get("RADNODE_PARENT_PID", "").isdigit():
        die_with_parent(int(os.environ["RADNODE_PARENT_PID"]))
    gpu_list = _comma_list(gpus)
    for gpu in gpu_list:
        if not gpu.replace("-", "").isalnum():  # an index, or a GPU UUID (nvidia-smi -L)
            raise click.BadParameter(f"{gpu!r} is not a GPU index or UUID", param_hint="--gpus")
    if gpu_list and concurrency not in (None, 1):
        raise click.UsageError("--gpus runs one worker process per GPU: leave out "
                               "--concurrency")
    settings = _settings(config_file)
    configure(settings.log_level)
    queue_list = _comma_list(queues) or settings.worker.queues
    try:
        check_shared_data_dir(settings.data_dir)
        migrate.require_head(settings.database_url)
    except ConfigError as exc:
        raise click.ClickException(f"cannot start the worker: {exc}") from exc
    if len(gpu_list) > 1:
        from service.node import supervise_gpu_workers

        sys.exit(supervise_gpu_workers(config_file, queue_list, gpu_list))
    name = "radnode-worker"
    if gpu_list:
        # Before anything initialises CUDA (the pool's children import torch after fork).
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_list[0]
        if settings.worker.device.startswith("cuda:"):  # "auto" and "cuda" find it alone
            log.info("worker.device %s: this process sees one GPU, cuda:0 (GPU %s)",
                     settings.worker.device, gpu_list[0])
            settings = settings.model_copy(
                update={"worker": settings.worker.model_copy(update={"device": "cuda:0"})})
        name, concurrency = f"radnode-gpu{gpu_list[0]}", 1
    from workers.celery_app import run_worker

    run_worker(
        settings,
        queues=queue_list,
        concurrency=concurrency or settings.worker.concurrency,
        loglevel=settings.log_level,
        name=name,
    )


@main.command()
@click.argument("destination", callback=_destination, metavar="AET@HOST:PORT")
@click.option("--calling-ae", default="RADNODE", show_default=True)
@click.option("--timeout", default=10.0, show_default=True, help="Seconds.")
def echo(destination: Destination, calling_ae: str, timeout: float) -> None:
    """Send a C-ECHO to AET@HOST:PORT; exit 0 on Success."""
    from service.dicom.scu import echo as send_echo

    configure("WARNING")
    status = send_echo(destination, calling_ae=calling_ae, timeout_s=timeout)
    if status is None:
        raise click.ClickException(f"no association with {destination}")
    click.echo(f"C-ECHO {destination}: status 0x{status:04X}")
    sys.exit(0 if status == 0 else 1)


@main.command()
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--to", "destination", required=True, callback=_destination,
              metavar="AET@HOST:PORT", help="The receiving AE.")
@click.option("--calling-ae", default="RADNODE", show_default=True)
def send(paths: tuple[Path, ...], destination: Destination, calling_ae: str) -> None:
    """Send DICOM files and folders (recursively) with C-STORE, with a progress bar."""
    from service.dicom.scu import find_dicom_files
    from service.progress import send_with_progress

    configure("WARNING")
    files = find_dicom_files(paths)
    if not files:
        raise click.ClickException("no DICOM Part 10 files found")
    outcomes = send_with_progress(destination, files, calling_ae=calling_ae)
    failed = [o for o in outcomes if not o.ok]
    click.echo(f"sent {len(outcomes) - len(failed)} of {len(outcomes)} to {destination}")
    for outcome in failed[:20]:
        status = "none" if outcome.status is None else f"0x{outcome.status:04X}"
        click.echo(f"  failed: {outcome.path} (status {status}: {outcome.error or ''})", err=True)
    sys.exit(1 if failed else 0)


@main.group()
def db() -> None:
    """Database commands."""


@db.command("upgrade")
@config_option
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--revision", default="head", show_default=True)
def db_upgrade(config_file: Path | None, data_dir: Path | None, revision: str) -> None:
    """Apply Alembic migrations up to REVISION (run it before starting node and workers)."""
    from service.db import migrate
    from service.db.session import describe_url

    settings = _settings(config_file, data_dir=data_dir)
    configure(settings.log_level)
    try:
        before = migrate.current_revision(settings.database_url)
        migrate.upgrade(settings.database_url, revision)
        after = migrate.current_revision(settings.database_url)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"database {describe_url(settings.database_url)}: revision "
               f"{before or '(empty)'} -> {after}"
               f"{' (newest)' if after == migrate.head_revision() else ''}")


@db.command("check")
@config_option
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False))
def db_check(config_file: Path | None, data_dir: Path | None) -> None:
    """Exit 0 if the database is at the newest revision, 1 (saying why) if not."""
    from service.db import migrate

    settings = _settings(config_file, data_dir=data_dir)
    configure("WARNING")
    try:
        migrate.require_head(settings.database_url)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    click.echo(f"database at revision {migrate.head_revision()} (newest)")


@db.command("downgrade")
@config_option
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False))
@click.argument("revision")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def db_downgrade(config_file: Path | None, data_dir: Path | None, revision: str,
                 yes: bool) -> None:
    """Undo migrations down to REVISION (rollback to an older radnode; back up first).

    Columns and tables that later revisions added are dropped with their data.
    """
    from service.db import migrate
    from service.db.session import describe_url

    settings = _settings(config_file, data_dir=data_dir)
    configure(settings.log_level)
    if not yes:
        click.confirm(f"downgrade {describe_url(settings.database_url)} to revision "
                      f"{revision}? Data in newer tables and columns is lost", abort=True)
    try:
        migrate.downgrade(settings.database_url, revision)
        after = migrate.current_revision(settings.database_url)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"database at revision {after or '(empty)'}")


@main.command()
@config_option
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--limit", default=20, show_default=True, help="How many jobs, newest first.")
def jobs(config_file: Path | None, data_dir: Path | None, limit: int) -> None:
    """Show recent jobs: series, why complete, rules, state, attempts, deliveries, error."""
    from rich.console import Console
    from rich.table import Table

    from service.db import repository
    from service.db.session import make_engine, make_session_factory

    settings = _settings(config_file, data_dir=data_dir)
    table = Table(title=f"radnode jobs ({settings.database_url.split('://')[0]})")
    for column in ("job", "series (UID)", "mod.", "inst.", "complete", "rules", "model",
                   "state", "tries", "delivered", "error"):
        table.add_column(column, overflow="fold")
    factory = make_session_factory(make_engine(settings.database_url))
    with factory() as session:
        for job in repository.recent_jobs(session=session, limit=limit):
            deliveries = [d for r in job.results for d in r.deliveries]
            sent = sum(d.state in ("sent", "committed") for d in deliveries)
            state = job.state if job.state != "failed" else f"[red]{job.state}[/]"
            table.add_row(
                str(job.id), job.series.series_instance_uid, job.series.modality,
                str(job.series.instance_count), job.series.completion_reason or "-",
                (job.rule_names or "-") + (" [bold]STAT[/]" if job.priority == "stat" else ""),
                job.model_name, state, str(job.attempts), f"{sent}/{len(deliveries)}",
                (job.error or "")[:200],
            )
    Console().print(table)


@main.group()
def config() -> None:
    """Configuration commands."""


@config.command("check")
@config_option
def config_check(config_file: Path | None) -> None:
    """Validate the configuration and print the effective values."""
    import yaml

    from service.model_spec import describe

    settings = _settings(config_file)
    if settings.dicom.tls is not None:  # the files must be there and usable, not only named
        from service.dicom.tls import server_context

        try:
            server_context(settings.dicom.tls)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
    for spec in settings.models:
        info = describe(spec)
        click.echo(f"model {info['name']} {info['version']}: {info['kind']} ({info['source']}"
                   f"{', ' + info['path'] if info['path'] else ''}), accepts "
                   f"{'/'.join(info['accepts'])}, "
                   f"outputs: {', '.join(info['outputs']) or 'built in'}")
    for destination in settings.destinations:
        click.echo(f"destination {destination.name}: {destination}")
    for rule in settings.rules:
        click.echo(f"rule {rule.name}: models {', '.join(rule.models) or 'none (store only)'}"
                   f" → {', '.join(rule.destinations) if rule.destinations is not None else 'all'}"
                   f" ({rule.priority}{', final' if rule.final else ''})")
    click.echo(f"configuration is valid (version {settings.config_version})")


@main.command()
@click.option("--input", "input_dir", type=click.Path(exists=True, file_okay=False,
                                                       path_type=Path),
              help="Series to send [the real CT in ../shared/data, else a phantom].")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False),
              default=Path("radnode-demo"), show_default=True)
@click.option("--phantom", is_flag=True, help="Send the synthetic CT phantom even if the real "
              "CT is there.")
@click.option("--quiet-period", type=float, default=2.0, show_default=True)
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="Seconds to wait for the results.")
def demo(input_dir: Path | None, data_dir: Path, phantom: bool, quiet_period: float,
         timeout: float) -> None:
    """Run the whole path on this machine: node, worker, a PACS, a CT series."""
    from service.demo import run_demo

    if phantom and input_dir is not None:
        raise click.UsageError("--phantom and --input exclude each other")
    configure("WARNING")
    sys.exit(run_demo(input_dir=input_dir, data_dir=data_dir, quiet_period_s=quiet_period,
                      timeout_s=timeout, phantom=phantom))


@main.command()
@click.option("--check", is_flag=True, help="Exit 1 if docs/conformance.md is stale.")
@click.option("--write", is_flag=True, help="Rewrite the generated tables of the document.")
@click.option("--path", type=click.Path(path_type=Path, dir_okay=False),
              help="The document [docs/conformance.md of the source tree].")
def conformance(check: bool, write: bool, path: Path | None) -> None:
    """Print the Conformance Statement's SOP class and transfer syntax tables (from the code)."""
    from service import conformance as statement

    if check and write:
        raise click.UsageError("--check and --write exclude each other")
    if check or write:
        argv = ["--check" if check else "--write"] + (["--path", str(path)] if path else [])
        sys.exit(statement.main(argv))
    for name, table in statement.render_tables().items():
        click.echo(f"## {name}\n\n{table.strip()}\n")


main.add_command(deliveries)
main.add_command(rules)
main.add_command(deid)
main.add_command(users)
main.add_command(tokens)
for _command in (audit, status, retry, cancel, complete, resend):
    main.add_command(_command)

if __name__ == "__main__":
    main()
