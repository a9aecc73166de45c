"""Data access as plain functions that take the session as a keyword argument.

Every function leaves committing to the caller unless its docstring says
otherwise, so that a caller can put several steps in one transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Select, case, func, select, update
from sqlalchemy.orm import Session

from service.config import CompletionSettings
from service.db.ingest import IngestSQL, ingest_sql
from service.db.models import Delivery, Instance, Job, Result, Series
from service.db.session import as_utc


def _ingest(session: Session) -> tuple[IngestSQL, Any]:
    """The compiled C-STORE statements and the DBAPI connection of the session's transaction."""
    connection = session.connection()
    return ingest_sql(connection.dialect), connection.connection.dbapi_connection


def instance_exists(sop_instance_uid: str, *, session: Session) -> bool:
    """Return True if an instance with this SOP Instance UID is already stored."""
    found = session.execute(
        select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
    ).first()
    return found is not None


def stored_instance(sop_instance_uid: str, *, session: Session) -> Instance | None:
    """The instance row of this SOP Instance UID (with its series), None if there is none."""
    return session.scalars(
        select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)).first()


def count_duplicate(sop_instance_uid: str, *, session: Session) -> None:
    """Count one more arrival of an already stored SOP Instance UID (the first is kept)."""
    sql, connection = _ingest(session)
    sql.count_duplicate_of(connection, sop_instance_uid)


def record_instance(
    *,
    session: Session,
    study_instance_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    sop_class_uid: str,
    transfer_syntax_uid: str,
    modality: str,
    path: str,
    size_bytes: int,
    calling_ae_title: str,
    received_at: datetime,
    expected_count: int | None = None,
    called_ae_title: str = "",
    peer_address: str = "",
) -> bool:
    """Record a stored instance and update its series.

    A series that was complete goes back to ``receiving`` (late instance: it
    is analysed again once complete again; deterministic result UIDs make the
    new results replace the old ones). The association facts (calling and
    called AE title, peer address) are those of the series' first instance.
    ``expected_count`` (Images in Acquisition) is kept from the first
    instance that carries it.

    Three statements on SQLite and PostgreSQL alike (the SCP runs this for
    every instance): an upsert of the series that returns its id, an insert
    of the instance that does nothing for a known SOP Instance UID, and the
    series' counters, or the duplicate counter instead.

    Returns
    -------
    bool
        True if the instance is new, False if its SOP Instance UID was already
        recorded (then only the duplicate counter changes).
    """
    sql, connection = _ingest(session)
    return sql.record_instance(
        connection, study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid,
        sop_class_uid=sop_class_uid, transfer_syntax_uid=transfer_syntax_uid,
        modality=modality, path=path, size_bytes=size_bytes,
        calling_ae_title=calling_ae_title, received_at=received_at,
        expected_count=expected_count, called_ae_title=called_ae_title,
        peer_address=peer_address)


def completion_reason(series: Series, now: datetime, rules: CompletionSettings,
                      quiet_period_s: float | None = None) -> str | None:
    """Why a receiving series counts as complete now, or None if it does not yet.

    The signals, first match wins: ``expected_count`` (instance count reached
    Images in Acquisition), ``association_released`` (the sending association
    was released after the last instance and ``release_quiet_s`` passed),
    ``quiet_period`` (no instance for ``quiet_period_s``: the routing rule's,
    when given, else ``rules.quiet_period_s``), ``force_timeout``
    (``max_wait_s`` since the first instance).
    """
    last = as_utc(series.last_received_at)
    quiet_s = (now - last).total_seconds()
    if (rules.use_expected_count and series.expected_count
            and series.instance_count >= series.expected_count):
        return "expected_count"
    if (rules.release_quiet_s > 0 and series.released_at is not None
            and as_utc(series.released_at) >= last and quiet_s >= rules.release_quiet_s):
        return "association_released"
    if quiet_s >= (quiet_period_s or rules.quiet_period_s):
        return "quiet_period"
    if (now - as_utc(series.first_received_at)).total_seconds() >= rules.max_wait_s:
        return "force_timeout"
    return None


def complete_ready_series(
    *, session: Session, now: datetime, rules: CompletionSettings,
    quiet_period: Callable[[Series], float | None] | None = None,
) -> list[Series]:
    """Mark every receiving series that is complete by :func:`completion_reason`.

    ``quiet_period(series)`` gives a series' own quiet period, seconds (from
    the routing rules it matches), or None for ``rules.quiet_period_s``.

    Returns
    -------
    list[Series]
        The series that became complete now, with ``completion_reason`` set.
    """
    completed = []
    for series in session.scalars(select(Series).where(Series.state == "receiving")):
        quiet = quiet_period(series) if quiet_period is not None else None
        reason = completion_reason(series, now, rules, quiet)
        if reason is not None:
            series.state = "complete"
            series.completed_at = now
            series.completion_reason = reason
            completed.append(series)
    return completed


def mark_released(series_uids: Sequence[str], *, session: Session, now: datetime) -> None:
    """Record that an association which stored instances of these series was released."""
    if series_uids:
        session.execute(
            update(Series)
            .where(Series.series_instance_uid.in_(list(series_uids)))
            .values(released_at=now)
        )


def add_job(
    *,
    session: Session,
    series: Series,
    task_name: str,
    queue: str,
    model_name: str,
    destinations: Sequence[str],
    now: datetime,
    priority: str = "routine",
    rule_names: Sequence[str] = (),
    config_version: str = "",
) -> Job:
    """Add a ``pending`` job for a series; it is published after commit.

    Earlier jobs of the same series and model that have not started
    (``pending``/``queued``: the series was completed again after late
    instances) become ``superseded``: the new job analyses the whole series
    once, and a worker never claims a superseded job.
    """
    session.execute(
        update(Job)
        .where(Job.series_id == series.id, Job.model_name == model_name,
               Job.state.in_(("pending", "queued")))
        .values(state="superseded", finished_at=now,
                error="superseded: the series received more instances and was queued again")
    )
    job = Job(
        series_id=series.id,
        task_name=task_name,
        queue=queue,
        model_name=model_name,
        destinations=list(destinations),
        priority=priority,
        rule_names=",".join(rule_names)[:400],
        config_version=config_version,
        state="pending",
        attempts=0,
        created_at=now,
    )
    session.add(job)
    return job


def restart_completion_clock(*, session: Session, now: datetime) -> int:
    """Give series that were receiving when the node stopped a fresh quiet period.

    The time the node was down is no evidence that a series is complete (the
    sender could not reach it), so their last activity becomes ``now`` and
    any association-release evidence is dropped. Returns how many series.
    """
    result = session.execute(
        update(Series).where(Series.state == "receiving")
        .values(last_received_at=now, released_at=None)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def claim_job(job_id: int, *, session: Session, now: datetime, stale_before: datetime) -> bool:
    """Atomically mark a job ``running`` for this worker; False if it is not claimable.

    A job is claimable when it is ``pending`` or ``queued``, or ``running``
    with a lease older than ``stale_before`` (its worker was lost). A
    duplicate broker message for a job that runs elsewhere or already ended
    is therefore dropped.
    """
    claimable = (Job.state.in_(("pending", "queued"))) | (
        (Job.state == "running") & (func.coalesce(Job.heartbeat_at, Job.started_at) < stale_before)
    )
    result = session.execute(
        update(Job).where(Job.id == job_id, claimable).values(
            state="running", started_at=now, heartbeat_at=now, attempts=Job.attempts + 1,
            error=None,
        )
    )
    return bool(getattr(result, "rowcount", 0))


def renew_lease(job_id: int, *, session: Session, now: datetime) -> None:
    """Renew a running job's lease (its heartbeat)."""
    session.execute(
        update(Job).where(Job.id == job_id, Job.state == "running").values(heartbeat_at=now)
    )


def lost_jobs(*, session: Session, stale_before: datetime) -> list[Job]:
    """Running jobs whose lease is older than ``stale_before``: their worker was lost."""
    return list(session.scalars(
        select(Job).where(Job.state == "running",
                          func.coalesce(Job.heartbeat_at, Job.started_at) < stale_before)
    ))


def unstarted_jobs(*, session: Session, queued_before: datetime) -> list[Job]:
    """Queued jobs published before ``queued_before`` that no worker started."""
    return list(session.scalars(
        select(Job).where(Job.state == "queued", Job.queued_at < queued_before)
    ))


def pending_jobs(*, session: Session) -> list[Job]:
    """Jobs written but not yet handed to the broker: STAT first, then oldest first."""
    stat_first = case((Job.priority == "stat", 0), else_=1)
    return list(session.scalars(
        select(Job).where(Job.state == "pending").order_by(stat_first, Job.id)))


def queued_counts(*, session: Session) -> dict[str, int]:
    """How many jobs each queue holds published but not started."""
    rows = session.execute(
        select(Job.queue, func.count()).where(Job.state == "queued").group_by(Job.queue))
    return {queue: int(count) for queue, count in rows}


def unrouted_series(*, session: Session) -> list[Series]:
    """Complete series not routed yet (oldest completion first)."""
    return list(session.scalars(
        select(Series).where(Series.state == "complete", Series.routed_at.is_(None))
        .order_by(Series.completed_at, Series.id)))


def study_activity(study_instance_uid: str, *, session: Session) -> tuple[bool, datetime]:
    """Whether a study still has a receiving series, and its last instance's arrival."""
    receiving, last = session.execute(
        select(func.count(case((Series.state == "receiving", 1))),
               func.max(Series.last_received_at))
        .where(Series.study_instance_uid == study_instance_uid)).one()
    return bool(receiving), as_utc(last)


def instance_paths(series_id: int, *, session: Session) -> list[str]:
    """Spool-relative paths of a series' instances, in arrival order."""
    return list(
        session.scalars(
            select(Instance.path).where(Instance.series_id == series_id).order_by(Instance.id)
        )
    )


def due_deliveries(*, session: Session, now: datetime, limit: int = 100) -> list[Delivery]:
    """Pending deliveries whose next attempt is due, oldest first."""
    return list(
        session.scalars(
            select(Delivery)
            .where(Delivery.state == "pending", Delivery.next_attempt_at <= now)
            .order_by(Delivery.id)
            .limit(limit)
        )
    )


def series_by_uid(series_instance_uid: str, *, session: Session) -> Series | None:
    """Return the series with this Series Instance UID, or None."""
    return session.scalars(
        select(Series).where(Series.series_instance_uid == series_instance_uid)
    ).first()


def jobs_for_series(series_id: int, *, session: Session) -> list[Job]:
    """All jobs of a series, oldest first."""
    return list(session.scalars(select(Job).where(Job.series_id == series_id).order_by(Job.id)))


def results_for_job(job_id: int, *, session: Session) -> list[Result]:
    """All results of a job."""
    return list(session.scalars(select(Result).where(Result.job_id == job_id).order_by(Result.id)))


def deliveries_for_result(result_id: int, *, session: Session) -> list[Delivery]:
    """All deliveries of a result."""
    return list(
        session.scalars(
            select(Delivery).where(Delivery.result_id == result_id).order_by(Delivery.id)
        )
    )


def recent_jobs(*, session: Session, limit: int = 20) -> list[Job]:
    """The newest jobs first, with their series loaded."""
    return list(session.scalars(select(Job).order_by(Job.id.desc()).limit(limit)))


def delivery_query(*, ids: Sequence[int] = (), state: str | None = None,
                   destination: str | None = None,
                   study_instance_uid: str | None = None) -> Select[Delivery]:
    """The deliveries matching every filter given (joined to result, job and series), unordered."""
    query = (select(Delivery).join(Result, Delivery.result_id == Result.id)
             .join(Job, Result.job_id == Job.id).join(Series, Job.series_id == Series.id))
    if ids:
        query = query.where(Delivery.id.in_(list(ids)))
    if state:
        query = query.where(Delivery.state == state)
    if destination:
        query = query.where(Delivery.destination == destination)
    if study_instance_uid:
        query = query.where(Series.study_instance_uid == study_instance_uid)
    return query


def find_deliveries(*, session: Session, ids: Sequence[int] = (), state: str | None = None,
                    destination: str | None = None, study_instance_uid: str | None = None,
                    limit: int | None = None) -> list[Delivery]:
    """Deliveries matching every filter given, newest first."""
    query = delivery_query(ids=ids, state=state, destination=destination,
                           study_instance_uid=study_instance_uid).order_by(Delivery.id.desc())
    if limit:
        query = query.limit(limit)
    return list(session.scalars(query))


def study_results(study_instance_uid: str, *, session: Session) -> list[Result]:
    """The results of the newest succeeded job of each (series, model) of a study."""
    jobs = session.scalars(
        select(Job).join(Series, Job.series_id == Series.id)
        .where(Series.study_instance_uid == study_instance_uid, Job.state == "succeeded")
        .order_by(Job.id))
    newest: dict[tuple[int, str], Job] = {}
    for job in jobs:
        newest[(job.series_id, job.model_name)] = job
    return [result for job in newest.values() for result in job.results]


def schedule_delivery(result: Result, destination: str, *, session: Session,
                      now: datetime) -> Delivery:
    """Make ``result`` due for ``destination`` now, as a fresh delivery.

    An existing row for the pair is reset (attempts, commitment, error); else
    one is added. Used by the operator's resend and retry commands.
    """
    delivery = session.scalars(select(Delivery).where(
        Delivery.result_id == result.id, Delivery.destination == destination)).first()
    if delivery is None:
        delivery = Delivery(result_id=result.id, destination=destination, created_at=now)
        session.add(delivery)
    delivery.state = "pending"
    delivery.attempts = 0
    delivery.status = None
    delivery.error = None
    delivery.next_attempt_at = now
    delivery.transaction_uid = None
    delivery.commit_requested_at = None
    delivery.commit_attempts = 0
    delivery.committed_at = None
    delivery.created_at = now  # the give-up clock starts again
    return delivery
