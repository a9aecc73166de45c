"""The worker's job function on a real database and spool: success, and a clear failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.models import AuditEvent, Delivery, Job, Result
from service.dicom.phantom import write_ct_phantom
from tests.unit.conftest import spool_series
from workers.tasks import run_analysis


def test_job_succeeds_and_a_rerun_is_dropped(
    tmp_path: Path, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    files = write_ct_phantom(tmp_path / "phantom", slices=24, rows=96, columns=96)
    job_id = spool_series(settings, session_factory, files, destinations=["PACS@127.0.0.1:104"])
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
    job_id = spool_series(settings, session_factory, files, destinations=["PACS@127.0.0.1:104"])
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


def test_a_file_error_queues_the_job_again_until_max_attempts(
    tmp_path: Path, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    """A lost shared mount (the instances cannot be read) is retried, then fails."""
    files = write_ct_phantom(tmp_path / "phantom", slices=12, rows=64, columns=64)
    job_id = spool_series(settings, session_factory, files, destinations=["PACS@127.0.0.1:104"])
    hidden = settings.spool_dir.rename(tmp_path / "unmounted")  # the NFS mount is gone
    settings.spool_dir.mkdir()
    states = [run_analysis(job_id, settings=settings, session_factory=session_factory)
              for _ in range(settings.worker.max_attempts)]
    assert states == ["pending"] * (settings.worker.max_attempts - 1) + ["failed"]
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == "failed"
        assert job.attempts == settings.worker.max_attempts
        assert job.error is not None and "No such file or directory" in job.error
        actions = [e.action for e in session.query(AuditEvent).filter_by(target_id=job_id)]
        assert actions.count("job.requeued") == settings.worker.max_attempts - 1
    # Mounted again: an operator's retry (a new job) runs on the same files.
    settings.spool_dir.rmdir()
    hidden.rename(settings.spool_dir)
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state, job.attempts = "pending", 0
        session.commit()
    assert run_analysis(job_id, settings=settings, session_factory=session_factory) \
        == "succeeded"
