"""The spool: received instances on disk, written durably.

Layout: ``<spool>/<Study Instance UID>/<Series Instance UID>/<SOP Instance UID>.dcm``.
Every UID is validated (:func:`service.dicom.uids.require_uid`) before it
becomes part of a path, so nothing can be written outside the spool.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def relative_path(study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
    """Return the spool-relative path of an instance (UIDs must already be validated)."""
    return f"{study_uid}/{series_uid}/{sop_instance_uid}.dcm"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(target: Path, data: bytes) -> int:
    """Write ``data`` to ``target`` so that it survives a crash or power loss.

    The bytes go to a temporary file in the same directory, which is fsynced
    and renamed over ``target`` atomically; the directory is fsynced too. A
    failure leaves no partial file behind.

    Parameters
    ----------
    target : pathlib.Path
        Final path; parent directories are created.
    data : bytes
        The complete file content.

    Returns
    -------
    int
        Number of bytes written.

    Raises
    ------
    OSError
        If the file cannot be written (disk full, permissions).
    """
    parent = target.parent
    new_dirs = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=".incoming-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(parent)
    if new_dirs:
        _fsync_dir(parent.parent)
        _fsync_dir(parent.parent.parent)
    return len(data)
