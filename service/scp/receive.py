"""The file of each received data set: made ahead of time, its File Meta written directly.

With chunked receive (``_config.STORE_RECV_CHUNKED_DATASET``) pynetdicom
writes every C-STORE data set to a file as its fragments arrive
(``pynetdicom.dimse_messages``). When the command set has arrived it

- creates a ``NamedTemporaryFile`` (in ``tempfile.tempdir``, which the node
  points at ``<spool>/.incoming``), and
- writes the File Meta Information with pydicom: ``create_file_meta`` builds
  a ``FileMetaDataset`` (each value validated as it is set) and
  ``write_file_meta_info`` encodes it.

Both lie on the path between the peer's last fragment and the C-STORE
response it waits for. On this project's test machine (ext4 on a virtual
disk) creating a file takes 0.1–0.8 ms, a journalled metadata change, and
the File Meta costs 0.2–0.4 ms of CPU, per instance.

:func:`install` replaces those three names in ``pynetdicom.dimse_messages``
for the process:

- :class:`IncomingFiles` keeps a few empty files ready, made by a
  background thread while the association waits on the network;
- :func:`file_meta` and :func:`write_file_meta` write the same seven elements
  byte for byte (the unit tests compare them with pydicom's output) without
  building a data set. Anything else handed to them goes to pydicom.

Nothing about durability changes: the C-STORE handler still fsyncs the file
before it answers Success, and its name, fsynced before use, is what a
recovery after a power cut finds it by (:mod:`service.scp.durability`). An
unused ready file is empty; :func:`uninstall` deletes them, and
:func:`service.node.recover_incoming` deletes any that a crash left behind.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import queue
import secrets
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pynetdicom.dimse_messages as dimse_messages
from pydicom.filewriter import write_file_meta_info
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import create_file_meta

from service.dicom import spool

log = logging.getLogger("radnode.scp")

_MAKE_FILE = tempfile.NamedTemporaryFile


class ReceiveFile(io.BufferedWriter):
    """A buffered file for one received data set, as pynetdicom uses a ``NamedTemporaryFile``.

    pynetdicom writes through the object and flushes its ``file`` after each
    fragment; here ``file`` is the object itself, so no wrapper forwards every
    call (``tempfile._TemporaryFileWrapper`` resolves each through
    ``__getattr__``). ``name`` is the file's path (a ``str``). Once its File
    Meta is written (:func:`write_file_meta`), ``dataset_start`` is the data
    set's offset, and the first fragment written after it goes to
    :func:`install`'s ``begin``, whose result is ``begun``.
    """

    #: What :func:`install`'s ``begin`` made of the data set's first bytes (None: nothing).
    begun: Any = None
    #: The data set's offset in the file, once its File Meta is written (else None).
    dataset_start: int | None = None
    #: Set by :func:`write_file_meta`: the next write is the data set's first fragment.
    _transfer_syntax: str | None = None

    @property
    def file(self) -> ReceiveFile:
        """The object itself (``NamedTemporaryFile(...).file`` in pynetdicom's calls)."""
        return self

    def write(self, data: Any) -> int:
        """Write ``data``; hand the data set's first fragment to :func:`install`'s ``begin``."""
        written = super().write(data)
        syntax = self._transfer_syntax
        if syntax is not None:
            self._transfer_syntax = None
            begin = _begin
            if begin is not None:
                try:
                    self.begun = begin(data, syntax)
                except Exception as exc:  # noqa: BLE001 (the whole check runs later)
                    log.debug("no structure check begun on %s: %s", self.name,
                              type(exc).__name__)
        return written


def _owner_only(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)  # as tempfile makes them: the owner's alone


# -- File Meta Information ------------------------------------------------------------------


@dataclass(frozen=True)
class FileMeta:
    """The File Meta Information of a received data set (DICOM PS3.10 7.1), not yet encoded.

    Attributes
    ----------
    sop_class_uid, sop_instance_uid : str
        Media Storage SOP Class UID and SOP Instance UID (the C-STORE-RQ's
        Affected SOP Class and Instance UID).
    transfer_syntax : str
        The presentation context's transfer syntax UID.
    implementation_uid : str
        Implementation Class UID (pynetdicom's, as pynetdicom writes it).
    implementation_version : str
        Implementation Version Name (pynetdicom's).
    """

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID
    implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION

    def encode(self) -> bytes:
        """Group 0002 in explicit VR little endian, Group Length first (DICOM PS3.10 7.1).

        Returns
        -------
        bytes
            (0002,0000) UL, (0002,0001) OB ``00 01``, (0002,0002),
            (0002,0003), (0002,0010), (0002,0012) UI padded with NUL and
            (0002,0013) SH padded with a space, as pydicom's
            ``write_file_meta_info`` writes them.

        Raises
        ------
        UnicodeEncodeError
            If a value is not ASCII.
        struct.error
            If a value is longer than 65535 bytes.
        """
        body = b"".join((
            struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
            _short(0x0002, b"UI", _pad(self.sop_class_uid, b"\x00")),
            _short(0x0003, b"UI", _pad(self.sop_instance_uid, b"\x00")),
            _short(0x0010, b"UI", _pad(self.transfer_syntax, b"\x00")),
            _short(0x0012, b"UI", _pad(self.implementation_uid, b"\x00")),
            _short(0x0013, b"SH", _pad(self.implementation_version, b" ")),
        ))
        return _short(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _pad(value: str, padding: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + padding if len(raw) % 2 else raw


def _short(element: int, vr: bytes, value: bytes) -> bytes:
    """An explicit VR element of group 0002 with a 2-byte length (DICOM PS3.5 7.1.2)."""
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_meta(*, sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any,
              **kwargs: Any) -> Any:
    """Stands in for pynetdicom's ``create_file_meta``: a :class:`FileMeta`, nothing validated.

    With other keyword arguments it is pynetdicom's ``create_file_meta``.
    """
    if kwargs:
        return create_file_meta(sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
                                transfer_syntax=transfer_syntax, **kwargs)
    return FileMeta(str(sop_class_uid), str(sop_instance_uid), str(transfer_syntax))


def write_file_meta(fp: Any, meta: Any, *args: Any, **kwargs: Any) -> None:
    """Stands in for pydicom's ``write_file_meta_info``: writes a :class:`FileMeta` directly.

    Anything else goes to pydicom's ``write_file_meta_info``.
    """
    if isinstance(meta, FileMeta) and not args and not kwargs:
        fp.write(meta.encode())
        if isinstance(fp, ReceiveFile):
            fp.dataset_start = fp.tell()
            fp._transfer_syntax = meta.transfer_syntax
        return
    write_file_meta_info(fp, meta, *args, **kwargs)


# -- files made ahead of time ---------------------------------------------------------------


class IncomingFiles:
    """Empty files, ready for pynetdicom's chunked receive (a small queue kept full).

    Parameters
    ----------
    directory : pathlib.Path
        Where the files are made: ``<spool>/.incoming``, on the spool's file
        system, so that storing one is a rename.
    depth : int
        How many files are kept ready. An association uses one per C-STORE,
        and the thread makes the next while the peer sends.
    refill_at : int, optional
        The thread makes files again once this many or fewer are ready
        (``depth // 2`` if not given), as many as there is room for, with
        one fsync of ``directory`` for all of them: a flush of the disk per
        ``depth - refill_at`` files, not per file, beside the C-STORE's own.

    Notes
    -----
    Call the object as ``tempfile.NamedTemporaryFile`` is called; pynetdicom
    calls ``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")``. A
    call with other arguments goes to ``tempfile``; with no file ready, one is
    made on the spot. The files are named ``receiving-*``: until the handler
    renames one into the spool, it is no instance.
    """

    def __init__(self, directory: Path, depth: int = 16, refill_at: int | None = None) -> None:
        self.directory = directory
        self._depth = max(1, depth)
        self._refill_at = min(self._depth - 1, self._depth // 2 if refill_at is None
                              else max(0, refill_at))
        #: Notified when the ready files fall to ``refill_at`` (and on stop).
        self._low = threading.Condition()
        self._ready: queue.Queue[IO[bytes]] = queue.Queue(maxsize=self._depth)
        self._lock = threading.Lock()
        #: Names of files made ahead whose directory entry is on disk (fsynced).
        self._durable: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Names: unique per process and object, counted (no random name per file).
        self._prefix = os.path.join(str(directory),
                                    f"receiving-{os.getpid()}-{secrets.token_hex(4)}-")
        self._numbers = itertools.count()
        #: Files handed out ready, and files made on the spot (none was ready).
        self.handed = 0
        self.made_on_the_spot = 0

    @property
    def ready(self) -> int:
        """How many files are ready now."""
        return self._ready.qsize()

    def _make(self) -> IO[bytes]:
        # Not *.dcm: a glob for instances in the spool must not meet an empty file. A
        # counted name costs a fraction of tempfile's random one (its name generator held
        # the GIL for 12 % of the SCP's samples); "x" refuses a name that exists.
        while True:
            path = f"{self._prefix}{next(self._numbers)}"
            try:
                return ReceiveFile(io.FileIO(path, "xb", opener=_owner_only))
            except FileExistsError:
                continue

    def _fill(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                # As many as there is room for, then one fsync of the directory for all.
                made = [self._make() for _ in range(max(1, self._depth - self._ready.qsize()))]
                spool.fsync_directory(self.directory)
            except OSError as exc:
                if not failing:
                    log.warning("cannot make files ahead in %s (%s); each is made as its "
                                "data set arrives", self.directory, exc.strerror)
                failing = True
                self._stop.wait(1.0)
                continue
            failing = False
            for handle in made:
                with self._lock:
                    self._durable.add(handle.name)
                while not self._put(handle):
                    if self._stop.is_set():
                        for left in made:
                            self.named_durably(Path(left.name))
                            _discard(left)
                        return
            with self._low:
                while self._ready.qsize() > self._refill_at and not self._stop.is_set():
                    self._low.wait()

    def _put(self, handle: IO[bytes]) -> bool:
        try:
            self._ready.put(handle, timeout=0.5)
        except queue.Full:
            return False
        return True

    def start(self) -> IncomingFiles:
        """Start keeping files ready; returns ``self``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._fill, daemon=True,
                                        name="scp-incoming-files")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop making files and delete the unused ones."""
        self._stop.set()
        with self._low:
            self._low.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        while True:
            try:
                handle = self._ready.get_nowait()
            except queue.Empty:
                return
            self.named_durably(Path(handle.name))
            _discard(handle)

    def named_durably(self, path: Path) -> bool:
        """True once for a file handed out whose name in ``directory`` is known to be on disk.

        The file was made ahead and ``directory`` fsynced after it, so its
        entry survives a power loss: once its data are fsynced, the file is
        durable under this name even before it is renamed into the spool.
        False for a file made on the spot, or one asked about before.
        """
        with self._lock:
            try:
                self._durable.remove(str(path))
            except KeyError:
                return False
        return True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """A file for a received data set: a ready one if the call is pynetdicom's."""
        if not args and kwargs == {"delete": False, "mode": "wb", "suffix": ".dcm"}:
            try:
                handle = self._ready.get_nowait()
            except queue.Empty:
                self.made_on_the_spot += 1
                return self._make()
            if self._ready.qsize() <= self._refill_at:
                with self._low:
                    self._low.notify()
            self.handed += 1
            return handle
        return _MAKE_FILE(*args, **kwargs)


def named_durably(path: Path) -> bool:
    """:meth:`IncomingFiles.named_durably` of the installed files; False if none are."""
    files = _active
    return files is not None and files.named_durably(path)


def _discard(handle: IO[bytes]) -> None:
    handle.close()
    Path(handle.name).unlink(missing_ok=True)


def _replace(**names: Any) -> None:
    """Set names in ``pynetdicom.dimse_messages``, the module that calls them."""
    for name, value in names.items():
        setattr(dimse_messages, name, value)


_active: IncomingFiles | None = None
_lock = threading.Lock()
#: :func:`install`'s ``begin``.
_begin: Callable[[Any, str], Any] | None = None


def install(directory: Path, depth: int = 16,
            begin: Callable[[Any, str], Any] | None = None) -> IncomingFiles:
    """Have pynetdicom receive into files made ahead in ``directory``, File Meta written directly.

    Process-wide, as pynetdicom's receive is (and ``tempfile.tempdir``): a
    second call replaces the first, whose unused files are deleted.

    Parameters
    ----------
    directory : pathlib.Path
        ``<spool>/.incoming``; created if missing.
    depth : int
        Files kept ready.
    begin : callable, optional
        Called with the first data set fragment written to each file (a
        bytes-like object, valid during the call only) and the transfer
        syntax UID (``str``) of its File Meta, in the thread that received
        it, while the rest of the data set is still on its way; what it
        returns becomes the file's ``begun`` (an exception: None). The
        C-STORE handler's structure check begins there
        (:func:`service.scp.handlers.begin_structure_check`).

    Returns
    -------
    IncomingFiles
        The ready files; hand them to :func:`uninstall` on stop.
    """
    global _active, _begin
    files = IncomingFiles(directory, depth).start()
    with _lock:
        previous, _active = _active, files
        _begin = begin
        _replace(NamedTemporaryFile=files, create_file_meta=file_meta,
                 write_file_meta_info=write_file_meta)
    if previous is not None:
        previous.stop()
    return files


def uninstall(files: IncomingFiles) -> None:
    """Undo :func:`install` if ``files`` are still the active ones; delete the unused files.

    Either way ``files`` stop. pynetdicom then makes each file on the spot
    and writes its File Meta with pydicom, as it does by itself.
    """
    global _active, _begin
    with _lock:
        if _active is files:
            _active = None
            _begin = None
            _replace(NamedTemporaryFile=_MAKE_FILE, create_file_meta=create_file_meta,
                     write_file_meta_info=write_file_meta_info)
    files.stop()
