"""P-DATA-TF PDUs read into one buffer (service/scp/pdata.py): the same as pynetdicom's reads.

Every comparison writes the same PDU bytes, encoded by pynetdicom itself, to two socket
pairs and reads them with pynetdicom's ``DULServiceProvider._read_pdu_data`` on one
association and with ``PDataReader`` on the other, then compares the queued events and
the P-DATA primitives the PDUs turn into.
"""

from __future__ import annotations

import socket
import threading
from io import BytesIO
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom.uid import CTImageStorage
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ABORT_RQ, A_RELEASE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from service.dicom.net import QuickAckSocket
from service.scp import pdata
from tests.unit.dicom_factory import make_ct_dataset
from tests.unit.scp_server import associated

SOP_UID = "1.2.826.0.1.3680043.8.498.1234567890123456789012345678901234567"


def _store_pdus(max_pdu: int, data_set: bytes) -> list[bytes]:
    """The P-DATA-TF PDUs pynetdicom sends for a C-STORE-RQ carrying ``data_set``."""
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = SOP_UID
    request.Priority = 2
    request.DataSet = BytesIO(data_set)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = []
    for primitive in message.encode_msg(1, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    return pdus


def _p_data(*values: tuple[int, bytes]) -> bytes:
    primitive = P_DATA()
    primitive.presentation_data_value_list = [list(v) for v in values]
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


@pytest.fixture(autouse=True)
def _no_standard_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    # As radnode's logging sets it: pynetdicom's standard handlers bind EVT_PDU_RECV.
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")


class _Side:
    """One acceptor association reading ``stream`` from a socket pair, as the SCP reads."""

    def __init__(self, stream: bytes, *, direct: bool, limit: int = pdata.MAX_DIRECT) -> None:
        self.mine, peer = socket.socketpair()
        self.mine.settimeout(10)

        def send() -> None:  # more than a socket pair's buffer: sent while it is read
            with peer:
                peer.sendall(stream)

        self.sender = threading.Thread(target=send, daemon=True)
        self.sender.start()
        self.assoc: Any = Association(AE(ae_title="RADNODE"), "acceptor")
        self.quick = QuickAckSocket(self.mine)
        # What set_tcp_nodelay arranges: pynetdicom's transport reads through read_exactly.
        self.assoc.dul.socket = SimpleNamespace(recv=self.quick.read_exactly)
        self.reader = pdata.PDataReader(self.assoc, self.quick, limit)
        self.read = self.reader if direct else self.reader.pynetdicom

    def next(self) -> tuple[str, Any]:
        """Read one PDU; its event, and its P-DATA primitive's PDVs as bytes (or the PDU)."""
        self.read()
        event = self.assoc.dul.event_queue.get_nowait()
        assert self.assoc.dul.event_queue.empty()
        if self.assoc.dul._recv_pdu.empty():
            return event, None
        pdu = self.assoc.dul._recv_pdu.get_nowait()
        if event != "Evt10":
            return event, type(pdu).__name__
        values = pdu.to_primitive().presentation_data_value_list
        return event, [(context_id, bytes(data)) for context_id, data in values]

    def close(self) -> None:
        self.mine.close()
        self.sender.join(timeout=10)


def _both(stream: bytes, reads: int, **kwargs: Any) -> tuple[list[Any], list[Any], _Side]:
    theirs, ours = _Side(stream, direct=False, **kwargs), _Side(stream, direct=True, **kwargs)
    try:
        return ([theirs.next() for _ in range(reads)], [ours.next() for _ in range(reads)],
                ours)
    finally:
        theirs.close()
        ours.close()


@pytest.mark.parametrize("max_pdu", [4096, 16382, 262144])
def test_store_pdus_read_as_pynetdicom_reads_them(max_pdu: int) -> None:
    data_set = bytes(range(256)) * 1500  # 375 KiB: several PDUs at every size
    pdus = _store_pdus(max_pdu, data_set)
    theirs, ours, side = _both(b"".join(pdus), len(pdus))
    assert ours == theirs
    assert [event for event, _ in ours] == ["Evt10"] * len(pdus)
    assert side.reader.read_directly == len(pdus)
    fragments = b"".join(data[1:] for _, values in ours[1:] for _, data in values)
    assert fragments == data_set  # every byte, in order


def test_the_fragments_are_views_of_one_buffer_per_pdu() -> None:
    first_pdu = _p_data((1, b"\x00" + b"a" * 100), (3, b"\x02" + b"b" * 50))
    side = _Side(first_pdu + _p_data((1, b"\x03command")), direct=True)
    try:
        side.reader()
        first = side.assoc.dul._recv_pdu.get_nowait()
        side.reader()
        second = side.assoc.dul._recv_pdu.get_nowait()
    finally:
        side.close()
    assert isinstance(first, P_DATA_TF) and first.pdu_length == len(first_pdu) - 6
    values = first.to_primitive().presentation_data_value_list
    assert [(c, type(d)) for c, d in values] == [(1, memoryview), (3, memoryview)]
    assert values[0][1].obj is values[1][1].obj  # one buffer
    assert values[0][1].obj is not second.values[0][1].obj  # each PDU its own
    assert [bytes(d) for _, d in values] == [b"\x00" + b"a" * 100, b"\x02" + b"b" * 50]


def test_other_pdus_are_pynetdicoms_and_lose_no_byte() -> None:
    store = _store_pdus(16382, b"x" * 40_000)
    abort = A_ABORT_RQ()
    abort.source, abort.reason_diagnostic = 0x00, 0x00  # service user, no reason given
    stream = b"".join([bytes(A_RELEASE_RQ().encode()), store[0],
                       bytes(abort.encode()), *store[1:]])
    theirs, ours, side = _both(stream, len(store) + 2)
    assert ours == theirs
    assert [event for event, _ in ours[:3]] == ["Evt12", "Evt10", "Evt16"]
    assert side.reader.read_directly == len(store)


def test_a_pdu_longer_than_the_limit_is_pynetdicoms() -> None:
    pdus = _store_pdus(16382, b"y" * 30_000)
    theirs, ours, side = _both(b"".join(pdus), len(pdus), limit=1000)
    assert ours == theirs
    assert side.reader.read_directly == 1  # only the command set's PDU is short enough


def test_a_handler_for_the_pdu_events_leaves_the_pdu_to_pynetdicom() -> None:
    pdus = _store_pdus(16382, b"z" * 20_000)
    side = _Side(b"".join(pdus), direct=True)
    seen: list[Any] = []
    side.assoc.bind(evt.EVT_PDU_RECV, lambda event: seen.append(event.pdu))
    try:
        got = [side.next() for _ in pdus]
    finally:
        side.close()
    assert side.reader.read_directly == 0
    assert [event for event, _ in got] == ["Evt10"] * len(pdus)
    assert len(seen) == len(pdus) and all(type(p) is P_DATA_TF for p in seen)


@pytest.mark.parametrize("body", [
    b"\x00\x00\x00\x10\x01\x00abc",  # the item runs past the PDU's end
    b"\x00\x00\x00\x01\x01",  # no message control header
    b"\x00\x00\x00\x03\x01\x00a\x00\x00",  # a second item shorter than its own length field
], ids=["past the end", "no control header", "truncated item"])
def test_malformed_items_end_the_pdu_as_a_decoding_failure(body: bytes) -> None:
    stream = b"\x04\x00" + len(body).to_bytes(4, "big") + body
    side = _Side(stream, direct=True)
    try:
        assert side.next() == ("Evt19", None)
    finally:
        side.close()
    assert side.reader.read_directly == 0


def test_a_pdu_cut_short_ends_as_a_closed_connection() -> None:
    stream = b"\x04\x00" + (1000).to_bytes(4, "big") + b"\x00\x00\x03\xe8\x01\x00" + b"q" * 10
    theirs, ours, _ = _both(stream, 1)
    assert ours == theirs == [("Evt17", None)]


def test_split_pdvs() -> None:
    body = bytearray(b"\x00\x00\x00\x03\x05\x02a" + b"\x00\x00\x00\x02\x07\x03")
    assert [(c, bytes(d)) for c, d in pdata.split_pdvs(body) or []] == [
        (5, b"\x02a"), (7, b"\x03")]
    assert pdata.split_pdvs(bytearray()) == []
    assert pdata.split_pdvs(bytearray(b"\x00\x00\x00")) is None


# -- a real association ----------------------------------------------------------------------


def test_a_real_association_reads_its_p_data_directly(tmp_path: Any) -> None:
    datasets = [make_ct_dataset(instance_number=n, rows=512, columns=512, seed=n)
                for n in range(1, 4)]
    with associated(tmp_path) as (assoc, served):
        statuses = [assoc.send_c_store(ds).Status for ds in datasets]
        reader = vars(served.dul)["_read_pdu_data"]
    assert statuses == [0x0000] * 3
    # 512 KiB of pixels each: two or more PDUs of the 256 KiB radnode announces.
    assert isinstance(reader, pdata.PDataReader) and reader.read_directly >= 9
    for ds in datasets:
        stored = pydicom.dcmread(next((tmp_path / "spool").rglob(f"{ds.SOPInstanceUID}.dcm")))
        assert stored.PixelData == ds.PixelData
