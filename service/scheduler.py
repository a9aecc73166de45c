"""The node's background loops: completion, routing and publishing, the job sweeper.

Every loop reads its work from the database, so a restart loses nothing: a
job row written but not yet published is published on the next tick, and a
delivery that was due is tried again. Only :func:`publish_pending` publishes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta
from time import monotonic

import pydicom
from celery import Celery
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy.orm import Session, sessionmaker

from service import queue
from service.config import Destination, Settings
from service.db import repository
from service.db.models import Series
from service.db.session import as_utc, utcnow
from service.model_spec import model_attributes
from service.routing import Routing, SeriesFacts, header_keywords, route

log = logging.getLogger("radnode.scheduler")


def _read_header(settings: Settings, session: Session, series: Series,
                 keywords: set[str]) -> Dataset:
    """The header of a series' first readable instance (what rules and models look at).

    Reads no Pixel Data; a file that cannot be read gives an empty data set,
    so that conditions on its attributes do not match.
    """
    paths = repository.instance_paths(series.id, session=session)
    problem = "no instance"
    # The first readable one: retention may have removed the earlier files of a
    # series that received a late instance.
    for path in [*paths[:3], *paths[-2:]]:
        try:
            return pydicom.dcmread(settings.spool_dir / path, stop_before_pixels=True,
                                   specific_tags=sorted(keywords))
        except (OSError, InvalidDicomError, ValueError) as exc:
            problem = type(exc).__name__
    log.warning("cannot read the header of series %s for routing: %s",
                series.series_instance_uid, problem)
    return Dataset()


def _as_text(header: Dataset) -> dict[str, str]:
    """Non-empty attributes of ``header`` as text, by keyword (model accept conditions)."""
    found: dict[str, str] = {}
    for element in header:
        if element.keyword and element.value not in (None, ""):
            found[element.keyword] = str(element.value)
    return found


class Router:
    """Routes complete series by the rules (``rules``, ``fallback``) and the models' accepts.

    Reads each series' first header once and keeps the outcome until the
    series is routed, so that a rule's own quiet period and a study-scope
    wait cost no further reads. :meth:`reset` forgets everything (after the
    configuration was reloaded).
    """

    def __init__(self) -> None:
        self._cache: dict[int, tuple[Routing, dict[str, str]]] = {}
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Forget cached routings (the rules changed)."""
        with self._lock:
            self._cache.clear()

    def routing(self, settings: Settings, session: Session,
                series: Series) -> tuple[Routing, dict[str, str]]:
        """The routing of ``series`` and its header attributes as text (cached)."""
        with self._lock:
            cached = self._cache.get(series.id)
        if cached is not None:
            return cached
        keywords = (header_keywords(settings.rules, settings.fallback)
                    | model_attributes(settings.models) | {"NumberOfFrames", "Modality"})
        header = _read_header(settings, session, series, keywords)
        if "Modality" not in header and series.modality:
            header.Modality = series.modality  # as recorded when it was received
        facts = SeriesFacts(header=header, calling_ae=series.calling_ae_title,
                            called_ae=series.called_ae_title, peer_address=series.peer_address)
        outcome = (route(settings.rules, settings.fallback, facts), _as_text(header))
        with self._lock:
            self._cache[series.id] = outcome
        return outcome

    def forget(self, series_id: int) -> None:
        """Drop the cached routing of a routed series."""
        with self._lock:
            self._cache.pop(series_id, None)

    def quiet_period(self, settings: Settings, session: Session, series: Series) -> float | None:
        """The series' own quiet period from its rules, seconds; None for the default."""
        if not any(rule.quiet_period_s for rule in settings.rules):
            return None
        return self.routing(settings, session, series)[0].quiet_period_s


def resolve_destinations(settings: Settings, names: Sequence[str],
                         calling_ae_title: str) -> list[str]:
    """Destination names for a job, in order, each once.

    ``*`` is every configured destination; ``sender`` the DICOM destinations
    that the series' calling AE title maps to (:meth:`Destination.is_sender`).
    """
    resolved: list[str] = []
    for name in names:
        if name == "*":
            candidates = [d.name for d in settings.destinations]
        elif name == "sender":
            candidates = [d.name for d in settings.destinations
                          if isinstance(d, Destination) and d.is_sender(calling_ae_title)]
            if not candidates:
                log.warning("no destination is configured for sender AE %s: results are not "
                            "returned to it", calling_ae_title or "(none)")
        else:
            candidates = [name]
        resolved.extend(c for c in candidates if c not in resolved)
    return resolved


def complete_and_route(settings: Settings, session_factory: sessionmaker[Session],
                       router: Router | None = None) -> int:
    """Complete ready series, then route complete series; return jobs added.

    Completion uses each series' own quiet period when a matching rule sets
    one. Routing (:func:`service.routing.route`) adds one job per target
    model that also accepts the series (``models[].accepts``); a rule with
    ``completion: study`` waits until no series of the study is receiving
    and the study was quiet for the rule's quiet period. Each job records its
    priority, the rules that routed it and the configuration version. Why a
    model declined a series is logged (UIDs only).
    """
    router = router or Router()
    now = utcnow()
    added = 0
    with session_factory() as session:
        repository.complete_ready_series(
            session=session, now=now, rules=settings.completion,
            quiet_period=lambda series: router.quiet_period(settings, session, series))
        session.flush()
        for series in repository.unrouted_series(session=session):
            routing, attributes = router.routing(settings, session, series)
            if routing.scope == "study":
                receiving, last = repository.study_activity(series.study_instance_uid,
                                                            session=session)
                quiet = routing.quiet_period_s or settings.completion.quiet_period_s
                if receiving or (now - last).total_seconds() < quiet:
                    continue  # the study is still arriving
            added += _add_jobs(settings, session, series, routing, attributes, now)
            series.routed_at = now
            router.forget(series.id)
        session.commit()
    return added


def _add_jobs(settings: Settings, session: Session, series: Series, routing: Routing,
              attributes: dict[str, str], now: datetime) -> int:
    frames = int(attributes.get("NumberOfFrames", "1") or 1)
    version = settings.config_version
    added = 0
    for target in routing.targets:
        try:
            spec = settings.model(target.model)
        except KeyError:
            log.error("series %s: rule(s) %s name model %s, which is not declared",
                      series.series_instance_uid, ",".join(target.rules), target.model)
            continue
        reason = spec.accepts.rejects(series.modality, attributes)
        slices = series.instance_count * max(frames, 1)
        if reason is None and slices < spec.accepts.min_slices:
            reason = f"{slices} slice(s), needs {spec.accepts.min_slices}"
        if reason is not None:
            log.info("series %s: model %s declines it: %s",
                     series.series_instance_uid, spec.name, reason)
            continue
        destinations = resolve_destinations(settings, target.destinations,
                                            series.calling_ae_title)
        repository.add_job(
            session=session, series=series, task_name=queue.ANALYSE_SERIES,
            queue=spec.queue, model_name=spec.name, destinations=destinations, now=now,
            priority=target.priority, rule_names=target.rules, config_version=version,
        )
        added += 1
    log.info("series %s complete (%s): %d instances, modality %s, rules %s, %d job(s)",
             series.series_instance_uid, series.completion_reason, series.instance_count,
             series.modality or "?", ",".join(routing.matched) or "-", added)
    return added


def time_limits(settings: Settings, model_name: str) -> tuple[int, int]:
    """Hard and soft time limits (s) of a job of ``model_name``.

    The model's own ``time_limit_s``/``soft_time_limit_s`` when declared, else
    ``worker.time_limit_s``; the soft limit defaults to 90 % of the hard one.
    """
    try:
        spec = settings.model(model_name)
        hard = spec.time_limit_s or settings.worker.time_limit_s
        soft = spec.soft_time_limit_s
    except KeyError:
        hard, soft = settings.worker.time_limit_s, None
    return hard, soft if soft is not None else max(int(hard * 0.9), 5)


class _BrokerState:
    """Say once that the broker is down, now and then that it still is, and when it is back.

    The scheduler tries to publish on every tick (every 0.5 s by default);
    one line per tick would bury the log.
    """

    #: Seconds between reminders while the broker stays unreachable.
    REMIND_S = 60.0

    def __init__(self) -> None:
        self.down_since: float | None = None
        self._last_said = 0.0

    def failed(self, app: Celery, exc: Exception) -> None:
        now = monotonic()
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        url = queue.describe_broker(app)
        if self.down_since is None:
            self.down_since = now
            self._last_said = now
            log.error("cannot reach the broker at %s (%s): jobs wait in the database and are "
                      "published when it is back", url, reason)
        elif now - self._last_said >= self.REMIND_S:
            self._last_said = now
            log.error("the broker at %s is still unreachable after %.0f s (%s)", url,
                      now - self.down_since, reason)

    def succeeded(self) -> None:
        if self.down_since is not None:
            log.info("the broker is reachable again after %.0f s", monotonic() - self.down_since)
            self.down_since = None


_BROKER = _BrokerState()


def publish_pending(app: Celery, session_factory: sessionmaker[Session],
                    settings: Settings | None = None) -> int:
    """Publish ``pending`` jobs (after their rows were committed); return how many.

    STAT jobs go first, then the oldest. With ``settings``, each queue holds
    at most ``worker.queued_ahead`` published jobs that no worker started;
    the others wait in the database, so that a STAT job overtakes every
    routine job but those. Each message carries its model's hard and soft
    time limits (:func:`time_limits`). Without ``settings`` every pending job
    is published with the worker's default limits.
    """
    published = 0
    ahead = settings.worker.queued_ahead if settings is not None else None
    with session_factory() as session:
        queued = repository.queued_counts(session=session)
        for job in repository.pending_jobs(session=session):
            if ahead is not None and queued.get(job.queue, 0) >= ahead:
                continue  # waits in the database, where a STAT job can overtake it
            limits = time_limits(settings, job.model_name) if settings is not None else None
            try:
                queue.publish(app, task_name=job.task_name, queue=job.queue, job_id=job.id,
                              time_limits=limits, stat=job.priority == "stat")
            except Exception as exc:  # kombu raises several types; retried next tick
                _BROKER.failed(app, exc)
                break
            _BROKER.succeeded()
            job.state = "queued"
            job.queued_at = utcnow()
            session.commit()
            queued[job.queue] = queued.get(job.queue, 0) + 1
            published += 1
            log.info("job %d (%s, %s) queued on %s", job.id, job.model_name, job.priority,
                     job.queue)
    return published


def sweep_jobs(settings: Settings, session_factory: sessionmaker[Session]) -> int:
    """Recover jobs whose broker message or worker was lost; return how many were touched.

    * a ``running`` job whose lease lapsed after it had run for its hard time
      limit (:func:`time_limits`) was killed by Celery for time: it fails and
      is not retried;
    * a ``running`` job whose lease (heartbeat) is older than
      ``worker.heartbeat_timeout_s`` lost its worker (killed, machine down):
      it goes back to ``pending`` (published again by :func:`publish_pending`),
      or ``failed`` after ``worker.max_attempts`` attempts;
    * a ``queued`` job not started ``worker.republish_after_s`` after it was
      published may have lost its message (broker restarted without
      persistence): it goes back to ``pending`` too. A duplicate message is
      harmless, since a worker only runs a job it can claim
      (:func:`repository.claim_job`).
    """
    cfg = settings.worker
    now = utcnow()
    touched = 0
    with session_factory() as session:
        stale = now - timedelta(seconds=cfg.heartbeat_timeout_s)
        for job in repository.lost_jobs(session=session, stale_before=stale):
            touched += 1
            hard, _ = time_limits(settings, job.model_name)
            if job.started_at is not None and (
                    now - as_utc(job.started_at)).total_seconds() >= hard:
                job.state = "failed"
                job.finished_at = now
                job.error = (f"time limit exceeded: ran {hard} s or more (hard limit of "
                             f"model {job.model_name}); not retried")
                log.error("job %d failed: hard time limit of %d s exceeded", job.id, hard)
                continue
            if job.attempts >= cfg.max_attempts:
                job.state = "failed"
                job.finished_at = now
                job.error = (f"worker lost {job.attempts} time(s) (no heartbeat for "
                             f"{cfg.heartbeat_timeout_s:g} s); giving up")
                log.error("job %d failed: worker lost after %d attempts", job.id, job.attempts)
                continue
            job.state = "pending"  # published again below, after commit
            log.warning("job %d lost its worker (no heartbeat for %g s): queued again",
                        job.id, cfg.heartbeat_timeout_s)
        cutoff = now - timedelta(seconds=cfg.republish_after_s)
        for job in repository.unstarted_jobs(session=session, queued_before=cutoff):
            touched += 1
            job.state = "pending"
            log.warning("job %d queued %g s ago and not started: publishing it again",
                        job.id, cfg.republish_after_s)
        session.commit()
    return touched


class Loop(threading.Thread):
    """Run ``step`` every ``interval_s`` seconds until stopped; log and survive errors."""

    def __init__(self, name: str, step: object, interval_s: float) -> None:
        super().__init__(name=name, daemon=True)
        self._step = step
        self._interval_s = interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Loop until :meth:`stop`."""
        while not self._stop_event.is_set():
            try:
                self._step()  # type: ignore[operator]
            except Exception:
                log.exception("%s loop step failed; continuing", self.name)
            self._stop_event.wait(self._interval_s)

    def stop(self) -> None:
        """Ask the loop to stop and wait for the current step."""
        self._stop_event.set()
        self.join(timeout=30)
