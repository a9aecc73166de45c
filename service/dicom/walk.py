"""A skipping walk over the top-level elements of an encoded data set, in memory.

The C-STORE handler must know that a received data set is whole (its
top-level elements cover its bytes exactly) and read a few of its
attributes. pydicom's element generator does both, but it parses every
undefined-length sequence into ``Dataset`` objects to find its end: on a
512×512 CT slice as its scanner wrote it (implicit VR, one undefined-length
sequence of nine items) that was two thirds of the check's time, and an
enhanced multi-frame object's functional groups cost milliseconds, on the
path the sending modality waits on (``benchmarks/structure_check.py``).

:func:`walk_top_level` finds the same ends by reading only element headers
(DICOM PS3.5 7.1 data elements, 7.5 nesting of sequences and items, A.4
encapsulated pixel data) with :func:`struct.unpack_from` on a ``bytes`` or
``mmap`` buffer: no value is copied but those it returns, and no file
position is asked for.
It takes only data sets laid out as the standard says, and there it
agrees with pydicom's reader element for element (the unit tests compare
the two on every file of the test data folder). Anything else, where
pydicom has heuristics or where it would stop or raise, makes it return
None, and the caller walks the data set with pydicom, whose outcome
(values, refusal and its reason) then stands:

* a header or value cut by the end of the data, or a value that runs past
  the end of its item;
* in explicit VR, a VR field that is not a standard VR, or a sequence item
  whose first element looks implicit VR (pydicom switches to implicit VR
  there, PS3.5 6.2.2);
* an undefined length on a UN element or on a wanted attribute;
* undefined-length sequences nested more than :data:`MAX_DEPTH` deep;
* an item that is not an Item (FFFE,E000), a delimiter out of place or an
  Item Delimitation Item whose length is not 0, or an
  undefined-length value other than a sequence that is not encapsulated
  fragments ending in a Sequence Delimitation Item;
* a Specific Character Set inside an item, or one at the top level that
  pydicom cannot read.

:func:`walk_prefix` runs the same walk over the first bytes of a data set
while the rest is still arriving (the first fragment of a C-STORE's data
set), and stops before the first element it cannot finish there; a value it
skips unread (a CT slice's Pixel Data) may run on past those bytes. If the
data set ends exactly where that walk stopped, its elements are those the
whole walk gives (:func:`service.dicom.inspect.begin_check`).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any, TypeAlias

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.tag import BaseTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, STANDARD_VR
from pydicom.values import convert_string

#: What the walk reads from: the data set's bytes, or a whole file mapped read-only.
Buffer: TypeAlias = bytes | mmap.mmap

UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_SPECIFIC_CHARACTER_SET = 0x00080005
#: Pixel Data, Float and Double Float Pixel Data: collection stops at the first of them,
#: as ``dcmread(stop_before_pixels=True)`` stops there.
_PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
#: Undefined-length sequences nested deeper than this are left to pydicom (which refuses
#: a nesting deep enough to exhaust Python's recursion limit).
MAX_DEPTH = 32

_VR_2 = {vr.encode("ascii"): str(vr) for vr in STANDARD_VR}  # VR field → pydicom's VR string
_VR_4 = frozenset(vr.encode("ascii") for vr in EXPLICIT_VR_LENGTH_32)
_VR_SQ = b"SQ"
_VR_UN = b"UN"


class _NotPlain(Exception):
    """The data set leaves the layout the walk takes: pydicom is to read it."""


class _Codec:
    """Element headers in one byte order (PS3.5 7.1.2 explicit VR, 7.1.3 implicit VR)."""

    __slots__ = ("tag", "u16", "u32", "item_tag", "delimiter_tag")

    def __init__(self, little: bool) -> None:
        order = "<" if little else ">"
        self.tag = struct.Struct(f"{order}HH").unpack_from
        self.u16 = struct.Struct(f"{order}H").unpack_from
        self.u32 = struct.Struct(f"{order}L").unpack_from
        self.item_tag = struct.pack(f"{order}HH", 0xFFFE, 0xE000)
        self.delimiter_tag = struct.pack(f"{order}HH", 0xFFFE, 0xE0DD)


_CODECS = {True: _Codec(True), False: _Codec(False)}


def walk_top_level(buffer: Buffer, start: int, implicit_vr: bool, little_endian: bool,
                   wanted: frozenset[int]) -> dict[BaseTag, RawDataElement] | None:
    """Check that a data set's top-level elements end exactly at the end of ``buffer``.

    Parameters
    ----------
    buffer : bytes or mmap.mmap
        Holds the data set from ``start`` to its end (a mapped file: the
        File Meta before ``start``).
    start : int
        Offset of the data set's first element in ``buffer``.
    implicit_vr, little_endian : bool
        The transfer syntax's encoding (DICOM PS3.5 A.1, A.2, A.3); not deflated.
    wanted : frozenset of int
        Top-level tags to return; only those before the first Pixel Data,
        Float or Double Float Pixel Data are kept, and the last of a tag
        encoded twice.

    Returns
    -------
    dict or None
        Tag → pydicom ``RawDataElement`` of each wanted tag found, as
        pydicom's ``data_element_generator`` yields it (VR None in implicit
        VR, the value's bytes not converted, ``value_tell`` an offset in
        ``buffer``). None if the data set is not laid out as the walk takes
        it (see the module's description); whether it is whole is then for
        pydicom's reader to say.
    """
    try:
        return _Walk(buffer, little_endian).top_level(start, implicit_vr, wanted).found
    except (_NotPlain, struct.error):
        return None


@dataclass(frozen=True)
class Walked:
    """How far a walk over the first bytes of a data set got (:func:`walk_prefix`).

    Attributes
    ----------
    pos : int
        Offset, from the data set's first byte, of the first top-level
        element not walked: the end of the last one walked. It may lie
        beyond the bytes walked, after a value that runs on past them
        (e.g. Pixel Data), which was skipped unread.
    found : dict
        Tag → ``RawDataElement`` of each wanted tag walked past, as
        :func:`walk_top_level` returns them (``value_tell`` from the data
        set's first byte).
    collecting : bool
        False once a pixel data element has been walked past.
    """

    pos: int
    found: dict[BaseTag, RawDataElement]
    collecting: bool


def walk_prefix(prefix: bytes | memoryview, implicit_vr: bool, little_endian: bool,
                wanted: frozenset[int]) -> Walked:
    """Walk the top-level elements of the first bytes of a data set, as far as they go.

    The same walk as :func:`walk_top_level`, over what has arrived of a data
    set (e.g. the first fragment of a C-STORE's data set, DICOM PS3.7 E.2),
    stopping before the first element it cannot finish there: one whose
    header, wanted value, Specific Character Set or undefined-length value
    is not whole in ``prefix``, or one the walk would leave to pydicom. A
    value the walk skips unread may run on past ``prefix``. Each element
    walked is walked as :func:`walk_top_level` walks it over the whole data
    set, so if the data set turns out to end exactly at :attr:`Walked.pos`,
    :attr:`Walked.found` is what that walk returns.

    Parameters
    ----------
    prefix : bytes or memoryview
        The data set's first bytes, without File Meta.
    implicit_vr, little_endian : bool
        The transfer syntax's encoding; not deflated.
    wanted : frozenset of int
        As for :func:`walk_top_level`.

    Returns
    -------
    Walked
        Where the walk stopped, and what it found before.
    """
    data = prefix if isinstance(prefix, bytes) else bytes(prefix)  # VR fields are looked up
    return _Walk(data, little_endian).top_level(0, implicit_vr, wanted, prefix=True)


class _Walk:
    """One walk over one buffer; raises :class:`_NotPlain` wherever pydicom might differ."""

    __slots__ = ("buffer", "end", "little", "codec")

    def __init__(self, buffer: Buffer, little: bool) -> None:
        self.buffer = buffer
        self.end = len(buffer)
        self.little = little
        self.codec = _CODECS[little]

    def header(self, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
        """Tag, VR field (None: implicit VR), value length and value offset of an element."""
        if pos + 8 > self.end:
            raise _NotPlain
        group, element = self.codec.tag(self.buffer, pos)
        tag = group << 16 | element
        if implicit or group == 0xFFFE:  # items and delimiters have no VR field (PS3.5 7.5)
            return tag, None, self.codec.u32(self.buffer, pos + 4)[0], pos + 8
        vr = self.buffer[pos + 4:pos + 6]
        if vr in _VR_4:
            if pos + 12 > self.end:
                raise _NotPlain
            return tag, vr, self.codec.u32(self.buffer, pos + 8)[0], pos + 12
        if vr not in _VR_2:
            raise _NotPlain  # pydicom guesses: implicit VR, or a 16-bit length
        return tag, vr, self.codec.u16(self.buffer, pos + 6)[0], pos + 8

    def top_level(self, pos: int, implicit: bool, wanted: frozenset[int], *,
                  prefix: bool = False) -> Walked:
        """Walk the top-level elements from ``pos`` to the end of the buffer.

        With ``prefix`` the buffer holds only the data set's first bytes: the
        walk stops before an element it cannot finish in them, and a value
        it skips may run on past them.
        """
        found: dict[BaseTag, RawDataElement] = {}
        collecting = True
        buffer, end = self.buffer, self.end
        while pos < end:
            at = pos
            try:
                tag, vr, length, value_at = self.header(pos, implicit)
                if tag >> 16 == 0xFFFE:
                    raise _NotPlain  # an item or delimiter at the top level
                if length == UNDEFINED_LENGTH:
                    if collecting and tag in wanted:
                        raise _NotPlain
                    pos = self.undefined_value(tag, vr, value_at, implicit)
                    if tag in _PIXEL_DATA_TAGS:
                        collecting = False
                    continue
                pos = value_at + length
                if pos > end:
                    if not prefix or tag == _SPECIFIC_CHARACTER_SET or (
                            collecting and tag in wanted):
                        raise _NotPlain
                    if tag in _PIXEL_DATA_TAGS:  # runs on past the prefix, skipped unread
                        collecting = False
                    continue
            except (_NotPlain, struct.error):
                if prefix:
                    return Walked(at, found, collecting)
                raise
            if tag == _SPECIFIC_CHARACTER_SET:
                try:  # pydicom's generator reads it as it passes
                    convert_encodings(convert_string(bytes(buffer[value_at:pos]),
                                                     self.little))
                except Exception as exc:
                    if prefix:
                        return Walked(at, found, collecting)
                    raise _NotPlain from exc
            if not collecting:
                continue
            if tag in _PIXEL_DATA_TAGS:
                collecting = False
            elif tag in wanted:
                name = None if vr is None else _VR_2[vr]
                value: Any = (bytes(buffer[value_at:pos]) if length
                              else empty_value_for_VR(name, raw=True))
                found[BaseTag(tag)] = RawDataElement(BaseTag(tag), name, length, value,
                                                     value_at, implicit, self.little)
        return Walked(pos, found, collecting)

    def undefined_value(self, tag: int, vr: bytes | None, pos: int, implicit: bool,
                        depth: int = 0) -> int:
        """Skip an undefined-length value starting at ``pos``; return the offset after it."""
        if vr == _VR_UN:
            raise _NotPlain  # pydicom reads it as a sequence in implicit VR (PS3.5 6.2.2)
        if vr is None:  # implicit VR: the dictionary's VR, as pydicom looks it up
            try:
                is_sequence = dictionary_VR(tag) == "SQ"
            except KeyError:  # private or unknown: a sequence if its value starts with an Item
                is_sequence = self.buffer[pos:pos + 4] == self.codec.item_tag
        else:
            is_sequence = vr == _VR_SQ
        if is_sequence:
            if depth >= MAX_DEPTH:
                raise _NotPlain
            return self.sequence(pos, implicit, depth + 1)
        return self.fragments(pos)

    def sequence(self, pos: int, implicit: bool, depth: int) -> int:
        """Skip the items of an undefined-length sequence and its Sequence Delimitation Item."""
        while True:
            tag, _, length, pos = self.header(pos, True)
            if tag == _SEQUENCE_DELIMITER:
                return pos
            if tag != _ITEM:
                raise _NotPlain
            if length == UNDEFINED_LENGTH:
                pos = self.item(pos, None, implicit, depth)
            else:
                item_end = pos + length
                if item_end > self.end:
                    raise _NotPlain
                pos = self.item(pos, item_end, implicit, depth)

    def item(self, pos: int, item_end: int | None, implicit: bool, depth: int) -> int:
        """Skip an item's elements, to ``item_end`` exactly or through its Item Delimiter."""
        if not implicit and pos != item_end and pos + 6 <= self.end:
            field = self.buffer[pos + 4:pos + 6]
            if not (0x40 < field[0] < 0x5B and 0x40 < field[1] < 0x5B):
                # pydicom reads such an item as implicit VR, unless it is empty
                if self.codec.tag(self.buffer, pos) != (0xFFFE, 0xE00D) or item_end is not None:
                    raise _NotPlain
        while item_end is None or pos < item_end:
            tag, vr, length, value_at = self.header(pos, implicit)
            if tag == _ITEM_DELIMITER and item_end is None:
                if length:  # in explicit VR pydicom may take that field for a VR and a length
                    raise _NotPlain
                return value_at
            if tag >> 16 == 0xFFFE or tag == _SPECIFIC_CHARACTER_SET:
                raise _NotPlain
            if length == UNDEFINED_LENGTH:
                pos = self.undefined_value(tag, vr, value_at, implicit, depth)
            else:
                pos = value_at + length
                if pos > self.end:
                    raise _NotPlain
            if item_end is not None and pos > item_end:
                raise _NotPlain
        return pos

    def fragments(self, pos: int) -> int:
        """Skip encapsulated fragments (PS3.5 A.4) through their Sequence Delimitation Item."""
        item_tag, delimiter_tag = self.codec.item_tag, self.codec.delimiter_tag
        while True:
            if pos + 8 > self.end:
                raise _NotPlain
            tag = self.buffer[pos:pos + 4]
            if tag == delimiter_tag:
                return pos + 8
            if tag != item_tag:
                raise _NotPlain
            pos += 8 + self.codec.u32(self.buffer, pos + 4)[0]
