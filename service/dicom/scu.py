"""C-ECHO and C-STORE SCU: ``radnode echo``, ``radnode send`` and result delivery.

Presentation contexts and transcoding (DICOM PS3.8 9.3.2.2, PS3.5 10)
---------------------------------------------------------------------
For each SOP class among the files radnode proposes one presentation context
per stored transfer syntax that is not little endian (JPEG 2000, RLE, big
endian, deflate, ...), each with that syntax alone, plus one context with
Explicit VR Little Endian and, as a last resort, Implicit VR Little Endian.
Separate contexts let the peer accept or reject each syntax on its own, so a
file goes as stored whenever the peer takes its syntax. Otherwise it is
converted to Explicit VR Little Endian (:func:`to_explicit_little_endian`),
and the decoded pixels are checked to be unchanged before it is sent; a file
that cannot be converted, or whose SOP class the peer accepted in no context,
fails with ``permanent=True``.

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

import copy
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.pixels.utils import pack_bits
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from service.config import Destination
from service.dicom.net import make_ae, set_tcp_nodelay
from service.dicom.tls import tls_args

log = logging.getLogger("radnode.scu")

#: pynetdicom proposes at most 128 presentation contexts per association (PS3.8 9.3.2.2).
MAX_CONTEXTS = 128
#: The fallback context's transfer syntaxes, in order of preference.
LITTLE_ENDIAN = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
#: Syntaxes pynetdicom converts between by itself (explicit/implicit VR, deflate).
_CONVERTIBLE = frozenset((*LITTLE_ENDIAN, str(DeflatedExplicitVRLittleEndian)))
_HANDLERS: list[Any] = [(evt.EVT_CONN_OPEN, set_tcp_nodelay)]
#: Bytes per value of the VRs whose values are byte-swapped between big and
#: little endian (PS3.5 7.3); OB and text are byte streams and stay as they are.
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def is_permanent(status: int) -> bool:
    """Whether a C-STORE failure status means that sending again cannot help.

    Permanent: 0x0122 (SOP class not supported) and 0x0124 (not authorised),
    from the general statuses of DICOM PS3.7 Annex C; 0xA9xx (data set does
    not match SOP class) and 0xCxxx (cannot understand), from the Storage
    Service Class statuses of DICOM PS3.4 B.2.3. Everything else, 0xA7xx (out
    of resources) in particular, may succeed later; Success and the Warning
    statuses are not failures and give False.

    Parameters
    ----------
    status : int
        The DIMSE Status (0000,0900) of a C-STORE response, 0x0000-0xFFFF.

    Returns
    -------
    bool
        True if the failure is permanent.
    """
    return status in (0x0122, 0x0124) or (status & 0xFF00) == 0xA900 or (
        status & 0xF000) == 0xC000


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
    unreachable : bool
        The destination could not be reached (connection refused, association
        rejected, network error): nothing is wrong with the instance.
    permanent : bool
        The destination refused the instance for a reason that sending it
        again cannot change (SOP class not supported, data set does not
        match the SOP class, cannot understand).
    """

    path: Path
    sop_instance_uid: str
    status: int | None
    error: str | None = None
    unreachable: bool = False
    permanent: bool = False

    @property
    def ok(self) -> bool:
        """True for Success (0x0000) and the Warning statuses (0x0001, 0xBxxx)."""
        return self.status is not None and (
            self.status in (0x0000, 0x0001) or (self.status & 0xF000) == 0xB000
        )


class TranscodeError(ValueError):
    """A data set cannot be converted to Explicit VR Little Endian."""


@dataclass(frozen=True)
class _FileInfo:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def _make_ae(calling_ae: str, response_timeout_s: float, connect_timeout_s: float) -> AE:
    ae = make_ae(calling_ae)
    ae.acse_timeout = connect_timeout_s
    ae.connection_timeout = connect_timeout_s
    ae.dimse_timeout = response_timeout_s
    ae.network_timeout = max(response_timeout_s, 30.0)
    return ae


def _one_line(text: str, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sop_class_text(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


def _no_context(sop_class_uid: str) -> str:
    return ("destination accepted no presentation context for SOP class "
            f"{_sop_class_text(sop_class_uid)}")


def echo(
    destination: Destination,
    *,
    calling_ae: str = "RADNODE",
    timeout_s: float = 10.0,
) -> int | None:
    """Send C-ECHO (DICOM PS3.7 9.1.5) and return the status.

    Uses TLS (DICOM PS3.15 B.1) when ``destination.tls`` is set.

    Parameters
    ----------
    destination : Destination
        The peer.
    calling_ae : str
        Our AE title.
    timeout_s : float
        Longest wait to connect, to open the association and for the
        response, seconds.

    Returns
    -------
    int or None
        The status (0x0000 is Success); None if the association was rejected,
        aborted or timed out, or the TLS files cannot be loaded (the reason
        is logged).
    """
    try:
        tls = tls_args(destination.tls, destination.host)
    except (OSError, ssl.SSLError) as exc:
        log.warning("C-ECHO to %s: cannot set up TLS: %s", destination, exc)
        return None
    ae = _make_ae(calling_ae, timeout_s, timeout_s)
    ae.add_requested_context(Verification)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         evt_handlers=_HANDLERS, tls_args=tls)
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


# -- transcoding --------------------------------------------------------------------------


def _decoded_pixels(dataset: Dataset) -> np.ndarray[Any, Any] | None:
    if not any(keyword in dataset for keyword in _PIXEL_KEYWORDS):
        return None
    return dataset.pixel_array


def _swap_to_little_endian(dataset: Dataset) -> None:
    """Byte-swap the OW/OF/OL/OD/OV values of a data set read as big endian, in place.

    pydicom decodes numbers (US, SS, FL, ...) by the data set's byte order
    and encodes them in the new one, but writes these VRs as raw bytes.
    """
    for elem in dataset.iterall():
        if elem.VR == "UN":
            raise TranscodeError(
                f"element {elem.tag} has VR UN, whose byte order cannot be converted"
            )
        width = _SWAP_WIDTH.get(str(elem.VR))
        if width is None or not elem.value:
            continue
        raw = elem.value
        if not isinstance(raw, bytes) or len(raw) % width:
            raise TranscodeError(
                f"element {elem.tag} ({elem.VR}) is not a whole number of {width}-byte values"
            )
        elem.value = np.frombuffer(raw, dtype=f">u{width}").astype(f"<u{width}").tobytes()


def _decompress(dataset: Dataset, decoded: np.ndarray[Any, Any] | None) -> None:
    if decoded is None:
        return  # no pixel data: only the transfer syntax changes
    dataset.decompress(generate_instance_uid=False)  # same instance, new transfer syntax
    if int(dataset.BitsAllocated) == 1:
        # pydicom 3.0 writes one byte per pixel here; PS3.5 8.1.1 packs 8 pixels per byte.
        dataset.PixelData = pack_bits(decoded)


def to_explicit_little_endian(dataset: Dataset) -> Dataset:
    """Convert a data set read from a file to Explicit VR Little Endian (PS3.5 A.2).

    A compressed data set is decompressed with pydicom and its pixel plugins
    (pylibjpeg, -libjpeg, -openjpeg, -rle); bit-packed 1-bit pixels are packed
    again. Deflated data sets are written inflated. Big endian data sets get
    their OW, OF, OL, OD and OV values byte-swapped; one with a UN element is
    refused, since its byte order is unknown. The SOP Instance UID is kept.
    The result is encoded, read back, and its decoded pixels must equal the
    original's.

    Parameters
    ----------
    dataset : pydicom.dataset.Dataset
        Read with :func:`pydicom.dcmread`, with ``file_meta``; not changed.

    Returns
    -------
    pydicom.dataset.Dataset
        The data set as read back from its Explicit VR Little Endian encoding
        (``dataset`` itself if it already is).

    Raises
    ------
    TranscodeError
        If no decoder can decompress it, a value cannot be byte-swapped, or
        the decoded pixels differ after the conversion.
    """
    source = UID(str(dataset.file_meta.TransferSyntaxUID))
    if source == ExplicitVRLittleEndian:
        return dataset
    dataset = copy.deepcopy(dataset)
    try:
        decoded = _decoded_pixels(dataset)
        if source.is_compressed:
            _decompress(dataset, decoded)
        elif not source.is_little_endian:
            _swap_to_little_endian(dataset)
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        buffer = BytesIO()
        dcmwrite(buffer, dataset, enforce_file_format=True)
        result = dcmread(BytesIO(buffer.getvalue()))
        if decoded is not None:
            after = _decoded_pixels(result)
            if after is None or after.shape != decoded.shape or not np.array_equal(
                    after, decoded):
                raise TranscodeError("the decoded pixels differ after the conversion")
    except TranscodeError:
        raise
    except Exception as exc:  # pydicom and its plugins raise many types
        raise TranscodeError(_one_line(f"{type(exc).__name__}: {exc}")) from exc
    return result


# -- presentation contexts ----------------------------------------------------------------


def _context_keys(info: _FileInfo) -> tuple[tuple[str, str], ...]:
    """The contexts a file needs: its stored syntax (if not little endian) and the LE one."""
    little = (info.sop_class_uid, "LE")
    if info.transfer_syntax_uid in LITTLE_ENDIAN:
        return (little,)
    return ((info.sop_class_uid, info.transfer_syntax_uid), little)


def _contexts(infos: Sequence[_FileInfo]) -> list[tuple[str, list[str]]]:
    """The presentation contexts to propose for ``infos``: (SOP class, transfer syntaxes).

    Per SOP class, one context for each stored syntax that is not little
    endian, with that syntax alone, and one with Explicit then Implicit VR
    Little Endian (the stored syntax of little endian files, and the
    fallback that every file can be converted to).
    """
    keys: dict[tuple[str, str], None] = {}
    for info in infos:
        keys.update(dict.fromkeys(_context_keys(info)))
    return [(sop_class, list(LITTLE_ENDIAN) if ts == "LE" else [ts]) for sop_class, ts in keys]


def _batches(infos: Sequence[_FileInfo]) -> list[list[_FileInfo]]:
    """Split ``infos`` so that no association needs more than :data:`MAX_CONTEXTS`."""
    batches: list[list[_FileInfo]] = []
    batch: list[_FileInfo] = []
    keys: set[tuple[str, str]] = set()
    for info in infos:
        needed = keys.union(_context_keys(info))
        if batch and len(needed) > MAX_CONTEXTS:
            batches.append(batch)
            batch, needed = [], set(_context_keys(info))
        batch.append(info)
        keys = needed
    if batch:
        batches.append(batch)
    return batches


class _Refused(Exception):
    """The peer accepted no presentation context this file can be sent on."""


def _plan(assoc: Association, info: _FileInfo) -> str:
    """How to send a file on ``assoc``: "stored" or "convert" (to Explicit VR Little Endian).

    Raises
    ------
    _Refused
        If no context for the file's SOP class was accepted with its stored
        syntax or one it can be converted to.
    """
    accepted = {
        str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
        if cx.abstract_syntax == info.sop_class_uid and cx.as_scu
    }
    stored = info.transfer_syntax_uid
    if not accepted:
        raise _Refused(_no_context(info.sop_class_uid))
    if stored in accepted or (stored in _CONVERTIBLE and accepted & _CONVERTIBLE):
        return "stored"  # pynetdicom converts explicit/implicit VR and deflate itself
    if accepted & _CONVERTIBLE:
        return "convert"
    names = ", ".join(sorted(UID(ts).name for ts in accepted))
    alternative = "" if stored in _CONVERTIBLE else " or little endian"
    raise _Refused(f"destination accepted SOP class {_sop_class_text(info.sop_class_uid)} "
                   f"only as {names}, not as {UID(stored).name}{alternative}")


# -- associations -------------------------------------------------------------------------


class _NothingAccepted(Exception):
    """The peer accepted the association but none of its presentation contexts."""


class _Sender:
    """One association at a time to one destination, re-opened after a stall."""

    def __init__(self, destination: Destination, ae: AE,
                 tls: tuple[ssl.SSLContext, str] | None) -> None:
        self.destination = destination
        self.ae = ae
        self.tls = tls
        self.assoc: Association | None = None
        # What the last association attempt saw, for the error message.
        self._connected = False
        self._peer_aborted = False
        self._rejection: str | None = None

    def _on_conn_open(self, _event: evt.Event) -> None:
        self._connected = True

    def _on_acse_recv(self, event: evt.Event) -> None:
        primitive: Any = getattr(event, "primitive", None)
        if isinstance(primitive, A_ABORT):
            self._peer_aborted = True
        elif getattr(primitive, "result", None) in (0x01, 0x02):
            self._rejection = (f"{primitive.result_str}, source: {primitive.source_str}, "
                               f"reason: {primitive.reason_str}")

    def ensure(self) -> Association:
        """Return an established association, opening one if needed.

        Raises
        ------
        ConnectionError
            If the association cannot be opened, with the reason.
        _NothingAccepted
            If the peer rejected every proposed presentation context.
        """
        if self.assoc is not None and self.assoc.is_established:
            return self.assoc
        self._connected = self._peer_aborted = False
        self._rejection = None
        started = time.monotonic()
        assoc = self.ae.associate(
            self.destination.host, self.destination.port, ae_title=self.destination.ae_title,
            evt_handlers=[*_HANDLERS, (evt.EVT_CONN_OPEN, self._on_conn_open),
                          (evt.EVT_ACSE_RECV, self._on_acse_recv)],
            tls_args=self.tls,
        )
        self.assoc = assoc
        if assoc.is_established:
            return assoc
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            raise _NothingAccepted()
        timeout_s = float(self.ae.connection_timeout or 10.0)
        if assoc.is_rejected:
            reason = f"the peer rejected it ({self._rejection or 'no reason given'})"
        elif time.monotonic() - started >= 0.9 * timeout_s:
            reason = f"no answer within {timeout_s:g} s"
        elif self._peer_aborted:
            reason = "the peer aborted it"
        elif self._connected:
            reason = "the peer closed the connection without answering the association request"
        else:  # pynetdicom only logs why the connection failed: find out
            reason = _connect_failure(self.destination, self.tls, timeout_s)
        raise ConnectionError(
            f"association with {self.destination} was rejected or could not be opened: {reason}"
        )

    def abort(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.abort()
        self.assoc = None

    def release(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.assoc = None


def _connect_failure(destination: Destination, tls: tuple[ssl.SSLContext, str] | None,
                     timeout_s: float) -> str:
    """Why a connection to ``destination`` fails, found by connecting once more.

    pynetdicom only logs the reason, so radnode connects (and does the TLS
    handshake) itself, only after an association could not be opened.
    """
    try:
        with socket.create_connection((destination.host, destination.port),
                                      timeout=timeout_s) as sock:
            if tls is not None:
                context, host = tls
                with context.wrap_socket(sock, server_hostname=host):
                    pass
    except ssl.SSLCertVerificationError as exc:
        return f"TLS certificate verification failed: {exc.verify_message or exc}"
    except ssl.SSLError as exc:
        return f"TLS handshake failed: {exc.reason or exc}"
    except OSError as exc:
        return _one_line(exc.strerror or str(exc) or type(exc).__name__)
    return "the connection failed"


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

    Each file goes in its stored transfer syntax if the peer accepted it,
    else converted to Explicit VR Little Endian (see the module docstring).
    TLS (DICOM PS3.15 B.1) is used when ``destination.tls`` is set.

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
        an error. When the association cannot be opened (refused, rejected,
        TLS failure) every remaining file gets ``unreachable=True``; a file
        whose SOP class the peer accepted in no presentation context, or that
        cannot be converted to a syntax it accepted, gets ``permanent=True``,
        as does a failure status for which :func:`is_permanent` holds.
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

    try:
        tls = tls_args(destination.tls, destination.host)
    except (OSError, ssl.SSLError) as exc:
        error = f"cannot set up TLS for {destination}: {_one_line(str(exc))}"
        for info in infos:
            report(index_of[id(info)], StoreOutcome(info.path, info.sop_instance_uid, None,
                                                    error, unreachable=True))
        infos = []

    for batch in _batches(infos):
        ae = _make_ae(calling_ae, response_timeout_s, connect_timeout_s)
        for sop_class, syntaxes in _contexts(batch):
            ae.add_requested_context(sop_class, syntaxes)
        sender = _Sender(destination, ae, tls)
        try:
            for index, info in enumerate(batch):
                try:
                    report(index_of[id(info)], _store_one(sender, info, resend_attempts))
                except ConnectionError as exc:
                    # The destination refuses or is down: do not hammer it per file.
                    for rest in batch[index:]:
                        report(index_of[id(rest)],
                               StoreOutcome(rest.path, rest.sop_instance_uid, None, str(exc),
                                            unreachable=True))
                    break
                except _NothingAccepted:
                    for rest in batch[index:]:
                        report(index_of[id(rest)], _not_accepted(rest))
                    break
        finally:
            sender.release()
    return [by_index[position] for position in range(len(paths))]


def _not_accepted(info: _FileInfo) -> StoreOutcome:
    return StoreOutcome(info.path, info.sop_instance_uid, None,
                        _no_context(info.sop_class_uid), permanent=True)


def _store_one(sender: _Sender, info: _FileInfo, resend_attempts: int) -> StoreOutcome:
    try:
        dataset = dcmread(info.path)
    except (InvalidDicomError, OSError, ValueError) as exc:
        return StoreOutcome(info.path, info.sop_instance_uid, None,
                            f"cannot read file: {type(exc).__name__}")
    converted: Dataset | None = None
    error = "no response"
    for attempt in range(resend_attempts + 1):
        assoc = sender.ensure()  # ConnectionError: the caller fails the rest of the batch
        to_send: Dataset = dataset
        try:
            if _plan(assoc, info) == "convert":
                if converted is None:
                    converted = to_explicit_little_endian(dataset)
                to_send = converted
        except _Refused as exc:
            return StoreOutcome(info.path, info.sop_instance_uid, None, str(exc), permanent=True)
        except TranscodeError as exc:
            return StoreOutcome(
                info.path, info.sop_instance_uid, None,
                f"cannot transcode from {UID(info.transfer_syntax_uid).name} to "
                f"Explicit VR Little Endian: {exc}",
                permanent=True,
            )
        started = time.monotonic()
        try:
            status = assoc.send_c_store(to_send)
        except (ValueError, AttributeError) as exc:
            # No usable context after all, or the data set cannot be encoded.
            return StoreOutcome(info.path, info.sop_instance_uid, None,
                                _one_line(str(exc)), permanent=True)
        except RuntimeError:
            status = Dataset()  # the association ended under us: as if no response came
        if "Status" in status:
            return _status_outcome(info, status)
        waited = time.monotonic() - started
        error = ("no C-STORE response before the timeout"
                 if waited >= 0.9 * float(sender.ae.dimse_timeout or 0.0)
                 else "the association ended before the C-STORE response came")
        log.warning(
            "%s from %s for %s (attempt %d): aborting, sending again on a new association",
            error, sender.destination, info.sop_instance_uid, attempt + 1
        )
        sender.abort()
    return StoreOutcome(info.path, info.sop_instance_uid, None, error)


def _status_outcome(info: _FileInfo, status: Dataset) -> StoreOutcome:
    code = int(status.Status)
    outcome = StoreOutcome(info.path, info.sop_instance_uid, code, permanent=is_permanent(code))
    if not outcome.ok:
        comment = status.get("ErrorComment")
        outcome.error = f"C-STORE failed with status 0x{code:04X}" + (
            f": {_one_line(str(comment))}" if comment else "")
    return outcome
