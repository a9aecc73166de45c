"""Structural checks of received data sets, without decoding their values."""

from __future__ import annotations

import io
import zlib

from pydicom.filereader import data_element_generator
from pydicom.uid import UID

from service.errors import InvalidInstanceError

UNDEFINED_LENGTH = 0xFFFFFFFF


def check_complete(raw: bytes, transfer_syntax: UID) -> None:
    """Check that the top-level elements of an encoded data set cover it exactly.

    pydicom stops reading silently when a value is shorter than its length or
    a header is cut, so a truncated data set would otherwise be stored as if
    whole. Values are skipped, not read (pixel data is never decoded).

    Parameters
    ----------
    raw : bytes
        The data set as received, without File Meta, in ``transfer_syntax``.
    transfer_syntax : pydicom.uid.UID
        Its transfer syntax (DICOM PS3.5 10); a deflated data set is inflated first.

    Raises
    ------
    InvalidInstanceError
        With status 0xC000 when the data set ends inside an element, has bytes
        after its last element, or cannot be inflated.
    """
    if transfer_syntax.is_deflated:
        try:
            raw = zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw)
        except zlib.error as exc:
            raise InvalidInstanceError("deflated data set cannot be inflated", 0xC000) from exc
    stream = io.BytesIO(raw)
    end = 0
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
    if end != len(raw):
        raise InvalidInstanceError("data set is truncated or has bytes after its end", 0xC000)
