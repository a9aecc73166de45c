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
3. The file gets its spool name as a second link (``link(2)``, which fails
   if the name exists: a duplicate SOP Instance UID of the same series is
   found there); the received name stays.
4. Success goes out. The marked file is the instance's record until its
   row is in the database: the row waits in :class:`RowFlusher`'s queue.
5. :class:`RowFlusher`, a thread, about every 50 ms: inserts the queued
   rows in one transaction (SQLite ``synchronous=NORMAL``: written to the
   write-ahead log, not yet flushed), fsyncs the spool directories that got
   new names, flushes SQLite's write-ahead log (what a ``synchronous=FULL``
   commit does), and only then removes the received names of the files
   those rows cover. A row that turns out to be a duplicate (the SOP
   Instance UID is stored in another series) loses its spool name and its
   file: the first copy is kept, as on the path with a row per C-STORE.
   An A-RELEASE-RQ runs the flush before the A-RELEASE-RP goes out, so
   that a released association's instances are all in the database.

A stop, a ``SIGKILL`` or an OOM kill loses nothing of this: the queued rows
are lost with the process, but the received names of their files are still
there, with their marks, and so are the files the kernel had not yet
written. After a power cut (or a kernel crash) the last rows, up to the last
flush, can be missing, and so can the spool names.
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
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from service.dicom import spool

if TYPE_CHECKING:
    from service.db.ingest import IngestWriter

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


@dataclass
class _Entry:
    """One instance in :class:`RowFlusher`'s queue."""

    #: Its received name, removed once its row and spool name are on disk (None: none).
    received: Path | None
    #: Its series directory in the spool, fsynced before the log (None: none).
    directory: Path | None
    #: The row to insert (``IngestSQL.record_instance``'s values); None: committed already.
    row: dict[str, Any] | None = None
    #: Its spool name, which a duplicate loses.
    target: Path | None = None
    #: Count one more arrival of this SOP Instance UID once the rows before are in.
    duplicate_of: str | None = None


class RowFlusher:
    """Inserts and flushes, in batches, the rows and spool names of marked instances.

    See the module. Rows come two ways: :meth:`defer` queues a row for the
    thread to insert (the C-STORE path), :meth:`stored` a row the caller
    committed itself.

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
    is nothing to flush. :meth:`close` flushes what is left. Queued rows need
    a writer: :meth:`attach` (``StoreContext.ingest_writer`` attaches its own).
    """

    def __init__(self, wal: Path, spool_dir: Path, interval_s: float = 0.05) -> None:
        self.wal = wal
        self.spool_dir = spool_dir
        self.interval_s = interval_s
        #: False once a mark could not be set for want of extended attributes.
        self.marks = True
        #: Instances whose rows were flushed in batches (for tests and logs).
        self.flushed = 0
        #: Queued rows found to be duplicates when inserted (their files were removed).
        self.duplicates = 0
        self.writer: IngestWriter | None = None
        self._pending: list[_Entry] = []
        self._wake = threading.Condition()
        self._flushing = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._failing = False
        self._thread: threading.Thread | None = None

    def attach(self, writer: IngestWriter) -> None:
        """Insert queued rows with ``writer`` (SQLite, ``synchronous=NORMAL``)."""
        self.writer = writer

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
        self._queue(_Entry(received, directory))

    def defer(self, received: Path, target: Path, row: dict[str, Any]) -> None:
        """Queue the row of a marked, fsynced file linked at ``target``, for the thread to insert.

        Parameters
        ----------
        received : pathlib.Path
            Its received name, removed after the batch's flush.
        target : pathlib.Path
            Its spool name; its directory is fsynced before the log.
        row : dict
            ``IngestSQL.record_instance``'s keyword values (``sop_instance_uid``
            among them).

        Notes
        -----
        The file keeps its received name until the row is committed, so a
        link count over one at ``target`` says that its row is queued.
        :meth:`flush` needs a writer (:meth:`attach`).
        """
        self._queue(_Entry(received, target.parent, row, target))

    def count_duplicate(self, sop_instance_uid: str) -> None:
        """Count one more arrival of a SOP Instance UID, after the rows queued before.

        Counted in the batch that holds it; a count that reaches the database
        before the first copy's row (queued later, or in another SCP process)
        counts nothing.
        """
        self._queue(_Entry(None, None, duplicate_of=sop_instance_uid))

    def _queue(self, entry: _Entry) -> None:
        with self._wake:
            self._pending.append(entry)
            if len(self._pending) > 1:
                return  # the thread knows
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="scp-row-flusher")
                self._thread.start()
            self._wake.notify()

    @property
    def failing(self) -> bool:
        """True while the last flush failed: new rows are then recorded before Success."""
        return self._failing

    @property
    def pending(self) -> int:
        """How many instances wait for their batch."""
        with self._wake:
            return len(self._pending)

    def flush_rows(self) -> None:
        """Make every row committed so far durable now (one flush of the log).

        Raises
        ------
        OSError
            If the log cannot be flushed.
        """
        flush_wal(self.wal)

    def flush(self) -> int:
        """Insert and flush what is pending now; return how many instances it covered.

        The queued rows first, in one transaction; then the spool
        directories, then the log: then the received names can go. If a step
        fails, the names stay (recovery would use them) and the batch is
        tried again later, without the rows already committed; the log says
        so once.
        """
        with self._flushing:
            with self._wake:
                batch, self._pending = self._pending, []
            if not batch:
                return 0
            try:
                batch = self._insert(batch)
                for directory in dict.fromkeys(entry.directory for entry in batch
                                               if entry.directory is not None):
                    try:
                        spool.sync_directory_chain(directory, self.spool_dir)
                    except FileNotFoundError:
                        continue  # removed since (a purged series): no entry to keep
                flush_wal(self.wal)
            except (OSError, SQLAlchemyError) as exc:
                with self._wake:
                    self._pending[:0] = batch
                if not self._failing:
                    reason = exc.strerror if isinstance(exc, OSError) else type(exc).__name__
                    log.error("cannot record or flush received instances (%s): their files "
                              "keep their received names until it works", reason)
                self._failing = True
                return 0
            if self._failing:
                log.warning("recording and flushing received instances works again")
            self._failing = False
            for entry in batch:
                if entry.received is not None:
                    _remove_name(entry.received)
            self.flushed += len(batch)
            return len(batch)

    def _insert(self, batch: list[_Entry]) -> list[_Entry]:
        """Insert the batch's queued rows and count its duplicates; the batch without duplicates.

        Raises
        ------
        sqlalchemy.exc.SQLAlchemyError
            If the transaction fails; nothing of it is committed.
        """
        work = [entry for entry in batch if entry.row is not None or entry.duplicate_of]
        if not work:
            return batch
        if self.writer is None:
            raise RuntimeError("queued rows without a writer")
        refused: dict[int, tuple[_Entry, str]] = {}  # id(entry): the entry and its UID
        inserts = [entry for entry in work if entry.row is not None]
        with self.writer.transaction() as transaction:
            added = transaction.record_instances([entry.row for entry in inserts
                                                  if entry.row is not None])
            for entry, new in zip(inserts, added, strict=True):
                if not new and entry.row is not None:
                    refused[id(entry)] = entry, entry.row["sop_instance_uid"]
            for entry in work:  # after the rows: each counts a row inserted above or before
                if entry.duplicate_of:
                    transaction.count_duplicate(entry.duplicate_of)
            transaction.commit()
        for entry in work:  # committed: a retry must not insert them again
            entry.row = None
            entry.duplicate_of = None
        for entry, uid in refused.values():
            self._discard_duplicate(entry, uid)
        return [entry for entry in batch if id(entry) not in refused
                and (entry.received is not None or entry.directory is not None)]

    def _discard_duplicate(self, entry: _Entry, sop_instance_uid: str) -> None:
        """Remove the spool name and file of a row found to be a duplicate when inserted."""
        self.duplicates += 1
        received, target = entry.received, entry.target
        try:
            if (received is not None and target is not None and target.exists()
                    and os.path.samefile(received, target)):
                target.unlink()
        except OSError:
            pass  # a name the next start's recovery removes
        if received is not None:
            _remove_name(received)
        log.info("duplicate SOP Instance UID %s (stored in another series): kept the first "
                 "copy", sop_instance_uid)

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


def _remove_name(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # a spare name only: the next start removes it
        pass


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
