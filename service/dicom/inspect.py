"""Structural checks of received data sets, without decoding their values."""

from __future__ import annotations

import io
import mmap
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO, cast

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.fileutil import read_undefined_length_value
from pydicom.tag import BaseTag, SequenceDelimiterTag
from pydicom.uid import UID

from service.dicom.walk import Walked, walk_prefix, walk_top_level
from service.errors import InvalidInstanceError

UNDEFINED_LENGTH = 0xFFFFFFFF
#: Specific Character Set: pydicom always reads it along with the tags asked for.
SPECIFIC_CHARACTER_SET = 0x00080005
#: Pixel Data, Float and Double Float Pixel Data: ``dcmread(stop_before_pixels=True)``
#: stops at the first of these (pydicom 3 ``filereader._at_pixel_data``).
PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})

_Element = RawDataElement | DataElement
#: A data set as bytes, a file mapped with ``mmap`` (positioned at the data set) or a stream.
_Data = bytes | mmap.mmap | BinaryIO


def check_complete(data: _Data, transfer_syntax: UID) -> None:
    """Check that the top-level elements of an encoded data set cover it exactly.

    pydicom stops reading silently when a value is shorter than its length or
    a header is cut, so a truncated data set would otherwise be stored as if
    whole. Values are skipped, not read (pixel data is never decoded), so a
    data set in a file is checked without loading it.

    Parameters
    ----------
    data : bytes, mmap.mmap or binary file
        The data set as received, without File Meta, in ``transfer_syntax``;
        a mapped file or a file must be positioned at the data set's first
        byte, which runs to the end of the file. Bytes and a mapped file are
        walked in memory, reading only element headers
        (:mod:`service.dicom.walk`).
    transfer_syntax : pydicom.uid.UID
        Its transfer syntax (DICOM PS3.5 10); a deflated data set is inflated first.

    Raises
    ------
    InvalidInstanceError
        With status 0xC000 when the data set ends inside an element, has bytes
        after its last element, or cannot be inflated.
    """
    _walk_dataset(data, transfer_syntax, frozenset())


def check_complete_and_read(data: _Data, transfer_syntax: UID,
                            tags: Iterable[int]) -> Dataset | None:
    """Check a data set as :func:`check_complete` does and return some of its elements.

    One walk over the top-level elements (DICOM PS3.5 7.1) both checks that
    they cover the data set exactly and keeps the raw elements of ``tags``,
    so reading a few attributes costs no second parse. The elements are kept
    as pydicom's reader yields them and pydicom converts them when they are
    first accessed, so each has the value and the VR that
    ``dcmread(..., stop_before_pixels=True, specific_tags=tags)`` gives
    (implicit VR: the VR of the data dictionary, PS3.5 6.2.2 and PS3.6 6):

    * only elements before the first Pixel Data, Float Pixel Data or Double
      Float Pixel Data are kept (the check walks on to the end);
    * of a tag encoded more than once, the last is kept;
    * Specific Character Set (0008,0005) is always kept and sets the data
      set's character set (PS3.5 6.1.2.3).

    Parameters
    ----------
    data : bytes, mmap.mmap or binary file
        The data set as received, without File Meta, in ``transfer_syntax``;
        a mapped file or a file must be positioned at the data set's first
        byte, which runs to the end of the file. Bytes and a mapped file are
        walked in memory, reading only element headers
        (:mod:`service.dicom.walk`).
    transfer_syntax : pydicom.uid.UID
        Its transfer syntax (DICOM PS3.5 10); a deflated data set (PS3.5 A.5)
        is inflated first.
    tags : iterable of int
        The top-level tags to return (e.g. ``pydicom.tag.Tag("SOPInstanceUID")``).

    Returns
    -------
    pydicom.dataset.Dataset or None
        The elements of ``tags`` found, and Specific Character Set, not yet
        converted (a malformed value raises when accessed, as after
        ``dcmread``); a tag not found is absent. None for a complete data
        set that pydicom does not read as ``transfer_syntax`` says: one that
        starts with a group 0000 (command) element, which ``dcmread`` reads
        apart as Implicit VR Little Endian (before inflating; likewise a
        deflated data set of less than 8 bytes), or whose first element's VR field
        does (explicit) or does not (implicit) look like a VR, where
        ``dcmread`` reads the whole top level in the other VR encoding. The
        caller reads such a data set with ``dcmread`` to get what it gives.

    Raises
    ------
    InvalidInstanceError
        With status 0xC000 when the data set ends inside an element, has bytes
        after its last element, cannot be inflated (also: its deflate stream
        is cut short) or its Specific Character Set cannot be read.
    """
    collected = check_complete_and_collect(data, transfer_syntax, tags)
    return None if collected is None else collected.dataset()


@dataclass(frozen=True)
class Collected:
    """Raw top-level elements found by :func:`check_complete_and_collect`.

    Attributes
    ----------
    elements : dict
        Tag → pydicom ``RawDataElement`` (or a parsed ``DataElement`` for a
        sequence), values not converted, as pydicom's reader yields them.
    implicit_vr, little_endian : bool
        The encoding they were read in.
    encoding : str or list of str
        The Python codecs of their Specific Character Set (PS3.5 6.1.2.3).
    """

    elements: dict[BaseTag, _Element]
    implicit_vr: bool
    little_endian: bool
    encoding: str | list[str]

    def dataset(self) -> Dataset:
        """The elements as a pydicom ``Dataset``, converted when first accessed.

        Raises
        ------
        InvalidInstanceError
            With status 0xC000 if pydicom refuses to hold them.
        """
        try:
            dataset = Dataset(dict(self.elements))  # it converts in place: not ours
            dataset.set_original_encoding(self.implicit_vr, self.little_endian, self.encoding)
        except Exception as exc:  # pydicom raises several types on malformed values
            raise InvalidInstanceError(f"cannot parse data set: {type(exc).__name__}",
                                       0xC000) from exc
        return dataset


def check_complete_and_collect(data: _Data, transfer_syntax: UID,
                               tags: Iterable[int]) -> Collected | None:
    """:func:`check_complete_and_read` without building the ``Dataset``.

    The same checks, the same elements and the same None; a caller that
    needs only a few plain values converts them itself and saves pydicom's
    ``Dataset`` machinery, or calls :meth:`Collected.dataset`.

    Raises
    ------
    InvalidInstanceError
        As :func:`check_complete_and_read`.
    """
    elements, head, whole, first = _walk_dataset(
        data, transfer_syntax, frozenset(tags) | {SPECIFIC_CHARACTER_SET})
    return _collected(elements, head, whole, first, transfer_syntax)


def _collected(elements: dict[BaseTag, _Element], head: bytes, whole: bool, first: bytes,
               transfer_syntax: UID) -> Collected | None:
    """The checks after the walk, and what :func:`check_complete_and_collect` returns."""
    # Before it inflates, dcmread reads group 0000 elements, and a first element header
    # shorter than 8 bytes is consumed by that look-ahead (nothing else is read).
    if head[:2] == b"\0\0" or 0 < len(head) < 8:
        return None
    if not whole:  # dcmread inflates with zlib.decompress, which refuses this
        raise InvalidInstanceError(f"cannot parse data set: {zlib.error.__name__}", 0xC000)
    implicit = bool(transfer_syntax.is_implicit_VR)
    if _read_as_other_encoding(first, implicit):
        return None
    encoding: str | list[str] = default_encoding
    if SPECIFIC_CHARACTER_SET in elements:  # as pydicom's read_dataset does
        try:
            charset = cast(RawDataElement, elements[BaseTag(SPECIFIC_CHARACTER_SET)])
            encoding = convert_encodings(convert_raw_data_element(charset).value)
        except Exception as exc:  # pydicom raises several types on malformed values
            raise InvalidInstanceError(f"cannot parse data set: {type(exc).__name__}",
                                       0xC000) from exc
    return Collected(elements, implicit, bool(transfer_syntax.is_little_endian), encoding)


@dataclass(frozen=True)
class BegunCheck:
    """A structure check begun on the first bytes of a data set, before the rest arrived.

    Made by :func:`begin_check`; :meth:`finish` ends it once the data set's
    length is known.

    Attributes
    ----------
    walked : service.dicom.walk.Walked
        How far the walk over the first bytes got.
    head : bytes
        The data set's first 8 bytes.
    transfer_syntax : pydicom.uid.UID
        Its transfer syntax.
    """

    walked: Walked
    head: bytes
    transfer_syntax: UID

    def finish(self, length: int, base: int) -> Collected | None | NotFinished:
        """:func:`check_complete_and_collect`'s outcome, where the walk needs no more bytes.

        Parameters
        ----------
        length : int
            The data set's whole length, bytes.
        base : int
            Where the data set would begin in the buffer the whole check
            walks (0 for its bytes, its offset in the file for a mapped
            file): the found elements' ``value_tell`` is shifted by it, as
            that walk gives it.

        Returns
        -------
        Collected or None or NotFinished
            What :func:`check_complete_and_collect` returns for the whole
            data set, if the walk stopped exactly at its end; otherwise
            :data:`NOT_FINISHED`, and the caller checks the whole data set
            (the elements after the first bytes, or a data set that ends
            before the walk did and is refused there).

        Raises
        ------
        InvalidInstanceError
            As :func:`check_complete_and_collect`.
        """
        walked = self.walked
        if walked.pos != length:
            return NOT_FINISHED
        elements: dict[BaseTag, _Element] = {
            tag: element._replace(value_tell=element.value_tell + base)
            for tag, element in walked.found.items()}
        return _collected(elements, self.head, True, self.head[:6], self.transfer_syntax)


class NotFinished:
    """The type of :data:`NOT_FINISHED`."""


#: :meth:`BegunCheck.finish`: the check needs the whole data set.
NOT_FINISHED = NotFinished()


def begin_check(prefix: bytes | memoryview, transfer_syntax: UID,
                tags: Iterable[int]) -> BegunCheck | None:
    """Begin :func:`check_complete_and_collect` on the first bytes of a data set.

    The structure check walks the elements of what has arrived (e.g. the
    first data set fragment of a C-STORE-RQ, DICOM PS3.7 E.2;
    :func:`service.dicom.walk.walk_prefix`), so that once the rest has
    arrived, a data set whose elements all began there (a CT slice's
    pixel data runs on past its first fragment, unread) needs no further
    reading: :meth:`BegunCheck.finish`.

    Parameters
    ----------
    prefix : bytes or memoryview
        The data set's first bytes, without File Meta.
    transfer_syntax : pydicom.uid.UID
        Its transfer syntax.
    tags : iterable of int
        As for :func:`check_complete_and_collect`.

    Returns
    -------
    BegunCheck or None
        None where the check cannot be begun this way: a deflated data set,
        or fewer than 8 bytes.
    """
    if transfer_syntax.is_deflated or len(prefix) < 8:
        return None
    walked = walk_prefix(prefix, bool(transfer_syntax.is_implicit_VR),
                         bool(transfer_syntax.is_little_endian),
                         frozenset(tags) | {SPECIFIC_CHARACTER_SET})
    return BegunCheck(walked, bytes(prefix[:8]), transfer_syntax)


def _walk_dataset(data: _Data, transfer_syntax: UID,
                  wanted: frozenset[int]) -> tuple[dict[BaseTag, _Element], bytes, bool, bytes]:
    """Walk a data set (:func:`_walk`); return its elements and what the checks after need.

    Bytes, an inflated data set and a mapped file (``mmap``) are walked by
    :func:`service.dicom.walk.walk_top_level`, which reads only element
    headers; a data set it does not take, and any other stream, by pydicom's
    reader. Also returned: the data set's first 8 bytes as received, whether
    its deflate stream came to its end (True if not deflated, or empty) and
    its first 6 bytes (inflated).
    """
    implicit = bool(transfer_syntax.is_implicit_VR)
    little = bool(transfer_syntax.is_little_endian)
    buffer: bytes | mmap.mmap | None = None
    start = 0
    whole = True
    if transfer_syntax.is_deflated:
        deflated = data if isinstance(data, bytes) else data.read()
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            buffer = inflater.decompress(deflated)
        except zlib.error as exc:
            raise InvalidInstanceError("deflated data set cannot be inflated", 0xC000) from exc
        head = deflated[:8]
        whole = inflater.eof or not deflated
    elif isinstance(data, bytes | mmap.mmap):
        buffer = data
        start = data.tell() if isinstance(data, mmap.mmap) else 0
        head = buffer[start:start + 8]
    if buffer is not None:
        first = buffer[start:start + 6]
        elements = walk_top_level(buffer, start, implicit, little, wanted)
        if elements is not None:
            return dict(elements), head, whole, first
        stream = cast(BinaryIO, io.BytesIO(buffer) if isinstance(buffer, bytes)
                      else _MappedFile(buffer))
        stream.seek(start)
    else:
        stream = cast(BinaryIO, data)
        start = stream.tell()
        head = stream.read(8)
        stream.seek(start)
        first = head[:6]
    return _walk(stream, transfer_syntax, wanted), head, whole, first


class _MappedFile:
    """A mapped file read as a file is: no copy of it, and a seek past its end allowed.

    pydicom's reader walks a mapped data set that the skipping walk leaves
    to it through this: a copy into ``io.BytesIO`` would hold a multi-frame
    object in memory whole, and ``mmap.seek`` refuses a position past the
    end, where a file (and the check of a truncated data set) accepts it.
    """

    __slots__ = ("_mapped", "_position")

    def __init__(self, mapped: mmap.mmap) -> None:
        self._mapped = mapped
        self._position = mapped.tell()

    def read(self, size: int = -1) -> bytes:
        end = len(self._mapped) if size < 0 else self._position + size
        data = self._mapped[self._position:end]
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._mapped)}
        position = base[whence] + offset
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._position = position
        return position

    def tell(self) -> int:
        return self._position


class _LastRead:
    """A stream whose last ``read`` is remembered: how many bytes it asked for and got.

    pydicom's element generator skips the values of tags it is not asked for
    with a ``seek`` and stops at the first header it cannot read whole; the
    walk then knows the elements ended exactly at the end of the data only if
    that last read asked for a header at the end and got nothing.
    """

    __slots__ = ("_read", "seek", "tell", "asked", "got")

    def __init__(self, stream: BinaryIO) -> None:
        self._read = stream.read
        self.seek = stream.seek
        self.tell = stream.tell
        self.asked = self.got = -1

    def read(self, size: int = -1) -> bytes:
        data = self._read(size)
        self.asked, self.got = size, len(data)
        return data


def _walk(stream: BinaryIO, transfer_syntax: UID,
          wanted: frozenset[int]) -> dict[BaseTag, _Element]:
    """Walk the top-level elements to the end; return those of ``wanted`` before pixels.

    Values are read only for ``wanted``, Specific Character Set and the
    pixel data tags (which end the collection, as ``dcmread(stop_before_pixels=True)``
    ends it); other values are skipped with a seek (pydicom's ``specific_tags``),
    and a skip past the end, or bytes left over, is found at the end of the walk.
    Undefined-length values are still read or parsed to find their end.
    """
    start = stream.tell()
    size = stream.seek(0, io.SEEK_END)
    stream.seek(start)
    found: dict[BaseTag, _Element] = {}
    collecting = bool(wanted)
    tracked = _LastRead(stream)
    try:
        little = bool(transfer_syntax.is_little_endian)
        for element in data_element_generator(
            cast(BinaryIO, tracked), transfer_syntax.is_implicit_VR, little, defer_size=256,
            specific_tags=list(wanted | PIXEL_DATA_TAGS),
        ):
            value = element.value
            length = getattr(element, "length", UNDEFINED_LENGTH)  # parsed sequences have none
            if (value is not None and length != UNDEFINED_LENGTH
                    and isinstance(value, bytes) and len(value) != length):
                raise InvalidInstanceError("data set ends inside an element value", 0xC000)
            if collecting:
                tag = element.tag
                if tag in PIXEL_DATA_TAGS:
                    collecting = False  # dcmread(stop_before_pixels=True) reads no further
                elif tag in wanted:
                    if (value is None and isinstance(element, RawDataElement)
                            and element.length != 0):  # None is also an empty value
                        element = _read_deferred(stream, element, little)
                    found[tag] = element
    except InvalidInstanceError:
        raise
    except Exception as exc:  # pydicom raises several types on malformed streams
        raise InvalidInstanceError(
            f"data set cannot be parsed: {type(exc).__name__}", 0xC000) from exc
    # The generator stops when a header read comes back short: the elements end exactly
    # at the end only if it asked for a header there and got nothing.
    if tracked.got != 0 or tracked.asked != 8 or stream.tell() != size:
        raise InvalidInstanceError("data set is truncated or has bytes after its end", 0xC000)
    return found


def _read_deferred(stream: BinaryIO, element: RawDataElement, little: bool) -> RawDataElement:
    """The element with the value the walk skipped (over 256 bytes), read as pydicom would."""
    resume = stream.tell()
    stream.seek(element.value_tell)
    if element.length == UNDEFINED_LENGTH:
        value = read_undefined_length_value(stream, little, SequenceDelimiterTag)
    else:
        value = stream.read(element.length)  # a short read is refused after the walk
    stream.seek(resume)
    return element._replace(value=value)


def _read_as_other_encoding(first: bytes, implicit: bool) -> bool:
    """True if pydicom would read the top level in the other VR encoding.

    pydicom's ``read_dataset`` takes the first element's VR field (bytes 4
    and 5, given in ``first``) for a VR if both are upper-case letters, else
    for part of an implicit VR length, whatever the transfer syntax.
    """
    if len(first) < 6:
        return False
    looks_implicit = not (0x40 < first[4] < 0x5B and 0x40 < first[5] < 0x5B)
    return looks_implicit != implicit


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
