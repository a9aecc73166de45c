"""The skipping walk (:mod:`service.dicom.walk`) agrees with pydicom's reader, or steps aside.

``walk_top_level`` reads only element headers. Wherever it returns elements, they must be
exactly those that pydicom's element generator yields in :func:`service.dicom.inspect._walk`
(the structure check it replaces on the C-STORE path), and pydicom must find the data set
whole. Where pydicom would refuse a data set or read it by a heuristic, the walk must return
None, so that pydicom decides. Checked on every DICOM file of the test data folder, on each of
them cut at every byte of its headers, on byte-level mutations, and on hand-built layouts.
"""

from __future__ import annotations

import io
import mmap
import random
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from service.dicom import walk
from service.dicom.inspect import _MappedFile, _walk, check_complete_and_collect, dataset_offset
from service.errors import InvalidInstanceError
from tests.unit.test_inspect_fields import SERIES_UID, SOP_UID, STUDY_UID, TAGS, dicom_files

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

WANTED = TAGS | {0x00080005}
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
#: Real files with nested sequences, private sequences, encapsulated pixel data, big endian.
CUT_FILES = [
    "ct_abdomen_pancreas_tcia/1-001.dcm",  # implicit VR LE, eight undefined-length sequences
    "ct_head_ge_gantry_tilt/01.dcm",  # explicit VR LE
    "transfer_syntaxes/dcm_qa_ts/3.dcm",  # explicit VR big endian
    "transfer_syntaxes/nema_wg04/NM1_JPLY_fixed.dcm",  # encapsulated pixel data
    "enhanced_multiframe/pydicom_data/eCT_Supplemental.dcm",  # deep functional groups
]


def reference(data: bytes, syntax: UID) -> Any:
    """pydicom's walk of the whole data set: its elements, or its refusal."""
    try:
        return _walk(io.BytesIO(data), syntax, WANTED)
    except InvalidInstanceError as exc:
        return ("refused", str(exc))


def fast(data: bytes, syntax: UID) -> dict[Any, Any] | None:
    return walk.walk_top_level(data, 0, bool(syntax.is_implicit_VR),
                               bool(syntax.is_little_endian), WANTED)


def agrees(data: bytes, syntax: UID) -> bool:
    """Assert the walk's elements are pydicom's where it gives any; True if it gave them."""
    found = fast(data, syntax)
    if found is None:
        return False
    assert found == reference(data, syntax)
    return True


def dataset_of(path: Path) -> tuple[bytes, UID]:
    """The data set of a Part 10 file (inflated if deflated) and the syntax to walk it in."""
    syntax = UID(read_file_meta_info(path).TransferSyntaxUID)
    data = path.read_bytes()
    data = data[dataset_offset(io.BytesIO(data)):]
    if syntax.is_deflated:
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data), ExplicitVRLittleEndian
    return data, syntax


def header_end(data: bytes, syntax: UID) -> int:
    """Just past the last bytes that read as a pixel data tag (or the end of the data).

    Everything before it, every header included, is cut and mutated byte by byte; the
    pixel data after it only every so often.
    """
    for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):
        packed = struct.pack("<HH" if syntax.is_little_endian else ">HH", tag >> 16,
                             tag & 0xFFFF)
        at = data.rfind(packed)
        if at > 0:
            return at + 12
    return len(data)


def test_every_real_file_is_walked_as_pydicom_walks_it(test_data_dir: Path) -> None:
    taken = 0
    paths = list(dicom_files(test_data_dir))
    for path in paths:
        data, syntax = dataset_of(path)
        taken += agrees(data, syntax)
    assert len(paths) >= 390  # the README counts 390 DICOM files
    assert taken == len(paths)  # every real file is laid out as the standard says


@pytest.mark.parametrize("relative", CUT_FILES)
def test_a_cut_anywhere_in_the_headers_is_never_taken_for_whole(test_data_dir: Path,
                                                                 relative: str) -> None:
    data, syntax = dataset_of(test_data_dir / relative)
    end = header_end(data, syntax)
    whole = refused = taken = 0
    for cut in [*range(1, end), *range(end, len(data), max(1, (len(data) - end) // 50))]:
        piece = data[:cut]
        outcome = reference(piece, syntax)
        if isinstance(outcome, tuple):
            refused += 1
            assert fast(piece, syntax) is None, f"cut at {cut} taken for whole"
        else:
            whole += 1
            taken += agrees(piece, syntax)
    assert refused > 0.9 * (refused + whole)  # most cuts fall inside an element
    assert taken == whole  # a cut at an element boundary is whole for both


def mutations(data: bytes, syntax: UID, count: int, seed: int) -> Iterator[bytes]:
    """Byte-level mutations of the header region: flips, overwrites with lengths, tags, VRs."""
    rng = random.Random(seed)
    end = min(header_end(data, syntax) + 16, len(data))
    order = "<" if syntax.is_little_endian else ">"
    words = [struct.pack(order + "L", v) for v in (0, 1, 8, 0xFF, UNDEFINED, 0xFFFF)]
    words += [struct.pack(order + "HH", t >> 16, t & 0xFFFF) for t in (ITEM, ITEM_END,
                                                                       SEQUENCE_END)]
    words += [b"SQ", b"UN", b"OB", b"zz", b"\0\0"]
    for _ in range(count):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(end)
            kind = rng.randrange(4)
            if kind == 0:
                mutated[at] ^= 1 << rng.randrange(8)
            elif kind == 1:
                word = rng.choice(words)
                mutated[at:at + len(word)] = word
            elif kind == 2:
                del mutated[at:at + rng.randint(1, 8)]
            else:
                mutated[at:at] = rng.randbytes(rng.randint(1, 8))
        yield bytes(mutated)


@pytest.mark.parametrize("relative", CUT_FILES)
def test_mutated_headers_are_walked_as_pydicom_walks_them_or_left_to_it(
        test_data_dir: Path, relative: str) -> None:
    data, syntax = dataset_of(test_data_dir / relative)
    taken = refused_by_pydicom = 0
    for n, mutated in enumerate(mutations(data, syntax, 600, seed=CUT_FILES.index(relative))):
        outcome = reference(mutated, syntax)
        if isinstance(outcome, tuple):
            refused_by_pydicom += 1
            assert fast(mutated, syntax) is None, f"mutation {n} refused by pydicom, taken here"
        else:
            taken += agrees(mutated, syntax)
    # Both kinds occur, so neither half of the property is vacuous.
    assert taken >= 50
    assert refused_by_pydicom >= 50


# -- hand-built layouts (PS3.5 7.1, 7.5, A.4) -------------------------------------------------


def el(tag: int, vr: str | None, value: bytes, *, little: bool = True,
       undefined: bool = False) -> bytes:
    """One element (``vr`` None: implicit VR)."""
    order = "<" if little else ">"
    head = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
    length = UNDEFINED if undefined else len(value)
    if vr is None:
        return head + struct.pack(order + "L", length) + value
    if vr in {"OB", "OW", "SQ", "UN", "UT", "UC", "UR"}:
        return head + vr.encode() + b"\0\0" + struct.pack(order + "L", length) + value
    return head + vr.encode() + struct.pack(order + "H", length) + value


def marker(tag: int, length: int = 0, little: bool = True) -> bytes:
    """An item or delimitation header: tag and 32-bit length, no VR (PS3.5 7.5)."""
    order = "<" if little else ">"
    return struct.pack(order + "HHL", tag >> 16, tag & 0xFFFF, length)


def item(content: bytes, *, undefined: bool = True) -> bytes:
    if undefined:
        return marker(ITEM, UNDEFINED) + content + marker(ITEM_END)
    return marker(ITEM, len(content)) + content


def sequence(*items: bytes) -> bytes:
    return b"".join(items) + marker(SEQUENCE_END)


def uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" * (len(raw) % 2)


def plain(vr: bool) -> tuple[bytes, bytes]:
    """The UIDs before and after a sequence: (0008,0018) and (0020,000D), (0020,000E)."""
    def v(name: str) -> str | None:
        return name if vr else None
    before = el(0x00080016, v("UI"), uid("1.2.840.10008.5.1.4.1.1.2")) + el(
        0x00080018, v("UI"), uid(SOP_UID))
    after = el(0x0020000D, v("UI"), uid(STUDY_UID)) + el(0x0020000E, v("UI"), uid(SERIES_UID))
    return before, after


def implicit_with(middle: bytes) -> bytes:
    before, after = plain(False)
    return before + middle + after


def explicit_with(middle: bytes) -> bytes:
    before, after = plain(True)
    return before + middle + after


NESTED_IMPLICIT = el(0x00081140, None, sequence(  # Referenced Image Sequence
    item(el(0x00081150, None, uid("1.2.3")) + el(0x00400555, None, sequence(
        item(el(0x0040A040, None, b"TEXT"), undefined=False)), undefined=True)),
    item(el(0x00081155, None, uid("1.2.4")), undefined=False),
    item(b""),
), undefined=True)

NESTED_EXPLICIT = el(0x00081140, "SQ", sequence(
    item(el(0x00081150, "UI", uid("1.2.3")) + el(0x00400555, "SQ", sequence(
        item(el(0x0040A040, "CS", b"TEXT"), undefined=False)), undefined=True)),
    item(el(0x00081155, "UI", uid("1.2.4")), undefined=False),
    item(b"", undefined=False),
), undefined=True)


@pytest.mark.parametrize(("data", "syntax"), [
    (implicit_with(NESTED_IMPLICIT), ImplicitVRLittleEndian),
    (explicit_with(NESTED_EXPLICIT), ExplicitVRLittleEndian),
    # a private sequence of undefined length in implicit VR: found by its first Item
    (implicit_with(el(0x00091010, None, sequence(item(el(0x00091011, None, b"AB"))),
                      undefined=True)), ImplicitVRLittleEndian),
    # encapsulated pixel data: an empty offset table and two fragments (PS3.5 A.4)
    (explicit_with(el(0x7FE00010, "OB", marker(ITEM, 0) + marker(ITEM, 4) + b"abcd"
                      + marker(ITEM, 2) + b"ef" + marker(SEQUENCE_END), undefined=True)),
     ExplicitVRLittleEndian),
    # an empty sequence of undefined length
    (explicit_with(el(0x00081140, "SQ", sequence(), undefined=True)), ExplicitVRLittleEndian),
], ids=["nested implicit", "nested explicit", "private sequence", "fragments", "empty"])
def test_standard_layouts_are_walked_as_pydicom_walks_them(data: bytes, syntax: UID) -> None:
    assert isinstance(reference(data, syntax), dict)
    assert agrees(data, syntax)


def deep(levels: int) -> bytes:
    content = el(0x00081150, "UI", uid("1.2.3"))
    for _ in range(levels):
        content = el(0x00081140, "SQ", sequence(item(content)), undefined=True)
    return explicit_with(content)


def test_nesting_deeper_than_the_limit_is_left_to_pydicom() -> None:
    assert agrees(deep(walk.MAX_DEPTH), ExplicitVRLittleEndian)
    too_deep = deep(walk.MAX_DEPTH + 1)
    assert isinstance(reference(too_deep, ExplicitVRLittleEndian), dict)
    assert fast(too_deep, ExplicitVRLittleEndian) is None


@pytest.mark.parametrize(("data", "syntax"), [
    # an item in implicit VR inside an explicit VR data set: pydicom switches (PS3.5 6.2.2)
    (explicit_with(el(0x00081140, "SQ", sequence(item(el(0x00081150, None, uid("1.2.3")))),
                      undefined=True)), ExplicitVRLittleEndian),
    # UN of undefined length: pydicom reads it as an implicit VR sequence
    (explicit_with(el(0x00091010, "UN", sequence(item(el(0x00091011, None, b"AB"))),
                      undefined=True)), ExplicitVRLittleEndian),
    # an undefined-length value that is not fragments: pydicom scans for the delimiter
    (implicit_with(el(0x00091010, None, b"ABCD" + marker(SEQUENCE_END), undefined=True)),
     ImplicitVRLittleEndian),
    # something other than an Item where an item belongs
    (explicit_with(el(0x00081140, "SQ", el(0x00081150, "UI", uid("1.2.3"))
                      + marker(SEQUENCE_END), undefined=True)), ExplicitVRLittleEndian),
    # a Specific Character Set inside an item
    (explicit_with(el(0x00081140, "SQ", sequence(item(el(0x00080005, "CS", b"ISO_IR 100"))),
                      undefined=True)), ExplicitVRLittleEndian),
    # a wanted attribute encoded with an undefined length
    (el(0x00080018, None, uid(SOP_UID) + marker(SEQUENCE_END), undefined=True),
     ImplicitVRLittleEndian),
    # an Item at the top level
    (explicit_with(item(el(0x00081150, "UI", uid("1.2.3")), undefined=False)),
     ExplicitVRLittleEndian),
    # a VR field that is no VR: pydicom guesses implicit VR
    (explicit_with(el(0x00091010, "zz", b"ABCD")), ExplicitVRLittleEndian),
], ids=["implicit item in explicit", "UN undefined", "not fragments", "no item",
        "character set in item", "wanted undefined", "item at top level", "unknown VR"])
def test_layouts_with_pydicom_heuristics_are_left_to_pydicom(data: bytes, syntax: UID) -> None:
    assert fast(data, syntax) is None


def test_big_endian_sequences_are_walked() -> None:
    body = el(0x00081140, "SQ", marker(ITEM, UNDEFINED, little=False)
              + el(0x00081150, "UI", uid("1.2.3"), little=False) + marker(ITEM_END, little=False)
              + marker(SEQUENCE_END, little=False), little=False, undefined=True)
    data = el(0x00080018, "UI", uid(SOP_UID), little=False) + body
    assert agrees(data, ExplicitVRBigEndian)


def test_a_mapped_file_gives_what_its_bytes_give(test_data_dir: Path, tmp_path: Path) -> None:
    path = test_data_dir / CUT_FILES[0]
    data = path.read_bytes()
    offset = dataset_offset(io.BytesIO(data))
    syntax = UID(read_file_meta_info(path).TransferSyntaxUID)
    from_bytes = check_complete_and_collect(data[offset:], syntax, TAGS)
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0,
                                              access=mmap.ACCESS_READ) as mapped:
        mapped.seek(offset)
        from_map = check_complete_and_collect(mapped, syntax, TAGS)
    assert from_bytes is not None and from_map is not None
    assert from_map.elements.keys() == from_bytes.elements.keys()
    for tag, element in from_map.elements.items():
        assert element.value == from_bytes.elements[tag].value
        assert element.value_tell == from_bytes.elements[tag].value_tell + offset
    # and a mapped file cut short is refused as pydicom refuses it
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:-3])
    with cut.open("rb") as handle, mmap.mmap(handle.fileno(), 0,
                                             access=mmap.ACCESS_READ) as mapped:
        mapped.seek(offset)
        with pytest.raises(InvalidInstanceError, match="truncated") as refused:
            check_complete_and_collect(mapped, syntax, TAGS)
    assert refused.value.status == 0xC000


def test_a_mapped_file_left_to_pydicom_is_read_in_place(tmp_path: Path) -> None:
    # A UN value of undefined length: the skipping walk leaves it to pydicom, which then
    # reads the mapped file as a file (no copy of 600 kB of pixel data into memory).
    pixels = el(0x7FE00010, "OW", bytes(600_000))
    unusual = el(0x00091010, "UN", sequence(item(el(0x00091011, None, b"AB"))), undefined=True)
    data = explicit_with(unusual) + pixels
    assert fast(data, ExplicitVRLittleEndian) is None
    expected = check_complete_and_collect(data, ExplicitVRLittleEndian, TAGS)
    assert expected is not None and expected.elements
    path = tmp_path / "big.dcm"
    preamble = b"FILE META STANDS HERE"
    for body, whole in ((data, True), (data[:-5], False)):
        path.write_bytes(preamble + body)
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0,
                                                  access=mmap.ACCESS_READ) as mapped:
            mapped.seek(len(preamble))
            if whole:
                found = check_complete_and_collect(mapped, ExplicitVRLittleEndian, TAGS)
                assert found is not None
                assert {t: e.value for t, e in found.elements.items()} == {
                    t: e.value for t, e in expected.elements.items()}
            else:  # pydicom's skip runs past the end: refused as a file is refused
                with pytest.raises(InvalidInstanceError, match="truncated"):
                    check_complete_and_collect(mapped, ExplicitVRLittleEndian, TAGS)


def test_mapped_file_reads_and_seeks_as_a_file_does(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0,
                                              access=mmap.ACCESS_READ) as mapped:
        mapped.seek(2)
        view = _MappedFile(mapped)
        assert view.tell() == 2
        assert view.read(3) == b"234"
        assert view.seek(4, io.SEEK_CUR) == 9
        assert view.read(5) == b"9"  # short at the end
        assert view.seek(20) == 20 and view.read(8) == b""  # past the end, as a file allows
        assert view.seek(-3, io.SEEK_END) == 7 and view.read() == b"789"
        with pytest.raises(ValueError):
            view.seek(-1)
