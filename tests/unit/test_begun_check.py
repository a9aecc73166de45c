"""A structure check begun on a data set's first fragment ends as the whole check does.

:func:`service.dicom.inspect.begin_check` walks what has arrived of a data set (the first
fragment of a C-STORE's data set) and :meth:`BegunCheck.finish` ends the check once the
data set's length is known, without its bytes. Wherever ``finish`` gives an outcome, it
must be exactly what :func:`check_complete_and_collect` gives for the whole data set; where
it cannot know, it must say so (``NOT_FINISHED``) and the handler checks the whole file.
Checked on every DICOM file of the test data folder at the fragment sizes senders use, on
files cut at every byte of their headers and at fragment boundaries, on byte-level
mutations, and through a real association.
"""

from __future__ import annotations

import io
import mmap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from service.dicom.inspect import (
    NOT_FINISHED,
    Collected,
    begin_check,
    check_complete_and_collect,
    dataset_offset,
)
from service.errors import InvalidInstanceError
from service.scp.handlers import _finish_begun_check
from service.scp.receive import ReceiveFile
from tests.unit.test_inspect_fields import TAGS, dicom_files
from tests.unit.test_walk import (
    CUT_FILES,
    dataset_of,
    explicit_with,
    header_end,
    implicit_with,
    mutations,
)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

#: First data set fragments as senders cut them: dcmtk's PDV for a 16 KiB and for its
#: largest PDU, pynetdicom's for its default, and a small one.
FRAGMENTS = (16372, 131060, 16370, 512)


def whole(data: bytes, syntax: UID) -> Any:
    """The whole check's outcome: what it returns, or its refusal."""
    try:
        return outcome(check_complete_and_collect(data, syntax, TAGS))
    except InvalidInstanceError as exc:
        return ("refused", exc.status, str(exc))


def begun(data: bytes, first: int, syntax: UID, base: int = 0) -> Any:
    """The begun check's outcome, its first ``first`` bytes walked before the rest."""
    check = begin_check(memoryview(data)[:first], syntax, TAGS)
    if check is None:
        return "not begun"
    try:
        result = check.finish(len(data), base)
    except InvalidInstanceError as exc:
        return ("refused", exc.status, str(exc))
    return "not finished" if result is NOT_FINISHED else outcome(result)


def outcome(collected: Any) -> Any:
    if not isinstance(collected, Collected):
        return collected  # None: pydicom is to read it
    return (collected.elements, collected.implicit_vr, collected.little_endian,
            collected.encoding)


def agrees(data: bytes, first: int, syntax: UID) -> bool:
    """Assert the begun check ends as the whole check, where it ends; True if it ended."""
    result = begun(data, first, syntax)
    if result in ("not begun", "not finished"):
        return False
    assert result == whole(data, syntax), f"first fragment of {first} bytes"
    return True


def test_every_real_file_ends_as_the_whole_check_ends(test_data_dir: Path) -> None:
    finished = tried = 0
    for path in dicom_files(test_data_dir):
        data, syntax = dataset_of(path)
        if syntax.is_deflated:
            continue
        for first in FRAGMENTS:
            tried += 1
            finished += agrees(data, first, syntax)
    # Most real files have all their elements before their pixel data's value, or fit in
    # the first fragment: the check ends without reading the file.
    assert finished > 0.6 * tried


def test_the_real_ct_is_finished_from_its_first_fragment(test_data_dir: Path) -> None:
    data, syntax = dataset_of(test_data_dir / "ct_abdomen_pancreas_tcia" / "1-001.dcm")
    assert len(data) > 131060  # its pixel data runs on past the first fragment
    assert agrees(data, 131060, syntax)
    assert agrees(data, 16372, syntax)


@pytest.mark.parametrize("relative", CUT_FILES)
def test_cuts_and_truncations_are_never_finished_otherwise(test_data_dir: Path,
                                                           relative: str) -> None:
    data, syntax = dataset_of(test_data_dir / relative)
    end = header_end(data, syntax)
    # The first fragment cut at every byte of the headers; the data set whole.
    finished = sum(agrees(data, first, syntax) for first in range(8, end + 1))
    # Encapsulated pixel data (undefined length) ends past its headers: never finished there.
    assert (finished == 0) == relative.endswith("NM1_JPLY_fixed.dcm")
    # The data set itself cut short (a sender's truncated data set): refused by the whole
    # check, and never finished otherwise here.
    for cut in [*range(520, end), *range(end, len(data), max(1, (len(data) - end) // 50))]:
        agrees(data[:cut], 512, syntax)


@pytest.mark.parametrize("relative", CUT_FILES)
def test_mutated_headers_end_as_the_whole_check_ends(test_data_dir: Path,
                                                     relative: str) -> None:
    data, syntax = dataset_of(test_data_dir / relative)
    finished = 0
    for mutated in mutations(data, syntax, 400, seed=100 + CUT_FILES.index(relative)):
        for first in (512, 16372, 131060):
            finished += agrees(mutated, min(first, len(mutated)), syntax)
    assert finished >= 40  # finished ones occur: the comparison is not vacuous


def test_a_value_left_unread_must_end_at_the_end(test_data_dir: Path) -> None:
    data, syntax = dataset_of(test_data_dir / "ct_abdomen_pancreas_tcia" / "1-001.dcm")
    for length in (len(data) - 2, len(data) - 1):  # pixel data cut short: refused whole
        assert begun(data[:length], 16372, syntax) == "not finished"
        assert isinstance(whole(data[:length], syntax), tuple)
    padded = data + b"\x00" * 8  # bytes after the last element
    assert begun(padded, 16372, syntax) == "not finished"
    assert isinstance(whole(padded, syntax), tuple)


def test_value_positions_are_those_of_the_buffer_the_whole_check_walks(
        test_data_dir: Path, tmp_path: Path) -> None:
    path = test_data_dir / "ct_abdomen_pancreas_tcia" / "1-001.dcm"
    raw = path.read_bytes()
    with path.open("rb") as handle:
        offset = dataset_offset(handle)
    data, syntax = raw[offset:], UID(ImplicitVRLittleEndian)
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0,
                                              access=mmap.ACCESS_READ) as mapped:
        mapped.seek(offset)
        in_file = outcome(check_complete_and_collect(mapped, syntax, TAGS))
    assert begun(data, 16372, syntax, base=offset) == in_file
    tells = {element.value_tell for element in in_file[0].values()}
    assert min(tells) > offset  # positions in the file, not in the data set


def test_a_data_set_in_one_fragment_is_finished() -> None:
    data = explicit_with(b"")
    assert agrees(data, len(data), UID(ExplicitVRLittleEndian))
    data = implicit_with(b"")
    assert agrees(data, len(data), UID(ImplicitVRLittleEndian))


def test_a_deflated_or_tiny_data_set_is_not_begun() -> None:
    assert begin_check(b"\x08\x00\x05\x00", UID(ImplicitVRLittleEndian), TAGS) is None
    assert begin_check(explicit_with(b""), UID("1.2.840.10008.1.2.1.99"), TAGS) is None


def test_the_handler_checks_the_file_where_no_check_was_begun(tmp_path: Path) -> None:
    data = explicit_with(b"")
    syntax = UID(ExplicitVRLittleEndian)
    handle = ReceiveFile(io.FileIO(tmp_path / "received", "xb"))
    handle.write(b"\0" * 132)
    handle.dataset_start = 132
    handle.write(data)
    handle.flush()
    request = SimpleNamespace(_dataset_file=handle)
    handle.begun = begin_check(data, syntax, TAGS)
    size, collected = _finish_begun_check(request, syntax)
    assert size == 132 + len(data)
    assert outcome(collected) == whole(data, syntax)
    # Another transfer syntax than the presentation context's, or a closed file: not ended.
    assert _finish_begun_check(request, UID(ImplicitVRLittleEndian)) == (0, NOT_FINISHED)
    handle.close()
    assert _finish_begun_check(request, syntax) == (0, NOT_FINISHED)
    assert _finish_begun_check(SimpleNamespace(_dataset_file=None), syntax) == (0, NOT_FINISHED)
