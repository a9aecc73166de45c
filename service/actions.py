"""Operator actions, shared by the HTTP API and the CLI; each one is audited.

Every action works on the database only, inside the caller's session, and
adds its :mod:`service.audit` event to the same transaction: the change and
its record are committed together or not at all. A running node picks the
change up on its next scheduler or delivery tick; nothing else is signalled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy.orm import Session

from service import audit
from service.db import repository
from service.db.models import Delivery, Job, Result, Series
from service.db.session import utcnow

#: Job states an operator may cancel, and the states a retry starts from.
CANCELLABLE = ("pending", "queued", "running")
RETRYABLE = ("succeeded", "failed", "cancelled", "superseded")


class ActionError(Exception):
    """An action that cannot be done: ``kind`` is ``not_found`` or ``conflict``.

    The HTTP API answers 404 or 409 with the message; the CLI prints it.
    """

    def __init__(self, kind: Literal["not_found", "conflict"], message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Outcome:
    """What an action did: a message for people and the ids it touched."""

    message: str
    ids: list[int] = field(default_factory=list)


def _job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise ActionError("not_found", f"no job with id {job_id}")
    return job


def retry_job(session: Session, job_id: int, *, actor: str) -> Outcome:
    """Run a finished job's model on its series again, as a new ``pending`` job.

    The new job has the same model, destinations, priority and routing
    record; its results replace the old ones through the deterministic UIDs.

    Raises
    ------
    ActionError
        ``not_found`` for an unknown id; ``conflict`` while the job is still
        pending, queued or running, or when its series was purged from the spool.
    """
    old = _job(session, job_id)
    if old.state not in RETRYABLE:
        raise ActionError("conflict", f"job {job_id} is {old.state}: only a finished job "
                                      f"({', '.join(RETRYABLE)}) can be retried")
    if old.series.state == "purged":
        raise ActionError("conflict", f"the series of job {job_id} was purged from the spool "
                                      "(retention): send it again to analyse it")
    new = repository.add_job(
        session=session, series=old.series, task_name=old.task_name, queue=old.queue,
        model_name=old.model_name, destinations=old.destinations, now=utcnow(),
        priority=old.priority, rule_names=[n for n in old.rule_names.split(",") if n],
        config_version=old.config_version)
    session.flush()
    audit.record(session, actor=actor, action="job.retry", target_type="job", target_id=job_id,
                 detail={"new_job": new.id, "previous_state": old.state,
                         "model": old.model_name,
                         "series_instance_uid": old.series.series_instance_uid})
    return Outcome(f"job {job_id} queued again as job {new.id}", [new.id])


def cancel_job(session: Session, job_id: int, *, actor: str) -> Outcome:
    """Cancel a pending, queued or running job.

    A pending or queued job is never started (a worker only runs a job it can
    claim); a running one finishes its computation, but its results are
    discarded and nothing is delivered.

    Raises
    ------
    ActionError
        ``not_found`` for an unknown id; ``conflict`` when the job has ended.
    """
    job = _job(session, job_id)
    if job.state not in CANCELLABLE:
        raise ActionError("conflict", f"job {job_id} is {job.state}: only a pending, queued "
                                      f"or running job can be cancelled")
    previous = job.state
    job.state = "cancelled"
    job.finished_at = utcnow()
    job.error = f"cancelled by {actor}"
    audit.record(session, actor=actor, action="job.cancel", target_type="job", target_id=job_id,
                 detail={"previous_state": previous, "model": job.model_name,
                         "series_instance_uid": job.series.series_instance_uid})
    return Outcome(f"job {job_id} cancelled (was {previous})", [job_id])


def force_complete(session: Session, series_id: int, *, actor: str) -> Outcome:
    """Mark a receiving series complete now (reason ``forced``); it is routed next tick.

    Raises
    ------
    ActionError
        ``not_found`` for an unknown id; ``conflict`` when the series is not receiving.
    """
    series = session.get(Series, series_id)
    if series is None:
        raise ActionError("not_found", f"no series with id {series_id}")
    if series.state != "receiving":
        raise ActionError("conflict", f"series {series_id} is {series.state}, not receiving")
    series.state = "complete"
    series.completed_at = utcnow()
    series.completion_reason = "forced"
    audit.record(session, actor=actor, action="series.complete", target_type="series",
                 target_id=series_id,
                 detail={"series_instance_uid": series.series_instance_uid,
                         "instances": series.instance_count})
    return Outcome(f"series {series_id} complete ({series.instance_count} instances)",
                   [series_id])


def resend_deliveries(session: Session, delivery_ids: Sequence[int], *, actor: str,
                      destination: str | None = None) -> Outcome:
    """Send the results of these deliveries again to the same destinations.

    Raises
    ------
    ActionError
        ``not_found`` if any id is unknown (or not to ``destination``).
    """
    rows = repository.find_deliveries(session=session, ids=delivery_ids, destination=destination)
    missing = set(delivery_ids) - {d.id for d in rows}
    if missing:
        raise ActionError("not_found",
                          f"no delivery with id {', '.join(map(str, sorted(missing)))}")
    return _schedule(session, [(d.result, d.destination) for d in rows], actor=actor,
                     action="delivery.resend")


def resend_result(session: Session, result_id: int, *, actor: str,
                  destinations: Sequence[str] = ()) -> Outcome:
    """Send one result again: to ``destinations``, or to every destination it went to.

    Raises
    ------
    ActionError
        ``not_found`` for an unknown id; ``conflict`` when the result never had
        a destination and none is given.
    """
    result = session.get(Result, result_id)
    if result is None:
        raise ActionError("not_found", f"no result with id {result_id}")
    targets = list(destinations) or sorted({d.destination for d in result.deliveries})
    if not targets:
        raise ActionError("conflict", f"result {result_id} has no destination: name one")
    return _schedule(session, [(result, name) for name in targets], actor=actor,
                     action="result.resend")


def resend_study(session: Session, study_instance_uid: str, *, actor: str,
                 destination: str | None = None) -> Outcome:
    """Send every current result of a study again (to ``destination`` only, if given).

    Raises
    ------
    ActionError
        ``not_found`` when the study has no results.
    """
    results = repository.study_results(study_instance_uid, session=session)
    if not results:
        raise ActionError("not_found", f"study {study_instance_uid} has no results")
    pairs = [(result, name) for result in results
             for name in ([destination] if destination else
                          sorted({d.destination for d in result.deliveries}))]
    return _schedule(session, pairs, actor=actor, action="study.resend")


def retry_failed_deliveries(session: Session, *, actor: str,
                            destination: str | None = None) -> Outcome:
    """Try every failed delivery (to ``destination``, if given) again from attempt zero."""
    rows = repository.find_deliveries(session=session, state="failed", destination=destination)
    return _schedule(session, [(d.result, d.destination) for d in rows], actor=actor,
                     action="delivery.retry")


def _schedule(session: Session, pairs: Sequence[tuple[Result, str]], *, actor: str,
              action: str) -> Outcome:
    now = utcnow()
    scheduled: list[Delivery] = []
    for result, name in pairs:
        scheduled.append(repository.schedule_delivery(result, name, session=session, now=now))
    session.flush()
    for delivery in scheduled:
        audit.record(session, actor=actor, action=action, target_type="delivery",
                     target_id=delivery.id,
                     detail={"destination": delivery.destination,
                             "sop_instance_uid": delivery.result.sop_instance_uid})
    count = len(scheduled)
    return Outcome(f"{count} deliver{'y' if count == 1 else 'ies'} scheduled",
                   [d.id for d in scheduled])
