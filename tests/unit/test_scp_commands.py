"""C-STORE-RQ command sets read directly (service/scp/commands.py): the same as pynetdicom's.

Every comparison feeds the same P-DATA primitives, encoded by pynetdicom itself, to
pynetdicom's ``DIMSEServiceProvider.receive_primitive`` and to ``StoreRequests`` on two
real acceptor associations, and compares what each queues: the C_STORE primitive's
attributes and the received file, byte for byte.
"""

from __future__ import annotations

import queue
import struct
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import build_context

from service.scp import commands
from tests.unit.dicom_factory import make_ct_dataset
from tests.unit.scp_server import associated

SOP_UID = "1.2.826.0.1.3680043.8.498.1234567890123456789012345678901234567"


def _store(message_id: int = 7, priority: int = 2, sop_instance: str = SOP_UID,
           sop_class: str = CTImageStorage, move_originator: str | None = None) -> C_STORE:
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = priority
    if move_originator is not None:
        request.MoveOriginatorApplicationEntityTitle = move_originator
        request.MoveOriginatorMessageID = 3
    request.DataSet = BytesIO(b"\x08\x00\x60\x00CS\x02\x00CT" + bytes(range(256)) * 40)
    return request


def _p_datas(request: Any, max_pdu: int = 4096) -> list[P_DATA]:
    """The P-DATA primitives pynetdicom sends for ``request`` (command PDV first)."""
    message = C_STORE_RQ() if isinstance(request, C_STORE) else C_ECHO_RQ()
    message.primitive_to_message(request)
    return list(message.encode_msg(1, max_pdu))


def _command_bytes(request: Any) -> bytes:
    pdvs = _p_datas(request, 1 << 20)[0].presentation_data_value_list
    context_id, data = pdvs[0]
    assert data[0] & 3 == 3  # a whole command set in one fragment
    return bytes(data[1:])


def _association() -> Any:
    assoc = Association(AE(ae_title="RADNODE"), "acceptor")
    context = build_context(CTImageStorage, ExplicitVRLittleEndian)
    context.context_id = 1
    context._as_scp = True
    assoc._accepted_cx = {1: context}
    assoc.dimse.msg_queue = queue.Queue()
    return assoc


def _received(assoc: Any) -> tuple[dict[str, Any], bytes]:
    """The queued request's attributes and its file's bytes."""
    context_id, request = assoc.dimse.msg_queue.get_nowait()
    assert assoc.dimse.msg_queue.empty() and assoc.dimse.message is None
    names = ["MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
             "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID",
             "is_valid_request"]
    attributes = {name: getattr(request, name) for name in names}
    attributes["context_id"] = (context_id, request._context_id)
    attributes["data_set"] = request.DataSet.getvalue()
    request._dataset_file.close()
    path = Path(request._dataset_path)
    data = path.read_bytes()
    path.unlink()
    return attributes, data


@pytest.fixture(autouse=True)
def _chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)  # as the SCP sets it
    # As radnode's logging sets it: pynetdicom's standard handlers bind EVT_DIMSE_RECV.
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")


def both(p_datas: list[P_DATA]) -> tuple[Any, Any, commands.StoreRequests]:
    """The same primitives through pynetdicom's receive_primitive and through ours."""
    theirs, ours = _association(), _association()
    reader = commands.StoreRequests(ours)
    for primitive in p_datas:
        theirs.dimse.receive_primitive(primitive)
        reader(primitive)
    return theirs, ours, reader


# -- the command set -------------------------------------------------------------------------


@pytest.mark.parametrize("request_", [
    _store(), _store(message_id=1, priority=0), _store(message_id=65535, priority=1),
    _store(sop_instance=SOP_UID + "1", sop_class=MRImageStorage),  # odd and even lengths
], ids=["low", "medium", "high", "odd UID"])
def test_a_store_request_reads_as_pydicom_reads_it(request_: C_STORE) -> None:
    encoded = _command_bytes(request_)
    command = commands.parse_store_request(encoded)
    reference = decode(BytesIO(encoded), True, True)
    assert command == commands.StoreCommand(
        reference.AffectedSOPClassUID, reference.AffectedSOPInstanceUID,
        reference.MessageID, reference.Priority)
    assert isinstance(command.sop_instance_uid, UID)


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, element, len(value)) + value


def _replaced(encoded: bytes, element: int, value: bytes | None) -> bytes:
    """``encoded`` with one element's value replaced (None: removed)."""
    out, position = b"", 0
    while position < len(encoded):
        _, number, length = struct.unpack_from("<HHI", encoded, position)
        raw = encoded[position:position + 8 + length]
        if number != element:
            out += raw
        elif value is not None:
            out += _element(element, value)
        position += 8 + length
    return out


@pytest.mark.parametrize("case", [
    "move originator", "echo", "no data set", "truncated", "unknown element", "wide US",
    "two UIDs", "repeated", "no message ID", "another group",
])
def test_anything_but_a_plain_store_request_is_left_to_pynetdicom(case: str) -> None:
    encoded = _command_bytes(_store())
    altered = {
        "move originator": lambda: _command_bytes(_store(move_originator="MOVER")),
        "echo": lambda: _command_bytes(_echo()),
        "no data set": lambda: _replaced(encoded, 0x0800, b"\x01\x01"),
        "truncated": lambda: encoded[:-3],
        "unknown element": lambda: encoded + _element(0x0901, b"\x00\x00"),
        "wide US": lambda: _replaced(encoded, 0x0110, b"\x07\x00\x08\x00"),
        "two UIDs": lambda: _replaced(encoded, 0x1000, b"1.2.3\\1.2.4\x00"),
        "repeated": lambda: encoded + _element(0x0700, b"\x02\x00"),
        "no message ID": lambda: _replaced(encoded, 0x0110, None),
        "another group": lambda: encoded + struct.pack("<HHI", 8, 0x16, 2) + b"\x00\x00",
    }[case]()
    assert commands.parse_store_request(altered) is None


def _echo() -> C_ECHO:
    request = C_ECHO()
    request.MessageID = 3
    request.AffectedSOPClassUID = "1.2.840.10008.1.1"
    return request


# -- the whole message -----------------------------------------------------------------------


@pytest.mark.parametrize("max_pdu", [4096, 1 << 20], ids=["fragments", "one data PDV"])
def test_a_store_request_queues_what_pynetdicom_queues(max_pdu: int) -> None:
    p_datas = _p_datas(_store(), max_pdu)
    assert len(p_datas[0].presentation_data_value_list) == 1
    theirs, ours, reader = both(p_datas)
    assert reader.read_directly == 1
    assert _received(ours) == _received(theirs)


def test_a_command_with_its_first_data_fragment_in_one_p_data_is_pynetdicoms() -> None:
    p_datas = _p_datas(_store())
    joined = P_DATA()
    joined.presentation_data_value_list = [
        list(pdv) for p_data in p_datas[:2] for pdv in p_data.presentation_data_value_list]
    theirs, ours, reader = both([joined, *p_datas[2:]])
    assert reader.read_directly == 0
    assert _received(ours) == _received(theirs)


def test_other_messages_are_pynetdicoms() -> None:
    theirs, ours, reader = both(_p_datas(_echo()))
    assert reader.read_directly == 0
    for assoc in (theirs, ours):
        _, request = assoc.dimse.msg_queue.get_nowait()
        assert isinstance(request, C_ECHO) and request.MessageID == 3


def test_a_command_fragment_inside_the_data_set_hands_the_message_to_pynetdicom() -> None:
    """A peer's protocol error: pynetdicom gets the message it would hold by then."""
    store = _p_datas(_store())
    echo = _p_datas(_echo())
    sequence = [store[0], store[1], echo[0]]
    theirs, ours, reader = both(sequence)
    assert reader.read_directly == 1

    def outcome(assoc: Any) -> tuple[Any, ...]:
        queued = [(type(request).__name__, request.MessageID, str(request.AffectedSOPClassUID))
                  for _, request in assoc.dimse.msg_queue.queue]
        return assoc.dimse.message, queued

    # pynetdicom takes the command fragment as a new command: the C-ECHO is queued.
    assert outcome(ours) == outcome(theirs) == (None, [("C_ECHO", 3, "1.2.840.10008.1.1")])


def test_an_unaccepted_context_or_a_dimse_recv_handler_leaves_it_to_pynetdicom() -> None:
    p_datas = _p_datas(_store())
    assoc = _association()
    assoc._accepted_cx = {}
    assert commands.StoreRequests(assoc)._begin(p_datas[0]) is None
    assoc = _association()
    assoc.bind(evt.EVT_DIMSE_RECV, lambda event: None)
    assert commands.StoreRequests(assoc)._begin(p_datas[0]) is None


def test_an_invalid_request_is_refused_as_pynetdicom_refuses_it() -> None:
    """Priority 7 passes the reading; the primitive's setter refuses it: Evt19 (abort)."""
    encoded = _replaced(_command_bytes(_store()), 0x0700, b"\x07\x00")
    p_datas = _p_datas(_store())
    p_datas[0].presentation_data_value_list = [[1, b"\x03" + encoded]]
    theirs, ours, reader = both(p_datas)
    assert reader.read_directly == 1
    for assoc in (theirs, ours):
        assert assoc.dimse.msg_queue.empty()
        assert assoc.dul.event_queue.get_nowait() == "Evt19"


# -- a real association ----------------------------------------------------------------------


def test_a_real_association_reads_its_store_requests_directly(tmp_path: Path) -> None:
    datasets = [make_ct_dataset(instance_number=n) for n in range(1, 6)]
    with associated(tmp_path) as (assoc, served):
        statuses = [assoc.send_c_store(ds).Status for ds in datasets]
        reader = served.dimse.receive_primitive
    assert statuses == [0x0000] * 5
    assert isinstance(reader, commands.StoreRequests) and reader.read_directly == 5
    stored = sorted(p.name for p in (tmp_path / "spool").rglob("*.dcm"))
    assert stored == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in datasets)
