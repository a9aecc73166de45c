"""``radnode deid``: de-identify files, look pseudonyms up, re-identify returning results.

The commands open the node's database (``--config`` / ``--data-dir``, as
``radnode status``) and so work only for who can read it: the service user.
The mapping holds patient data; every look-up and re-identification is
written to the audit trail as ``cli:<operating-system user>``. Output names
UIDs and pseudonyms only on the terminal; ``lookup`` prints the original
values because that is what it is for.
"""

from __future__ import annotations

from pathlib import Path

import click

from service.cli_deliveries import config_option, data_dir_option, open_database
from service.config import DeidOptions

_open = open_database


@click.group()
def deid() -> None:
    """De-identification: pseudonym look-up, re-identification, export (see docs)."""


@deid.command("reidentify")
@config_option
@data_dir_option
@click.argument("files", nargs=-1, required=True,
                type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("-o", "--output", "output", required=True,
              type=click.Path(path_type=Path, file_okay=False),
              help="Folder for the re-identified files (created if needed).")
@click.option("--scope", default=None, help="Mapping scope (default: found from the study).")
def reidentify_command(config_file: Path | None, data_dir: Path | None,
                       files: tuple[Path, ...], output: Path, scope: str | None) -> None:
    """Map the pseudonyms of returning FILES back to the originals; write them to -o.

    A file whose Study Instance UID is not a known pseudonym is reported and
    not written. Exit status 1 if any file was not re-identified.
    """
    from pydicom import dcmread

    from service import audit
    from service.deid import reidentify

    _, factory = _open(config_file, data_dir)
    output.mkdir(parents=True, exist_ok=True)
    failures = 0
    with factory() as session:
        actor = audit.cli_actor()
        for path in files:
            try:
                dataset = dcmread(path)
            except Exception as exc:  # pydicom raises many types on bad files
                click.echo(f"{path}: not readable as DICOM ({type(exc).__name__})", err=True)
                failures += 1
                continue
            pseudonym = str(dataset.get("SOPInstanceUID", ""))
            if not reidentify(session, dataset, scope):
                click.echo(f"{path}: its Study Instance UID is not a known pseudonym", err=True)
                failures += 1
                continue
            target = output / f"{dataset.SOPInstanceUID}.dcm"
            dataset.save_as(target, enforce_file_format=True)
            audit.record(session, actor=actor, action="deid.reidentify", target_type="instance",
                         target_id=str(dataset.SOPInstanceUID),
                         detail={"pseudonym": pseudonym})
            click.echo(f"{path} -> {target}")
        session.commit()
    if failures:
        raise SystemExit(1)


@deid.command("lookup")
@config_option
@data_dir_option
@click.argument("pseudonym")
@click.option("--scope", default=None, help="Mapping scope (default: every scope).")
def lookup_command(config_file: Path | None, data_dir: Path | None, pseudonym: str,
                   scope: str | None) -> None:
    """Print the original value behind PSEUDONYM (a UID or a patient pseudonym)."""
    from service import audit
    from service.deid import lookup

    _, factory = _open(config_file, data_dir)
    with factory() as session:
        found = lookup(session, scope, pseudonym)
        audit.record(session, actor=audit.cli_actor(), action="deid.lookup",
                     target_type="pseudonym", target_id=pseudonym[:80],
                     detail={"found": found is not None})
        session.commit()
    if found is None:
        raise click.ClickException(f"{pseudonym} is not a known pseudonym")
    click.echo(f"scope:    {found.scope}")
    click.echo(f"kind:     {found.kind}")
    click.echo(f"original: {found.original}")


@deid.command("export")
@config_option
@data_dir_option
@click.argument("files", nargs=-1, required=True,
                type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("-o", "--output", "output", required=True,
              type=click.Path(path_type=Path, file_okay=False),
              help="Folder for the de-identified files (created if needed).")
@click.option("--destination", "destination_name", default=None,
              help="Use this configured destination's deidentify options and scope.")
@click.option("--scope", default=None, help="Mapping scope (without --destination).")
def export_command(config_file: Path | None, data_dir: Path | None, files: tuple[Path, ...],
                   output: Path, destination_name: str | None, scope: str | None) -> None:
    """De-identify FILES (e.g. a result's source series) as a destination would; write to -o.

    With the destination's scope, the exported images carry the same
    pseudonym UIDs that the results sent there reference.
    """
    from service.deid import DeidentificationError, deidentify_file, options_of, scope_of

    settings, factory = _open(config_file, data_dir)
    if destination_name is not None:
        try:
            destination = settings.destination(destination_name)
        except KeyError as exc:
            raise click.ClickException(str(exc)) from exc
        options = options_of(destination.deidentify)
        if options is None:
            raise click.ClickException(f"destination {destination_name} does not de-identify")
        use_scope = scope or scope_of(options, destination.name)
    elif scope:
        options, use_scope = DeidOptions(), scope
    else:
        raise click.UsageError("give --destination or --scope")
    output.mkdir(parents=True, exist_ok=True)
    failures = 0
    with factory() as session:
        for path in files:
            try:
                dataset = deidentify_file(path, session, scope=use_scope, options=options)
            except DeidentificationError as exc:
                click.echo(f"{path}: {exc}", err=True)
                failures += 1
                continue
            session.commit()
            target = output / f"{dataset.SOPInstanceUID}.dcm"
            dataset.save_as(target, enforce_file_format=True)
            click.echo(f"{path} -> {target}")
    if failures:
        raise SystemExit(1)
