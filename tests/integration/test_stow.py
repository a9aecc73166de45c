"""STOW-RS delivery against a real Orthanc with its DICOMweb plugin (no mocks)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from service.config import StowDestination
from service.delivery.stow import stow_files
from tests.peers import OrthancPeer, free_port, orthanc

pytestmark = pytest.mark.integration

USERS = {"radnode": "s3cret-pw"}


@pytest.fixture(scope="module")
def shared_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    """One Orthanc for the module (it takes ~3 s to stop)."""
    with orthanc(tmp_path_factory.mktemp("stow"), users=USERS) as peer:
        yield peer


@pytest.fixture
def pacs(shared_pacs: OrthancPeer) -> OrthancPeer:
    """The shared Orthanc, emptied for this test."""
    shared_pacs.clear()
    assert shared_pacs.instances() == []
    return shared_pacs


@pytest.fixture
def seg_and_ct(test_data_dir: Path) -> list[Path]:
    """A dcmqi liver SEG and one slice of the CT it segments."""
    folder = test_data_dir / "seg_sr" / "dcmqi_ct_liver_seg"
    return [folder / "liver.dcm", folder / "ct_3slice" / "01.dcm"]


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_stow_seg_and_ct_with_basic_auth(pacs: OrthancPeer, seg_and_ct: list[Path]) -> None:
    outcomes = stow_files(pacs.stow_destination(), seg_and_ct)

    assert [o.path for o in outcomes] == seg_and_ct
    for outcome, path in zip(outcomes, seg_and_ct, strict=True):
        assert outcome.ok, outcome
        assert outcome.status == 0x0000
        assert outcome.error is None
        assert outcome.sop_instance_uid == uid_of(path)
        assert pacs.has_instance(outcome.sop_instance_uid)
    assert sorted(pacs.instances()) == sorted(uid_of(p) for p in seg_and_ct)

    # Sending the same instances again is harmless (Orthanc keeps the first copy).
    again = stow_files(pacs.stow_destination(), seg_and_ct)
    assert all(o.ok for o in again)
    assert len(pacs.instances()) == 2


def test_many_files_in_several_requests(pacs: OrthancPeer, ct_series_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from service.delivery import stow

    monkeypatch.setattr(stow, "MAX_BATCH_FILES", 4)  # 10 files -> 3 requests
    files = sorted(ct_series_dir.glob("*.dcm"))[:10]
    outcomes = stow_files(pacs.stow_destination(), files)
    assert [o.path for o in outcomes] == files
    assert all(o.ok for o in outcomes), outcomes
    assert sorted(pacs.instances()) == sorted(uid_of(p) for p in files)


def test_wrong_password_is_a_clear_error(pacs: OrthancPeer, seg_and_ct: list[Path]) -> None:
    outcomes = stow_files(pacs.stow_destination("radnode", "wrong"), seg_and_ct)

    assert len(outcomes) == 2
    for outcome in outcomes:
        assert not outcome.ok
        assert outcome.status is None
        assert outcome.error == "authentication failed (HTTP 401)"
        assert not outcome.unreachable
        assert not outcome.permanent
    assert pacs.instances() == []


def test_unreachable_server(tmp_path: Path, seg_and_ct: list[Path]) -> None:
    closed = StowDestination(kind="stow", name="nobody", timeout_s=5,
                             url=f"http://127.0.0.1:{free_port()}/dicom-web")
    outcomes = stow_files(closed, seg_and_ct)

    assert len(outcomes) == 2
    for outcome in outcomes:
        assert not outcome.ok
        assert outcome.unreachable
        assert outcome.error is not None and "cannot reach the server" in outcome.error


def test_wrong_service_root(pacs: OrthancPeer, seg_and_ct: list[Path]) -> None:
    wrong = StowDestination(kind="stow", name="wrong-root", url=f"{pacs.url}/not-dicom-web",
                            username="radnode", password=USERS["radnode"])
    outcomes = stow_files(wrong, seg_and_ct[:1])
    assert not outcomes[0].ok
    assert not outcomes[0].unreachable
    assert outcomes[0].error is not None and outcomes[0].error.startswith("HTTP 404")


def test_file_that_is_not_dicom(pacs: OrthancPeer, test_data_dir: Path,
                                seg_and_ct: list[Path]) -> None:
    readme = test_data_dir / "README.md"
    paths = [seg_and_ct[0], readme, seg_and_ct[1]]
    outcomes = stow_files(pacs.stow_destination(), paths)

    assert [o.path for o in outcomes] == paths
    assert outcomes[0].ok and outcomes[2].ok
    assert not outcomes[1].ok
    assert outcomes[1].status is None
    assert outcomes[1].error is not None and "not a DICOM" in outcomes[1].error
    assert outcomes[1].permanent
    assert len(pacs.instances()) == 2


def test_instance_refused_by_the_server(pacs: OrthancPeer, seg_and_ct: list[Path]) -> None:
    """POST to another study: Orthanc answers 409 with a Failed SOP Sequence.

    Orthanc 1.10 sends that body without a Content-Type; its Failure Reason
    is 0x0110 (processing failure), which may pass: not permanent.
    """
    outcomes = stow_files(pacs.stow_destination(), seg_and_ct[:1],
                          study_instance_uid="1.2.826.0.1.3680043.8.498.1")

    outcome = outcomes[0]
    assert not outcome.ok
    assert not outcome.unreachable
    assert outcome.status == 0x0110
    assert not outcome.permanent
    assert outcome.error is not None and "0x0110" in outcome.error
    assert pacs.instances() == []
