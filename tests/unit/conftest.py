"""Fixtures and helpers shared by the unit tests that use a real SQLite database."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service import scheduler
from service.config import Settings, load_settings
from service.db import migrate, repository
from service.db.session import make_engine, make_session_factory

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
DESTINATIONS = ["PACS@10.0.0.5:104", "ARCHIVE@10.0.0.6:11112"]
#: Their names (the AE titles), as jobs and deliveries record them.
DESTINATION_NAMES = ["PACS", "ARCHIVE"]


@pytest.fixture
def session_factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'radnode.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def either_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    """A migrated, empty database: SQLite in ``tmp_path``, then PostgreSQL (one test each)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'radnode.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    migrate.upgrade(url)
    engine = make_engine(url)
    request.addfinalizer(engine.dispose)
    return engine


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    for name in list(os.environ):
        if name.upper().startswith("RADNODE_"):
            monkeypatch.delenv(name)
    return load_settings(data_dir=tmp_path, destinations=DESTINATIONS)


class Clock:
    """The scheduler's notion of "now", set by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def at(self, seconds: float) -> None:
        self.now = T0 + timedelta(seconds=seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock(T0)
    monkeypatch.setattr(scheduler, "utcnow", fake)
    return fake


def record(factory: sessionmaker[Session], *, series_uid: str, modality: str,
           at: datetime, study_uid: str = "1.2.3", sop_uid: str | None = None,
           calling_ae: str = "MODALITY") -> bool:
    sop = sop_uid or generate_uid()
    with factory() as session:
        new = repository.record_instance(
            session=session, study_instance_uid=study_uid, series_instance_uid=series_uid,
            sop_instance_uid=sop,
            sop_class_uid=CTImageStorage if modality == "CT" else MRImageStorage,
            transfer_syntax_uid=ExplicitVRLittleEndian, modality=modality,
            path=f"{study_uid}/{series_uid}/{sop}.dcm", size_bytes=1000,
            calling_ae_title=calling_ae, called_ae_title="RADNODE", peer_address="10.1.2.3",
            received_at=at,
        )
        session.commit()
    return new


def spool_series(settings: Settings, factory: sessionmaker[Session], files: list[Path], *,
                 destinations: Sequence[str] = ("PACS",)) -> int:
    """Put DICOM ``files`` (one CT series) into the spool and database; return a queued job's id.

    The series is marked complete and has one ``radnode-builtin-ct`` job to
    ``destinations``, ready for :func:`workers.tasks.run_analysis`.
    """
    import pydicom

    from service.queue import ANALYSE_SERIES

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
        series.state = "complete"
        job = repository.add_job(session=session, series=series, task_name=ANALYSE_SERIES,
                                 queue="gpu", model_name="radnode-builtin-ct",
                                 destinations=list(destinations), now=T0)
        job.state = "queued"
        session.commit()
        return job.id
