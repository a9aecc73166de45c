"""record_instance's prebuilt statements (the C-STORE path) on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from service.db import repository
from service.db.models import Instance, Series
from service.db.session import make_session_factory
from tests.unit.conftest import T0

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


@pytest.fixture
def factory(either_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(either_engine)


def _record(factory: sessionmaker[Session], series_uid: str, sop_uid: str, *,
            seconds: float = 0, expected: int | None = None, calling: str = "CT1") -> bool:
    with factory() as session:
        new = repository.record_instance(
            session=session, study_instance_uid="1.2.3", series_instance_uid=series_uid,
            sop_instance_uid=sop_uid, sop_class_uid=CT, transfer_syntax_uid=EXPLICIT,
            modality="CT", path=f"1.2.3/{series_uid}/{sop_uid}.dcm", size_bytes=1000,
            calling_ae_title=calling, called_ae_title="RADNODE", peer_address="10.0.0.7",
            received_at=T0 + timedelta(seconds=seconds), expected_count=expected)
        session.commit()
    return new


def _series(factory: sessionmaker[Session], uid: str) -> Series:
    with factory() as session:
        found = repository.series_by_uid(uid, session=session)
        assert found is not None
        return found


def test_series_counters_duplicates_and_late_instances(factory: sessionmaker[Session]) -> None:
    series_uid, first, second = generate_uid(), generate_uid(), generate_uid()
    assert _record(factory, series_uid, first, expected=None)
    assert _record(factory, series_uid, second, seconds=2, expected=3, calling="OTHER")
    series = _series(factory, series_uid)
    assert series.instance_count == 2
    assert series.expected_count == 3  # from the first instance that carries it
    assert series.calling_ae_title == "CT1"  # the series' first instance's association
    assert series.peer_address == "10.0.0.7"
    assert (series.last_received_at - series.first_received_at).total_seconds() == 2

    # A duplicate changes only its own counter: not the series, not the stored row.
    assert not _record(factory, series_uid, first, seconds=5)
    with factory() as session:
        row = session.scalars(select(Instance).where(Instance.sop_instance_uid == first)).one()
        assert row.duplicates == 1
        assert row.calling_ae_title == "CT1"
    series = _series(factory, series_uid)
    assert series.instance_count == 2
    assert (series.last_received_at - series.first_received_at).total_seconds() == 2

    # A late instance of a series that was complete and routed reopens it.
    with factory() as session:
        row = session.get(Series, series.id)
        assert row is not None
        row.state, row.routed_at = "complete", T0
        session.commit()
    assert _record(factory, series_uid, generate_uid(), seconds=9, expected=7)
    series = _series(factory, series_uid)
    assert (series.state, series.routed_at, series.instance_count) == ("receiving", None, 3)
    assert series.expected_count == 3  # kept


def test_instances_of_two_series_get_their_own_series_rows(
    factory: sessionmaker[Session],
) -> None:
    one, two = generate_uid(), generate_uid()
    for index in range(3):
        assert _record(factory, one if index % 2 == 0 else two, generate_uid(), seconds=index)
    assert _series(factory, one).instance_count == 2
    assert _series(factory, two).instance_count == 1
    with factory() as session:
        by_series = {row.series_id for row in session.scalars(select(Instance))}
    assert by_series == {_series(factory, one).id, _series(factory, two).id}
