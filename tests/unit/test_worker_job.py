"""The worker's job function on a real database and spool: success, and a clear failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db import repository
from service.db.models import Delivery, Job, Result
from service.dicom.phantom import write_ct_phantom
from tests.unit.conftest import T0
from workers.tasks import run_analysis


def _spool_series(settings: Settings, factory: sessionmaker[Session], files: list[Path]) -> int:
    for path in files:
        ds = pydicom.dcmread(path)
        relative = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        target = settings.spool_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
        with factory() as session:
            repository.record_instance(
                session=session, study_instance_uid=ds.StudyInstanceUID,
                series_instance_uid=ds.SeriesInstanceUID, sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                modality="CT", path=relative, size_bytes=target.stat().st_size,
                calling_ae_title="CT", received_at=T0)
            session.commit()
    with factory() as session:
        series = repository.series_by_uid(str(ds.SeriesInstanceUID), session=session)
        assert series is not None
        job = repository.add_job(session=session, series=series,
                                 task_name="radnode.analyse_series", queue="gpu",
                                 model_name="radnode-builtin-ct",
                                 destinations=["PACS@127.0.0.1:104"], now=T0)
        job.state = "queued"
        session.commit()
        return job.id


def test_job_succeeds_and_a_rerun_is_dropped(
    tmp_path: Path, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    files = write_ct_phantom(tmp_path / "phantom", slices=24, rows=96, columns=96)
    job_id = _spool_series(settings, session_factory, files)
    assert run_analysis(job_id, settings=settings, session_factory=session_factory) == "succeeded"
    # The same message delivered twice: the job is not run again.
    assert run_analysis(job_id, settings=settings, session_factory=session_factory) == "succeeded"
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.attempts == 1 and job.model_version == "1.0.0"
        results = session.query(Result).all()
        assert sorted(r.kind for r in results) == ["SEG", "SR"]
        assert all(Path(r.path).is_file() for r in results)
        assert [d.state for d in session.query(Delivery)] == ["pending", "pending"]


def test_series_without_geometry_fails_with_a_clear_reason(
    tmp_path: Path, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    files = write_ct_phantom(tmp_path / "phantom", slices=12, rows=64, columns=64)
    for path in files:
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path, enforce_file_format=True)
    job_id = _spool_series(settings, session_factory, files)
    assert run_analysis(job_id, settings=settings, session_factory=session_factory) == "failed"
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == "failed" and job.finished_at is not None
        assert job.error is not None
        assert job.error.startswith("VolumeError")
        assert "Image Position" in job.error or "ImagePositionPatient" in job.error
        assert session.query(Result).count() == 0
    # The data is kept.
    assert len(list(settings.spool_dir.rglob("*.dcm"))) == len(files)
    # And the reason is shown to the operator.
    shown = subprocess.run(
        [sys.executable, "-m", "service.cli", "jobs", "--data-dir", str(settings.data_dir)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "COLUMNS": "400"})
    assert shown.returncode == 0, shown.stderr
    assert "failed" in shown.stdout and "VolumeError" in shown.stdout
