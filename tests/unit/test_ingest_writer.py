"""The C-STORE path's SQL on the DBAPI connection (service/db/ingest.py), SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.db.ingest import IngestWriter, ingest_sql, ingest_statements
from service.db.models import Instance, Series
from service.db.session import make_engine, make_session_factory
from tests.unit.conftest import T0

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


@pytest.fixture
def engine(either_engine: Engine) -> Engine:
    return either_engine


def _values(series_uid: str, sop_uid: str, *, at: datetime = T0,
            expected: int | None = None, calling: str = "CT1") -> dict[str, Any]:
    return dict(study_instance_uid="1.2.3", series_instance_uid=series_uid,
                sop_instance_uid=sop_uid, sop_class_uid=CT, transfer_syntax_uid=EXPLICIT,
                modality="CT", path=f"1.2.3/{series_uid}/{sop_uid}.dcm", size_bytes=1000,
                calling_ae_title=calling, called_ae_title="RADNODE", peer_address="10.0.0.7",
                received_at=at, expected_count=expected)


def _through_sqlalchemy(factory: sessionmaker[Session], values: dict[str, Any]) -> bool:
    """The same statements executed by SQLAlchemy itself (Session.execute): the reference."""
    statements = ingest_statements(factory.kw["bind"].dialect.name)
    with factory() as session:
        series_id = session.execute(statements.upsert_series, {
            "series_instance_uid": values["series_instance_uid"],
            "study_instance_uid": values["study_instance_uid"],
            "modality": values["modality"], "calling_ae_title": values["calling_ae_title"],
            "called_ae_title": values["called_ae_title"],
            "peer_address": values["peer_address"], "state": "receiving",
            "instance_count": 0, "first_received_at": values["received_at"],
            "last_received_at": values["received_at"],
            "expected_count": values["expected_count"]}).scalar_one()
        added = session.execute(statements.insert_instance, {
            "series_id": series_id, "sop_instance_uid": values["sop_instance_uid"],
            "sop_class_uid": values["sop_class_uid"],
            "transfer_syntax_uid": values["transfer_syntax_uid"], "path": values["path"],
            "size_bytes": values["size_bytes"], "received_at": values["received_at"],
            "calling_ae_title": values["calling_ae_title"], "duplicates": 0}).first()
        if added is None:
            session.execute(statements.count_duplicate,
                            {"b_sop_instance_uid": values["sop_instance_uid"]})
        else:
            session.execute(statements.add_to_series, {
                "b_series_id": series_id, "b_count": 1, "b_received_at": values["received_at"],
                "b_expected_count": values["expected_count"]})
        session.commit()
    return added is not None


def _through_writer(writer: IngestWriter, values: dict[str, Any]) -> bool:
    with writer.transaction() as transaction:
        new = transaction.record_instance(**values)
        transaction.commit()
    return new


Rows = list[tuple[Any, ...]]


def _raw_rows(engine: Engine, series_uid: str) -> tuple[Rows, Rows]:
    """Every column but the ids, as the database holds them (text for SQLite's dates)."""
    with engine.connect() as connection:
        series = connection.execute(text(
            "SELECT series_instance_uid, study_instance_uid, modality, calling_ae_title, "
            "called_ae_title, peer_address, state, instance_count, first_received_at, "
            "last_received_at, completed_at, completion_reason, expected_count, released_at, "
            "purged_at, routed_at FROM series WHERE series_instance_uid = :uid"),
            {"uid": series_uid}).all()
        instances = connection.execute(text(
            "SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.path, "
            "i.size_bytes, i.received_at, i.calling_ae_title, i.duplicates FROM instances i "
            "JOIN series s ON s.id = i.series_id WHERE s.series_instance_uid = :uid "
            "ORDER BY i.received_at, i.sop_instance_uid"), {"uid": series_uid}).all()
    return [tuple(r) for r in series], [tuple(r) for r in instances]


def _story(record: Any, series_uid: str, uids: list[str]) -> list[bool]:
    """New instances, a late Images in Acquisition, a duplicate, microseconds and none."""
    return [
        record(_values(series_uid, uids[0], at=T0)),
        record(_values(series_uid, uids[1], at=T0 + timedelta(seconds=2, microseconds=7),
                       expected=3, calling="OTHER")),
        record(_values(series_uid, uids[0], at=T0 + timedelta(seconds=5))),
        record(_values(series_uid, uids[2], at=T0 + timedelta(seconds=9, microseconds=500000))),
    ]


def _assert_same_rows(engine: Engine, ours: str, theirs: str, rename: dict[str, str]) -> None:
    """Series ``ours`` holds the rows of ``theirs``, once their UIDs are renamed."""

    def renamed(row: tuple[Any, ...]) -> tuple[Any, ...]:
        out = []
        for value in row:
            if isinstance(value, str):
                for old, new in rename.items():
                    value = value.replace(old, new)
            out.append(value)
        return tuple(out)

    our_series, our_instances = _raw_rows(engine, ours)
    their_series, their_instances = _raw_rows(engine, theirs)
    assert our_series == [renamed(r) for r in their_series]
    assert our_instances == [renamed(r) for r in their_instances]


def test_the_rows_are_those_sqlalchemy_writes(engine: Engine) -> None:
    factory = make_session_factory(engine)
    writer = IngestWriter(engine)
    ours, theirs = generate_uid(), generate_uid()
    uids = [generate_uid() for _ in range(3)]
    other_uids = [generate_uid() for _ in range(3)]
    assert _story(lambda v: _through_writer(writer, v), ours, uids) == [True, True, False, True]
    assert _story(lambda v: _through_sqlalchemy(factory, v), theirs,
                  other_uids) == [True, True, False, True]
    _assert_same_rows(engine, ours, theirs,
                      dict(zip(other_uids, uids, strict=True)) | {theirs: ours})
    # And the ORM reads them back as it reads its own.
    with factory() as session:
        series = session.scalars(select(Series).where(Series.series_instance_uid == ours)).one()
        assert (series.instance_count, series.expected_count, series.calling_ae_title) == (
            3, 3, "CT1")
        first = session.scalars(select(Instance).where(
            Instance.sop_instance_uid == uids[0])).one()
        assert first.duplicates == 1
        assert first.received_at.replace(tzinfo=None) == T0.replace(tzinfo=None)


def test_a_batch_writes_the_rows_of_one_call_per_instance(engine: Engine) -> None:
    writer = IngestWriter(engine)
    ours, theirs = generate_uid(), generate_uid()
    uids = [generate_uid() for _ in range(3)]
    other_uids = [generate_uid() for _ in range(3)]
    batch: list[dict[str, Any]] = []
    _story(lambda v: batch.append(v) or True, ours, uids)
    stored_before = _values(generate_uid(), generate_uid())
    assert _through_writer(writer, stored_before)
    batch.append(dict(stored_before, series_instance_uid=ours, path="elsewhere.dcm"))
    with writer.transaction() as transaction:
        assert transaction.record_instances(batch) == [True, True, False, True, False]
        transaction.commit()
    assert _story(lambda v: _through_writer(writer, v), theirs,
                  other_uids) == [True, True, False, True]
    _assert_same_rows(engine, ours, theirs,
                      dict(zip(other_uids, uids, strict=True)) | {theirs: ours})
    with engine.connect() as connection:  # the one stored before counts one more arrival
        assert connection.execute(text(
            "SELECT duplicates FROM instances WHERE sop_instance_uid = :uid"),
            {"uid": stored_before["sop_instance_uid"]}).scalar_one() == 1


def test_a_transaction_not_committed_is_rolled_back(engine: Engine) -> None:
    writer = IngestWriter(engine)
    series_uid, sop_uid = generate_uid(), generate_uid()
    with writer.transaction() as transaction:
        assert transaction.record_instance(**_values(series_uid, sop_uid))
    assert _raw_rows(engine, series_uid) == ([], [])
    assert _through_writer(writer, _values(series_uid, sop_uid))  # still new


def test_count_duplicate_says_whether_the_instance_is_stored(engine: Engine) -> None:
    writer = IngestWriter(engine)
    series_uid, sop_uid = generate_uid(), generate_uid()
    with writer.transaction() as transaction:
        assert not transaction.count_duplicate(sop_uid)
    _through_writer(writer, _values(series_uid, sop_uid))
    for _ in range(2):
        with writer.transaction() as transaction:
            assert transaction.count_duplicate(sop_uid)
            transaction.commit()
    assert _raw_rows(engine, series_uid)[1][0][-1] == 2  # duplicates


def test_a_driver_error_is_raised_as_sqlalchemys_wrapper(engine: Engine) -> None:
    writer = IngestWriter(engine)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE instances"))
    with pytest.raises(DBAPIError) as caught, writer.transaction() as transaction:
        transaction.record_instance(**_values(generate_uid(), generate_uid()))
    assert isinstance(caught.value.orig, ingest_sql(engine.dialect).dbapi_error)


def test_an_unreachable_database_is_an_operational_error(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'missing' / 'radnode.db'}")
    with pytest.raises(OperationalError), IngestWriter(engine).transaction():
        pass
    engine.dispose()


def test_compiled_once_per_engine_dialect(engine: Engine) -> None:
    assert ingest_sql(engine.dialect) is ingest_sql(engine.dialect)
    assert IngestWriter(engine).sql is ingest_sql(engine.dialect)


def test_sqlite_keeps_its_connections_and_postgresql_returns_them(engine: Engine) -> None:
    writer = IngestWriter(engine)
    pool: Any = engine.pool
    series_uid = generate_uid()
    used = []
    for committed in (True, False, True):
        with writer.transaction() as transaction:
            used.append(transaction.connection.dbapi_connection)
            transaction.record_instance(**_values(series_uid, generate_uid()))
            if committed:
                transaction.commit()
    if engine.dialect.name == "sqlite":  # one connection, kept checked out between them
        assert used[0] is used[1] is used[2]
        assert pool.checkedout() == 1
    else:  # back to the pool after each (its pre-ping guards the next check-out)
        assert pool.checkedout() == 0
    # The uncommitted one was rolled back before its connection was used again.
    assert len(_raw_rows(engine, series_uid)[1]) == 2
    writer.close()
    assert pool.checkedout() == 0
    assert _through_writer(writer, _values(series_uid, generate_uid()))  # still works
    assert pool.checkedout() == 0  # after close, each goes straight back


def test_a_failed_transaction_does_not_keep_its_connection(engine: Engine) -> None:
    writer = IngestWriter(engine)
    series_uid, sop_uid = generate_uid(), generate_uid()
    with pytest.raises(RuntimeError), writer.transaction() as transaction:
        transaction.record_instance(**_values(series_uid, sop_uid))
        raise RuntimeError("the handler failed")
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert _raw_rows(engine, series_uid) == ([], [])
