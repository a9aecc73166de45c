"""P-DATA-TF PDUs read into one buffer, their fragments handed on as views of it.

pynetdicom (3.0) copies every byte of a received P-DATA-TF PDU (DICOM PS3.8
9.3.5) about five times in Python before the C-STORE data set reaches its
file: ``DULServiceProvider._read_pdu_data`` appends the body to a
``bytearray``, ``_decode_pdu`` copies that into ``bytes``,
``P_DATA_TF.decode`` slices each presentation data value (PDV) out of it,
and ``decode_msg`` slices the message control header off before it writes.
A 512×512 CT slice is about two 256 KiB PDUs (py-spy of the GIL put
``_read_pdu_data`` and ``_decode_pdu`` at about a fifth of a CT C-STORE's
samples); a small instance is one PDU, decoded by pynetdicom's generic
field decoders. Measured against reading through pynetdicom (interleaved
pairs, ``benchmarks/README.md``): 7 % less CPU per small instance, and on
the CT a gain within the noise of the kernel's copies and the flush.

:class:`PDataReader` takes the place of ``_read_pdu_data`` on the SCP's
plain TCP associations (:func:`read_pdata_directly`, an ``EVT_CONN_OPEN``
handler, after :func:`service.dicom.net.set_tcp_nodelay`). For a P-DATA-TF
PDU no longer than the maximum PDU length radnode announced, it reads the
body with ``recv_into`` straight into one ``bytearray`` and queues, as
pynetdicom does, the event ``Evt10`` and a PDU whose ``to_primitive`` gives
the same P-DATA primitive, each PDV's data a ``memoryview`` of that buffer.
Everything downstream takes a view where it took ``bytes`` (``data[0]``,
``data[1:]``, a file's or ``BytesIO``'s ``write``). Each PDU has its own
buffer: nothing is reused while a view of it may live.

Anything else (another PDU type, a longer PDU, a handler bound to
``EVT_DATA_RECV`` or ``EVT_PDU_RECV``, which are given the PDU's bytes)
goes to pynetdicom's ``_read_pdu_data``: the six header bytes already read
are handed back to the socket (:meth:`service.dicom.net.QuickAckSocket.unread`).
Malformed PDV items end the PDU as pynetdicom's decoding failure does
(``Evt19``: the association is aborted), a short read as its short PDU
(``Evt17``).
"""

from __future__ import annotations

import logging
from typing import Any

from pynetdicom import evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from service.dicom.net import QuickAckSocket

#: pynetdicom's DUL logger: a PDU refused here is reported where pynetdicom reports it.
pynetdicom_log = logging.getLogger("pynetdicom.dul")

_P_DATA_TF = 0x04  # PDU type (PS3.8 9.3.1)
#: Events whose handlers are given the PDU's bytes or object: with one bound, pynetdicom reads.
_PDU_EVENTS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV)


class DirectPData(P_DATA_TF):
    """A received P-DATA-TF PDU whose PDVs are views of the buffer it was read into.

    Parameters
    ----------
    values : list of (int, memoryview)
        Each PDV's presentation context ID and its data (message control
        header first, then the fragment), in the order received.
    """

    def __init__(self, values: list[tuple[int, memoryview]]) -> None:
        super().__init__()
        self.values = values

    @property
    def pdu_length(self) -> int:
        """The PDU's length field: each item's 4-byte length, context ID and value."""
        return sum(5 + len(data) for _, data in self.values)

    def to_primitive(self) -> P_DATA:
        """The P-DATA primitive pynetdicom's ``P_DATA_TF.to_primitive`` gives, with views."""
        primitive = P_DATA()
        primitive.presentation_data_value_list = []
        primitive.presentation_data_value_list.extend(self.values)  # type: ignore[arg-type]
        return primitive


def split_pdvs(body: bytearray) -> list[tuple[int, memoryview]] | None:
    """The presentation data value items of a P-DATA-TF PDU's body (DICOM PS3.8 9.3.5.1).

    Parameters
    ----------
    body : bytearray
        The PDU after its six-byte header: items of a 4-byte big-endian
        length, a presentation context ID byte and the value.

    Returns
    -------
    list of (int, memoryview) or None
        Each item's presentation context ID and a view of its value (the
        message control header byte, then the fragment); None if an item
        is shorter than its context ID and control header, or runs past
        the end.
    """
    view = memoryview(body)
    values: list[tuple[int, memoryview]] = []
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < 6:
            return None
        length = int.from_bytes(body[offset:offset + 4], "big")
        stop = offset + 4 + length
        if length < 2 or stop > end:
            return None
        values.append((body[offset + 4], view[offset + 5:stop]))
        offset = stop
    return values


class PDataReader:
    """Stands in for ``DULServiceProvider._read_pdu_data`` on one accepted association.

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        The association; its DUL reads through ``quick``.
    quick : QuickAckSocket
        The association's socket (see :func:`service.dicom.net.set_tcp_nodelay`).
    limit : int
        The longest PDU read directly, bytes: radnode's announced maximum
        PDU length. Longer ones are pynetdicom's to read, in pieces.
    """

    def __init__(self, assoc: Any, quick: QuickAckSocket, limit: int) -> None:
        self.assoc = assoc
        self.dul = assoc.dul
        self.quick = quick
        self.limit = limit
        #: pynetdicom's own ``_read_pdu_data`` (bound), for every other PDU.
        self.pynetdicom = type(assoc.dul)._read_pdu_data.__get__(assoc.dul)
        #: P-DATA-TF PDUs read directly (for tests).
        self.read_directly = 0

    def __call__(self) -> None:
        """Read one PDU from the socket and queue its event, as pynetdicom does."""
        dul = self.dul
        try:
            header = self.quick.read_exactly(6)
        except OSError as exc:  # TimeoutError included
            self._read_failed(exc)
            return
        length = int.from_bytes(header[2:6], "big")
        if (len(header) != 6 or header[0] != _P_DATA_TF or length > self.limit
                or any(self.assoc.get_handlers(event) for event in _PDU_EVENTS)):
            self.quick.unread(header)
            self.pynetdicom()
            return
        body = bytearray(length)
        try:
            received = self.quick.read_into(memoryview(body))
        except OSError as exc:
            self._read_failed(exc)
            return
        if received != length:
            pynetdicom_log.error(f"The received PDU is shorter than expected ({6 + received} "
                                 f"of {6 + length} bytes received)")
            dul.event_queue.put("Evt17")
            return
        values = split_pdvs(body)
        if values is None:
            pynetdicom_log.error("Unable to decode the received PDU data")
            dul.event_queue.put("Evt19")
            return
        self.read_directly += 1
        dul.event_queue.put("Evt10")
        dul._recv_pdu.put(DirectPData(values))

    def _read_failed(self, exc: OSError) -> None:
        """As pynetdicom reports a failed read: logged, then Evt17 (transport connection closed)."""
        pynetdicom_log.error("Connection closed before the entire PDU was received")
        pynetdicom_log.exception(exc)
        self.dul.event_queue.put("Evt17")


def read_pdata_directly(event: evt.Event) -> None:
    """``EVT_CONN_OPEN``: read this association's P-DATA-TF PDUs with :class:`PDataReader`.

    Only where :func:`service.dicom.net.set_tcp_nodelay` (bound before this
    handler) put a :class:`QuickAckSocket` on the socket: accepted plain TCP
    associations on Linux. TLS associations keep pynetdicom's reads.
    """
    assoc: Any = event.assoc
    transport = assoc.dul.socket
    quick = getattr(transport, "socket", None)
    if not isinstance(quick, QuickAckSocket) or isinstance(
            vars(assoc.dul).get("_read_pdu_data"), PDataReader):
        return
    limit = int(assoc.acceptor.maximum_length or 0) or MAX_DIRECT
    assoc.dul._read_pdu_data = PDataReader(assoc, quick, limit)


#: The longest PDU read directly when radnode announces no maximum (0, unlimited).
MAX_DIRECT = 256 << 10
