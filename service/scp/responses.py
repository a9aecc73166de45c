"""The C-STORE-RSP of a Success, encoded without pydicom.

pynetdicom answers every C-STORE by building a ``C_STORE`` primitive, turning
it into a pydicom command set ``Dataset`` (every attribute validated as it is
set) and encoding that data set twice, once for the Command Group Length and
once to send. On this project's test machine that costs 0.3–0.6 ms of CPU
per instance, on the path between the durable store and the response the
peer waits for; a C-STORE-RSP is seven elements in a fixed layout.

:func:`answer_successes_directly` wraps one association's
``DIMSEServiceProvider.send_msg``: a C-STORE-RSP with Status 0x0000 and
nothing else is encoded by :func:`encode_store_success` and handed to the
DUL as one P-DATA-TF, byte for byte what pynetdicom would send (the unit
tests compare the two). Every other message, a failure status with its Error
Comment included, goes through pynetdicom as before.
"""

from __future__ import annotations

import struct
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

#: Command Field of a C-STORE-RSP, and Command Data Set Type "no data set"
#: (DICOM PS3.7 9.3.1.2, E.1).
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
#: The P-DATA-TF message control header of a last command fragment (DICOM PS3.8 E.2).
_LAST_COMMAND_FRAGMENT = b"\x03"
#: A PDV's header within a P-DATA-TF: item length (4) + context ID (1) + control header (1).
_PDV_OVERHEAD = 6


def _element(group_element: int, value: bytes) -> bytes:
    """An implicit VR little endian element: tag, 4-byte length, value."""
    return struct.pack("<HHI", 0x0000, group_element, len(value)) + value


def _uid(value: str) -> bytes:
    """A UI value padded with NUL to an even length (DICOM PS3.5 6.2)."""
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_store_success(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """The command set of a C-STORE-RSP with Status Success, implicit VR little endian.

    Parameters
    ----------
    message_id : int
        The Message ID of the C-STORE-RQ (Message ID Being Responded To), 0–65535.
    sop_class_uid, sop_instance_uid : str
        Affected SOP Class UID and Affected SOP Instance UID of the request.

    Returns
    -------
    bytes
        Command Group Length, Affected SOP Class UID, Command Field (0x8001),
        Message ID Being Responded To, Command Data Set Type (0x0101), Status
        (0x0000) and Affected SOP Instance UID, in tag order (DICOM PS3.7
        9.3.1.2 and Annex E).

    Raises
    ------
    struct.error
        If ``message_id`` is not an unsigned 16-bit value.
    UnicodeEncodeError
        If a UID is not ASCII.
    """
    body = b"".join((
        _element(0x0002, _uid(sop_class_uid)),
        _element(0x0100, struct.pack("<H", _C_STORE_RSP)),
        _element(0x0120, struct.pack("<H", message_id)),
        _element(0x0800, struct.pack("<H", _NO_DATA_SET)),
        _element(0x0900, struct.pack("<H", 0x0000)),
        _element(0x1000, _uid(sop_instance_uid)),
    ))
    return _element(0x0000, struct.pack("<I", len(body))) + body


#: C-STORE-RSP parameters besides those above; any of them set takes pynetdicom's path.
_OTHER_PARAMETERS = ("ErrorComment", "OffendingElement", "ErrorID", "AttributeIdentifierList",
                     "EventTypeID", "FailedSOPInstanceUIDList", "NumberOfRemainingSuboperations")


def _plain_success(primitive: Any) -> bool:
    if type(primitive) is not C_STORE or primitive.MessageIDBeingRespondedTo is None:
        return False
    if primitive.Status != 0x0000:
        return False
    if primitive.AffectedSOPClassUID is None or primitive.AffectedSOPInstanceUID is None:
        return False
    return all(getattr(primitive, name, None) is None for name in _OTHER_PARAMETERS)


def send_store_success(assoc: Any, context_id: int, message_id: int, sop_class_uid: str,
                       sop_instance_uid: str) -> bool:
    """Send a C-STORE-RSP Success as one P-DATA-TF, encoded by :func:`encode_store_success`.

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        The association; the P-DATA goes to its DUL's queue.
    context_id : int
        The presentation context ID of the request.
    message_id, sop_class_uid, sop_instance_uid
        As for :func:`encode_store_success`.

    Returns
    -------
    bool
        False, with nothing sent, where pynetdicom must send the response: a
        handler is bound to ``EVT_DIMSE_SENT`` (it would miss the message),
        or the response does not fit in one PDU of the peer's maximum length.
    """
    if assoc.get_handlers(evt.EVT_DIMSE_SENT):
        return False
    command = encode_store_success(message_id, sop_class_uid, sop_instance_uid)
    dimse = assoc.dimse
    limit = int(dimse.maximum_pdu_size or 0)
    if limit != 0 and len(command) + _PDV_OVERHEAD > limit:
        return False
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, _LAST_COMMAND_FRAGMENT + command))
    dimse.dul.send_pdu(pdata)
    return True


def answer_successes_directly(event: evt.Event) -> None:
    """``EVT_ACCEPTED``: send this association's C-STORE Successes without pydicom.

    Wraps ``event.assoc.dimse.send_msg``; see the module's docstring and
    :func:`send_store_success`, where pynetdicom sends as usual.
    """
    assoc: Any = event.assoc
    dimse = assoc.dimse
    send_pynetdicom = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        if _plain_success(primitive) and send_store_success(
                assoc, context_id, int(primitive.MessageIDBeingRespondedTo),
                str(primitive.AffectedSOPClassUID), str(primitive.AffectedSOPInstanceUID)):
            return
        send_pynetdicom(primitive, context_id)

    dimse.send_msg = send_msg
