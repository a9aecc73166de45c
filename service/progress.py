"""A rich progress bar around :func:`service.dicom.scu.store_files`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from service.config import Destination
from service.dicom.scu import StoreOutcome, store_files


def send_with_progress(destination: Destination, files: Sequence[Path], *,
                       calling_ae: str = "RADNODE") -> list[StoreOutcome]:
    """Send ``files`` to ``destination`` showing instances sent and elapsed time."""
    with Progress(
        TextColumn(f"C-STORE → {destination}"), BarColumn(), MofNCompleteColumn(),
        TaskProgressColumn(), TimeElapsedColumn(),
    ) as progress:
        task = progress.add_task("send", total=len(files))

        def advance(_outcome: StoreOutcome) -> None:
            progress.advance(task)

        return store_files(destination, files, calling_ae=calling_ae, on_progress=advance)
