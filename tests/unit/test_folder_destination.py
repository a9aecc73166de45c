"""Folder destinations: durable copies at <Study>/<Series>/<SOP>.dcm, nothing outside the folder."""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread

from service.config import FolderDestination
from service.delivery.folder import write_files
from tests.unit.dicom_factory import write_ct_file


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".incoming-")]


def _expected(folder: Path, path: Path) -> Path:
    ds = dcmread(path, stop_before_pixels=True)
    return folder / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


@pytest.fixture
def destination(tmp_path: Path) -> FolderDestination:
    out = tmp_path / "out"
    out.mkdir()
    return FolderDestination(kind="folder", name="scripts", path=out)


def test_files_land_at_uid_paths_with_identical_bytes(
    destination: FolderDestination, tmp_path: Path, test_data_dir: Path
) -> None:
    source = tmp_path / "src"
    synthetic = [
        write_ct_file(source / f"{name}.dcm", study_uid="1.2.3", series_uid=series, sop_uid=sop)
        for name, series, sop in [("a", "1.2.3.4", "1.2.3.4.1"), ("b", "1.2.3.4", "1.2.3.4.2"),
                                  ("c", "1.2.3.5", "1.2.3.5.1")]
    ]
    real = [test_data_dir / "seg_sr" / "dcmqi_ct_liver_seg" / "liver.dcm",
            test_data_dir / "transfer_syntaxes" / "dcm_qa_ts" / "9.dcm"]  # SEG; JPEG 2000
    paths = [*synthetic, *real]

    outcomes = write_files(destination, paths)

    assert [o.path for o in outcomes] == paths
    assert [(o.ok, o.status, o.error, o.unreachable, o.permanent) for o in outcomes] == [
        (True, 0x0000, None, False, False)] * len(paths)
    assert (destination.path / "1.2.3" / "1.2.3.4" / "1.2.3.4.1.dcm").read_bytes() == \
        synthetic[0].read_bytes()
    for path, outcome in zip(paths, outcomes, strict=True):
        target = _expected(destination.path, path)
        assert target.read_bytes() == path.read_bytes()
        assert outcome.sop_instance_uid == target.stem
    written = sorted(p for p in destination.path.rglob("*") if p.is_file())
    assert len(written) == len(paths)
    assert _leftovers(destination.path) == []


def test_writing_again_replaces_the_file(destination: FolderDestination, tmp_path: Path) -> None:
    path = write_ct_file(tmp_path / "a.dcm", study_uid="1.2.3", series_uid="1.2.3.4",
                         sop_uid="1.2.3.4.1")
    assert write_files(destination, [path])[0].ok
    (again,) = write_files(destination, [path])
    assert again.ok
    target = destination.path / "1.2.3" / "1.2.3.4" / "1.2.3.4.1.dcm"
    assert target.read_bytes() == path.read_bytes()
    assert [p for p in destination.path.rglob("*") if p.is_file()] == [target]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
@pytest.mark.parametrize("bad", ["../x", "../../etc", "/tmp/abs", "1.2.3/../../x", ""])
def test_a_uid_that_is_not_a_uid_is_refused(
    destination: FolderDestination, tmp_path: Path, keyword: str, bad: str
) -> None:
    path = write_ct_file(tmp_path / "src" / "good.dcm", study_uid="1.2.3", series_uid="1.2.3.4",
                         sop_uid="1.2.3.4.1")
    ds = dcmread(path)
    crafted = tmp_path / "src" / "crafted.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UI value
        setattr(ds, keyword, bad)
        ds.save_as(crafted)

    (outcome,) = write_files(destination, [crafted])

    assert not outcome.ok
    assert outcome.status is None
    assert outcome.permanent and not outcome.unreachable
    assert outcome.error is not None
    assert ("is missing" if bad == "" else "is not a valid UID") in outcome.error
    assert ".." not in outcome.sop_instance_uid and "/" not in outcome.sop_instance_uid
    assert list(destination.path.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # nothing beside it


def test_unreadable_and_non_dicom_files_fail_with_an_error(
    destination: FolderDestination, tmp_path: Path
) -> None:
    good = write_ct_file(tmp_path / "good.dcm")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom" * 50)
    missing = tmp_path / "missing.dcm"

    outcomes = write_files(destination, [junk, good, missing])

    assert [o.path for o in outcomes] == [junk, good, missing]
    assert outcomes[1].ok
    for outcome in (outcomes[0], outcomes[2]):
        assert outcome.status is None and not outcome.ok
        assert outcome.error and outcome.error.startswith("cannot read file")
        assert not outcome.unreachable
    assert "InvalidDicomError" in str(outcomes[0].error)
    assert "FileNotFoundError" in str(outcomes[2].error)


def test_missing_folder_is_unreachable_and_not_created(tmp_path: Path) -> None:
    path = write_ct_file(tmp_path / "a.dcm")
    gone = tmp_path / "unmounted" / "share"
    outcomes = write_files(FolderDestination(kind="folder", name="x", path=gone), [path, path])
    assert len(outcomes) == 2
    for outcome in outcomes:
        assert outcome.unreachable and not outcome.permanent and outcome.status is None
        assert outcome.error and str(gone) in outcome.error and "does not exist" in outcome.error
        assert outcome.sop_instance_uid  # read from the file
    assert not (tmp_path / "unmounted").exists()


def test_folder_that_is_a_file_is_unreachable(tmp_path: Path) -> None:
    path = write_ct_file(tmp_path / "a.dcm")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    (outcome,) = write_files(FolderDestination(kind="folder", name="x", path=not_a_folder), [path])
    assert outcome.unreachable and outcome.error and "not a folder" in outcome.error


def test_write_error_is_unreachable_with_the_reason(
    destination: FolderDestination, tmp_path: Path
) -> None:
    # Works as root too: a file where the study folder should be cannot become a folder.
    path = write_ct_file(tmp_path / "a.dcm", study_uid="1.2.3", series_uid="1.2.3.4")
    (destination.path / "1.2.3").write_text("in the way")
    (outcome,) = write_files(destination, [path])
    assert outcome.unreachable and not outcome.permanent and outcome.status is None
    assert outcome.error is not None and str(destination.path) in outcome.error
    assert "Not a directory" in outcome.error or "File exists" in outcome.error
    assert _leftovers(destination.path) == []


def test_disk_full_is_unreachable_and_leaves_no_temporary_file(
    destination: FolderDestination, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = write_ct_file(tmp_path / "a.dcm", study_uid="1.2.3", series_uid="1.2.3.4")
    second = write_ct_file(tmp_path / "b.dcm", study_uid="1.2.3", series_uid="1.2.3.4")
    assert write_files(destination, [first])[0].ok

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdatasync", full)
    (outcome,) = write_files(destination, [second])

    assert outcome.unreachable and not outcome.ok
    assert outcome.error and "No space left on device" in outcome.error
    assert not _expected(destination.path, second).exists()
    assert _expected(destination.path, first).read_bytes() == first.read_bytes()
    assert _leftovers(destination.path) == []
