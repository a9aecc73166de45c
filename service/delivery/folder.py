"""Folder destinations: result files copied into a folder that scripts watch.

Each file lands at ``<path>/<Study Instance UID>/<Series Instance UID>/<SOP
Instance UID>.dcm``. It is written to a ``.incoming-*.tmp`` file in the
series folder, fsynced, renamed into place atomically and the folder fsynced
(the durable-write helpers of :mod:`service.dicom.spool`), so a watcher never
sees a partial file; it should ignore names starting with ``.``. The UIDs are
validated (:func:`service.dicom.uids.require_uid`) before they become part of
a path, so nothing is written outside ``path``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from service.config import FolderDestination
from service.dicom.scu import StoreOutcome
from service.dicom.spool import move_into_place, relative_path, write_temporary
from service.dicom.uids import is_valid_uid, require_uid
from service.errors import InvalidInstanceError

log = logging.getLogger("radnode.delivery.folder")

_UIDS = (("StudyInstanceUID", "Study Instance UID"), ("SeriesInstanceUID", "Series Instance UID"),
         ("SOPInstanceUID", "SOP Instance UID"))


def write_files(destination: FolderDestination, paths: Sequence[Path]) -> list[StoreOutcome]:
    """Copy DICOM files into a folder destination, durably.

    Parameters
    ----------
    destination : FolderDestination
        The folder; it must exist (a missing folder may be an unmounted
        share, so it is not created). Study and series folders are created.
    paths : sequence of pathlib.Path
        DICOM Part 10 files; the bytes are copied unchanged.

    Returns
    -------
    list[StoreOutcome]
        One per path, in order. Status 0x0000 once the file is in place. A
        file that cannot be read or is not DICOM Part 10 gets status None and
        an error; one whose Study, Series or SOP Instance UID is missing or
        invalid also gets ``permanent=True``. When the folder is missing or a
        write fails (not writable, disk full) the outcome has
        ``unreachable=True`` and the reason.
    """
    root = destination.path
    if not root.is_dir():
        error = f"{destination}: the folder does not exist or is not a folder"
        return [StoreOutcome(path, _sop_instance_uid(path), None, error, unreachable=True)
                for path in paths]
    return [_write_one(destination, root, path) for path in paths]


def _sop_instance_uid(path: Path) -> str:
    try:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        return require_uid(meta.get("SOPInstanceUID"), "SOP Instance UID")
    except (InvalidDicomError, InvalidInstanceError, OSError, ValueError):
        return ""


def _write_one(destination: FolderDestination, root: Path, path: Path) -> StoreOutcome:
    try:
        data = path.read_bytes()
        dataset = dcmread(BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError) as exc:
        return StoreOutcome(path, "", None, f"cannot read file: {type(exc).__name__}: {exc}")
    try:
        study, series, sop = (require_uid(dataset.get(keyword), name) for keyword, name in _UIDS)
    except InvalidInstanceError as exc:
        uid = str(dataset.get("SOPInstanceUID", ""))
        return StoreOutcome(path, uid if is_valid_uid(uid) else "", None,
                            f"cannot name the file: {exc}", permanent=True)
    target = root / relative_path(study, series, sop)
    try:
        temporary = write_temporary(target, data)
        try:
            move_into_place(temporary, target, root=root)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.warning("%s: cannot write %s: %s", destination, target, exc)
        return StoreOutcome(path, sop, None, f"{destination}: cannot write {target}: {exc}",
                            unreachable=True)
    return StoreOutcome(path, sop, 0x0000)
