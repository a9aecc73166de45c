"""Operator actions and the audit trail on a real (migrated) SQLite database.

Every action is checked for its state change, its conflicts and its audit
event, which must be committed with the change or not at all; the database
itself refuses to rewrite the trail; exports round trip; the CLI front ends
work on the same database; the worker drops the results of a cancelled job.
"""

from __future__ import annotations

import csv
import getpass
import io
import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid
from sqlalchemy import func, select, text
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session, sessionmaker

from service import actions, audit, queue, scheduler
from service.actions import ActionError
from service.cli import main
from service.config import Settings
from service.db import repository
from service.db.models import AuditEvent, Delivery, Job, Result, Series
from service.db.session import as_utc, utcnow
from service.dicom.phantom import write_ct_phantom
from tests.unit.conftest import T0, record, spool_series
from workers import tasks

ACTOR = "cli:tester"
FINISHED = ("succeeded", "failed", "cancelled", "superseded")


# -- rows as the node and its workers write them -------------------------------------------


def make_series(factory: sessionmaker[Session], *, modality: str = "CT", instances: int = 2,
                study_uid: str = "1.2.3", calling_ae: str = "MODALITY", at: datetime = T0,
                state: str | None = None) -> int:
    """A series received through the repository (``receiving``), optionally moved on."""
    uid = generate_uid()
    start = as_utc(at)
    for i in range(instances):
        record(factory, series_uid=uid, modality=modality, at=start + timedelta(seconds=i),
               study_uid=study_uid, calling_ae=calling_ae)
    with factory() as session:
        series = session.scalars(select(Series).where(Series.series_instance_uid == uid)).one()
        if state is not None and state != "receiving":
            series.state = state
            series.completed_at = start + timedelta(seconds=instances + 5)
            series.completion_reason = "quiet_period"
            series.routed_at = start + timedelta(seconds=instances + 6)
        session.commit()
        return series.id


def make_job(factory: sessionmaker[Session], series_id: int, state: str = "succeeded", *,
             model: str = "radnode-builtin-ct", destinations: Sequence[str] = ("PACS",),
             priority: str = "routine", rules: Sequence[str] = ("ct",),
             created: datetime | None = None) -> int:
    """A job as routing adds it, then moved to ``state`` as the worker would."""
    now = as_utc(created) if created is not None else T0 + timedelta(seconds=30)
    with factory() as session:
        series = session.get(Series, series_id)
        assert series is not None
        job = repository.add_job(session=session, series=series, task_name=queue.ANALYSE_SERIES,
                                 queue="gpu", model_name=model, destinations=list(destinations),
                                 now=now, priority=priority, rule_names=list(rules),
                                 config_version="cfg1")
        job.state = state
        if state != "pending":
            job.queued_at = now
        if state in ("running", *FINISHED):
            job.started_at = now + timedelta(seconds=1)
            job.heartbeat_at = now + timedelta(seconds=1)
            job.attempts = 1
            job.worker = "host:1"
        if state in FINISHED:
            job.finished_at = now + timedelta(seconds=10)
        if state == "failed":
            job.error = "VolumeError: no geometry"
        session.commit()
        return job.id


def make_result(factory: sessionmaker[Session], job_id: int, kind: str = "SEG",
                deliveries: dict[str, str] | None = None) -> tuple[int, dict[str, int]]:
    """A result of ``job_id`` with one delivery per destination in the given state."""
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        now = as_utc(job.finished_at or job.created_at)
        result = Result(job_id=job_id, kind=kind,
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4" if kind == "SEG"
                        else "1.2.840.10008.5.1.4.1.1.88.34",
                        sop_instance_uid=generate_uid(), series_instance_uid=generate_uid(),
                        path=f"/results/{kind}.dcm", summary={"segments": 1}, created_at=now)
        session.add(result)
        session.flush()
        ids = {}
        for name, state in (deliveries or {}).items():
            delivery = Delivery(result_id=result.id, destination=name, state=state,
                                created_at=now, next_attempt_at=now,
                                attempts=5 if state == "failed" else 1,
                                status=0xA700 if state == "failed" else 0,
                                error="refused: 0xA700" if state == "failed" else None,
                                sent_at=now + timedelta(seconds=2)
                                if state in ("sent", "committed") else None)
            session.add(delivery)
            session.flush()
            ids[name] = delivery.id
        session.commit()
        return result.id, ids


def audit_rows(factory: sessionmaker[Session], action: str | None = None) -> list[AuditEvent]:
    with factory() as session:
        return audit.events(session, action=action)


def count(factory: sessionmaker[Session], model: type) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def act(factory: sessionmaker[Session], action: object, *args: object,
        **kwargs: object) -> actions.Outcome:
    """Run one action in its own transaction and commit it, as the API and CLI do."""
    with factory() as session:
        outcome = action(session, *args, actor=ACTOR, **kwargs)  # type: ignore[operator]
        session.commit()
        return outcome


def expect_error(factory: sessionmaker[Session], kind: str, action: object, *args: object,
                 **kwargs: object) -> str:
    with factory() as session:
        with pytest.raises(ActionError) as raised:
            action(session, *args, actor=ACTOR, **kwargs)  # type: ignore[operator]
        session.rollback()
    assert raised.value.kind == kind
    return str(raised.value)


# -- retry ----------------------------------------------------------------------------------


@pytest.mark.parametrize("state", FINISHED)
def test_retry_of_a_finished_job_adds_a_pending_copy_and_audits_it(
    session_factory: sessionmaker[Session], state: str
) -> None:
    series_id = make_series(session_factory, state="complete")
    old_id = make_job(session_factory, series_id, state, destinations=("PACS", "ARCHIVE"),
                      priority="stat", rules=("ct", "stat-er"))
    outcome = act(session_factory, actions.retry_job, old_id)
    (new_id,) = outcome.ids
    assert new_id != old_id
    assert outcome.message == f"job {old_id} queued again as job {new_id}"
    with session_factory() as session:
        old, new = session.get(Job, old_id), session.get(Job, new_id)
        assert old is not None and new is not None
        assert old.state == state  # the old job keeps its outcome
        assert (new.state, new.attempts, new.started_at, new.finished_at) == (
            "pending", 0, None, None)
        assert (new.series_id, new.model_name, new.queue, new.task_name) == (
            series_id, "radnode-builtin-ct", "gpu", queue.ANALYSE_SERIES)
        assert new.destinations == ["PACS", "ARCHIVE"]
        assert (new.priority, new.rule_names, new.config_version) == (
            "stat", "ct,stat-er", "cfg1")
        series_uid = old.series.series_instance_uid
    (event,) = audit_rows(session_factory, "job.retry")
    assert (event.actor, event.target_type, event.target_id) == (ACTOR, "job", str(old_id))
    assert event.detail == {"new_job": new_id, "previous_state": state,
                            "model": "radnode-builtin-ct", "series_instance_uid": series_uid}


@pytest.mark.parametrize("state", actions.CANCELLABLE)
def test_retry_of_an_unfinished_job_is_a_conflict(
    session_factory: sessionmaker[Session], state: str
) -> None:
    job_id = make_job(session_factory, make_series(session_factory, state="complete"), state)
    message = expect_error(session_factory, "conflict", actions.retry_job, job_id)
    assert f"job {job_id} is {state}" in message
    assert count(session_factory, Job) == 1
    assert audit_rows(session_factory) == []


def test_retry_of_a_job_whose_series_was_purged_is_a_conflict(
    session_factory: sessionmaker[Session]
) -> None:
    job_id = make_job(session_factory, make_series(session_factory, state="purged"))
    message = expect_error(session_factory, "conflict", actions.retry_job, job_id)
    assert "purged" in message
    assert count(session_factory, Job) == 1
    assert audit_rows(session_factory) == []


def test_retry_of_an_unknown_job_is_not_found(session_factory: sessionmaker[Session]) -> None:
    assert expect_error(session_factory, "not_found", actions.retry_job, 999) == (
        "no job with id 999")
    assert audit_rows(session_factory) == []


def test_a_retried_job_waits_for_publishing(session_factory: sessionmaker[Session]) -> None:
    """The node publishes pending jobs on its next tick: the retry is one of them."""
    job_id = make_job(session_factory, make_series(session_factory, state="complete"), "failed")
    (new_id,) = act(session_factory, actions.retry_job, job_id).ids
    with session_factory() as session:
        assert [j.id for j in repository.pending_jobs(session=session)] == [new_id]


# -- cancel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("state", actions.CANCELLABLE)
def test_cancel_of_a_waiting_or_running_job(
    session_factory: sessionmaker[Session], state: str
) -> None:
    job_id = make_job(session_factory, make_series(session_factory, state="complete"), state)
    before = utcnow()
    outcome = act(session_factory, actions.cancel_job, job_id)
    assert outcome.ids == [job_id]
    assert outcome.message == f"job {job_id} cancelled (was {state})"
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.state == "cancelled"
        assert job.error == f"cancelled by {ACTOR}"
        assert job.finished_at is not None and as_utc(job.finished_at) >= before
        series_uid = job.series.series_instance_uid
        # a cancelled job is no longer claimable by a worker
        assert not repository.claim_job(job_id, session=session, now=utcnow(),
                                        stale_before=utcnow() + timedelta(days=1))
    (event,) = audit_rows(session_factory, "job.cancel")
    assert (event.actor, event.target_type, event.target_id) == (ACTOR, "job", str(job_id))
    assert event.detail == {"previous_state": state, "model": "radnode-builtin-ct",
                            "series_instance_uid": series_uid}


@pytest.mark.parametrize("state", FINISHED)
def test_cancel_of_a_finished_job_is_a_conflict(
    session_factory: sessionmaker[Session], state: str
) -> None:
    job_id = make_job(session_factory, make_series(session_factory, state="complete"), state)
    message = expect_error(session_factory, "conflict", actions.cancel_job, job_id)
    assert f"job {job_id} is {state}" in message
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == state
    assert audit_rows(session_factory) == []
    assert expect_error(session_factory, "not_found", actions.cancel_job, job_id + 1) == (
        f"no job with id {job_id + 1}")


# -- force complete -------------------------------------------------------------------------


def test_force_complete_of_a_receiving_series_then_routing_adds_its_job(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    series_id = make_series(session_factory, instances=3)
    outcome = act(session_factory, actions.force_complete, series_id)
    assert outcome.ids == [series_id]
    assert outcome.message == f"series {series_id} complete (3 instances)"
    with session_factory() as session:
        series = session.get(Series, series_id)
        assert series is not None
        assert (series.state, series.completion_reason) == ("complete", "forced")
        assert series.completed_at is not None and series.routed_at is None
        uid = series.series_instance_uid
    (event,) = audit_rows(session_factory, "series.complete")
    assert (event.actor, event.target_type, event.target_id) == (ACTOR, "series",
                                                                  str(series_id))
    assert event.detail == {"series_instance_uid": uid, "instances": 3}
    # the node's next tick routes it: the CT rule adds the built-in CT model's job
    assert scheduler.complete_and_route(settings, session_factory) == 1
    with session_factory() as session:
        (job,) = session.scalars(select(Job)).all()
        assert (job.series_id, job.model_name, job.state) == (series_id, "radnode-builtin-ct",
                                                               "pending")


@pytest.mark.parametrize("state", ["complete", "purged"])
def test_force_complete_only_when_receiving(
    session_factory: sessionmaker[Session], state: str
) -> None:
    series_id = make_series(session_factory, state=state)
    message = expect_error(session_factory, "conflict", actions.force_complete, series_id)
    assert message == f"series {series_id} is {state}, not receiving"
    assert expect_error(session_factory, "not_found", actions.force_complete, 4242) == (
        "no series with id 4242")
    assert audit_rows(session_factory) == []


# -- resend and retry of deliveries ---------------------------------------------------------


def _delivery(factory: sessionmaker[Session], delivery_id: int) -> Delivery:
    with factory() as session:
        row = session.get(Delivery, delivery_id)
        assert row is not None
        return row


def _assert_fresh(row: Delivery) -> None:
    assert (row.state, row.attempts, row.status, row.error) == ("pending", 0, None, None)
    assert row.committed_at is None and row.transaction_uid is None


def test_resend_result_to_its_destinations_or_named_ones(
    session_factory: sessionmaker[Session]
) -> None:
    job_id = make_job(session_factory, make_series(session_factory, state="complete"),
                      destinations=("PACS", "ARCHIVE"))
    result_id, ids = make_result(session_factory, job_id,
                                 deliveries={"PACS": "sent", "ARCHIVE": "failed"})
    other_id, other = make_result(session_factory, job_id, "SR", deliveries={"PACS": "sent"})

    # every destination it went to
    outcome = act(session_factory, actions.resend_result, result_id)
    assert sorted(outcome.ids) == sorted(ids.values())
    assert outcome.message == "2 deliveries scheduled"
    for delivery_id in ids.values():
        _assert_fresh(_delivery(session_factory, delivery_id))
    assert _delivery(session_factory, other["PACS"]).state == "sent"  # other result untouched
    events = audit_rows(session_factory, "result.resend")
    assert sorted(int(e.target_id) for e in events) == sorted(ids.values())
    assert {e.detail["destination"] for e in events} == {"PACS", "ARCHIVE"}
    assert all(e.actor == ACTOR and e.target_type == "delivery" for e in events)

    # a named destination it never went to gets a new delivery
    outcome = act(session_factory, actions.resend_result, other_id, destinations=["ARCHIVE"])
    (new_id,) = outcome.ids
    assert outcome.message == "1 delivery scheduled"
    row = _delivery(session_factory, new_id)
    assert (row.result_id, row.destination) == (other_id, "ARCHIVE")
    _assert_fresh(row)
    assert _delivery(session_factory, other["PACS"]).state == "sent"

    # no destination at all
    lonely_id, _ = make_result(session_factory, job_id, "SR")
    message = expect_error(session_factory, "conflict", actions.resend_result, lonely_id)
    assert message == f"result {lonely_id} has no destination: name one"
    assert expect_error(session_factory, "not_found", actions.resend_result, 999) == (
        "no result with id 999")


def test_resend_deliveries_checks_every_id_first(session_factory: sessionmaker[Session]) -> None:
    job_id = make_job(session_factory, make_series(session_factory, state="complete"))
    _, ids = make_result(session_factory, job_id, deliveries={"PACS": "sent", "ARCHIVE": "sent"})
    message = expect_error(session_factory, "not_found", actions.resend_deliveries,
                           [ids["PACS"], 777, 778])
    assert message == "no delivery with id 777, 778"
    # a destination filter that does not match is "not found" as well
    expect_error(session_factory, "not_found", actions.resend_deliveries, [ids["PACS"]],
                 destination="ARCHIVE")
    assert _delivery(session_factory, ids["PACS"]).state == "sent"
    assert audit_rows(session_factory) == []

    outcome = act(session_factory, actions.resend_deliveries, [ids["PACS"]])
    assert outcome.ids == [ids["PACS"]]
    _assert_fresh(_delivery(session_factory, ids["PACS"]))
    assert _delivery(session_factory, ids["ARCHIVE"]).state == "sent"
    (event,) = audit_rows(session_factory, "delivery.resend")
    assert event.target_id == str(ids["PACS"]) and event.detail["destination"] == "PACS"


def test_resend_study_sends_the_newest_results(session_factory: sessionmaker[Session]) -> None:
    series_id = make_series(session_factory, state="complete", study_uid="1.2.9")
    old_job = make_job(session_factory, series_id)
    make_result(session_factory, old_job, deliveries={"PACS": "sent"})
    new_job = make_job(session_factory, series_id)
    _, new_ids = make_result(session_factory, new_job, deliveries={"PACS": "sent"})
    outcome = act(session_factory, actions.resend_study, "1.2.9")
    assert outcome.ids == [new_ids["PACS"]]
    outcome = act(session_factory, actions.resend_study, "1.2.9", destination="ARCHIVE")
    (archive_id,) = outcome.ids
    assert _delivery(session_factory, archive_id).destination == "ARCHIVE"
    assert [e.action for e in audit_rows(session_factory)] == ["study.resend"] * 2
    assert expect_error(session_factory, "not_found", actions.resend_study, "9.9") == (
        "study 9.9 has no results")


def test_retry_failed_deliveries_resets_attempts(session_factory: sessionmaker[Session]) -> None:
    job_id = make_job(session_factory, make_series(session_factory, state="complete"))
    _, first = make_result(session_factory, job_id,
                           deliveries={"PACS": "failed", "ARCHIVE": "failed"})
    _, second = make_result(session_factory, job_id, "SR",
                            deliveries={"PACS": "sent", "ARCHIVE": "failed"})
    assert _delivery(session_factory, first["PACS"]).attempts == 5

    outcome = act(session_factory, actions.retry_failed_deliveries, destination="ARCHIVE")
    assert sorted(outcome.ids) == sorted([first["ARCHIVE"], second["ARCHIVE"]])
    _assert_fresh(_delivery(session_factory, first["ARCHIVE"]))
    _assert_fresh(_delivery(session_factory, second["ARCHIVE"]))
    assert _delivery(session_factory, first["PACS"]).state == "failed"  # other destination

    outcome = act(session_factory, actions.retry_failed_deliveries)
    assert outcome.ids == [first["PACS"]]
    assert _delivery(session_factory, second["PACS"]).state == "sent"  # sent stays sent
    assert act(session_factory, actions.retry_failed_deliveries).ids == []  # none left
    events = audit_rows(session_factory, "delivery.retry")
    assert sorted(int(e.target_id) for e in events) == sorted(
        [first["ARCHIVE"], second["ARCHIVE"], first["PACS"]])


# -- the audit trail ------------------------------------------------------------------------


def test_the_audit_event_is_in_the_actions_transaction(
    session_factory: sessionmaker[Session]
) -> None:
    series_id = make_series(session_factory)
    job_id = make_job(session_factory, make_series(session_factory, state="complete"))
    pending_id = make_job(session_factory, make_series(session_factory, state="complete"),
                          "queued")
    with session_factory() as session:
        actions.retry_job(session, job_id, actor=ACTOR)
        actions.cancel_job(session, pending_id, actor=ACTOR)
        actions.force_complete(session, series_id, actor=ACTOR)
        session.flush()
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == 3
        session.rollback()
    assert audit_rows(session_factory) == []
    assert count(session_factory, Job) == 2  # no new job
    with session_factory() as session:
        queued = session.get(Job, pending_id)
        series = session.get(Series, series_id)
        assert queued is not None and queued.state == "queued"
        assert series is not None and series.state == "receiving"
    # committed: change and record together
    act(session_factory, actions.cancel_job, pending_id)
    assert [e.action for e in audit_rows(session_factory)] == ["job.cancel"]


def _one_event(factory: sessionmaker[Session]) -> int:
    with factory() as session:
        event = audit.record(session, actor="ae:SCANNER", action="association",
                             target_type="association", target_id=1,
                             detail={"outcome": "released", "instances": 3})
        session.commit()
        return event.id


def test_the_database_refuses_to_update_the_trail(session_factory: sessionmaker[Session]) -> None:
    event_id = _one_event(session_factory)
    with session_factory() as session:
        event = session.get(AuditEvent, event_id)
        assert event is not None
        event.actor = "someone-else"
        with pytest.raises(DatabaseError, match="append-only"):
            session.commit()
    with session_factory() as session:
        with pytest.raises(DatabaseError, match="append-only"):
            session.execute(text("UPDATE audit_events SET detail = '{}'"))
    (kept,) = audit_rows(session_factory)
    assert kept.actor == "ae:SCANNER" and kept.detail == {"outcome": "released", "instances": 3}


def test_the_database_refuses_to_delete_from_the_trail(
    session_factory: sessionmaker[Session]
) -> None:
    event_id = _one_event(session_factory)
    with session_factory() as session:
        event = session.get(AuditEvent, event_id)
        session.delete(event)
        with pytest.raises(DatabaseError, match="append-only"):
            session.commit()
    with session_factory() as session:
        with pytest.raises(DatabaseError, match="append-only"):
            session.execute(text("DELETE FROM audit_events"))
    assert [e.id for e in audit_rows(session_factory)] == [event_id]
    _one_event(session_factory)  # appending still works
    assert len(audit_rows(session_factory)) == 2


def _trail(factory: sessionmaker[Session]) -> list[int]:
    """Four events at known times, written out of order; returns ids in time order."""
    details = [
        (T0 + timedelta(hours=2), "api:pacsadmin", "job.retry",
         {"new_job": 7, "note": 'comma, "quote"\nnew line, é'}),
        (T0, "ae:SCANNER", "association", {"outcome": "released", "statuses": {"0x0000": 3}}),
        (T0 + timedelta(days=1), "cli:root", "delivery.resend", {"destination": "PACS"}),
        (T0 + timedelta(hours=1), "worker:host:1", "job.succeeded", {"results": 2}),
    ]
    with factory() as session:
        events = [audit.record(session, actor=actor, action=action, target_type="job",
                               target_id=i, detail=detail, at=at)
                  for i, (at, actor, action, detail) in enumerate(details)]
        session.commit()
        ids = [e.id for e in events]
    return [ids[1], ids[3], ids[0], ids[2]]


def test_events_in_time_order_with_a_half_open_window(
    session_factory: sessionmaker[Session]
) -> None:
    ordered = _trail(session_factory)
    with session_factory() as session:
        assert [e.id for e in audit.events(session)] == ordered
        window = audit.events(session, since=T0 + timedelta(hours=1),
                              until=T0 + timedelta(days=1))
        assert [e.id for e in window] == ordered[1:3]  # since inclusive, until exclusive
        assert [e.action for e in audit.events(session, action="job.retry")] == ["job.retry"]
        assert [e.actor for e in audit.events(session, actor="cli:root")] == ["cli:root"]
        assert [e.id for e in audit.events(session, limit=2, offset=1)] == ordered[1:3]


def test_export_csv_has_a_header_and_round_trips(session_factory: sessionmaker[Session]) -> None:
    ordered = _trail(session_factory)
    with session_factory() as session:
        rows = audit.events(session)
    body = "".join(audit.export(rows, "csv"))
    table = list(csv.reader(io.StringIO(body)))
    assert table[0] == list(audit.EXPORT_FIELDS)
    assert [int(row[0]) for row in table[1:]] == ordered
    for row, event in zip(table[1:], rows, strict=True):
        item = dict(zip(audit.EXPORT_FIELDS, row, strict=True))
        assert item["at"] == as_utc(event.at).isoformat()
        assert item["at"].endswith("+00:00")
        assert (item["actor"], item["action"], item["target_type"], item["target_id"]) == (
            event.actor, event.action, event.target_type, event.target_id)
        assert json.loads(item["detail"]) == event.detail  # quotes, commas, new lines
    assert list(csv.reader(io.StringIO("".join(audit.export([], "csv"))))) == [
        list(audit.EXPORT_FIELDS)]


def test_export_json_lines_round_trip(session_factory: sessionmaker[Session]) -> None:
    ordered = _trail(session_factory)
    with session_factory() as session:
        rows = audit.events(session)
    lines = "".join(audit.export(rows, "json")).splitlines()
    assert len(lines) == 4
    parsed = [json.loads(line) for line in lines]
    assert [p["id"] for p in parsed] == ordered
    assert parsed == [audit.as_dict(e) for e in rows]
    assert parsed[2]["detail"]["note"] == 'comma, "quote"\nnew line, é'
    assert set(parsed[0]) == set(audit.EXPORT_FIELDS)
    assert "".join(audit.export([], "json")) == ""


def test_cli_actor_names_the_operating_system_user() -> None:
    assert audit.cli_actor() == f"cli:{getpass.getuser()}"


# -- the CLI front ends ---------------------------------------------------------------------


def cli(data_dir: Path, *args: str) -> tuple[int, str]:
    # wide enough that rich folds no table cell
    result = CliRunner(env={"COLUMNS": "300"}).invoke(main, [*args, "--data-dir", str(data_dir)])
    return result.exit_code, result.output


def test_cli_retry_cancel_complete_on_the_database(
    tmp_path: Path, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    assert settings.database_url.endswith(str(tmp_path / "radnode.db"))
    receiving = make_series(session_factory)
    done = make_job(session_factory, make_series(session_factory, state="complete"))
    running = make_job(session_factory, make_series(session_factory, state="complete"),
                       "running")

    code, out = cli(tmp_path, "retry", str(done))
    assert code == 0, out
    assert f"job {done} queued again as job" in out
    code, out = cli(tmp_path, "retry", str(running))
    assert code != 0 and f"job {running} is running" in out
    code, out = cli(tmp_path, "cancel", str(running))
    assert code == 0 and f"job {running} cancelled (was running)" in out
    code, out = cli(tmp_path, "cancel", str(running))
    assert code != 0 and "only a pending, queued or running job" in out
    code, out = cli(tmp_path, "complete", str(receiving))
    assert code == 0 and f"series {receiving} complete (2 instances)" in out
    code, out = cli(tmp_path, "complete", "999")
    assert code != 0 and "no series with id 999" in out

    me = audit.cli_actor()
    assert [(e.actor, e.action) for e in audit_rows(session_factory)] == [
        (me, "job.retry"), (me, "job.cancel"), (me, "series.complete")]


def test_cli_deliveries_resend_and_retry(
    tmp_path: Path, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    job_id = make_job(session_factory, make_series(session_factory, state="complete"))
    _, ids = make_result(session_factory, job_id, deliveries={"PACS": "sent",
                                                              "ARCHIVE": "failed"})
    code, out = cli(tmp_path, "resend", str(ids["PACS"]))
    assert code == 0 and "1 delivery scheduled" in out, out
    code, out = cli(tmp_path, "deliveries", "resend", str(ids["PACS"]), "--to", "NOWHERE")
    assert code != 0 and "no destination named 'NOWHERE'" in out
    code, out = cli(tmp_path, "deliveries", "retry")
    assert code == 0 and "1 failed delivery scheduled again" in out, out
    for delivery_id in ids.values():
        _assert_fresh(_delivery(session_factory, delivery_id))
    assert [e.action for e in audit_rows(session_factory)] == ["delivery.resend",
                                                                "delivery.retry"]


def test_cli_audit_export_by_date(
    tmp_path: Path, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    ordered = _trail(session_factory)
    # a bare --until date means the end of that day: T0's day has three events
    code, out = cli(tmp_path, "audit", "export", "--format", "json",
                    "--since", T0.date().isoformat(), "--until", T0.date().isoformat())
    assert code == 0, out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [p["id"] for p in lines] == ordered[:3]
    assert "3 audit event(s)" in out

    target = tmp_path / "audit.csv"
    code, out = cli(tmp_path, "audit", "export", "--since", "2026-01-01T13:00:00+01:00",
                    "-o", str(target))
    assert code == 0, out
    table = list(csv.reader(target.open(encoding="utf-8", newline="")))
    assert table[0] == list(audit.EXPORT_FIELDS)
    assert [int(row[0]) for row in table[1:]] == ordered  # 13:00+01:00 is T0 (12:00 UTC)
    code, out = cli(tmp_path, "audit", "export", "--since", "yesterday")
    assert code != 0 and "is not an ISO 8601" in out


def test_cli_status_shows_the_pipeline(
    tmp_path: Path, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    make_series(session_factory)
    failed = make_job(session_factory, make_series(session_factory, state="complete"), "failed")
    code, out = cli(tmp_path, "status")
    assert code == 0, out
    assert "radnode status" in out and "recent series" in out
    assert f"{failed}:radnode-builtin-ct failed" in out
    assert "VolumeError: no geometry" in out  # the failures table


# -- the worker and cancelled jobs ----------------------------------------------------------


def _spooled_job(settings: Settings, factory: sessionmaker[Session], tmp_path: Path) -> int:
    files = write_ct_phantom(tmp_path / "phantom", slices=16, rows=64, columns=64)
    return spool_series(settings, factory, files)


def test_worker_records_success_in_the_audit_trail(
    tmp_path: Path, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    job_id = _spooled_job(settings, session_factory, tmp_path)
    assert tasks.run_analysis(job_id, settings=settings, session_factory=session_factory,
                              hostname="gpu-box") == "succeeded"
    (event,) = audit_rows(session_factory, "job.succeeded")
    assert (event.actor, event.target_type, event.target_id) == ("worker:gpu-box", "job",
                                                                  str(job_id))
    assert event.detail["results"] == 2 and event.detail["destinations"] == ["PACS"]
    assert event.detail["model"] == "radnode-builtin-ct"


def test_worker_never_starts_a_cancelled_job(
    tmp_path: Path, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    job_id = _spooled_job(settings, session_factory, tmp_path)
    act(session_factory, actions.cancel_job, job_id)
    assert tasks.run_analysis(job_id, settings=settings,
                              session_factory=session_factory) == "cancelled"
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == "cancelled" and job.attempts == 0
    assert count(session_factory, Result) == 0


@pytest.mark.parametrize("then_fail", [False, True])
def test_a_job_cancelled_while_it_runs_delivers_nothing(
    tmp_path: Path, settings: Settings, session_factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch, then_fail: bool
) -> None:
    """The operator cancels while the worker loads the series (a real cancel, mid-run)."""
    job_id = _spooled_job(settings, session_factory, tmp_path)
    load_volumes = tasks.load_volumes

    def cancel_then_load(paths: list[Path]) -> object:
        with session_factory() as session:
            assert session.get(Job, job_id).state == "running"  # type: ignore[union-attr]
        act(session_factory, actions.cancel_job, job_id)
        if then_fail:
            raise RuntimeError("the series vanished")
        return load_volumes(paths)

    monkeypatch.setattr(tasks, "load_volumes", cancel_then_load)
    assert tasks.run_analysis(job_id, settings=settings,
                              session_factory=session_factory) == "cancelled"
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.state, job.error) == ("cancelled", f"cancelled by {ACTOR}")
    assert count(session_factory, Result) == 0
    assert count(session_factory, Delivery) == 0
    assert [e.action for e in audit_rows(session_factory)] == ["job.cancel"]
