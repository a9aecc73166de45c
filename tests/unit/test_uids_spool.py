from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from pydicom.uid import UID, generate_uid

from service.dicom import spool
from service.dicom.uids import is_valid_uid, require_uid
from service.errors import InvalidInstanceError

GOOD_UIDS = [
    "1.2.840.10008.5.1.4.1.1.2",
    "0",
    "1.0.2",
    "2.25.329800735698586629295641978511506172918",
    "1." + "2" * 62,  # exactly 64 characters
]


@pytest.mark.parametrize("uid", GOOD_UIDS)
def test_require_uid_accepts_valid(uid: str) -> None:
    assert len(uid) <= 64
    assert require_uid(uid, "SOP Instance UID") == uid
    assert is_valid_uid(uid)


def test_require_uid_accepts_pydicom_uid_and_strips_padding() -> None:
    uid = generate_uid()
    assert require_uid(UID(uid), "Series Instance UID") == uid
    # UI values are padded with NUL to an even length on the wire.
    assert require_uid(uid + "\x00", "Series Instance UID") == uid
    assert isinstance(require_uid(UID(uid), "x"), str)


BAD_UIDS = [
    "../../x",
    "1.2.03",            # leading zero in a component
    "1." + "2" * 63,     # 65 characters
    "1.2.",              # empty last component
    ".1.2",
    "1..2",
    "1.2.abc",
    "1.2/3",
    "1.2 .3",
    "SECRET^PATIENT",
]


@pytest.mark.parametrize("value", BAD_UIDS)
def test_require_uid_rejects_invalid_without_echoing(value: str) -> None:
    with pytest.raises(InvalidInstanceError) as info:
        require_uid(value, "Study Instance UID")
    assert info.value.status == 0xC000
    message = str(info.value)
    assert "Study Instance UID" in message
    assert value not in message
    assert not is_valid_uid(value)


@pytest.mark.parametrize("value", ["", None])
def test_require_uid_rejects_missing(value: object) -> None:
    with pytest.raises(InvalidInstanceError, match="missing") as info:
        require_uid(value, "SOP Instance UID")
    assert info.value.status == 0xC000


def test_is_valid_uid_rejects_non_strings() -> None:
    assert not is_valid_uid(123)
    assert not is_valid_uid(b"1.2.3")
    assert not is_valid_uid(None)


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".incoming-")]


def test_relative_path_layout() -> None:
    assert spool.relative_path("1.2", "1.2.3", "1.2.3.4") == "1.2/1.2.3/1.2.3.4.dcm"


def test_write_durably_writes_content(tmp_path: Path) -> None:
    target = tmp_path / "spool" / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    data = bytes(range(256)) * 41
    written = spool.write_durably(target, data)
    assert written == len(data)
    assert target.read_bytes() == data
    assert _temp_files(tmp_path) == []
    assert sorted(p.name for p in target.parent.iterdir()) == ["1.2.3.4.dcm"]


def test_write_durably_replaces_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.dcm"
    spool.write_durably(target, b"first version, longer than the second")
    spool.write_durably(target, b"second")
    assert target.read_bytes() == b"second"
    assert _temp_files(tmp_path) == []


def test_write_durably_failure_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "spool" / "1.2" / "1.2.3.dcm"
    target.mkdir(parents=True)  # a directory where the file should go
    (target / "keep").write_bytes(b"x")
    with pytest.raises(OSError):
        spool.write_durably(target, b"data")
    assert _temp_files(tmp_path) == []
    assert sorted(p.name for p in target.parent.iterdir()) == ["1.2.3.dcm"]
    assert target.is_dir()
    assert (target / "keep").read_bytes() == b"x"


def test_write_durably_failure_when_parent_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "spool"
    blocker.write_bytes(b"not a folder")
    with pytest.raises(OSError):
        spool.write_durably(blocker / "1.2" / "1.2.3.dcm", b"data")
    assert blocker.read_bytes() == b"not a folder"
    assert _temp_files(tmp_path) == []


def test_adopt_on_the_spool_file_system_keeps_the_received_file(tmp_path: Path) -> None:
    received = tmp_path / ".incoming" / "tmpabc.dcm"
    received.parent.mkdir()
    received.write_bytes(b"DICM instance")
    target = tmp_path / "study" / "series" / "sop.dcm"
    adopted = spool.adopt(received, target)
    assert adopted == received  # no second file is created beside the target
    assert list(target.parent.iterdir()) == []
    spool.move_into_place(adopted, target, root=tmp_path)
    assert target.read_bytes() == b"DICM instance"
    assert not received.exists()


def test_adopt_from_another_file_system_copies(tmp_path: Path) -> None:
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system (/dev/shm) on this machine")
    received = other / f"radnode-test-{generate_uid()}.dcm"
    received.write_bytes(b"DICM instance")
    try:
        target = tmp_path / "series" / "sop.dcm"
        adopted = spool.adopt(received, target)
        assert adopted.parent == target.parent and adopted.name.startswith(".incoming-")
        spool.move_into_place(adopted, target)
        assert target.read_bytes() == b"DICM instance"
    finally:
        received.unlink(missing_ok=True)


def test_start_writeback_accepts_a_read_only_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "received.dcm"
    path.write_bytes(b"\0" * 300_000)
    if sys.platform.startswith("linux"):
        assert spool._sync_file_range() is not None  # found in the C library
    with path.open("rb") as handle:
        spool.start_writeback(handle.fileno())
        os.fdatasync(handle.fileno())
    assert path.read_bytes() == b"\0" * 300_000


def test_start_writeback_ignores_a_closed_descriptor(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "x", os.O_CREAT | os.O_WRONLY)
    os.close(fd)
    spool.start_writeback(fd)  # only a hint: never raises
