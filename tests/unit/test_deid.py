"""De-identification (DICOM PS3.15 E.1) of real CT slices and of the SEG and SR made from them.

The CT is the real TCIA pancreas series; it was de-identified by TCIA, so
each copy used here is given back identifying attributes (name, birth date,
accession number, institution, descriptions with the name in them) before
the test, so that leaks can be detected. SEG and SR are made from it by
radnode's own encoders (as tests/dicom does). dciodvfy must report no error
on a de-identified object that it did not report on the original.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID_dictionary  # type: ignore[attr-defined]
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.config import DeidOptions, FolderDestination, Settings
from service.db import migrate
from service.db.models import DeidMapping
from service.db.session import make_engine, make_session_factory
from service.deid import deidentify_file, lookup, options_of, reidentify
from service.deid.mapping import DATE_SHIFT_DAYS, original_uids
from service.deid.outgoing import sent_uid
from service.delivery.dispatch import send
from tests.conftest import REPO_ROOT, missing
from tests.dicom.conftest import SEGMENTS, _threshold_masks, _volume_from_datasets
from workers.results.measure import measure_segments
from workers.results.seg import build_seg
from workers.results.sr import build_sr
from workers.results.uids import result_uid

NAME = "Doe^Jane^Quinn"
BIRTH_DATE = "19610203"
ACCESSION = "ACC98765"
INSTITUTION = "Example General Hospital"
REFERRER = "Smith^Roberta"
SLICES = slice(60, 66)

#: UIDs that identify nothing: SOP classes, transfer syntaxes, coding schemes, the implementation.
_NOT_IDENTIFYING = {"SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID",
                    "TransferSyntaxUID", "ImplementationClassUID", "CodingSchemeUID",
                    "ContextUID", "MappingResourceUID"}

Factory = sessionmaker[Session]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct_dir(ct_series_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real CT slices with identifying attributes put back."""
    folder = tmp_path_factory.mktemp("ct")
    for path in sorted(ct_series_dir.glob("*.dcm"))[SLICES]:
        ds = pydicom.dcmread(path)
        ds.PatientName = NAME
        ds.PatientBirthDate = BIRTH_DATE
        ds.AccessionNumber = ACCESSION
        ds.InstitutionName = INSTITUTION
        ds.ReferringPhysicianName = REFERRER
        ds.StudyDescription = "PANCREAS Doe follow-up"
        ds.SeriesDescription = "PANCREAS DI, iDose (3)"
        ds.save_as(folder / path.name, enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def ct_files(ct_dir: Path) -> list[Path]:
    return sorted(ct_dir.glob("*.dcm"))


@pytest.fixture(scope="module")
def results(ct_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A SEG and a TID 1500 SR made by radnode's encoders from the CT slices."""
    datasets = [pydicom.dcmread(p) for p in ct_files]
    volume = _volume_from_datasets(datasets)
    masks = _threshold_masks(volume)
    series = str(volume.datasets[0].SeriesInstanceUID)

    def uids(kind: str) -> dict[str, str]:
        return {"series_instance_uid": result_uid(series, "m", "1", kind, "series"),
                "sop_instance_uid": result_uid(series, "m", "1", kind, "instance")}

    folder = tmp_path_factory.mktemp("results")
    seg = build_seg(volume, masks, SEGMENTS, algorithm_name="m", algorithm_version="1",
                    **uids("seg"))
    seg.save_as(folder / "seg.dcm")
    sr = build_sr(hd.seg.segread(folder / "seg.dcm"), volume,
                  measure_segments(volume, masks, SEGMENTS), SEGMENTS, algorithm_name="m",
                  algorithm_version="1", **uids("sr"))
    sr.save_as(folder / "sr.dcm")
    return {"seg": folder / "seg.dcm", "sr": folder / "sr.dcm"}


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[Factory]:
    url = f"sqlite:///{tmp_path / 'radnode.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def dciodvfy() -> Callable[[Path], set[str]]:
    path = shutil.which("dciodvfy") or ("/usr/bin/dciodvfy"
                                        if Path("/usr/bin/dciodvfy").exists() else None)
    if path is None:
        missing("dciodvfy (dicom3tools) is not installed")
    assert path is not None

    def errors(file: Path) -> set[str]:
        run = subprocess.run([path, str(file)], capture_output=True, text=True, timeout=300,
                             check=False)
        lines = (run.stdout + run.stderr).splitlines()
        # values differ after de-identification; compare what is wrong, not the value
        return {re.sub(r"<[^>]*>|\[[^\]]*\]", "<>", line)
                for line in lines if line.startswith("Error")}

    return errors


def deid(factory: Factory, path: Path, options: DeidOptions | None = None,
         scope: str = "research") -> Dataset:
    with factory() as session:
        ds = deidentify_file(path, session, scope=scope, options=options or DeidOptions())
        session.commit()
    return ds


def save(ds: Dataset, path: Path) -> bytes:
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def instance_uids(ds: Dataset) -> set[str]:
    """Every UID value in the data set that identifies an instance, series, study..."""
    found: set[str] = set()

    def visit(_: Dataset, element: pydicom.DataElement) -> None:
        if element.VR == "UI" and element.keyword not in _NOT_IDENTIFYING and element.value:
            values = element.value if element.VM > 1 else [element.value]
            found.update(str(v) for v in values if str(v) not in UID_dictionary)

    ds.walk(visit)
    for element in ds.file_meta:
        if element.VR == "UI" and element.keyword not in _NOT_IDENTIFYING:
            found.add(str(element.value))
    return found


# -- the profile ------------------------------------------------------------------------------


def test_basic_profile_on_a_real_ct_slice(factory: Factory, ct_files: list[Path]) -> None:
    original = pydicom.dcmread(ct_files[0])
    assert any(e.tag.is_private for e in original)
    ds = deid(factory, ct_files[0])
    assert re.fullmatch(r"ANON-[0-9A-F]{10}", str(ds.PatientID))
    assert str(ds.PatientName) == str(ds.PatientID)
    assert ds.PatientBirthDate == "" and ds.AccessionNumber == "" and ds.PatientSex == ""
    assert ds.get("InstitutionName") in (None, "", "ANONYMIZED")
    assert ds.ReferringPhysicianName == ""
    for keyword in ("StudyDescription", "SeriesDescription", "ImageComments"):
        assert keyword not in ds, keyword  # X without Clean Descriptors
    assert ds.StudyDate == "" and ds.StudyTime == ""
    assert not any(e.tag.is_private for e in ds)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                    "FrameOfReferenceUID"):
        assert str(ds[keyword].value).startswith("2.25."), keyword
        assert ds[keyword].value != original[keyword].value
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == original.SOPClassUID
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    # TCIA's own method codes stay; the Basic Profile's is there
    codes = {(i.CodeValue, i.CodingSchemeDesignator) for i in ds.DeidentificationMethodCodeSequence}
    assert ("113100", "DCM") in codes
    assert "DICOM PS3.15 E.1 Basic Profile (radnode)" in ds.DeidentificationMethod
    assert ds.PixelData == original.PixelData
    assert ds.Manufacturer == original.Manufacturer  # not in Table E.1-1: kept


@pytest.mark.parametrize("which", ["ct", "seg", "sr"])
def test_no_original_identifier_in_the_output_bytes(
    which: str, factory: Factory, ct_files: list[Path], results: dict[str, Path],
    tmp_path: Path,
) -> None:
    path = ct_files[0] if which == "ct" else results[which]
    original = pydicom.dcmread(path)
    data = save(deid(factory, path), tmp_path / "out.dcm")
    identifiers = {NAME, *NAME.split("^"), "Doe", BIRTH_DATE, ACCESSION, INSTITUTION,
                   *REFERRER.split("^"), str(original.PatientID), "PANCREAS",
                   "Doe follow-up", "iDose"}
    for identifier in identifiers:
        assert identifier.encode() not in data, identifier
    uids = instance_uids(original)
    assert len(uids) >= (3 if which == "ct" else 8)
    for uid in uids:
        assert uid.encode() not in data, uid


@pytest.mark.parametrize("which", ["ct", "seg", "sr"])
def test_dciodvfy_finds_no_new_error(
    which: str, factory: Factory, ct_files: list[Path], results: dict[str, Path],
    dciodvfy: Callable[[Path], set[str]], tmp_path: Path,
) -> None:
    path = ct_files[0] if which == "ct" else results[which]
    out = tmp_path / "out.dcm"
    save(deid(factory, path), out)
    before, after = dciodvfy(path), dciodvfy(out)
    assert after - before == set(), sorted(after - before)
    for options in (DeidOptions(retain_longitudinal="modified", clean_descriptors=True),
                    DeidOptions(retain_longitudinal="full")):
        save(deid(factory, path, options), out)
        assert dciodvfy(out) - before == set(), options


def test_sr_content_keeps_its_structure(factory: Factory, results: dict[str, Path]) -> None:
    original = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(results["sr"]))
    ds = deid(factory, results["sr"])
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    groups = sr.content.get_planar_roi_measurement_groups() + \
        sr.content.get_volumetric_roi_measurement_groups()
    before = original.content.get_planar_roi_measurement_groups() + \
        original.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(before) > 0
    values = [m.value for g in groups for m in g.get_measurements()]
    assert values == [m.value for g in before for m in g.get_measurements()]


# -- options ----------------------------------------------------------------------------------


def test_retain_longitudinal_full_keeps_dates(factory: Factory, ct_files: list[Path]) -> None:
    original = pydicom.dcmread(ct_files[0])
    ds = deid(factory, ct_files[0], DeidOptions(retain_longitudinal="full"))
    for keyword in ("StudyDate", "StudyTime", "SeriesDate", "AcquisitionDate", "ContentTime"):
        assert ds[keyword].value == original[keyword].value, keyword
    assert ds.PatientBirthDate == ""  # not part of the option
    assert ds.LongitudinalTemporalInformationModified == original.get(
        "LongitudinalTemporalInformationModified", "UNMODIFIED")
    codes = {i.CodeValue for i in ds.DeidentificationMethodCodeSequence}
    assert {"113100", "113106"} <= codes


def test_retain_longitudinal_modified_shifts_per_patient(
    factory: Factory, ct_files: list[Path], results: dict[str, Path]
) -> None:
    from datetime import date

    options = DeidOptions(retain_longitudinal="modified")
    shifts = set()
    for path in (ct_files[0], ct_files[3], results["seg"]):
        original = pydicom.dcmread(path)
        ds = deid(factory, path, options)
        before = date.fromisoformat(f"{original.StudyDate[:4]}-{original.StudyDate[4:6]}-"
                                    f"{original.StudyDate[6:]}")
        after = date.fromisoformat(f"{ds.StudyDate[:4]}-{ds.StudyDate[4:6]}-{ds.StudyDate[6:]}")
        shifts.add((after - before).days)
        assert ds.StudyTime == original.StudyTime  # times kept
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert len(shifts) == 1
    shift = shifts.pop()
    assert DATE_SHIFT_DAYS[0] <= shift <= DATE_SHIFT_DAYS[1]


def test_clean_descriptors_keeps_descriptions_without_identifiers(
    factory: Factory, ct_files: list[Path]
) -> None:
    ds = deid(factory, ct_files[0], DeidOptions(clean_descriptors=True))
    assert ds.SeriesDescription == "PANCREAS DI, iDose (3)"
    assert ds.StudyDescription == "PANCREAS follow-up"  # the patient's name taken out
    assert ds.ImageComments == "PANCREAS DI"
    assert "113105" in {i.CodeValue for i in ds.DeidentificationMethodCodeSequence}


def test_config_deidentify_true_and_options() -> None:
    settings = Settings(destinations=[
        {"kind": "folder", "name": "research", "path": "/tmp/x", "deidentify": True},
        {"name": "trial", "ae_title": "TRIAL", "host": "h", "port": 104,
         "deidentify": {"retain_longitudinal": "modified", "clean_descriptors": True,
                        "scope": "trial-7"}},
        {"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104},
    ])
    research, trial, pacs = settings.destinations
    assert options_of(research.deidentify) == DeidOptions()
    options = options_of(trial.deidentify)
    assert options is not None and options.retain_longitudinal == "modified"
    assert options.scope == "trial-7" and options.clean_descriptors
    assert options_of(pacs.deidentify) is None
    with pytest.raises(ValueError):
        DeidOptions(retain_longitudinal="sometimes")  # type: ignore[arg-type]


# -- the mapping ------------------------------------------------------------------------------


def test_same_object_every_time_and_in_another_process(
    factory: Factory, ct_files: list[Path], tmp_path: Path
) -> None:
    first = save(deid(factory, ct_files[0]), tmp_path / "a.dcm")
    second = save(deid(factory, ct_files[0]), tmp_path / "b.dcm")
    assert first == second  # a retry sends the identical object
    other_scope = deid(factory, ct_files[0], scope="other")
    assert other_scope.SOPInstanceUID != pydicom.dcmread(tmp_path / "a.dcm").SOPInstanceUID
    assert other_scope.PatientID != pydicom.dcmread(tmp_path / "a.dcm").PatientID
    with factory() as session:
        url = str(session.get_bind().url)
    code = ("import sys; from pathlib import Path; from service.db.session import "
            "make_engine, make_session_factory; from service.config import DeidOptions; "
            "from service.deid import deidentify_file; "
            "s = make_session_factory(make_engine(sys.argv[1]))(); "
            "ds = deidentify_file(Path(sys.argv[2]), s, scope='research', options=DeidOptions()); "
            "s.commit(); print(ds.SOPInstanceUID, ds.StudyInstanceUID, ds.PatientID)")
    run = subprocess.run([sys.executable, "-c", code, url, str(ct_files[0])], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120, check=True)
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    assert run.stdout.split() == [ds.SOPInstanceUID, ds.StudyInstanceUID, ds.PatientID]


def test_concurrent_senders_get_one_pseudonym(factory: Factory, ct_files: list[Path]) -> None:
    seen: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(path: Path) -> None:
        try:
            barrier.wait()
            ds = deid(factory, path, scope="race")
            seen.append((str(ds.StudyInstanceUID), str(ds.PatientID)))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in ct_files[:4]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert len(set(seen)) == 1 and len(seen) == 4
    with factory() as session:
        count = session.scalar(select(func.count()).select_from(DeidMapping).where(
            DeidMapping.scope == "race", DeidMapping.kind == "patient"))
        studies = session.scalar(select(func.count()).select_from(DeidMapping).where(
            DeidMapping.scope == "race", DeidMapping.pseudonym == seen[0][0]))
    assert count == 1 and studies == 1


def test_seg_references_the_pseudonyms_of_its_sources(
    factory: Factory, ct_files: list[Path], results: dict[str, Path]
) -> None:
    sources = [deid(factory, p) for p in ct_files]  # e.g. `radnode deid export`
    seg = deid(factory, results["seg"])
    source_uids = {str(s.SOPInstanceUID) for s in sources}
    series = {str(s.SeriesInstanceUID) for s in sources}
    assert len(series) == 1 and len(source_uids) == len(ct_files)
    referenced = seg.ReferencedSeriesSequence[0]
    assert str(referenced.SeriesInstanceUID) in series
    assert {str(i.ReferencedSOPInstanceUID)
            for i in referenced.ReferencedInstanceSequence} == source_uids
    assert {str(i.ReferencedSOPInstanceUID) for i in seg.SourceImageSequence} == source_uids
    per_frame = {str(s.ReferencedSOPInstanceUID)
                 for frame in seg.PerFrameFunctionalGroupsSequence
                 for d in frame.DerivationImageSequence for s in d.SourceImageSequence}
    assert per_frame and per_frame <= source_uids
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.PatientID == sources[0].PatientID
    sr = deid(factory, results["sr"])
    assert sr.StudyInstanceUID == seg.StudyInstanceUID
    assert str(seg.SOPInstanceUID) in str(sr.ContentSequence)
    evidence = {str(i.ReferencedSOPInstanceUID)
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series_item in study.ReferencedSeriesSequence
                for i in series_item.ReferencedSOPSequence}
    assert evidence & source_uids and evidence <= source_uids | {str(seg.SOPInstanceUID)}


def test_reidentify_restores_uids_and_patient(
    factory: Factory, results: dict[str, Path]
) -> None:
    original = pydicom.dcmread(results["seg"])
    ds = deid(factory, results["seg"])
    pseudonym = str(ds.SOPInstanceUID)
    with factory() as session:
        assert reidentify(session, ds)
        found = lookup(session, None, pseudonym)
        by_patient = lookup(session, "research", str(deid(factory, results["seg"]).PatientID))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                    "FrameOfReferenceUID"):
        assert ds[keyword].value == original[keyword].value, keyword
    assert ds.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert [str(i.ReferencedSOPInstanceUID) for i in ds.SourceImageSequence] == \
        [str(i.ReferencedSOPInstanceUID) for i in original.SourceImageSequence]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                    "PatientSex", "StudyDate", "ReferringPhysicianName"):
        assert ds[keyword].value == original[keyword].value, keyword
    assert found is not None and found.original == original.SOPInstanceUID
    assert found.scope == "research" and found.kind == "uid"
    assert by_patient is not None and by_patient.original == original.PatientID
    unknown = pydicom.dcmread(results["sr"])
    with factory() as session:
        assert not reidentify(session, unknown)  # not a pseudonym: unchanged
    assert unknown.StudyInstanceUID == original.StudyInstanceUID


def test_reidentify_a_new_object_about_the_deidentified_study(
    factory: Factory, results: dict[str, Path]
) -> None:
    """A reader's new object keeps its own UIDs and gets the patient back."""
    original = pydicom.dcmread(results["sr"])
    ds = deid(factory, results["sr"], DeidOptions(retain_longitudinal="modified"))
    ds.SOPInstanceUID = "2.25.1234567"
    with factory() as session:
        assert reidentify(session, ds)
    assert ds.SOPInstanceUID == "2.25.1234567"
    assert ds.StudyInstanceUID == original.StudyInstanceUID
    assert ds.PatientName == original.PatientName
    assert ds.ContentDate == original.ContentDate  # shifted back


# -- sending ----------------------------------------------------------------------------------


def test_send_to_a_deidentifying_folder(
    factory: Factory, ct_files: list[Path], results: dict[str, Path], tmp_path: Path
) -> None:
    target = tmp_path / "out"
    target.mkdir()
    destination = FolderDestination(kind="folder", name="research", path=target,
                                    deidentify=True)
    settings = Settings(data_dir=tmp_path / "data", destinations=[destination])
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom")
    before = results["seg"].read_bytes()
    with factory() as session:
        outcomes = send(settings, destination, [results["seg"], bad, results["sr"]],
                        session=session)
        seg_uid = sent_uid(session, destination,
                           str(pydicom.dcmread(results["seg"]).SOPInstanceUID))
        back = original_uids(session, [o.sop_instance_uid for o in outcomes if o.ok])
    assert [o.ok for o in outcomes] == [True, False, True]
    assert outcomes[1].permanent and outcomes[1].path == bad
    assert outcomes[0].path == results["seg"]
    assert outcomes[0].sop_instance_uid == seg_uid and seg_uid.startswith("2.25.")
    assert back[seg_uid] == pydicom.dcmread(results["seg"]).SOPInstanceUID
    written = sorted(target.rglob("*.dcm"))
    assert len(written) == 2
    for path in written:
        data = path.read_bytes()
        assert NAME.encode() not in data and ACCESSION.encode() not in data
    assert results["seg"].read_bytes() == before  # the result itself stays identified
    assert list((tmp_path / "data" / "deid-outbox").iterdir()) == []  # temporary copies gone
    with pytest.raises(ValueError):
        send(settings, destination, [results["seg"]])


def test_storage_commitment_names_the_pseudonym(
    factory: Factory, results: dict[str, Path], tmp_path: Path
) -> None:
    """The commitment request names the UID sent; the report is mapped back to the result."""
    from pydicom.uid import generate_uid

    from service.db.models import Delivery, Job, Result, Series
    from service.db.session import utcnow
    from service.delivery.commitment import CommitmentReport, record_report

    destination = FolderDestination(kind="folder", name="research", path=tmp_path,
                                     deidentify=True)
    settings = Settings(data_dir=tmp_path / "data", destinations=[destination])
    original = pydicom.dcmread(results["seg"])
    now = utcnow()
    with factory() as session:
        outcome, = send(settings, destination, [results["seg"]], session=session)
        assert outcome.ok
        series = Series(series_instance_uid=generate_uid(), study_instance_uid=generate_uid(),
                        first_received_at=now, last_received_at=now)
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, task_name="t", queue="gpu", model_name="m",
                  created_at=now)
        session.add(job)
        session.flush()
        result = Result(job_id=job.id, kind="SEG", sop_class_uid=str(original.SOPClassUID),
                        sop_instance_uid=str(original.SOPInstanceUID),
                        series_instance_uid=str(original.SeriesInstanceUID),
                        path=str(results["seg"]), created_at=now)
        session.add(result)
        session.flush()
        delivery = Delivery(result_id=result.id, destination="research", state="sent",
                            transaction_uid="2.25.42", created_at=now, next_attempt_at=now)
        session.add(delivery)
        session.commit()
        uid = sent_uid(session, destination, str(original.SOPInstanceUID))
        assert uid == outcome.sop_instance_uid != original.SOPInstanceUID
        assert record_report(CommitmentReport("2.25.42", [uid]), session=session,
                             now=now) == (1, 0)
        session.commit()
        assert delivery.state == "committed"
