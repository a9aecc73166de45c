"""One flush per received instance: its file and a mark on disk, its row flushed in a batch.

Before it answers Success to a C-STORE the SCP must have the instance on disk
and recorded. Written naively that is two flushes of the disk per instance,
one after the other, on the path the sending modality waits on: the file's
``fsync`` and the database commit's. With the spool on a file system that
has user extended attributes (ext4, XFS, Btrfs, tmpfs since Linux 6.6) and
the database in SQLite, the SCP needs one:

1. The data set arrives in a file made ahead in ``<spool>/.incoming``
   (:mod:`service.scp.receive`), whose name is already on disk.
2. Once the data set has passed its checks, the file gets a mark, the
   extended attribute :data:`service.dicom.spool.STORED_MARK`, holding what
   the row needs beyond the data set (:class:`StoredMark`: time of receipt,
   calling and called AE title, peer address). One ``fsync`` writes the
   file's data, its size and the mark.
3. The file gets its spool name as a second link; the received name stays.
4. The row is committed without a flush (SQLite ``synchronous=NORMAL``:
   written to the write-ahead log, not yet flushed) and Success goes out.
5. :class:`RowFlusher`, a thread, about every 50 ms: fsyncs the spool
   directories that got new names, flushes SQLite's write-ahead log (what a
   ``synchronous=FULL`` commit does), and only then removes the received
   names of the files those rows cover.

A stop, a ``SIGKILL`` or an OOM kill loses nothing of this: the kernel keeps
what was written. After a power cut (or a kernel crash) the last rows, up to
the last flush, can be missing, and so can the spool names; the received
names of those files are still there, with their marks.
:func:`service.node.recover_incoming` records each marked file whose row is
missing again, from its data set and its mark, and puts it under its spool
name, before the SCP accepts associations. The write-ahead log keeps the
database a prefix of its commits, so a row is only ever missing together
with the rows after it, and any commit that was flushed (the scheduler's,
say) made every row before it durable too.

A file whose mark cannot be set (no extended attributes there, or no room
for one), one that was not made ahead, and every row on PostgreSQL take the
path of two flushes: :meth:`RowFlusher.flush_rows` before Success.
``storage.batched_row_flush: false`` takes it for every instance.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine

from service.dicom import spool

log = logging.getLogger("radnode.scp")

#: Version of :class:`StoredMark`'s encoding (its first line).
_MARK_VERSION = b"1"


@dataclass(frozen=True)
class StoredMark:
    """What a received file's mark holds: the row's facts that are not in the data set.

    Encoded as five lines of ASCII (version, milliseconds since the epoch,
    calling AE title, called AE title, peer address): an AE title holds no
    line feed (DICOM PS3.5 6.2, AE), and the value stays small enough to fit
    in an ext4 inode beside the file's other attributes.

    Attributes
    ----------
    received_at : datetime.datetime
        When the SCP stored it, timezone-aware UTC (to the millisecond).
    calling_ae_title, called_ae_title : str
        The association's AE titles, at most 16 characters each.
    peer_address : str
        The sender's IP address.
    """

    received_at: datetime
    calling_ae_title: str
    called_ae_title: str
    peer_address: str

    def encode(self) -> bytes:
        """The mark's value: five lines of ASCII."""
        milliseconds = round(self.received_at.timestamp() * 1000)
        return b"\n".join([_MARK_VERSION, str(milliseconds).encode(),
                           *(_line(text) for text in (self.calling_ae_title,
                                                      self.called_ae_title,
                                                      self.peer_address))])

    @classmethod
    def decode(cls, value: bytes) -> StoredMark:
        """Read a mark written by :meth:`encode`.

        Raises
        ------
        ValueError
            If ``value`` is no mark of this version.
        """
        lines = value.split(b"\n")
        if len(lines) != 5 or lines[0] != _MARK_VERSION:
            raise ValueError("not a stored mark of version 1")
        try:
            received_at = datetime.fromtimestamp(int(lines[1]) / 1000, tz=UTC)
            calling, called, peer = (line.decode("ascii") for line in lines[2:])
        except (OverflowError, OSError) as exc:  # a time out of range
            raise ValueError(f"a stored mark with an unusable time ({exc})") from exc
        return cls(received_at, calling, called, peer)


def _line(text: str) -> bytes:
    """``text`` as one line of ASCII (anything else replaced by ``?``)."""
    return text.replace("\n", "?").encode("ascii", errors="replace")


def sqlite_wal(engine: Engine) -> Path | None:
    """The write-ahead log of ``engine``'s SQLite database file; None for any other database."""
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).resolve().with_name(Path(database).name + "-wal")


def flush_wal(wal: Path) -> None:
    """Flush SQLite's write-ahead log: every commit written to it before is durable.

    This is the flush a ``synchronous=FULL`` commit makes (``fdatasync`` of
    the log, sqlite.org/wal.html). A log that is not there was checkpointed
    into the database file, which SQLite flushed, and removed: nothing to do.

    Raises
    ------
    OSError
        If the log cannot be opened or flushed (an I/O error of the disk).
    """
    try:
        fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


class RowFlusher:
    """Flushes, in batches, the rows and spool names of marked instances; see the module.

    Parameters
    ----------
    wal : pathlib.Path
        SQLite's write-ahead log (:func:`sqlite_wal`).
    spool_dir : pathlib.Path
        Root of the spool: the directories below it get their entries fsynced.
    interval_s : float
        How long a stored instance waits at most for its batch's flush, seconds.

    Notes
    -----
    The thread starts with the first stored instance and sleeps while there
    is nothing to flush. :meth:`close` flushes what is left.
    """

    def __init__(self, wal: Path, spool_dir: Path, interval_s: float = 0.05) -> None:
        self.wal = wal
        self.spool_dir = spool_dir
        self.interval_s = interval_s
        #: False once a mark could not be set for want of extended attributes.
        self.marks = True
        #: Instances whose rows were flushed in batches (for tests and logs).
        self.flushed = 0
        self._pending: list[tuple[Path, Path]] = []  # (received name, spool directory)
        self._wake = threading.Condition()
        self._flushing = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._failing = False
        self._thread: threading.Thread | None = None

    def mark(self, received: Path, mark: StoredMark) -> bool:
        """Set ``received``'s mark; False if it cannot be set (then flush its row itself).

        Without extended attributes on the spool's file system (``ENOTSUP``)
        no later file is tried: the log says so once.

        Parameters
        ----------
        received : pathlib.Path
            The received file, made ahead in ``<spool>/.incoming``.
        mark : StoredMark
            What its row will hold beyond its data set.
        """
        if not self.marks:
            return False
        try:
            spool.mark_stored(received, mark.encode())
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                self.marks = False
                log.warning("the spool's file system has no user extended attributes: each "
                            "C-STORE now waits for two flushes of the disk, not one")
            return False
        return True

    def stored(self, received: Path, directory: Path) -> None:
        """Say that a marked file was linked into ``directory`` and its row committed.

        Parameters
        ----------
        received : pathlib.Path
            Its received name, removed after the batch's flush.
        directory : pathlib.Path
            Its series directory in the spool, fsynced before the log.
        """
        with self._wake:
            self._pending.append((received, directory))
            if len(self._pending) > 1:
                return  # the thread knows
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="scp-row-flusher")
                self._thread.start()
            self._wake.notify()

    def flush_rows(self) -> None:
        """Make every row committed so far durable now (one flush of the log).

        Raises
        ------
        OSError
            If the log cannot be flushed.
        """
        flush_wal(self.wal)

    def flush(self) -> int:
        """Flush what is pending now; return how many instances it covered.

        The spool directories first, then the log: then the received names
        can go. If a flush fails, the names stay (recovery would use them)
        and the batch is tried again later; the log says so once.
        """
        with self._flushing:
            with self._wake:
                batch, self._pending = self._pending, []
            if not batch:
                return 0
            try:
                for directory in dict.fromkeys(directory for _, directory in batch):
                    try:
                        spool.sync_directory_chain(directory, self.spool_dir)
                    except FileNotFoundError:
                        continue  # removed since (a purged series): no entry to keep
                flush_wal(self.wal)
            except OSError as exc:
                with self._wake:
                    self._pending[:0] = batch
                if not self._failing:
                    log.error("cannot flush the spool's directories or the database log (%s): "
                              "received files keep their names until it works", exc.strerror)
                self._failing = True
                return 0
            if self._failing:
                log.warning("flushing the spool's directories and the database log works again")
            self._failing = False
            for received, _ in batch:
                try:
                    received.unlink(missing_ok=True)
                except OSError:  # a spare name only: the next start removes it
                    pass
            self.flushed += len(batch)
            return len(batch)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
            # Let the batch grow for a while (later commits join it); close() ends it.
            self._stop.wait(self.interval_s)
            self.flush()
            if self._failing:
                self._stop.wait(1.0)  # not in a tight loop against a failing disk

    def close(self) -> None:
        """Stop the thread and flush what is left (a stop loses nothing either way)."""
        self._stop.set()
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()


def row_flusher_for(engine: Engine, spool_dir: Path, enabled: bool = True,
                    interval_ms: int = 50) -> RowFlusher | None:
    """A :class:`RowFlusher` for the SCP where one can work, else None.

    None (each row flushed before Success) when ``enabled`` is false
    (``storage.batched_row_flush``), on PostgreSQL (its commits are
    flushed by the server) and where ``<spool>/.incoming`` takes no
    extended attributes; the log says which.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        The node's database.
    spool_dir : pathlib.Path
        Root of the spool; ``.incoming`` below it must exist.
    enabled : bool
        ``storage.batched_row_flush``.
    interval_ms : int
        ``storage.row_flush_interval_ms``: the longest a row waits for its flush.
    """
    wal = sqlite_wal(engine)
    if not enabled or wal is None:
        return None
    try:
        supported = spool.marks_supported(spool_dir / ".incoming")
    except OSError:
        supported = False
    if not supported:
        log.warning("the spool's file system takes no user extended attributes: each C-STORE "
                    "waits for two flushes of the disk (file and database row), not one")
        return None
    return RowFlusher(wal, spool_dir.resolve(), interval_ms / 1000)
