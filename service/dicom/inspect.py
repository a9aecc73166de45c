"""Structural checks of received data sets, without decoding their values."""

from __future__ import annotations

import io
import struct
import zlib
from typing import BinaryIO

from pydicom.filereader import data_element_generator
from pydicom.uid import UID

from service.errors import InvalidInstanceError

UNDEFINED_LENGTH = 0xFFFFFFFF


def check_complete(data: bytes | BinaryIO, transfer_syntax: UID) -> None:
    """Check that the top-level elements of an encoded data set cover it exactly.

    pydicom stops reading silently when a value is shorter than its length or
    a header is cut, so a truncated data set would otherwise be stored as if
    whole. Values are skipped, not read (pixel data is never decoded), so a
    data set in a file is checked without loading it.

    Parameters
    ----------
    data : bytes or binary file
        The data set as received, without File Meta, in ``transfer_syntax``;
        a file must be positioned at the data set's first byte, which runs to
        the end of the file.
    transfer_syntax : pydicom.uid.UID
        Its transfer syntax (DICOM PS3.5 10); a deflated data set is inflated first.

    Raises
    ------
    InvalidInstanceError
        With status 0xC000 when the data set ends inside an element, has bytes
        after its last element, or cannot be inflated.
    """
    stream: BinaryIO = io.BytesIO(data) if isinstance(data, bytes) else data
    if transfer_syntax.is_deflated:
        try:
            stream = io.BytesIO(zlib.decompressobj(-zlib.MAX_WBITS).decompress(stream.read()))
        except zlib.error as exc:
            raise InvalidInstanceError("deflated data set cannot be inflated", 0xC000) from exc
    start = stream.tell()
    size = stream.seek(0, io.SEEK_END)
    stream.seek(start)
    end = start
    try:
        for element in data_element_generator(
            stream, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian,
            defer_size=256,
        ):
            length = getattr(element, "length", UNDEFINED_LENGTH)  # parsed sequences have none
            if (element.value is not None and length != UNDEFINED_LENGTH
                    and isinstance(element.value, bytes) and len(element.value) != length):
                raise InvalidInstanceError("data set ends inside an element value", 0xC000)
            end = stream.tell()
    except InvalidInstanceError:
        raise
    except Exception as exc:  # pydicom raises several types on malformed streams
        raise InvalidInstanceError(
            f"data set cannot be parsed: {type(exc).__name__}", 0xC000) from exc
    if end != size:
        raise InvalidInstanceError("data set is truncated or has bytes after its end", 0xC000)


def dataset_offset(handle: BinaryIO) -> int:
    """Offset of the data set in a DICOM file: after the preamble and the File Meta group.

    Parameters
    ----------
    handle : binary file
        A file in the DICOM File Format (PS3.10 7.1) whose File Meta starts
        with File Meta Information Group Length (0002,0000); read from its start.

    Raises
    ------
    InvalidInstanceError
        With status 0xC000 if the file does not start that way.
    """
    handle.seek(0)
    head = handle.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise InvalidInstanceError("received data has no valid File Meta", 0xC000)
    (group_length,) = struct.unpack("<I", head[140:144])
    return 144 + int(group_length)
