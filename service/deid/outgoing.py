"""De-identified copies of result files for one destination, made just before sending.

:func:`service.delivery.dispatch.send` calls :func:`prepare` for a
destination with ``deidentify``: each file is read, de-identified in the
destination's scope, and written to a temporary file under
``<data_dir>/deid-outbox``; the new pseudonyms are committed before anything
is sent, so a retry (or a send after a crash) makes the identical object
with the same UIDs. The result files themselves stay identified (the PACS
and other destinations get them as they are). :func:`sent_uid` gives the
SOP Instance UID a destination actually received, for Storage Commitment.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session

from service.config import Destination, FolderDestination, StowDestination
from service.deid import mapping
from service.deid.profile import DeidentificationError, deidentify_file, options_of, scope_of
from service.dicom.scu import StoreOutcome

log = logging.getLogger("radnode.deid")

AnyDestination = Destination | StowDestination | FolderDestination


@dataclass
class Prepared:
    """De-identified copies of some files, and the outcomes of those that failed.

    Attributes
    ----------
    paths : list[pathlib.Path]
        The temporary de-identified files, in the order of the input paths
        that succeeded.
    index : list[int]
        For each of ``paths``, its position in the input.
    failed : dict[int, StoreOutcome]
        Input position -> a permanent failure (the file cannot be
        de-identified; it is never sent identified instead).
    folder : pathlib.Path or None
        The temporary folder; removed by :meth:`cleanup`.
    """

    paths: list[Path] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    failed: dict[int, StoreOutcome] = field(default_factory=dict)
    folder: Path | None = None

    def merge(self, originals: Sequence[Path], sent: Sequence[StoreOutcome]) -> list[StoreOutcome]:
        """One outcome per original path, in order: the failures and the send's outcomes."""
        outcomes: list[StoreOutcome | None] = [None] * len(originals)
        for position, outcome in self.failed.items():
            outcomes[position] = outcome
        for position, outcome in zip(self.index, sent, strict=True):
            outcome.path = originals[position]
            outcomes[position] = outcome
        return [o for o in outcomes if o is not None]

    def cleanup(self) -> None:
        """Remove the temporary files."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def prepare(session: Session, destination: AnyDestination, paths: Sequence[Path],
            outbox: Path) -> Prepared:
    """De-identify ``paths`` for ``destination`` into temporary files; commit the pseudonyms.

    Parameters
    ----------
    session : sqlalchemy.orm.Session
        An open session; it is committed (the new pseudonyms are durable
        before anything is sent).
    destination : Destination, StowDestination or FolderDestination
        A destination with ``deidentify`` set.
    paths : sequence of pathlib.Path
        The (identified) result files.
    outbox : pathlib.Path
        Folder for the temporary files (``<data_dir>/deid-outbox``), created if needed.

    Returns
    -------
    Prepared

    Raises
    ------
    ValueError
        If ``destination`` does not de-identify.
    """
    options = options_of(destination.deidentify)
    if options is None:
        raise ValueError(f"destination {destination.name} does not de-identify")
    scope = scope_of(options, destination.name)
    outbox.mkdir(parents=True, exist_ok=True)
    prepared = Prepared(folder=Path(tempfile.mkdtemp(prefix=".deid-", dir=outbox)))
    for position, path in enumerate(paths):
        try:
            dataset = deidentify_file(path, session, scope=scope, options=options)
        except DeidentificationError as exc:
            log.error("%s: cannot de-identify a result for %s: %s", path.name,
                      destination.name, exc)
            prepared.failed[position] = StoreOutcome(
                path, "", None, f"cannot de-identify: {exc}", permanent=True)
            continue
        target = prepared.folder / f"{position:05d}.dcm"  # type: ignore[operator]
        dataset.save_as(target, enforce_file_format=True)
        prepared.paths.append(target)
        prepared.index.append(position)
    session.commit()
    return prepared


def sent_uid(session: Session, destination: AnyDestination, sop_instance_uid: str) -> str:
    """The SOP Instance UID ``destination`` received for the result ``sop_instance_uid``.

    The pseudonym for a de-identifying destination (the original if none was
    made yet), the UID itself otherwise.
    """
    options = options_of(destination.deidentify)
    if options is None:
        return sop_instance_uid
    found = mapping.find(session, scope_of(options, destination.name), mapping.UID_KIND,
                         sop_instance_uid)
    return found.pseudonym if found is not None else sop_instance_uid
