"""Completion signals, job claims and leases, the sweeper and retention, on a real SQLite file."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy.orm import Session, sessionmaker

from service import queue, retention, scheduler
from service.config import CompletionSettings, Settings
from service.db import repository
from service.db.models import Delivery, Job, Result, Series
from service.db.session import utcnow
from tests.unit.conftest import T0, Clock, record


def _series(factory: sessionmaker[Session], uid: str) -> Series:
    with factory() as session:
        found = repository.series_by_uid(uid, session=session)
        assert found is not None
        return found


def _reason(factory: sessionmaker[Session], uid: str, seconds: float,
            rules: CompletionSettings) -> str | None:
    return repository.completion_reason(_series(factory, uid), T0 + timedelta(seconds=seconds),
                                        rules)


def test_expected_count_completes_at_once(session_factory: sessionmaker[Session]) -> None:
    uid = generate_uid()
    rules = CompletionSettings(quiet_period_s=60)
    for index in range(3):
        with session_factory() as session:
            repository.record_instance(
                session=session, study_instance_uid="1.2.3", series_instance_uid=uid,
                sop_instance_uid=generate_uid(), sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT",
                path=f"x/{index}.dcm", size_bytes=1, calling_ae_title="CT",
                received_at=T0, expected_count=3)
            session.commit()
        expected = "expected_count" if index == 2 else None
        assert _reason(session_factory, uid, 0, rules) == expected
    no_count = rules.model_copy(update={"use_expected_count": False})
    assert _reason(session_factory, uid, 0, no_count) is None


def test_association_release_shortens_the_quiet_period(
    session_factory: sessionmaker[Session],
) -> None:
    uid = generate_uid()
    record(session_factory, series_uid=uid, modality="CT", at=T0)
    rules = CompletionSettings(quiet_period_s=60, release_quiet_s=1)
    assert _reason(session_factory, uid, 2, rules) is None  # not released yet
    with session_factory() as session:
        repository.mark_released([uid], session=session, now=T0 + timedelta(seconds=0.5))
        session.commit()
    assert _reason(session_factory, uid, 0.9, rules) is None
    assert _reason(session_factory, uid, 1.0, rules) == "association_released"
    off = rules.model_copy(update={"release_quiet_s": 0})
    assert _reason(session_factory, uid, 2, off) is None
    # A later instance (another association, not yet released) cancels the evidence.
    record(session_factory, series_uid=uid, modality="CT", at=T0 + timedelta(seconds=3))
    assert _reason(session_factory, uid, 10, rules) is None
    assert _reason(session_factory, uid, 63, rules) == "quiet_period"


def test_force_timeout_while_instances_keep_coming(
    session_factory: sessionmaker[Session],
) -> None:
    uid = generate_uid()
    rules = CompletionSettings(quiet_period_s=10, release_quiet_s=0, max_wait_s=30)
    for second in range(0, 40, 5):
        record(session_factory, series_uid=uid, modality="CT", at=T0 + timedelta(seconds=second))
        reason = _reason(session_factory, uid, second + 1, rules)
        assert reason == ("force_timeout" if second + 1 >= 30 else None)


def _job(factory: sessionmaker[Session], state: str, **fields: Any) -> int:
    uid = generate_uid()
    record(factory, series_uid=uid, modality="CT", at=T0)
    with factory() as session:
        series = repository.series_by_uid(uid, session=session)
        assert series is not None
        job = repository.add_job(session=session, series=series, task_name="t", queue="gpu",
                                 model_name="m", destinations=[], now=T0)
        job.state = state
        for key, value in fields.items():
            setattr(job, key, value)
        session.commit()
        return job.id


def _claim(factory: sessionmaker[Session], job_id: int, now_s: float, stale_s: float) -> bool:
    with factory() as session:
        claimed = repository.claim_job(job_id, session=session,
                                       now=T0 + timedelta(seconds=now_s),
                                       stale_before=T0 + timedelta(seconds=stale_s))
        session.commit()
        return claimed


def test_a_job_is_claimed_once(session_factory: sessionmaker[Session]) -> None:
    job_id = _job(session_factory, "queued")
    assert _claim(session_factory, job_id, 1, -60)
    assert not _claim(session_factory, job_id, 2, -60)  # duplicate message: dropped
    # Its lease goes stale (heartbeat at 1 s, stale before 100 s): claimable again.
    assert _claim(session_factory, job_id, 101, 100)
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.attempts == 2 and job.state == "running"
        job.state = "succeeded"
        session.commit()
    assert not _claim(session_factory, job_id, 500, 400)


class FakeCelery:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[int], str]] = []

    def send_task(self, name: str, args: list[int], queue: str, **limits: int) -> None:
        self.sent.append((name, args, queue))
        self.limits = limits


def test_sweeper_requeues_lost_and_unstarted_jobs(
    session_factory: sessionmaker[Session], settings: Settings, clock: Clock
) -> None:
    lost = _job(session_factory, "running", attempts=1, started_at=T0, heartbeat_at=T0)
    exhausted = _job(session_factory, "running", attempts=3, started_at=T0, heartbeat_at=T0)
    fresh = _job(session_factory, "running", attempts=1, started_at=T0,
                 heartbeat_at=T0 + timedelta(seconds=100))
    unstarted = _job(session_factory, "queued", queued_at=T0)
    app = FakeCelery()
    clock.at(120)  # heartbeat timeout 60 s, republish after 300 s
    assert scheduler.sweep_jobs(settings, session_factory) == 2
    assert scheduler.publish_pending(app, session_factory) == 1  # type: ignore[arg-type]
    assert [args for _, args, _ in app.sent] == [[lost]]
    clock.at(400)
    app.sent.clear()
    assert scheduler.sweep_jobs(settings, session_factory) == 2
    scheduler.publish_pending(app, session_factory)  # type: ignore[arg-type]
    assert sorted(args[0] for _, args, _ in app.sent) == sorted([unstarted, fresh])
    with session_factory() as session:
        states = {job_id: session.get(Job, job_id).state  # type: ignore[union-attr]
                  for job_id in (lost, exhausted, fresh, unstarted)}
        failed = session.get(Job, exhausted)
        assert failed is not None and "worker lost" in (failed.error or "")
    assert states == {lost: "queued", exhausted: "failed", fresh: "queued",
                      unstarted: "queued"}


def test_job_lost_after_its_hard_time_limit_fails_and_is_not_retried(
    session_factory: sessionmaker[Session], settings: Settings, clock: Clock
) -> None:
    killed = _job(session_factory, "running", attempts=1, started_at=T0, heartbeat_at=T0)
    clock.at(settings.worker.time_limit_s + 61)  # ran past its hard limit, lease stale
    assert scheduler.sweep_jobs(settings, session_factory) == 1
    with session_factory() as session:
        job = session.get(Job, killed)
        assert job is not None and job.state == "failed"
        assert "time limit exceeded" in (job.error or "")


def test_published_message_carries_the_model_time_limits(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    with session_factory() as session:
        job = session.get(Job, _job(session_factory, "pending"))
        assert job is not None
        job.model_name = "radnode-builtin-ct"
        session.commit()
    app = FakeCelery()
    assert scheduler.publish_pending(app, session_factory, settings) == 1  # type: ignore[arg-type]
    hard = settings.worker.time_limit_s
    assert app.limits == {"time_limit": hard, "soft_time_limit": int(hard * 0.9),
                          "priority": queue.PRIORITY_ROUTINE}


def _delivered_series(factory: sessionmaker[Session], spool: Path, *, sent: bool,
                      job_state: str = "succeeded") -> str:
    uid = generate_uid()
    sop = generate_uid()
    relative = f"1.2.3/{uid}/{sop}.dcm"
    (spool / relative).parent.mkdir(parents=True, exist_ok=True)
    (spool / relative).write_bytes(b"x")
    record(factory, series_uid=uid, modality="CT", at=T0, sop_uid=sop)
    with factory() as session:
        series = repository.series_by_uid(uid, session=session)
        assert series is not None
        series.state = "complete"
        job = repository.add_job(session=session, series=series, task_name="t", queue="gpu",
                                 model_name="m", destinations=["PACS@h:104"], now=T0)
        job.state = job_state
        session.flush()
        result = Result(job_id=job.id, kind="SEG", sop_class_uid="1.2", sop_instance_uid=sop,
                        series_instance_uid=generate_uid(), path="/r", created_at=T0)
        session.add(result)
        session.flush()
        session.add(Delivery(result_id=result.id, destination="PACS@h:104",
                             state="sent" if sent else "failed", created_at=T0,
                             next_attempt_at=T0, sent_at=T0 if sent else None))
        session.commit()
    return relative


def test_retention_purges_only_what_the_policy_allows(
    session_factory: sessionmaker[Session], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = settings.spool_dir
    delivered = _delivered_series(session_factory, spool, sent=True)
    failed = _delivered_series(session_factory, spool, sent=False)
    running = _delivered_series(session_factory, spool, sent=True, job_state="running")
    now = T0 + timedelta(hours=25)  # after_delivery_h 24, max_age_days 30
    monkeypatch.setattr(retention, "utcnow", lambda: now)
    assert retention.purge_due(settings, session_factory) == 1
    assert not (spool / delivered).exists()
    assert not (spool / delivered).parent.exists()  # empty folders go too
    assert (spool / failed).exists() and (spool / running).exists()
    now = T0 + timedelta(days=31)
    assert retention.purge_due(settings, session_factory) == 1  # the failed one, by age
    assert not (spool / failed).exists()
    assert (spool / running).exists()  # never while a job is active
    with session_factory() as session:
        states = sorted(s.state for s in session.query(Series))
    assert states == ["complete", "purged", "purged"]
    assert utcnow() > T0
