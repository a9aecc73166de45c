"""The C-STORE handler's direct reading of plain values gives what pydicom's ``Dataset`` gives.

``handlers._plain_values`` decodes Study/Series/SOP Instance/SOP Class UID, Modality and
Images in Acquisition straight from the raw elements of the structure check; anything not
plain goes to ``handlers._dataset_values`` (pydicom's conversion). Every case here runs
both on the same elements and compares the values, or the error and its status.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from service.dicom.inspect import check_complete_and_collect, dataset_offset
from service.errors import InvalidInstanceError
from service.scp import handlers
from tests.unit.test_inspect_fields import SERIES_UID, STUDY_UID, TAGS, ct, dicom_files, element
from tests.unit.test_inspect_fields import encoded as pydicom_encoded

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
            DeflatedExplicitVRLittleEndian]


def outcome(read: Any) -> Any:
    """The values read, or the error as (type, status, message)."""
    try:
        return read()
    except InvalidInstanceError as exc:
        return ("refused", exc.status, str(exc))


def compare(data: bytes, syntax: UID) -> Any:
    """Both readings of one data set: equal, and the plain one's outcome (None: not plain)."""
    collected = check_complete_and_collect(data, syntax, TAGS)
    assert collected is not None
    reference = outcome(lambda: handlers._dataset_values(collected.dataset()))
    plain = outcome(lambda: handlers._plain_values(collected.elements))
    if plain is not None:
        assert plain == reference
    return plain


def test_every_real_file_reads_the_same(test_data_dir: Path) -> None:
    plain = compared = 0
    for path in dicom_files(test_data_dir):
        syntax = UID(read_file_meta_info(path).TransferSyntaxUID)
        data = path.read_bytes()
        data = data[dataset_offset(io.BytesIO(data)):]
        if check_complete_and_collect(data, syntax, TAGS) is None:
            continue  # read by dcmread in the handler, never by either reading here
        compared += 1
        plain += compare(data, syntax) is not None
    assert compared >= 390  # the README counts 390 DICOM files
    assert plain >= 0.9 * compared  # the direct reading is the common case, not a curiosity


#: Each case, and whether the direct reading takes it (False: pydicom's Dataset reads it).
WRITTEN = [
    ({}, True),
    ({"Modality": None}, True),
    ({"Modality": "MR "}, True),
    ({"Modality": ["CT", "MR"]}, False),  # several values: pydicom's reading
    ({"ImagesInAcquisition": "12"}, True),
    ({"ImagesInAcquisition": "0"}, True),
    ({"ImagesInAcquisition": "-3"}, False),
    ({"ImagesInAcquisition": "+3"}, False),
    ({"ImagesInAcquisition": ""}, False),
    ({"ImagesInAcquisition": ["2", "3"]}, False),
    ({"SOPInstanceUID": None, "SOPClassUID": None}, True),
    ({"SOPInstanceUID": "1.2.3.4"}, True),
    ({"SOPInstanceUID": ""}, False),
    ({"StudyInstanceUID": None}, False),
    ({"StudyInstanceUID": ""}, False),
    ({"SeriesInstanceUID": "1.2.3.04"}, True),  # not a valid UID: refused by both
    ({"SeriesInstanceUID": [SERIES_UID, STUDY_UID]}, False),
]


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize(("attributes", "direct"), WRITTEN, ids=repr)
def test_written_by_pydicom_reads_the_same(syntax: UID, attributes: dict[str, Any],
                                           direct: bool) -> None:
    plain = compare(pydicom_encoded(ct(**attributes), syntax), syntax)
    assert (plain is not None) is direct


def test_the_common_case_is_read_directly() -> None:
    data = pydicom_encoded(ct(ImagesInAcquisition="12"), ExplicitVRLittleEndian)
    assert compare(data, ExplicitVRLittleEndian) == (
        STUDY_UID, SERIES_UID, ct().SOPInstanceUID, ct().SOPClassUID, "CT", 12)


@pytest.mark.parametrize(("value", "direct"), [
    (b" 12 ", True), (b"12\0", True), (b"012", True), (b"  ", False),
    (b"1.0", False), (b"1e1", False), (b"\xb2", False), (b"7\\8", False),
], ids=repr)
def test_images_in_acquisition_as_sent(value: bytes, direct: bool) -> None:
    """Odd IS encodings as a peer may send them (implicit VR: no VR to check)."""
    data = b"".join([
        element(0x00080016, None, str(ct().SOPClassUID).encode() + b"\0"),
        element(0x00080018, None, str(ct().SOPInstanceUID).encode() + b"\0"),
        element(0x00080060, None, b"CT"),
        element(0x00200013, None, b"1 "),
        element(0x0020000D, None, STUDY_UID.encode() + b"\0"),
        element(0x0020000E, None, SERIES_UID.encode() + b"\0"),
        element(0x00201002, None, value + (b" " if len(value) % 2 else b"")),
    ])
    assert (compare(data, ImplicitVRLittleEndian) is not None) is direct


@pytest.mark.parametrize("value", [
    STUDY_UID.encode() + b"\0", STUDY_UID.encode() + b" ", b" " + STUDY_UID.encode() + b" ",
    STUDY_UID.encode() + b"\0\0", b"1.2.3\xe9\0", b"1.2.3.4" + b".5" * 40,
], ids=repr)
@pytest.mark.parametrize("vr", ["UI", "UN", "LO"])
def test_study_uid_as_sent(value: bytes, vr: str) -> None:
    """Padding, a leading space, a non-ASCII byte, 64+ characters, another VR."""
    data = b"".join([
        element(0x00080016, "UI", str(ct().SOPClassUID).encode() + b"\0"),
        element(0x00080060, "CS", b"CT"),
        element(0x0020000D, vr, value + (b" " if len(value) % 2 else b"")),
        element(0x0020000E, "UI", SERIES_UID.encode() + b"\0"),
    ])
    plain = compare(data, ExplicitVRLittleEndian)
    # UI: read directly (values or the refusal); another VR: pydicom decides what it means.
    assert (plain is not None) is (vr == "UI")
