"""Migrations with data in the tables; each downgrade against its upgrade.

Every test runs on SQLite and on the machine's PostgreSQL (the ``url`` fixture
of ``test_migrations``). Rows are written with plain SQL on reflected tables:
the ORM models describe the newest schema only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, MetaData, insert, inspect, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from service.db import migrate, repository
from service.db.models import ApiToken, AuditEvent, DeidMapping, Result, User, WorkerStatus
from service.db.session import make_engine
from tests.unit import test_migrations
from tests.unit.test_migrations import RADNODE_TABLES

#: The database of each test: a SQLite file, or a new PostgreSQL database.
url = test_migrations.url

#: The revisions whose data checks are written below, oldest first. A new
#: migration fails the test until its backfills and defaults are checked here.
REVISIONS = ["0001", "0002", "0003", "0004", "0005", "0006"]

T0 = datetime(2026, 3, 2, 8, 15, 0, tzinfo=UTC)
ROOT = "1.2.826.0.1.3680043.8.498"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
STUDY_CT = f"{ROOT}.10.1"
STUDY_MR = f"{ROOT}.10.2"
SERIES_CT = f"{ROOT}.20.1"
SERIES_MR = f"{ROOT}.20.2"
SERIES_PURGED = f"{ROOT}.20.3"


def _history() -> list[str]:
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    return [r.revision for r in reversed(list(script.walk_revisions()))]


@contextmanager
def _connection(url: str) -> Iterator[Connection]:
    """A connection in a transaction, committed at the end; its engine is disposed."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


def _utc(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


@dataclass
class Rows:
    """The rows written so far: ``table -> id -> column -> value`` (what must be read back)."""

    tables: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)

    def add(self, conn: Connection, table: str, **values: Any) -> int:
        """INSERT one row with plain SQL on the reflected table; return its id."""
        reflected = MetaData()
        reflected.reflect(conn, only=[table])
        t = reflected.tables[table]
        row_id = int(conn.execute(insert(t).values(**values).returning(t.c.id)).scalar_one())
        self.tables.setdefault(table, {})[row_id] = dict(values)
        return row_id

    def expect(self, table: str, **values: Any) -> None:
        """Every row of ``table`` written so far must now also read back ``values``."""
        for row in self.tables[table].values():
            row.update(values)

    def check(self, conn: Connection) -> None:
        """Every row written, in every table that exists now, reads back unchanged."""
        reflected = MetaData()
        reflected.reflect(conn)
        for name, rows in self.tables.items():
            if name not in reflected.tables:
                continue
            t = reflected.tables[name]
            found = {row.id: row._mapping for row in conn.execute(select(t))}
            assert set(found) == set(rows), name
            for row_id, values in rows.items():
                for column, value in values.items():
                    if column in t.c:
                        assert _utc(found[row_id][column]) == _utc(value), (name, row_id, column)

    def column(self, conn: Connection, table: str, column: str) -> dict[int, Any]:
        """``id -> value`` of one column as the database has it."""
        reflected = MetaData()
        reflected.reflect(conn, only=[table])
        t = reflected.tables[table]
        values = conn.execute(select(t.c.id, t.c[column]))
        return {int(row_id): _utc(value) for row_id, value in values}


def _at_0001(conn: Connection, rows: Rows) -> dict[str, int]:
    """The first schema with what a node had after a day: complete, receiving, purged."""
    ids: dict[str, int] = {}
    ids["ct"] = rows.add(
        conn, "series", series_instance_uid=SERIES_CT, study_instance_uid=STUDY_CT,
        modality="CT", calling_ae_title="CT_SCANNER", state="complete", instance_count=3,
        first_received_at=T0, last_received_at=T0 + timedelta(seconds=2),
        completed_at=T0 + timedelta(seconds=62), completion_reason="quiet_period")
    ids["mr"] = rows.add(
        conn, "series", series_instance_uid=SERIES_MR, study_instance_uid=STUDY_MR,
        modality="MR", calling_ae_title="MR_SCANNER", state="receiving", instance_count=1,
        first_received_at=T0 + timedelta(minutes=5),
        last_received_at=T0 + timedelta(minutes=5), completed_at=None,
        completion_reason=None)
    ids["purged"] = rows.add(
        conn, "series", series_instance_uid=SERIES_PURGED, study_instance_uid=STUDY_CT,
        modality="CT", calling_ae_title="CT_SCANNER", state="purged", instance_count=1,
        first_received_at=T0 - timedelta(days=8), last_received_at=T0 - timedelta(days=8),
        completed_at=T0 - timedelta(days=8, seconds=-60), completion_reason="force_timeout")
    for n in range(3):
        rows.add(conn, "instances", series_id=ids["ct"], sop_instance_uid=f"{ROOT}.30.1.{n}",
                 sop_class_uid=CT_IMAGE, transfer_syntax_uid=EXPLICIT_LE,
                 path=f"{STUDY_CT}/{SERIES_CT}/{ROOT}.30.1.{n}.dcm", size_bytes=526_000 + n,
                 received_at=T0 + timedelta(seconds=n), calling_ae_title="CT_SCANNER",
                 duplicates=1 if n == 0 else 0)
    rows.add(conn, "instances", series_id=ids["mr"], sop_instance_uid=f"{ROOT}.30.2.0",
             sop_class_uid=MR_IMAGE, transfer_syntax_uid=EXPLICIT_LE,
             path=f"{STUDY_MR}/{SERIES_MR}/{ROOT}.30.2.0.dcm", size_bytes=131_000,
             received_at=T0 + timedelta(minutes=5), calling_ae_title="MR_SCANNER", duplicates=0)
    rows.add(conn, "instances", series_id=ids["purged"], sop_instance_uid=f"{ROOT}.30.3.0",
             sop_class_uid=CT_IMAGE, transfer_syntax_uid=EXPLICIT_LE,
             path=f"{STUDY_CT}/{SERIES_PURGED}/{ROOT}.30.3.0.dcm", size_bytes=526_100,
             received_at=T0 - timedelta(days=8), calling_ae_title="CT_SCANNER", duplicates=0)
    job = {"task_name": "radnode.analyse_series", "model_version": "1.2.0", "attempts": 1,
           "created_at": T0 + timedelta(seconds=62)}
    ids["job_done"] = rows.add(
        conn, "jobs", **job, series_id=ids["ct"], queue="gpu", model_name="ct_liver",
        state="succeeded", destinations=["PACS", "ARCHIVE"], worker="gpu-node-1:4242",
        error=None, timings={"load": 1.9, "inference": 4.2, "encode": 0.8},
        queued_at=T0 + timedelta(seconds=63), started_at=T0 + timedelta(seconds=64),
        finished_at=T0 + timedelta(seconds=71))
    ids["job_queued"] = rows.add(
        conn, "jobs", **{**job, "attempts": 0, "model_version": None}, series_id=ids["ct"],
        queue="gpu", model_name="ct_spleen", state="queued", destinations=["PACS"],
        worker=None, error=None, timings=None, queued_at=T0 + timedelta(seconds=63),
        started_at=None, finished_at=None)
    ids["job_failed"] = rows.add(
        conn, "jobs", **{**job, "attempts": 3}, series_id=ids["purged"], queue="cpu",
        model_name="ct_liver", state="failed", destinations=["PACS"],
        worker="cpu-node:17", error="CUDA out of memory", timings={"load": 2.0},
        queued_at=T0 - timedelta(days=8), started_at=T0 - timedelta(days=8),
        finished_at=T0 - timedelta(days=8))
    result = {"job_id": ids["job_done"], "series_instance_uid": f"{ROOT}.40.1",
              "created_at": T0 + timedelta(seconds=71)}
    ids["seg"] = rows.add(conn, "results", **result, kind="SEG", sop_class_uid=SEG,
                          sop_instance_uid=f"{ROOT}.41.1", path="/srv/radnode/results/1/seg.dcm",
                          summary={"segments": [{"label": "Liver", "volume_ml": 1523.4}]})
    ids["sr"] = rows.add(conn, "results", **result, kind="SR", sop_class_uid=COMPREHENSIVE_SR,
                         sop_instance_uid=f"{ROOT}.41.2", path="/srv/radnode/results/1/sr.dcm",
                         summary=None)
    delivery = {"created_at": T0 + timedelta(seconds=71)}
    ids["sent"] = rows.add(conn, "deliveries", **delivery, result_id=ids["seg"],
                           destination="PACS", state="sent", attempts=1, status=0, error=None,
                           next_attempt_at=T0 + timedelta(seconds=71),
                           sent_at=T0 + timedelta(seconds=72))
    ids["due"] = rows.add(conn, "deliveries", **delivery, result_id=ids["sr"],
                          destination="PACS", state="pending", attempts=2, status=0xA700,
                          error="Out of resources", next_attempt_at=T0 + timedelta(minutes=5),
                          sent_at=None)
    ids["refused"] = rows.add(conn, "deliveries", **delivery, result_id=ids["seg"],
                              destination="ARCHIVE", state="failed", attempts=5, status=0x0122,
                              error="SOP Class not supported",
                              next_attempt_at=T0 + timedelta(minutes=30), sent_at=None)
    return ids


def _step(revision: str, conn: Connection, rows: Rows, ids: dict[str, int]) -> None:
    """What ``revision`` added and backfilled, checked on the rows written before it."""
    if revision == "0002":  # new nullable columns, no backfill
        rows.expect("series", expected_count=None, released_at=None, purged_at=None)
        rows.expect("jobs", heartbeat_at=None)
    elif revision == "0003":
        rows.expect("series", called_ae_title="", peer_address="")
        # Series complete before 0003 were routed when they completed: not routed again.
        assert rows.column(conn, "series", "routed_at") == {
            ids["ct"]: T0 + timedelta(seconds=62), ids["mr"]: None,
            ids["purged"]: T0 - timedelta(days=8, seconds=-60)}
        rows.tables["series"][ids["ct"]]["routed_at"] = T0 + timedelta(seconds=62)
        rows.tables["series"][ids["mr"]]["routed_at"] = None
        rows.tables["series"][ids["purged"]]["routed_at"] = T0 - timedelta(days=8, seconds=-60)
        rows.expect("jobs", priority="routine", rule_names="", config_version="")
        rows.expect("deliveries", transaction_uid=None, commit_requested_at=None,
                    commit_attempts=0, committed_at=None)
        # A node still on the old code writes a job without the new columns: defaults.
        ids["job_old_node"] = rows.add(
            conn, "jobs", series_id=ids["mr"], task_name="radnode.analyse_series", queue="gpu",
            model_name="mr_prostate", model_version=None, state="pending",
            destinations=["PACS"], attempts=0, created_at=T0 + timedelta(minutes=6))
        assert rows.column(conn, "jobs", "priority")[ids["job_old_node"]] == "routine"
        rows.tables["jobs"][ids["job_old_node"]].update(
            priority="routine", rule_names="", config_version="", heartbeat_at=None)
    elif revision == "0004":
        for table in ("associations", "audit_events", "workers"):
            assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() == 0
        ids["association"] = rows.add(
            conn, "associations", calling_ae_title="CT_SCANNER", called_ae_title="RADNODE",
            peer_address="10.0.0.21", outcome="released", started_at=T0,
            ended_at=T0 + timedelta(seconds=3), instances=3, bytes_received=1_578_003,
            statuses={"0x0000": 3}, series_uids=[SERIES_CT])
        rows.add(conn, "audit_events", at=T0, actor="ae:CT_SCANNER", action="series.received",
                 target_type="series", target_id=SERIES_CT, detail={"instances": 3})
        rows.add(conn, "audit_events", at=T0 + timedelta(minutes=1), actor="api:pacsadmin",
                 action="job.cancel", target_type="job", target_id=str(ids["job_queued"]),
                 detail={"state": "queued"})
        rows.add(conn, "workers", name="gpu-node-1:4242", queues=["gpu"], device="cuda:0",
                 models=[{"name": "ct_liver", "version": "1.2.0", "device": "cuda:0"}],
                 gpu_memory_allocated_mb=2048.5, gpu_memory_total_mb=81559.0, started_at=T0,
                 heartbeat_at=T0 + timedelta(seconds=70))
    elif revision == "0005":
        ids["user"] = rows.add(conn, "users", name="pacsadmin", role="admin",
                               password_hash="$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA",
                               created_at=T0, disabled_at=None)
        rows.add(conn, "api_tokens", user_id=ids["user"], label="monitoring",
                 prefix="a1b2c3d4", token_hash="0" * 63 + "1", created_at=T0,
                 last_used_at=None, expires_at=T0 + timedelta(days=90), revoked_at=None)
        rows.add(conn, "web_sessions", user_id=ids["user"], session_hash="f" * 64,
                 created_at=T0, last_seen_at=T0, expires_at=T0 + timedelta(hours=12))
    elif revision == "0006":
        rows.add(conn, "deid_mappings", scope="research", kind="patient", original="PID-0042",
                 pseudonym="RN-7F3A", attributes={"PatientName": "DOE^JANE"},
                 date_shift_days=-17, created_at=T0)
        rows.add(conn, "deid_mappings", scope="research", kind="uid", original=STUDY_CT,
                 pseudonym="2.25.1234567890", attributes={"AccessionNumber": "A100"},
                 date_shift_days=None, created_at=T0)


def _audit_is_append_only(url: str) -> None:
    for statement in ("UPDATE audit_events SET actor = 'x'", "DELETE FROM audit_events"):
        with pytest.raises(DBAPIError, match="append-only"), _connection(url) as conn:
            conn.execute(text(statement))


def _read_with_the_repository(url: str, rows: Rows, ids: dict[str, int]) -> None:
    """At head, radnode's own code reads the rows written at 0001-0006 and writes beside them."""
    engine = make_engine(url)
    now = T0 + timedelta(hours=1)
    try:
        with Session(engine) as session:
            ct = repository.series_by_uid(SERIES_CT, session=session)
            assert ct is not None and ct.id == ids["ct"]
            assert ct.state == "complete" and ct.instance_count == 3 == len(ct.instances)
            assert repository.instance_paths(ct.id, session=session) == [
                f"{STUDY_CT}/{SERIES_CT}/{ROOT}.30.1.{n}.dcm" for n in range(3)]
            jobs = repository.jobs_for_series(ct.id, session=session)
            assert [(j.id, j.state, j.priority) for j in jobs] == [
                (ids["job_done"], "succeeded", "routine"), (ids["job_queued"], "queued", "routine")]
            assert jobs[0].timings == {"load": 1.9, "inference": 4.2, "encode": 0.8}
            results = repository.results_for_job(ids["job_done"], session=session)
            assert [r.kind for r in results] == ["SEG", "SR"]
            assert [(d.destination, d.state, d.status) for d in
                    repository.deliveries_for_result(ids["seg"], session=session)] == [
                ("PACS", "sent", 0), ("ARCHIVE", "failed", 0x0122)]
            assert {r.id for r in repository.study_results(STUDY_CT, session=session)} == {
                ids["seg"], ids["sr"]}
            assert [d.id for d in repository.find_deliveries(
                session=session, study_instance_uid=STUDY_CT)] == sorted(
                [ids["sent"], ids["due"], ids["refused"]], reverse=True)
            assert [d.id for d in repository.due_deliveries(session=session, now=now)] == [
                ids["due"]]
            # Backfilled routed_at: no series of 0001 is routed a second time.
            assert repository.unrouted_series(session=session) == []
            assert [j.id for j in repository.pending_jobs(session=session)] == [
                ids["job_old_node"]]
            assert repository.queued_counts(session=session) == {"gpu": 1}
            user = session.scalars(select(User).where(User.name == "pacsadmin")).one()
            assert [t.label for t in user.tokens] == ["monitoring"]
            assert session.scalars(select(ApiToken)).one().user_id == ids["user"]
            assert len(session.scalars(select(AuditEvent)).all()) == 2
            assert session.scalars(select(WorkerStatus)).one().models[0]["name"] == "ct_liver"
            patient = session.scalars(select(DeidMapping).where(
                DeidMapping.kind == "patient")).one()
            assert (patient.pseudonym, patient.date_shift_days) == ("RN-7F3A", -17)

            # New rows beside the old ones (sequences on PostgreSQL are past them).
            assert repository.record_instance(
                session=session, study_instance_uid=STUDY_MR, series_instance_uid=SERIES_MR,
                sop_instance_uid=f"{ROOT}.30.2.1", sop_class_uid=MR_IMAGE,
                transfer_syntax_uid=EXPLICIT_LE, modality="MR",
                path=f"{STUDY_MR}/{SERIES_MR}/{ROOT}.30.2.1.dcm", size_bytes=131_001,
                calling_ae_title="MR_SCANNER", received_at=now)
            sr = session.get(Result, ids["sr"])
            assert sr is not None
            resend = repository.schedule_delivery(sr, "ARCHIVE", session=session, now=now)
            session.commit()
            mr = repository.series_by_uid(SERIES_MR, session=session)
            assert mr is not None and mr.instance_count == 2 == len(mr.instances)
            new_instance = max(i.id for i in mr.instances)
            assert new_instance > max(rows.tables["instances"])
            assert resend.id > max(rows.tables["deliveries"])
    finally:
        engine.dispose()
    rows.tables["series"][ids["mr"]].update(instance_count=2, last_received_at=now)
    rows.tables["instances"][new_instance] = {"series_id": ids["mr"], "size_bytes": 131_001}
    rows.tables["deliveries"][resend.id] = {"result_id": ids["sr"], "destination": "ARCHIVE",
                                            "state": "pending", "commit_attempts": 0}


def test_upgrade_from_the_first_revision_with_data_and_back(url: str) -> None:
    history = _history()
    assert history == REVISIONS, "a new migration: add its data checks to _step"
    rows = Rows()
    tables: dict[str, set[str]] = {}
    columns: dict[str, dict[str, list[str]]] = {}

    def remember(revision: str, conn: Connection) -> None:
        inspector = inspect(conn)
        tables[revision] = set(inspector.get_table_names()) & RADNODE_TABLES
        columns[revision] = {t: [c["name"] for c in inspector.get_columns(t)]
                             for t in tables[revision]}

    migrate.upgrade(url, "0001")
    with _connection(url) as conn:
        ids = _at_0001(conn, rows)
        remember("0001", conn)
    assert tables["0001"] == {"series", "instances", "jobs", "results", "deliveries"}
    assert set(rows.tables) == tables["0001"]  # every table of 0001 has rows
    for revision in history[1:]:
        migrate.upgrade(url, revision)
        with _connection(url) as conn:
            _step(revision, conn, rows, ids)
            rows.check(conn)
            remember(revision, conn)
        assert set(rows.tables) == tables[revision], revision  # every table has rows
    _audit_is_append_only(url)
    _read_with_the_repository(url, rows, ids)
    with _connection(url) as conn:
        rows.check(conn)

    for revision in reversed(history[:-1]):
        migrate.downgrade(url, revision)  # drops tables and columns that hold data
        with _connection(url) as conn:
            inspector = inspect(conn)
            assert set(inspector.get_table_names()) & RADNODE_TABLES == tables[revision]
            assert {t: [c["name"] for c in inspector.get_columns(t)]
                    for t in tables[revision]} == columns[revision], revision
            rows.check(conn)
    migrate.downgrade(url, "base")
    with _connection(url) as conn:
        assert set(inspect(conn).get_table_names()) <= {"alembic_version"}


# -- each downgrade reverses its upgrade --------------------------------------------------


def _schema(conn: Connection) -> dict[str, Any]:
    """Tables, columns with types, keys, indexes and constraints; triggers, functions."""
    inspector = inspect(conn)
    schema: dict[str, Any] = {}
    for table in sorted(inspector.get_table_names()):
        if table == "alembic_version":
            continue
        schema[table] = {
            "columns": [(c["name"], c["type"].compile(dialect=conn.dialect), c["nullable"],
                         c.get("default")) for c in inspector.get_columns(table)],
            "primary_key": (inspector.get_pk_constraint(table)["name"],
                            tuple(inspector.get_pk_constraint(table)["constrained_columns"])),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                              for i in inspector.get_indexes(table)),
            "unique": sorted((u["name"], tuple(u["column_names"]))
                             for u in inspector.get_unique_constraints(table)),
            "foreign_keys": sorted(
                (f["name"], tuple(f["constrained_columns"]), f["referred_table"],
                 tuple(f["referred_columns"])) for f in inspector.get_foreign_keys(table)),
            "checks": sorted((c["name"], c["sqltext"])
                             for c in inspector.get_check_constraints(table)),
        }
    if conn.dialect.name == "postgresql":
        schema["triggers"] = sorted(conn.execute(text(
            "SELECT tgname, tgrelid::regclass::text FROM pg_trigger WHERE NOT tgisinternal")))
        schema["functions"] = sorted(conn.execute(text(
            "SELECT proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'public'")))
        schema["sequences"] = sorted(conn.execute(text(
            "SELECT sequence_name FROM information_schema.sequences "
            "WHERE sequence_schema = 'public'")))
    else:
        schema["triggers"] = sorted(conn.execute(text(
            "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger'")))
    return schema


def _differences(got: dict[str, Any], expected: dict[str, Any]) -> list[tuple[Any, ...]]:
    """``(table, aspect, got, expected)`` for each part of two schemas that differs."""
    out: list[tuple[Any, ...]] = []
    for table in sorted(set(got) | set(expected)):
        a, b = got.get(table), expected.get(table)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [(table, k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
        elif a != b:
            out.append((table, None, a, b))
    return out


def test_each_downgrade_reverses_its_upgrade(url: str) -> None:
    history = ["base", *_history()]
    migrate.upgrade(url, "base")  # an empty database with radnode's version table
    with _connection(url) as conn:
        before = _schema(conn)
    for revision, following in zip(history, history[1:], strict=False):
        migrate.upgrade(url, following)
        with _connection(url) as conn:
            after = _schema(conn)
        assert after != before, f"{following} changes nothing"
        migrate.downgrade(url, revision)
        with _connection(url) as conn:
            assert _differences(_schema(conn), before) == [], f"downgrade of {following}"
        migrate.upgrade(url, following)
        with _connection(url) as conn:
            assert _differences(_schema(conn), after) == [], f"{following} again"
        before = after


def test_migrations_build_the_same_schema_without_the_models(url: str) -> None:
    # radnode passes the models' metadata to Alembic for autogenerate only; the schema
    # (constraint names included) must come from the migration files alone.
    migrate.upgrade(url)
    with _connection(url) as conn:
        with_models = _schema(conn)
    migrate.downgrade(url, "base")
    config = migrate.alembic_config(url)
    del config.attributes["target_metadata"]
    command.upgrade(config, "head")
    with _connection(url) as conn:
        assert _differences(_schema(conn), with_models) == []
