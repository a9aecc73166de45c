"""C-ECHO and C-STORE SCU: ``radnode echo``, ``radnode send`` and result delivery.

Guard against a lost C-STORE response
-------------------------------------
pynetdicom 3.0.4's ``send_c_store`` can lose a response to a race in its
reactor thread and then waits until the DIMSE timeout. radnode keeps that wait
short (``response_timeout_s``) and, when no status comes back, aborts the
association and sends that one instance again on a fresh association (at most
``resend_attempts`` times). Sending the same SOP Instance UID again is safe: a
PACS stores a duplicate, not a second object.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from service.config import Destination
from service.dicom.net import set_tcp_nodelay

log = logging.getLogger("radnode.scu")

#: pynetdicom proposes at most 128 presentation contexts per association (PS3.8 9.3.2.2).
MAX_CONTEXTS = 128
LITTLE_ENDIAN = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
_HANDLERS: list[Any] = [(evt.EVT_CONN_OPEN, set_tcp_nodelay)]


@dataclass
class StoreOutcome:
    """What happened to one file sent with C-STORE.

    Attributes
    ----------
    path : pathlib.Path
        The file.
    sop_instance_uid : str
        Its SOP Instance UID ('' if the file could not be read).
    status : int or None
        The DIMSE status from the peer; None if none was received.
    error : str or None
        Why it was not sent or not acknowledged, if so.
    """

    path: Path
    sop_instance_uid: str
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True for Success (0x0000) and the Warning statuses (0x0001, 0xBxxx)."""
        return self.status is not None and (
            self.status in (0x0000, 0x0001) or (self.status & 0xF000) == 0xB000
        )


@dataclass(frozen=True)
class _FileInfo:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def _make_ae(calling_ae: str, response_timeout_s: float, connect_timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = connect_timeout_s
    ae.connection_timeout = connect_timeout_s
    ae.dimse_timeout = response_timeout_s
    ae.network_timeout = max(response_timeout_s, 30.0)
    return ae


def echo(
    destination: Destination,
    *,
    calling_ae: str = "RADNODE",
    timeout_s: float = 10.0,
) -> int | None:
    """Send C-ECHO (DICOM PS3.7 9.1.5) and return the status.

    Returns
    -------
    int or None
        The status (0x0000 is Success); None if the association was rejected,
        aborted or timed out.
    """
    ae = _make_ae(calling_ae, timeout_s, timeout_s)
    ae.add_requested_context(Verification)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         evt_handlers=_HANDLERS)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def find_dicom_files(paths: Iterable[Path]) -> list[Path]:
    """Expand files and folders (recursively) into the DICOM Part 10 files among them.

    Files without the "DICM" preamble marker (READMEs, licences) are left out.
    """
    found: list[Path] = []
    for path in paths:
        candidates = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for candidate in candidates:
            try:
                with candidate.open("rb") as handle:
                    handle.seek(128)
                    if handle.read(4) == b"DICM":
                        found.append(candidate)
            except OSError:
                continue
    return found


def _read_info(path: Path) -> _FileInfo | str:
    try:
        meta = read_file_meta_info(path)
        return _FileInfo(
            path=path,
            sop_class_uid=str(meta.MediaStorageSOPClassUID),
            sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
            transfer_syntax_uid=str(meta.TransferSyntaxUID),
        )
    except (InvalidDicomError, AttributeError, OSError) as exc:
        return f"not a DICOM Part 10 file ({type(exc).__name__})"


def _contexts(infos: Sequence[_FileInfo]) -> list[tuple[str, list[str]]]:
    """One context per (SOP class, stored transfer syntax), proposed as stored.

    Little endian files also offer the other little endian syntax as a
    fallback, since pynetdicom converts between implicit and explicit VR;
    other syntaxes (big endian, deflate, compressed) are proposed as stored.
    """
    wanted: dict[tuple[str, str], list[str]] = {}
    for info in infos:
        ts = info.transfer_syntax_uid
        fallback = [t for t in LITTLE_ENDIAN if t != ts] if ts in LITTLE_ENDIAN else []
        wanted.setdefault((info.sop_class_uid, ts), [ts, *fallback])
    return [(sop_class, syntaxes) for (sop_class, _), syntaxes in wanted.items()]


class _Sender:
    """One association at a time to one destination, re-opened after a stall."""

    def __init__(self, destination: Destination, ae: AE) -> None:
        self.destination = destination
        self.ae = ae
        self.assoc: Association | None = None

    def ensure(self) -> Association:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate(
                self.destination.host, self.destination.port,
                ae_title=self.destination.ae_title, evt_handlers=_HANDLERS,
            )
        if not self.assoc.is_established:
            raise ConnectionError(
                f"association with {self.destination} was rejected or could not be opened"
            )
        return self.assoc

    def abort(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.abort()
        self.assoc = None

    def release(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.assoc = None


def store_files(
    destination: Destination,
    paths: Sequence[Path],
    *,
    calling_ae: str = "RADNODE",
    response_timeout_s: float = 15.0,
    connect_timeout_s: float = 10.0,
    resend_attempts: int = 2,
    on_progress: Callable[[StoreOutcome], None] | None = None,
) -> list[StoreOutcome]:
    """Send DICOM files to ``destination`` with C-STORE (DICOM PS3.4 B.2).

    Parameters
    ----------
    destination : Destination
        The peer.
    paths : sequence of pathlib.Path
        DICOM Part 10 files.
    calling_ae : str
        Our AE title.
    response_timeout_s : float
        Longest wait for each C-STORE response, seconds.
    connect_timeout_s : float
        Longest wait to open an association, seconds.
    resend_attempts : int
        How often an instance whose response never came is sent again on a
        new association.
    on_progress : callable, optional
        Called with each :class:`StoreOutcome` as it is known.

    Returns
    -------
    list[StoreOutcome]
        One per path, in order. A file that is not DICOM gets status None and
        an error; so does every remaining file when the destination refuses
        the association.
    """
    by_index: dict[int, StoreOutcome] = {}
    infos: list[_FileInfo] = []
    index_of: dict[int, int] = {}  # id(info) -> position in paths

    def report(position: int, outcome: StoreOutcome) -> None:
        by_index[position] = outcome
        if on_progress is not None:
            on_progress(outcome)

    for position, path in enumerate(paths):
        info = _read_info(path)
        if isinstance(info, str):
            report(position, StoreOutcome(path, "", None, info))
        else:
            infos.append(info)
            index_of[id(info)] = position

    # Several associations if the files need more than 128 presentation contexts.
    batches: list[list[_FileInfo]] = []
    batch: list[_FileInfo] = []
    for info in infos:
        if len(_contexts([*batch, info])) > MAX_CONTEXTS:
            batches.append(batch)
            batch = []
        batch.append(info)
    if batch:
        batches.append(batch)

    for batch in batches:
        ae = _make_ae(calling_ae, response_timeout_s, connect_timeout_s)
        for sop_class, syntaxes in _contexts(batch):
            ae.add_requested_context(sop_class, syntaxes)
        sender = _Sender(destination, ae)
        try:
            for index, info in enumerate(batch):
                try:
                    report(index_of[id(info)], _store_one(sender, info, resend_attempts))
                except ConnectionError as exc:
                    # The destination refuses or is down: do not hammer it per file.
                    for rest in batch[index:]:
                        report(index_of[id(rest)],
                               StoreOutcome(rest.path, rest.sop_instance_uid, None, str(exc)))
                    break
        finally:
            sender.release()
    return [by_index[position] for position in range(len(paths))]


def _store_one(sender: _Sender, info: _FileInfo, resend_attempts: int) -> StoreOutcome:
    try:
        dataset = dcmread(info.path)
    except (InvalidDicomError, OSError, ValueError) as exc:
        return StoreOutcome(info.path, info.sop_instance_uid, None,
                            f"cannot read file: {type(exc).__name__}")
    error = "no response"
    for attempt in range(resend_attempts + 1):
        assoc = sender.ensure()  # ConnectionError: the caller fails the rest of the batch
        try:
            status = assoc.send_c_store(dataset)
        except (ValueError, RuntimeError, AttributeError) as exc:
            # No accepted presentation context for this SOP class / syntax.
            return StoreOutcome(info.path, info.sop_instance_uid, None, str(exc))
        if "Status" in status:
            return StoreOutcome(info.path, info.sop_instance_uid, int(status.Status))
        error = "no C-STORE response before the timeout"
        log.warning(
            "no C-STORE response from %s for %s (attempt %d): aborting, sending again "
            "on a new association", sender.destination, info.sop_instance_uid, attempt + 1
        )
        sender.abort()
    return StoreOutcome(info.path, info.sop_instance_uid, None, error)
