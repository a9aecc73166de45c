"""C-STORE-RQ command sets read directly, not through a pydicom ``Dataset``.

pynetdicom (3.0) turns every DIMSE message it receives into a C_STORE
primitive in three steps, in ``DIMSEServiceProvider.receive_primitive``:

1. ``DIMSEMessage()`` builds an empty command set (a pydicom ``Dataset``);
2. ``decode_msg`` decodes the command set with pydicom's ``read_dataset``
   and reads four of its attributes (each a pydicom value conversion);
3. ``message_to_primitive`` walks the command set again, converting every
   element, and copies each into the primitive's validating setters.

Per small instance that is about a third of the Python time of the whole
C-STORE (py-spy, the SCP's GIL), for at most nine elements whose encoding is fixed:
Implicit VR Little Endian, group 0000 (DICOM PS3.7 6.3.1 and E.1).

:class:`StoreRequests` takes the place of ``receive_primitive`` on the SCP's
associations (:func:`read_store_commands`, an ``EVT_CONN_OPEN`` handler).
For the common case it decodes the command set itself
(:func:`parse_store_request`) and then does what pynetdicom does with a
C-STORE-RQ, with pynetdicom's own objects: the same ``C_STORE_RQ`` message,
the data set written by pynetdicom's ``decode_msg`` (chunked receive, into
the file made ahead by :mod:`service.scp.receive`), the same ``EVT_DIMSE_RECV``
and the same ``C_STORE`` primitive set through the same validating setters,
queued on ``dimse.msg_queue``. The common case is a P-DATA whose only PDV
is the last fragment of a command set with exactly the elements of a
C-STORE-RQ that carries a data set and no Move Originator, on an accepted
presentation context, with no handler bound to ``EVT_DIMSE_RECV``. Anything
else, and any message already begun by pynetdicom, goes to pynetdicom's
``receive_primitive`` unchanged.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pynetdicom.dimse_messages as dimse_messages
from pydicom.uid import UID
from pynetdicom import _config, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode

#: The module whose names pynetdicom's decode_msg calls (replaced by :mod:`service.scp.receive`
#: when installed): looked up at each call, as decode_msg looks them up.
_decode_msg_names: Any = dimse_messages
#: pynetdicom's logger, where it reports an invalid DIMSE message.
pynetdicom_log = logging.getLogger("pynetdicom.dimse")

#: The attribute on a message begun by :class:`StoreRequests` that holds its command.
_COMMAND = "_radnode_store_command"

_HEADER = struct.Struct("<HHI")
_C_STORE_RQ = 0x0001  # Command Field (PS3.7 9.3.1.1)
_NO_DATA_SET = 0x0101  # Command Data Set Type: no data set follows (PS3.7 E.1)

#: Group 0000 elements of a C-STORE-RQ (PS3.7 Table 9.3-1), element number → VR.
_ELEMENTS = {
    0x0000: "UL",  # Command Group Length
    0x0002: "UI",  # Affected SOP Class UID
    0x0100: "US",  # Command Field
    0x0110: "US",  # Message ID
    0x0700: "US",  # Priority
    0x0800: "US",  # Command Data Set Type
    0x1000: "UI",  # Affected SOP Instance UID
}
#: Those a C-STORE-RQ must have for the direct reading (the group length is optional).
_REQUIRED = frozenset(_ELEMENTS) - {0x0000}


@dataclass(frozen=True)
class StoreCommand:
    """The command set of a C-STORE-RQ that carries a data set (DICOM PS3.7 9.3.1.1).

    Attributes
    ----------
    sop_class_uid, sop_instance_uid : pydicom.uid.UID
        Affected SOP Class UID (0000,0002) and Affected SOP Instance UID
        (0000,1000), as pydicom decodes them (trailing NUL and spaces
        stripped, then the ``UID``'s own strip); not validated here.
    message_id : int
        Message ID (0000,0110).
    priority : int
        Priority (0000,0700): 0 medium, 1 high, 2 low (not checked here).
    """

    sop_class_uid: UID
    sop_instance_uid: UID
    message_id: int
    priority: int


def parse_store_request(encoded: bytes) -> StoreCommand | None:
    """Decode a command set if it is exactly a C-STORE-RQ with a data set, else None.

    Parameters
    ----------
    encoded : bytes
        The command set: group 0000 elements in Implicit VR Little Endian
        (DICOM PS3.7 6.3.1), as the command fragments carry it.

    Returns
    -------
    StoreCommand or None
        None for anything pynetdicom's own reading should handle: another
        command, a C-STORE-RQ without a data set or with a Move Originator,
        an element missing, repeated, unknown or of another length than its
        VR (a US of two values, say), a UID of several values, bytes left over.
    """
    found: dict[int, bytes] = {}
    position, end = 0, len(encoded)
    while position < end:
        if end - position < 8:
            return None
        group, element, length = _HEADER.unpack_from(encoded, position)
        position += 8
        vr = _ELEMENTS.get(element)
        if group != 0 or vr is None or element in found or end - position < length:
            return None
        if (vr == "US" and length != 2) or (vr == "UL" and length != 4):
            return None
        found[element] = encoded[position:position + length]
        position += length
    if not _REQUIRED <= found.keys():
        return None
    command_field, data_set_type, message_id, priority = (
        int.from_bytes(found[element], "little") for element in (0x0100, 0x0800, 0x0110, 0x0700))
    if command_field != _C_STORE_RQ or data_set_type == _NO_DATA_SET:
        return None
    sop_class = _uid(found[0x0002])
    sop_instance = _uid(found[0x1000])
    if sop_class is None or sop_instance is None:
        return None
    return StoreCommand(sop_class, sop_instance, message_id, priority)


def _uid(value: bytes) -> UID | None:
    """A UI value as pydicom's reader gives it (``convert_UI``), None if it has several."""
    text = value.decode("latin-1").rstrip("\0 ")
    return None if "\\" in text else UID(text)


class StoreRequests:
    """``DIMSEServiceProvider.receive_primitive`` of one association, C-STORE-RQs read directly.

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        The association (acceptor) whose DIMSE provider this serves.

    Attributes
    ----------
    read_directly : int
        C-STORE-RQ command sets decoded by :func:`parse_store_request`.
    """

    def __init__(self, assoc: Any) -> None:
        self.assoc = assoc
        self.dimse = assoc.dimse
        #: pynetdicom's own ``receive_primitive`` (bound), for everything else.
        self.pynetdicom = type(assoc.dimse).receive_primitive.__get__(assoc.dimse)
        self.read_directly = 0

    def __call__(self, primitive: Any) -> None:
        """Process a P-DATA primitive from the peer, as ``receive_primitive`` does."""
        dimse = self.dimse
        message = dimse.message
        if message is None:
            begun = self._begin(primitive)
            if begun is None:
                self.pynetdicom(primitive)
            else:
                dimse.message = begun
            return
        command: StoreCommand | None = getattr(message, _COMMAND, None)
        if command is None:
            self.pynetdicom(primitive)
            return
        if any(data[0] & 1 for _, data in primitive.presentation_data_value_list):
            # A command fragment inside a data set: pynetdicom decides, on the message it
            # would hold by now.
            message.command_set = decode(message.encoded_command_set, True, True)
            delattr(message, _COMMAND)
            self.pynetdicom(primitive)
            return
        if message.decode_msg(primitive, self.assoc):  # writes the data set's fragments
            self._complete(message, command)

    def _begin(self, primitive: Any) -> Any:
        """A C-STORE-RQ message begun as ``decode_msg`` begins it, or None (pynetdicom's)."""
        pdvs = getattr(primitive, "presentation_data_value_list", None)
        if not _config.STORE_RECV_CHUNKED_DATASET or not pdvs or len(pdvs) != 1:
            return None
        context_id, data = pdvs[0]
        if len(data) < 1 or data[0] & 3 != 3:  # not the last fragment of a command set
            return None
        command = parse_store_request(bytes(data[1:]))
        context = self.assoc._accepted_cx.get(context_id)
        if command is None or context is None or self.assoc.get_handlers(evt.EVT_DIMSE_RECV):
            return None
        message: Any = C_STORE_RQ.__new__(C_STORE_RQ)  # the state decode_msg leaves
        message.context_id = context_id
        message.encoded_command_set = BytesIO()
        message.encoded_command_set.write(data[1:])
        message.data_set = BytesIO()
        message.command_set = None  # decoded only if pynetdicom ever takes the message over
        handle = _decode_msg_names.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
        message._data_set_file = handle
        message._data_set_path = Path(handle.name)
        handle.write(b"\x00" * 128)
        handle.write(b"DICM")
        _decode_msg_names.write_file_meta_info(handle, _decode_msg_names.create_file_meta(
            sop_class_uid=command.sop_class_uid, sop_instance_uid=command.sop_instance_uid,
            transfer_syntax=context.transfer_syntax[0]))
        setattr(message, _COMMAND, command)
        self.read_directly += 1
        return message

    def _complete(self, message: Any, command: StoreCommand) -> None:
        """What ``receive_primitive`` does with a complete message, its primitive built here."""
        dimse = self.dimse
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": message})
        context_id = message.context_id
        try:
            request = C_STORE()  # the setters message_to_primitive calls, in its order
            request.AffectedSOPClassUID = command.sop_class_uid
            request.MessageID = command.message_id
            request.Priority = command.priority
            request.AffectedSOPInstanceUID = command.sop_instance_uid
            request.DataSet = message.data_set
        except Exception as exc:  # noqa: BLE001 (pynetdicom aborts the association too)
            pynetdicom_log.error("Received an invalid DIMSE message")
            pynetdicom_log.exception(exc)
            dimse.dul.event_queue.put("Evt19")
            return
        request._context_id = context_id
        request._dataset_path = message._data_set_path
        request._dataset_file = message._data_set_file
        dimse.msg_queue.put((context_id, request))
        # As pynetdicom resets a message it has handed on (its issue #41).
        message.encoded_command_set = BytesIO()
        message.data_set = BytesIO()
        message._data_set_file = None
        message._data_set_path = None
        dimse.message = None


def read_store_commands(event: evt.Event) -> None:
    """``EVT_CONN_OPEN``: read this association's C-STORE-RQ command sets directly.

    Installs :class:`StoreRequests` as the association's
    ``dimse.receive_primitive`` (the DUL thread calls it for every P-DATA;
    the threads start after this event).
    """
    dimse: Any = event.assoc.dimse
    if isinstance(vars(dimse).get("receive_primitive"), StoreRequests):
        return
    dimse.receive_primitive = StoreRequests(event.assoc)
