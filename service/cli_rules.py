"""``radnode rules``: try the routing rules on DICOM files, without sending anything.

``radnode rules test FILE_OR_FOLDER...`` groups the files by Series Instance
UID, takes the first file of each series as its header (as the node does) and
shows, per series, how every rule decided and why, and what would happen: the
models to run with their destinations and priority, the completion scope and
the quiet period. Only the Series Instance UID, Modality and Series
Description of a series are shown, never patient data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from rich.console import Console
from rich.markup import escape

from service.config import Destination, Settings, load_settings
from service.errors import ConfigError
from service.routing import ALL_DESTINATIONS, SENDER, RouteTarget, Routing, SeriesFacts, route


@dataclass
class _Series:
    header: Dataset
    first: Path
    files: list[Path] = field(default_factory=list)


@click.group()
def rules() -> None:
    """Inspect the routing rules (``rules:`` and ``fallback:`` in the configuration)."""


@rules.command("test")
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path), metavar="FILE_OR_FOLDER...")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
              help="YAML configuration file whose rules to try.")
@click.option("--calling-ae", default="", metavar="AET",
              help="Pretend the series came from this AE title.")
@click.option("--called-ae", default=None, metavar="AET",
              help="Pretend the series was sent to this AE title [the node's own].")
@click.option("--peer-address", default="", metavar="IP",
              help="Pretend the series came from this IP address.")
def rules_test(paths: tuple[Path, ...], config_file: Path | None, calling_ae: str,
               called_ae: str | None, peer_address: str) -> None:
    """Show which rules match the series in FILE_OR_FOLDER... and what would happen.

    Nothing is sent and nothing is stored.
    """
    from service.dicom.scu import find_dicom_files

    try:
        settings = load_settings(config_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    console = Console(highlight=False, soft_wrap=True)
    files = find_dicom_files(paths)
    if not files:
        raise click.ClickException(f"no DICOM files in {', '.join(str(p) for p in paths)}")
    series: dict[str, _Series] = {}
    for path in files:
        try:
            header = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            console.print(f"skipped {escape(str(path))}: {type(exc).__name__}")
            continue
        uid = str(header.get("SeriesInstanceUID", "") or "").strip()
        series.setdefault(uid, _Series(header=header, first=path)).files.append(path)
    called = settings.dicom.ae_title if called_ae is None else called_ae
    for uid, found in series.items():
        facts = SeriesFacts(header=found.header, calling_ae=calling_ae.strip(),
                            called_ae=called.strip(), peer_address=peer_address.strip())
        routing = route(settings.rules, settings.fallback, facts)
        _print_series(console, uid, found, routing, settings, calling_ae.strip())


def _print_series(console: Console, uid: str, found: _Series, routing: Routing,
                  settings: Settings, calling_ae: str) -> None:
    header = found.header
    modality = str(header.get("Modality", "") or "").strip() or "(absent)"
    description = header.get("SeriesDescription")
    described = repr(str(description).strip()) if description is not None else "(absent)"
    console.print()
    console.print(f"[bold]Series {escape(uid or '(no Series Instance UID)')}[/]  "
                  f"({len(found.files)} file{'s' if len(found.files) != 1 else ''}, "
                  f"header from {escape(found.first.name)})")
    console.print(f"  Modality {escape(modality)}, SeriesDescription {escape(described)}")
    width = max([len(r.rule.name) for r in routing.results] + [4])
    for result in routing.results:
        if result.matched:
            verdict = "[green]MATCH[/]        "
        elif result.evaluated:
            verdict = "no           "
        else:
            verdict = "[dim]not evaluated[/]"
        console.print(f"  {verdict} {escape(result.rule.name.ljust(width))}  "
                      f"{escape(result.reason)}")
    fallback = routing.matched == ("fallback",)
    if not routing.targets:
        what = "fallback: store only" if fallback else (
            f"store only (matched: {', '.join(routing.matched)})")
        console.print(f"  => {escape(what)}")
    for target in routing.targets:
        prefix = "fallback: " if fallback else ""
        console.print(f"  => {escape(prefix + target.model)} -> "
                      f"{escape(_destinations(target, settings, calling_ae))}, "
                      f"{target.priority} (rules: {escape(', '.join(target.rules))})")
    if routing.quiet_period_s is not None:
        quiet = f"{routing.quiet_period_s:g} s"
    else:
        quiet = f"{settings.completion.quiet_period_s:g} s (completion.quiet_period_s)"
    console.print(f"  scope: {routing.scope}, quiet period: {quiet}")


def _destinations(target: RouteTarget, settings: Settings, calling_ae: str) -> str:
    names = [d.name for d in settings.destinations]
    shown: list[str] = []
    for name in target.destinations:
        if name == ALL_DESTINATIONS:
            shown.append(f"all destinations ({', '.join(names) or 'none configured'})")
        elif name == SENDER:
            if not calling_ae:
                shown.append("sender (give --calling-ae to see which)")
                continue
            senders = [d.name for d in settings.destinations
                       if isinstance(d, Destination) and d.is_sender(calling_ae)]
            shown.append(f"sender ({', '.join(senders)})" if senders else
                         f"sender (no destination configured for AE {calling_ae!r})")
        else:
            shown.append(name)
    return ", ".join(shown) or "nowhere (no destinations)"
