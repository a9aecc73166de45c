"""The structure check that also reads the SCP's attributes: the same values as ``dcmread``.

:func:`service.dicom.inspect.check_complete_and_read` replaces ``check_complete`` followed by
``dcmread(stop_before_pixels=True, specific_tags=...)`` in the C-STORE handler. Every case
compares it with that ``dcmread`` on the same bytes: the real files of the test data folder
(every one of them), and data sets written by pydicom and then altered where a hostile peer
would alter them. Nothing here replaces pydicom's parsing.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from service.dicom.inspect import check_complete, check_complete_and_read, dataset_offset
from service.errors import InvalidInstanceError
from service.scp import handlers
from tests.unit.test_hostile_input import (
    CT_SMALL,
    MR_BIG_ENDIAN,
    Lab,
    assert_left_nothing,
    assert_refused,
    chunked_send,
    expect_success_identical,
    open_lab,
    running_node,
)
from tests.unit.test_scp import Node

# pydicom warns about the odd values and encodings some cases carry on purpose.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

KEYWORDS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
            "Modality", "ImagesInAcquisition"]
TAGS = frozenset(Tag(k) for k in KEYWORDS)
#: What the comparison looks at: the attributes read, plus the character set pydicom keeps.
COMPARED = [*KEYWORDS, "SpecificCharacterSet"]
STUDY_UID = "1.2.826.0.1.3680043.8.498.10000000000000000000000000000000001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.10000000000000000000000000000000002"
SOP_UID = "1.2.826.0.1.3680043.8.498.10000000000000000000000000000000003"

#: Real files of each kind: CT, MR, enhanced multi-frame, and every
#: transfer syntax family (implicit, explicit LE and BE, deflated, encapsulated).
REAL_FILES = [
    "ct_abdomen_pancreas_tcia/1-001.dcm",  # Implicit VR LE, 512x512
    "ct_head_ge_gantry_tilt/01.dcm",  # Explicit VR LE, 512x512
    "mr_head_siemens_t1_sag/0001_1.3.12.2.1107.5.2.43.67060.2022040715053454597060816.dcm",
    "mr_phantom_philips_dualecho/001.dcm",
    "enhanced_multiframe/pydicom_data/eCT_Supplemental.dcm",
    "enhanced_multiframe/pydicom_data/emri_small.dcm",
    "enhanced_multiframe/pydicom_data/emri_small_big_endian.dcm",
    "enhanced_multiframe/philips_fieldmap/IM_0027_fMAP.dcm",
    "transfer_syntaxes/dcm_qa_ts/2.dcm",  # Implicit VR LE
    "transfer_syntaxes/dcm_qa_ts/3.dcm",  # Explicit VR Big Endian
    "transfer_syntaxes/dclunie/image_dfl.dcm",  # Deflated Explicit VR LE
    "transfer_syntaxes/pydicom_small/MR_small_implicit.dcm",
    "transfer_syntaxes/pydicom_small/MR_small_RLE.dcm",
    "transfer_syntaxes/nema_wg04/NM1_JPLY_fixed.dcm",
]


# --------------------------------------------------------------------------- helpers


def summary(dataset: Dataset) -> dict[str, tuple[str, Any]]:
    """VR and value of each compared attribute present (values converted by pydicom)."""
    return {k: (dataset[k].VR, dataset[k].value) for k in COMPARED if k in dataset}


def read_file(path: Path) -> Dataset | None:
    """The new function on a Part 10 file, positioned as the handler positions it."""
    syntax = UID(read_file_meta_info(path).TransferSyntaxUID)
    with path.open("rb") as handle:
        handle.seek(dataset_offset(handle))
        return check_complete_and_read(handle, syntax, TAGS)


def reference(path: Path) -> Dataset:
    """What the handler read before: ``dcmread`` of the few attributes, pixels not read."""
    return dcmread(path, stop_before_pixels=True, specific_tags=KEYWORDS)


def dicom_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                handle.seek(128)
                if handle.read(4) == b"DICM":
                    yield path


def part10(dataset_bytes: bytes, syntax: UID, tmp_path: Path) -> Path:
    """A Part 10 file: File Meta written by pydicom, then ``dataset_bytes`` as given."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(SOP_UID)
    meta.TransferSyntaxUID = syntax
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path = tmp_path / "instance.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + buffer.getvalue() + dataset_bytes)
    return path


def encoded(dataset: Dataset, syntax: UID) -> bytes:
    """``dataset`` encoded by pydicom in ``syntax`` (deflated where the syntax says so)."""
    dataset = Dataset(dataset)  # the same elements; File Meta and preamble set on this one
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(SOP_UID)
    meta.TransferSyntaxUID = syntax
    dataset.file_meta = meta
    dataset.preamble = b"\0" * 128
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    return data[dataset_offset(io.BytesIO(data)):]


def element(tag: int, vr: str | None, value: bytes, *, little: bool = True,
            undefined: bool = False) -> bytes:
    """One element as encoded bytes (``vr`` None: implicit VR), PS3.5 7.1.2 / 7.1.3."""
    endian = "<" if little else ">"
    head = struct.pack(endian + "HH", tag >> 16, tag & 0xFFFF)
    length = 0xFFFFFFFF if undefined else len(value)
    if vr is None:
        return head + struct.pack(endian + "L", length) + value
    if vr in {"OB", "OW", "SQ", "UN", "UT", "UC", "UR"}:
        return head + vr.encode() + b"\0\0" + struct.pack(endian + "L", length) + value
    return head + vr.encode() + struct.pack(endian + "H", length) + value


def ct(**attributes: Any) -> Dataset:
    """A small CT data set with the attributes the SCP reads and 8x8 pixels."""
    dataset = Dataset()
    dataset.SpecificCharacterSet = "ISO_IR 100"
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = SOP_UID
    dataset.StudyInstanceUID = STUDY_UID
    dataset.SeriesInstanceUID = SERIES_UID
    dataset.Modality = "CT"
    dataset.PatientName = "ANON^FIELDS"
    dataset.Rows = dataset.Columns = 8
    dataset.BitsAllocated = 16
    dataset.PixelData = bytes(range(128))
    for keyword, value in attributes.items():
        if value is None:
            delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    return dataset


def assert_same_as_dcmread(path: Path) -> Dataset:
    """The new function gives dcmread's attributes (VR and value); returns its data set."""
    got = read_file(path)
    assert got is not None
    assert summary(got) == summary(reference(path))
    return got


# --------------------------------------------------------------------------- real files


@pytest.mark.parametrize("relative", REAL_FILES)
def test_real_file_gives_the_values_of_dcmread(test_data_dir: Path, relative: str) -> None:
    path = test_data_dir / relative
    got = assert_same_as_dcmread(path)
    meta = read_file_meta_info(path)
    # Not vacuous: the UIDs are there, as UI, and match the File Meta.
    assert got["StudyInstanceUID"].VR == got["SeriesInstanceUID"].VR == "UI"
    assert got.SOPInstanceUID == meta.MediaStorageSOPInstanceUID
    assert got.SOPClassUID == meta.MediaStorageSOPClassUID
    assert got.Modality
    assert "PixelData" not in got and "PatientName" not in got  # only what was asked


def test_every_real_file_gives_the_values_of_dcmread(test_data_dir: Path) -> None:
    checked = 0
    for path in dicom_files(test_data_dir):
        got = read_file(path)
        assert got is not None, path
        assert summary(got) == summary(reference(path)), path
        assert got.original_character_set == reference(path).original_character_set, path
        checked += 1
    assert checked >= 390  # the README counts 390 DICOM files


def test_implicit_vr_takes_the_vr_from_the_dictionary(test_data_dir: Path) -> None:
    path = test_data_dir / "ct_abdomen_pancreas_tcia/1-001.dcm"
    assert read_file_meta_info(path).TransferSyntaxUID == ImplicitVRLittleEndian
    got = read_file(path)
    assert got is not None
    raw = got.get_item(Tag("StudyInstanceUID"), keep_deferred=True)  # not converted yet
    assert isinstance(raw, RawDataElement) and raw.VR is None
    assert got["StudyInstanceUID"].VR == "UI"
    assert got["Modality"].VR == "CS" and got.Modality == "CT"


def test_bytes_and_file_give_the_same(test_data_dir: Path) -> None:
    path = test_data_dir / "transfer_syntaxes/dclunie/image_dfl.dcm"
    data = path.read_bytes()
    syntax = UID(read_file_meta_info(path).TransferSyntaxUID)
    assert syntax == DeflatedExplicitVRLittleEndian
    from_bytes = check_complete_and_read(data[dataset_offset(io.BytesIO(data)):], syntax, TAGS)
    assert from_bytes is not None
    assert summary(from_bytes) == summary(reference(path))


# --------------------------------------------------------------------------- written by pydicom


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                    ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
@pytest.mark.parametrize("images", ["12", "0", "-3", "", None])
def test_images_in_acquisition_and_modality(tmp_path: Path, syntax: UID,
                                            images: str | None) -> None:
    dataset = ct(Modality="A_VERY_LONG_MODALITY")  # CS allows 16: read as sent, cut later
    if images is not None:
        dataset.ImagesInAcquisition = images
    path = part10(encoded(dataset, syntax), syntax, tmp_path)
    got = assert_same_as_dcmread(path)
    expected = reference(path)
    assert handlers._positive_int(got.get("ImagesInAcquisition")) == \
        handlers._positive_int(expected.get("ImagesInAcquisition")) == \
        (12 if images == "12" else None)
    assert str(got.get("Modality"))[:16] == "A_VERY_LONG_MODA"


@pytest.mark.parametrize("vr", ["LO", "SH", "UN", "OB"])
def test_uid_with_another_vr_keeps_that_vr(tmp_path: Path, vr: str) -> None:
    dataset = ct(StudyInstanceUID=None)
    dataset.add_new(Tag("StudyInstanceUID"), vr,
                    STUDY_UID if vr in {"LO", "SH"} else STUDY_UID.encode() + b"\0")
    path = part10(encoded(dataset, ExplicitVRLittleEndian), ExplicitVRLittleEndian, tmp_path)
    got = assert_same_as_dcmread(path)
    # pydicom gives UN the dictionary's VR (config.replace_un_with_known_vr); the handler
    # refuses the others (not UI).
    assert got["StudyInstanceUID"].VR == ("UI" if vr == "UN" else vr)
    assert got["SeriesInstanceUID"].VR == "UI"


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SOPInstanceUID", "Modality"])
def test_missing_attribute_is_absent(tmp_path: Path, keyword: str) -> None:
    path = part10(encoded(ct(**{keyword: None}), ExplicitVRLittleEndian),
                  ExplicitVRLittleEndian, tmp_path)
    got = assert_same_as_dcmread(path)
    assert keyword not in got
    assert "SeriesInstanceUID" in got


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "ImagesInAcquisition"])
def test_empty_value_is_read_like_dcmread(tmp_path: Path, syntax: UID, keyword: str) -> None:
    """An empty value: pydicom's reader gives None (implicit VR) or b"" (explicit UI) raw."""
    dataset = ct(StudyInstanceUID=None)
    dataset.add_new(Tag(keyword), "UI" if keyword == "StudyInstanceUID" else "IS", None)
    path = part10(encoded(dataset, syntax), syntax, tmp_path)
    got = read_file(path)
    assert got is not None
    raw = got.get_item(Tag(keyword), keep_deferred=True)
    assert isinstance(raw, RawDataElement) and raw.length == 0
    assert raw.value == empty_value_for_VR(raw.VR, raw=True)  # what pydicom's reader gives
    assert summary(got) == summary(reference(path))
    assert got[keyword].value in ("", None)


def test_attribute_after_pixel_data_is_not_read(tmp_path: Path) -> None:
    """As dcmread(stop_before_pixels=True): an element after Pixel Data is not read."""
    data = encoded(ct(StudyInstanceUID=None), ExplicitVRLittleEndian)
    data += element(0x0020000D, "UI", STUDY_UID.encode() + b"\0")  # out of order, last
    path = part10(data, ExplicitVRLittleEndian, tmp_path)
    got = assert_same_as_dcmread(path)
    assert "StudyInstanceUID" not in got


def test_repeated_element_keeps_the_last(tmp_path: Path) -> None:
    data = encoded(ct(Modality=None), ExplicitVRLittleEndian)
    pixels = data.index(struct.pack("<HH", 0x7FE0, 0x0010) + b"OW")
    repeated = element(0x00080060, "CS", b"MR") + element(0x00080060, "CS", b"PT")
    path = part10(data[:pixels] + repeated + data[pixels:], ExplicitVRLittleEndian, tmp_path)
    got = assert_same_as_dcmread(path)
    assert got.Modality == "PT"


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_value_longer_than_the_walk_reads_is_read_whole(tmp_path: Path,
                                                        implicit: bool) -> None:
    """The walk skips values over 256 bytes; one of the SCP's attributes is read anyway."""
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    long_value = ("1.2." + "3." * 200 + "4").encode()  # 405 bytes: an invalid, long UID
    data = encoded(ct(SeriesInstanceUID=None), syntax)
    pixels = data.index(struct.pack("<HH", 0x7FE0, 0x0010))
    series = element(0x0020000E, None if implicit else "UI", long_value + b"\0")
    path = part10(data[:pixels] + series + data[pixels:], syntax, tmp_path)
    got = assert_same_as_dcmread(path)
    assert got.SeriesInstanceUID == long_value.decode()


def test_undefined_length_value_in_implicit_vr_is_read_like_dcmread(tmp_path: Path) -> None:
    """Implicit VR allows an undefined length on any element; the value runs to (FFFE,E0DD)."""
    data = encoded(ct(SeriesInstanceUID=None), ImplicitVRLittleEndian)
    pixels = data.index(struct.pack("<HH", 0x7FE0, 0x0010))
    value = ("1.2." + "5." * 200 + "6").encode()
    series = (element(0x0020000E, None, value, undefined=True)
              + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    path = part10(data[:pixels] + series + data[pixels:], ImplicitVRLittleEndian, tmp_path)
    got = assert_same_as_dcmread(path)
    assert got.SeriesInstanceUID == value.decode()


# --------------------------------------------------------------------------- refused


def truncations(data: bytes) -> dict[str, bytes]:
    study = data.index(struct.pack("<HH", 0x0020, 0x000D))
    pixels = data.index(struct.pack("<HH", 0x7FE0, 0x0010))
    return {
        "inside the Study Instance UID value": data[:study + 8 + 10],
        "inside the Study Instance UID header": data[:study + 5],
        "inside Pixel Data": data[:pixels + 12 + 64],
        "bytes after the end": data + b"\0\0\0",
    }


@pytest.mark.parametrize("where", ["inside the Study Instance UID value",
                                   "inside the Study Instance UID header",
                                   "inside Pixel Data", "bytes after the end"])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_truncated_data_set_is_refused(tmp_path: Path, where: str, syntax: UID) -> None:
    body = truncations(encoded(ct(), ExplicitVRLittleEndian))[where]
    if syntax.is_deflated:
        packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = packer.compress(body) + packer.flush()
    path = part10(body, syntax, tmp_path)
    with pytest.raises(InvalidInstanceError) as info:
        read_file(path)
    assert info.value.status == 0xC000
    with path.open("rb") as handle:  # check_complete refuses the same
        handle.seek(dataset_offset(handle))
        with pytest.raises(InvalidInstanceError):
            check_complete(handle, syntax)


def test_deflate_stream_cut_at_an_element_boundary_is_refused(tmp_path: Path) -> None:
    """Inflated, the cut stream is whole elements; dcmread's zlib.decompress still refuses it."""
    dataset = encoded(ct(), ExplicitVRLittleEndian)
    pixels = dataset.index(struct.pack("<HH", 0x7FE0, 0x0010))
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    cut = packer.compress(dataset[:pixels]) + packer.flush(zlib.Z_FULL_FLUSH)  # no final block
    path = part10(cut, DeflatedExplicitVRLittleEndian, tmp_path)
    with pytest.raises(zlib.error):
        dcmread(path, stop_before_pixels=True, specific_tags=KEYWORDS)
    with path.open("rb") as handle:
        handle.seek(dataset_offset(handle))
        check_complete(handle, DeflatedExplicitVRLittleEndian)  # whole elements: passes
    with pytest.raises(InvalidInstanceError) as info:
        read_file(path)
    assert (info.value.status, str(info.value)) == (0xC000, "cannot parse data set: error")


def test_unreadable_specific_character_set_is_refused(tmp_path: Path) -> None:
    """dcmread converts (0008,0005) while reading; as an undefined-length sequence it fails."""
    data = encoded(ct(SpecificCharacterSet=None), ExplicitVRLittleEndian)
    charset = (element(0x00080005, "SQ", b"", undefined=True)
               + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    path = part10(charset + data, ExplicitVRLittleEndian, tmp_path)
    with pytest.raises(Exception) as by_dcmread:
        reference(path)
    with pytest.raises(InvalidInstanceError) as info:
        read_file(path)
    assert (info.value.status, str(info.value)) == (
        0xC000, f"cannot parse data set: {type(by_dcmread.value).__name__}")


# --------------------------------------------------------------------------- left to dcmread


def test_leading_command_element_is_left_to_dcmread(tmp_path: Path) -> None:
    """dcmread reads group 0000 elements apart, as Implicit VR Little Endian: None."""
    data = element(0x00000902, "LO", b"NOT A DATA SET ") + encoded(ct(), ExplicitVRLittleEndian)
    path = part10(data, ExplicitVRLittleEndian, tmp_path)
    assert read_file(path) is None
    assert reference(path).StudyInstanceUID == STUDY_UID  # what the handler then reads


def test_deflated_data_set_under_8_bytes_is_left_to_dcmread(tmp_path: Path) -> None:
    """dcmread's look-ahead for group 0000 consumes a body under 8 bytes: it reads nothing."""
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = packer.compress(b"") + packer.flush(zlib.Z_SYNC_FLUSH)  # no final block
    assert 0 < len(body) < 8
    path = part10(body, DeflatedExplicitVRLittleEndian, tmp_path)
    assert read_file(path) is None
    assert "StudyInstanceUID" not in reference(path)  # the handler answers "missing"


@pytest.mark.parametrize("declared", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_first_element_in_the_other_vr_encoding_is_left_to_dcmread(tmp_path: Path,
                                                                   declared: UID) -> None:
    """dcmread reads the whole top level in the VR encoding its first element suggests."""
    if declared == ExplicitVRLittleEndian:  # an empty first element in implicit VR
        first = element(0x00080001, None, b"")
    else:  # an implicit VR length whose first two bytes read as "AB"
        first = element(0x00080001, None, b"\0" * 0x4241)
    path = part10(first + encoded(ct(), declared), declared, tmp_path)
    assert read_file(path) is None
    with path.open("rb") as handle:
        handle.seek(dataset_offset(handle))
        check_complete(handle, declared)  # the structure is sound in the declared syntax


@pytest.fixture(scope="module")
def fields_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with chunked_send(), running_node(tmp_path_factory.mktemp("fields") / "root") as node:
        yield node


@pytest.fixture
def fields_lab(test_data_dir: Path, fields_node: Node, tmp_path: Path) -> Iterator[Lab]:
    with open_lab(test_data_dir, fields_node, tmp_path) as opened:
        yield opened


def test_scp_answers_as_dcmread_reads_an_odd_top_level(fields_lab: Lab) -> None:
    """Big endian, first tag overwritten with (0000,0000): dcmread finds no Study UID."""
    part = fields_lab.part(MR_BIG_ENDIAN)
    data = bytearray(part.dataset_bytes)
    data[0:4] = b"\0\0\0\0"
    part = part.with_dataset(bytes(data))
    path = fields_lab.workdir / "odd.dcm"
    path.write_bytes(part.meta + part.body)
    assert read_file(path) is None
    assert "StudyInstanceUID" not in reference(path)
    assert_refused(fields_lab.node, fields_lab.send(part), part, 0xC000)
    assert fields_lab.sender.last_comment == "Study Instance UID is missing"


def test_scp_stores_a_leading_command_element_as_dcmread_reads_it(fields_lab: Lab) -> None:
    part = fields_lab.part(CT_SMALL)
    part = part.with_dataset(element(0x00000902, "LO", b"NOT A DATA SET ")
                             + part.dataset_bytes)
    path = fields_lab.workdir / "command.dcm"
    path.write_bytes(part.meta + part.body)
    assert read_file(path) is None
    expect_success_identical(fields_lab, part)


def test_scp_refuses_a_cut_deflate_stream(fields_lab: Lab) -> None:
    part = fields_lab.part("transfer_syntaxes/dclunie/image_dfl.dcm")
    dataset = part.dataset_bytes
    pixels = dataset.index(struct.pack("<HH", 0x7FE0, 0x0010))
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    part = part.with_body(packer.compress(dataset[:pixels]) + packer.flush(zlib.Z_FULL_FLUSH))
    assert_refused(fields_lab.node, fields_lab.send(part), part, 0xC000)
    assert fields_lab.sender.last_comment == "cannot parse data set: error"
    assert_left_nothing(fields_lab.node, part)
