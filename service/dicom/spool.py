"""The spool: received instances on disk, written durably.

Layout: ``<spool>/<Study Instance UID>/<Series Instance UID>/<SOP Instance UID>.dcm``.
Every UID is validated (:func:`service.dicom.uids.require_uid`) before it
becomes part of a path, so nothing can be written outside the spool.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast


def relative_path(study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
    """Return the spool-relative path of an instance (UIDs must already be validated)."""
    return f"{study_uid}/{series_uid}/{sop_instance_uid}.dcm"


def fsync_directory(path: Path) -> None:
    """Fsync a directory, so that the entries made or renamed in it survive a power loss.

    Raises
    ------
    OSError
        If it cannot be opened or synced.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _temporary_beside(target: Path) -> Iterator[Path]:
    """An empty ``.incoming-*.tmp`` file in ``target``'s directory, deleted if the block fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=".incoming-", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(name)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


@functools.cache
def _sync_file_range() -> Callable[..., int] | None:
    """The C library's ``sync_file_range`` (Linux), None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[..., int], function)


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages to disk, without waiting.

    The fsync that makes the file durable comes later (:func:`adopt`); by
    then most of a large instance is on its way to the disk, so that fsync
    waits for less, while the SCP checks the data set meanwhile. Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; a no-op elsewhere or if it
    fails (the fsync alone is always enough for durability).

    Parameters
    ----------
    fd : int
        An open descriptor of the file (read-only is enough).
    """
    function = _sync_file_range()
    if function is not None:
        function(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _fsync_file(path: Path, *, attributes: bool = False) -> None:
    # fdatasync: the data and the size reach the disk; mtime/atime need not.
    # attributes: fsync, so that the inode goes too, its extended attributes with it.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        (os.fsync if attributes else os.fdatasync)(fd)
    finally:
        os.close(fd)


#: The extended attribute that marks a received file as a stored instance
#: (:func:`mark_stored`); its value is the SCP's (:class:`service.scp.durability.StoredMark`).
STORED_MARK = "user.radnode.stored"


def mark_stored(path: Path, value: bytes) -> None:
    """Mark ``path`` as a stored instance: set its :data:`STORED_MARK` extended attribute.

    The mark reaches the disk with the file's next fsync (``adopt(...,
    attributes=True)``): one flush makes the data and the mark durable.

    Raises
    ------
    OSError
        If the file system has no user extended attributes (``ENOTSUP``), has
        no room for this one (``ENOSPC``, ``E2BIG``) or the file is gone.
    """
    os.setxattr(path, STORED_MARK, value)


def stored_mark(path: Path) -> bytes | None:
    """The :data:`STORED_MARK` of ``path``; None if it has none or it cannot be read."""
    try:
        return os.getxattr(path, STORED_MARK)
    except OSError:  # ENODATA (no mark), ENOTSUP, ENOENT
        return None


def marks_supported(directory: Path) -> bool:
    """True if files in ``directory`` take :data:`STORED_MARK` (a probe file is marked).

    Raises
    ------
    OSError
        If no probe file can be made in ``directory``.
    """
    fd, name = tempfile.mkstemp(dir=directory, prefix=".incoming-probe-", suffix=".tmp")
    os.close(fd)
    try:
        mark_stored(Path(name), b"probe")
        return stored_mark(Path(name)) == b"probe"
    except OSError:
        return False
    finally:
        os.unlink(name)


#: Directories whose own entry in their parent is known to be on disk (this
#: process fsynced the parent after the directory appeared). Each instance
#: then costs one directory fsync (its series folder), not one per level.
_durable_dirs: set[Path] = set()
_DURABLE_DIRS_MAX = 100_000


def forget_directory(path: Path) -> None:
    """Say that ``path`` was removed: a folder made again there is fsynced as new."""
    _durable_dirs.discard(path)


def write_temporary(target: Path, data: bytes) -> Path:
    """Write ``data`` to a new temporary file beside ``target`` and fsync it.

    Returns
    -------
    pathlib.Path
        The temporary file (``.incoming-*.tmp``); hand it to
        :func:`move_into_place`, or delete it.

    Raises
    ------
    OSError
        If it cannot be written; nothing is left behind.
    """
    with _temporary_beside(target) as temporary:
        temporary.write_bytes(data)
        _fsync_file(temporary)
    return temporary


def adopt(received: Path, target: Path, *, attributes: bool = False) -> Path:
    """Make a file received elsewhere durable, ready to be renamed onto ``target``.

    On the spool's file system (the node points pynetdicom's temporary files
    at ``<spool>/.incoming``) the received file itself is fsynced and
    returned: :func:`move_into_place` then renames it across directories,
    which is atomic on one file system, and no extra file is created (each
    creation and rename is a journal entry that a later fsync waits for).
    Elsewhere it is copied into a fsynced temporary file beside ``target``.
    ``attributes=True`` fsyncs the whole inode, not only the data and the
    size: the received file's :data:`STORED_MARK` goes to the disk with them
    (a copy carries no mark).

    Returns
    -------
    pathlib.Path
        The file to hand to :func:`move_into_place`, or to delete.

    Raises
    ------
    OSError
        If it can be neither fsynced nor copied; nothing is left behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if received.stat().st_dev == target.parent.stat().st_dev:
        _fsync_file(received, attributes=attributes)
        return received
    with _temporary_beside(target) as temporary:  # another file system: a rename cannot
        shutil.copyfile(received, temporary)
        _fsync_file(temporary)
    return temporary


def move_into_place(temporary: Path, target: Path, root: Path | None = None, *,
                    sync_directories: bool = True) -> None:
    """Rename a fsynced temporary file over ``target`` atomically and fsync the directories.

    ``target``'s directory is fsynced, and so is each directory above it up
    to ``root`` (exclusive) the first time this process puts a file below it,
    so that new directory entries survive a power loss while an instance of
    a known series costs a single directory fsync.

    ``sync_directories=False`` leaves the rename to the file system's own
    journal commit (seconds later). Only for a file whose own name is on
    disk and that a recovery after a crash finds by that name and renames
    again: the SCP's received files (:func:`service.node.recover_incoming`).

    Raises
    ------
    OSError
        If the rename or an fsync fails; the caller decides whether ``target``
        must be removed (it may already be in place).
    """
    os.replace(temporary, target)
    if sync_directories:
        sync_directory_chain(target.parent, root)


def link_into_place(received: Path, target: Path, *, replace: bool = True) -> None:
    """Give a fsynced received file a second name, ``target``, and keep the first.

    For the SCP's marked files (:mod:`service.scp.durability`): the received
    name, on disk since the file was made ahead, stays until the
    directories and the database rows have been flushed; after a power cut
    before that, recovery finds the file by it. With ``replace``, a file
    already at ``target`` (never recorded: its row is being inserted now) is
    replaced. Nothing is fsynced.

    Raises
    ------
    FileExistsError
        Without ``replace``, if ``target`` exists (e.g. the same SOP Instance
        UID, stored before).
    OSError
        If the link cannot be made (e.g. ``EXDEV``: another file system).
    """
    try:
        os.link(received, target)
    except FileExistsError:
        if not replace:
            raise
        target.unlink()
        os.link(received, target)


def sync_directory_chain(directory: Path, root: Path | None = None) -> None:
    """Fsync ``directory``, and its parents up to ``root`` the first time they are met.

    The entries made in ``directory`` survive a power loss, and so does its
    own entry and those of each directory above it below ``root``
    (exclusive), which this process fsyncs once each.

    Raises
    ------
    OSError
        If a directory cannot be opened or synced.
    """
    fsync_directory(directory)  # the new entries in it
    if root is None:
        return
    child = directory
    while child != root and child.is_relative_to(root) and child not in _durable_dirs:
        fsync_directory(child.parent)  # the entry of child, in case child is new
        if len(_durable_dirs) >= _DURABLE_DIRS_MAX:
            _durable_dirs.clear()
        _durable_dirs.add(child)
        child = child.parent


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
    temporary = write_temporary(target, data)
    try:
        move_into_place(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return len(data)
