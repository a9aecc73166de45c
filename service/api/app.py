"""The node's HTTP application: REST API, health, Prometheus metrics, dashboard.

Built by :func:`create_app` and served by ``radnode serve`` (uvicorn in a
thread of the node, :mod:`service.api.server`). It reads and changes the
database only; the node's loops pick every change up on their next tick.
The OpenAPI schema is at ``/openapi.json`` and browsable at ``/docs``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from sqlalchemy import Select, desc, func, select, text
from sqlalchemy.orm import Session, selectinload, sessionmaker

from service import actions, audit
from service.api import schemas
from service.api.auth import Admin, AuthMiddleware, Operator, Viewer, require_role
from service.config import Destination, FolderDestination, Settings, StowDestination
from service.db import repository
from service.db.models import (
    Association,
    AuditEvent,
    Delivery,
    Job,
    Result,
    Series,
    WorkerStatus,
)
from service.db.session import as_utc, utcnow

log = logging.getLogger("radnode.api")

#: A readiness probe: () -> (ok, detail). Must not raise and must be quick.
Probe = Callable[[], tuple[bool, str]]

#: Pipeline order of series states, least advanced first (a study's state is
#: that of its least advanced series).
SERIES_ORDER = ("receiving", "complete", "purged")

#: A worker that has not reported for this long is shown as not alive.
WORKER_STALE = timedelta(minutes=2)

_Query = TypeVar("_Query", bound=Select)  # type: ignore[type-arg]


@dataclass
class ApiContext:
    """What the application needs from the node.

    Attributes
    ----------
    settings : callable
        Returns the node's current settings (they change on reload).
    session_factory : sessionmaker
        Database sessions.
    probes : dict
        Readiness probes by name (``database`` is built in): the node adds
        ``broker``, ``spool`` and ``scp``.
    render_metrics : callable, optional
        Returns ``(body, content type)`` for ``/metrics``.
    echo : callable, optional
        ``echo(destination) -> status or None``: C-ECHO for the destinations
        page (default: :func:`service.dicom.scu.echo`).
    """

    settings: Callable[[], Settings]
    session_factory: sessionmaker[Session]
    probes: dict[str, Probe] = field(default_factory=dict)
    render_metrics: Callable[[], tuple[bytes, str]] | None = None
    echo: Callable[[Destination, str], int | None] | None = None


def _context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.radnode
    return context


def _session(request: Request) -> Any:
    with _context(request).session_factory() as session:
        yield session


Db = Annotated[Session, Depends(_session)]
Ctx = Annotated[ApiContext, Depends(_context)]


def _operator_actor(who: Operator) -> str:
    """The operator behind an action request, for the audit trail (``api:``/``web:<name>``).

    Raises 401 without credentials and 403 below the ``operator`` role
    (:func:`service.api.auth.require_role`).
    """
    return who.actor


Actor = Annotated[str, Depends(_operator_actor)]


def _page(session: Session, query: Select[Any], limit: int, offset: int) -> tuple[list[Any], int]:
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery()))
    rows = list(session.scalars(query.limit(limit).offset(offset)))
    return rows, int(total or 0)


def _run_action(session: Session, action: Callable[[], actions.Outcome]) -> schemas.ActionOut:
    try:
        outcome = action()
    except actions.ActionError as exc:
        session.rollback()
        raise HTTPException(404 if exc.kind == "not_found" else 409, str(exc)) from exc
    session.commit()
    return schemas.ActionOut(message=outcome.message, ids=outcome.ids)


def _job_out(job: Job) -> schemas.JobOut:
    data = {name: getattr(job, name) for name in schemas.JobOut.model_fields
            if name not in ("series_instance_uid", "study_instance_uid")}
    return schemas.JobOut(series_instance_uid=job.series.series_instance_uid,
                          study_instance_uid=job.series.study_instance_uid, **data)


def _series_out(series: Series) -> schemas.SeriesOut:
    return schemas.SeriesOut.model_validate(series)


def _stages(series: Series) -> list[schemas.Stage]:
    """The pipeline of a series as a timeline (received → complete → routed → jobs → delivered)."""
    stages = [schemas.Stage(name="first instance", at=series.first_received_at,
                            detail=f"from {series.calling_ae_title}"),
              schemas.Stage(name="last instance", at=series.last_received_at,
                            detail=f"{series.instance_count} instances")]
    if series.completed_at is not None:
        stages.append(schemas.Stage(name="complete", at=series.completed_at,
                                    detail=series.completion_reason or ""))
    else:
        stages.append(schemas.Stage(name="complete", at=None, state="waiting"))
    if series.routed_at is not None:
        rules = sorted({name for job in series.jobs for name in job.rule_names.split(",") if name})
        stages.append(schemas.Stage(name="routed", at=series.routed_at,
                                    detail=", ".join(rules) or "fallback"))
    for job in series.jobs:
        label = f"job {job.id} {job.model_name}"
        if job.started_at is not None:
            stages.append(schemas.Stage(name=f"{label} started", at=job.started_at,
                                        detail=job.worker or ""))
        if job.finished_at is not None:
            stages.append(schemas.Stage(name=f"{label} {job.state}", at=job.finished_at,
                                        detail=(job.error or "")[:200],
                                        state="failed" if job.state == "failed" else "done"))
        elif job.started_at is None:
            stages.append(schemas.Stage(name=f"{label} {job.state}", at=job.queued_at,
                                        state="waiting"))
        for result in job.results:
            for delivery in result.deliveries:
                name = f"{result.kind} to {delivery.destination}"
                if delivery.state == "failed":
                    stages.append(schemas.Stage(name=f"{name} failed", at=delivery.sent_at,
                                                detail=(delivery.error or "")[:200],
                                                state="failed"))
                elif delivery.state in ("sent", "committed") and delivery.sent_at is not None:
                    stages.append(schemas.Stage(name=f"{name} sent", at=delivery.sent_at))
                else:
                    stages.append(schemas.Stage(name=f"{name} {delivery.state}", at=None,
                                                detail=(delivery.error or "")[:200],
                                                state="waiting"))
                if delivery.committed_at is not None:
                    stages.append(schemas.Stage(name=f"{name} committed",
                                                at=delivery.committed_at))
    return stages


def _destination_row(destination: Destination | StowDestination | FolderDestination,
                     counts: dict[str, int]) -> schemas.DestinationOut:
    if isinstance(destination, Destination):
        address, commitment = str(destination), destination.storage_commitment
    elif isinstance(destination, StowDestination):
        address, commitment = destination.url, False
    else:
        address, commitment = str(destination.path), False
    return schemas.DestinationOut(name=destination.name, kind=destination.kind, address=address,
                                  storage_commitment=commitment, deliveries=counts)


Limit = Annotated[int, Query(ge=1, le=500, description="Page size.")]
Offset = Annotated[int, Query(ge=0, description="Rows to skip.")]
Since = Annotated[datetime | None, Query(description="From this time (ISO 8601), inclusive.")]
Until = Annotated[datetime | None, Query(description="Before this time (ISO 8601).")]


def _equal(query: _Query, *conditions: tuple[Any, Any]) -> _Query:
    """``query`` narrowed to ``column == value`` for each pair whose value was given."""
    for column, value in conditions:
        if value is not None and value != "":
            query = query.where(column == value)
    return query


def _window(query: _Query, column: Any, since: datetime | None,
            until: datetime | None) -> _Query:
    if since is not None:
        query = query.where(column >= as_utc(since))
    if until is not None:
        query = query.where(column < as_utc(until))
    return query


def api_router() -> APIRouter:
    """The ``/api/v1`` routes."""
    router = APIRouter(prefix="/api/v1", dependencies=[Depends(require_role("viewer"))])

    @router.get("/me", response_model=schemas.MeOut, tags=["auth"])
    def me(who: Viewer) -> Any:
        """Who the credentials of this request belong to: user, role, token or dashboard."""
        return schemas.MeOut(name=who.name, role=who.role, method=who.method, actor=who.actor)

    @router.get("/studies", response_model=schemas.Page[schemas.StudyOut], tags=["studies"])
    def list_studies(session: Db, state: str | None = None, modality: str | None = None,
                     calling_ae: str | None = None, since: Since = None, until: Until = None,
                     limit: Limit = 20, offset: Offset = 0) -> Any:
        """Studies, newest activity first; filters apply to their series."""
        filtered = select(Series.study_instance_uid, func.max(Series.last_received_at)
                          .label("last")).group_by(Series.study_instance_uid)
        filtered = _equal(filtered, (Series.state, state), (Series.modality, modality),
                                    (Series.calling_ae_title, calling_ae))
        filtered = _window(filtered, Series.last_received_at, since, until)
        total = session.scalar(select(func.count()).select_from(filtered.subquery())) or 0
        page = session.execute(filtered.order_by(desc("last"), Series.study_instance_uid)
                               .limit(limit).offset(offset)).all()
        uids: list[str] = [str(row[0]) for row in page]
        all_series = list(session.scalars(
            select(Series).where(Series.study_instance_uid.in_(uids))
            .options(selectinload(Series.jobs)).order_by(Series.first_received_at)))
        items = []
        for uid in uids:
            members = [s for s in all_series if s.study_instance_uid == uid]
            least = min((s.state for s in members),
                        key=lambda st: SERIES_ORDER.index(st) if st in SERIES_ORDER else 0)
            jobs = Counter(job.state for s in members for job in s.jobs)
            items.append(schemas.StudyOut(
                study_instance_uid=uid, series_count=len(members),
                instance_count=sum(s.instance_count for s in members),
                modalities=sorted({s.modality for s in members if s.modality}),
                calling_ae_titles=sorted({s.calling_ae_title for s in members}),
                first_received_at=min(as_utc(s.first_received_at) for s in members),
                last_received_at=max(as_utc(s.last_received_at) for s in members),
                state=least, jobs=dict(jobs), series=[_series_out(s) for s in members]))
        return schemas.Page[schemas.StudyOut](items=items, total=int(total), limit=limit,
                                              offset=offset)

    @router.get("/series", response_model=schemas.Page[schemas.SeriesOut], tags=["series"])
    def list_series(session: Db, state: str | None = None, modality: str | None = None,
                    calling_ae: str | None = None, study: str | None = None,
                    since: Since = None, until: Until = None, limit: Limit = 50,
                    offset: Offset = 0) -> Any:
        """Series, newest activity first."""
        query = select(Series).options(selectinload(Series.jobs))
        query = _equal(query, (Series.state, state), (Series.modality, modality),
                              (Series.calling_ae_title, calling_ae),
                              (Series.study_instance_uid, study))
        query = _window(query, Series.last_received_at, since, until)
        rows, total = _page(session, query.order_by(Series.last_received_at.desc(),
                                                    Series.id.desc()), limit, offset)
        return schemas.Page[schemas.SeriesOut](items=[_series_out(s) for s in rows],
                                               total=total, limit=limit, offset=offset)

    @router.get("/series/{series_id}", response_model=schemas.SeriesDetail, tags=["series"])
    def get_series(series_id: int, session: Db) -> Any:
        """One series with its jobs, results, deliveries and pipeline stages."""
        series = session.get(Series, series_id)
        if series is None:
            raise HTTPException(404, f"no series with id {series_id}")
        base = _series_out(series).model_dump()
        results = [schemas.ResultOut.model_validate(r) for job in series.jobs
                   for r in job.results]
        return schemas.SeriesDetail(**base, job_details=[_job_out(j) for j in series.jobs],
                                    results=results, stages=_stages(series))

    @router.post("/series/{series_id}/complete", response_model=schemas.ActionOut,
                 tags=["actions"])
    def complete_series(series_id: int, session: Db, who: Actor) -> Any:
        """Force a receiving series complete now; it is routed on the next tick."""
        return _run_action(session, lambda: actions.force_complete(session, series_id,
                                                                   actor=who))

    @router.get("/jobs", response_model=schemas.Page[schemas.JobOut], tags=["jobs"])
    def list_jobs(session: Db, state: str | None = None, model: str | None = None,
                  priority: Literal["stat", "routine"] | None = None,
                  calling_ae: str | None = None, modality: str | None = None,
                  since: Since = None, until: Until = None, limit: Limit = 50,
                  offset: Offset = 0) -> Any:
        """Jobs, newest first; the time window applies to their creation."""
        query = select(Job).join(Series, Job.series_id == Series.id)
        query = _equal(query, (Job.state, state), (Job.model_name, model), (Job.priority, priority),
                              (Series.calling_ae_title, calling_ae), (Series.modality, modality))
        query = _window(query, Job.created_at, since, until)
        rows, total = _page(session, query.order_by(Job.id.desc()), limit, offset)
        return schemas.Page[schemas.JobOut](items=[_job_out(j) for j in rows], total=total,
                                            limit=limit, offset=offset)

    @router.get("/jobs/{job_id}", response_model=schemas.JobOut, tags=["jobs"])
    def get_job(job_id: int, session: Db) -> Any:
        """One job."""
        job = session.get(Job, job_id)
        if job is None:
            raise HTTPException(404, f"no job with id {job_id}")
        return _job_out(job)

    @router.post("/jobs/{job_id}/retry", response_model=schemas.ActionOut, tags=["actions"])
    def retry_job(job_id: int, session: Db, who: Actor) -> Any:
        """Run a finished job's model on its series again (a new job)."""
        return _run_action(session, lambda: actions.retry_job(session, job_id, actor=who))

    @router.post("/jobs/{job_id}/cancel", response_model=schemas.ActionOut, tags=["actions"])
    def cancel_job(job_id: int, session: Db, who: Actor) -> Any:
        """Cancel a pending, queued or running job."""
        return _run_action(session, lambda: actions.cancel_job(session, job_id, actor=who))

    @router.get("/results", response_model=schemas.Page[schemas.ResultOut], tags=["results"])
    def list_results(session: Db, job_id: int | None = None, kind: str | None = None,
                     since: Since = None, until: Until = None, limit: Limit = 50,
                     offset: Offset = 0) -> Any:
        """Result objects (SEG, SR, SC) with their deliveries, newest first."""
        query = select(Result).options(selectinload(Result.deliveries))
        query = _equal(query, (Result.job_id, job_id), (Result.kind, kind))
        query = _window(query, Result.created_at, since, until)
        rows, total = _page(session, query.order_by(Result.id.desc()), limit, offset)
        return schemas.Page[schemas.ResultOut](
            items=[schemas.ResultOut.model_validate(r) for r in rows], total=total,
            limit=limit, offset=offset)

    @router.post("/results/{result_id}/resend", response_model=schemas.ActionOut,
                 tags=["actions"])
    def resend_result(result_id: int, session: Db, ctx: Ctx, who: Actor,
                      destinations: Annotated[list[str] | None, Body(embed=True)] = None) -> Any:
        """Send a result again, to ``destinations`` or everywhere it went."""
        known = {d.name for d in ctx.settings().destinations}
        unknown = sorted(set(destinations or ()) - known)
        if unknown:
            raise HTTPException(422, f"no destination named {', '.join(unknown)}")
        return _run_action(session, lambda: actions.resend_result(
            session, result_id, actor=who, destinations=destinations or ()))

    @router.get("/deliveries", response_model=schemas.Page[schemas.DeliveryRow],
                tags=["deliveries"])
    def list_deliveries(session: Db, state: str | None = None, destination: str | None = None,
                        study: str | None = None, since: Since = None, until: Until = None,
                        limit: Limit = 50, offset: Offset = 0) -> Any:
        """Deliveries, newest first; the time window applies to their creation."""
        query = repository.delivery_query(state=state, destination=destination,
                                          study_instance_uid=study)
        query = _window(query, Delivery.created_at, since, until)
        rows, total = _page(session, query.order_by(Delivery.id.desc()), limit, offset)
        items = [schemas.DeliveryRow(
            **schemas.DeliveryOut.model_validate(d).model_dump(), kind=d.result.kind,
            sop_instance_uid=d.result.sop_instance_uid, job_id=d.result.job_id) for d in rows]
        return schemas.Page[schemas.DeliveryRow](items=items, total=total, limit=limit,
                                                 offset=offset)

    @router.post("/deliveries/{delivery_id}/resend", response_model=schemas.ActionOut,
                 tags=["actions"])
    def resend_delivery(delivery_id: int, session: Db, who: Actor) -> Any:
        """Send this delivery's result to its destination again."""
        return _run_action(session, lambda: actions.resend_deliveries(session, [delivery_id],
                                                                      actor=who))

    @router.post("/deliveries/retry-failed", response_model=schemas.ActionOut,
                 tags=["actions"])
    def retry_failed(session: Db, who: Actor, destination: str | None = None) -> Any:
        """Try every failed delivery (to ``destination``) again from attempt zero."""
        return _run_action(session, lambda: actions.retry_failed_deliveries(
            session, actor=who, destination=destination))

    @router.get("/associations", response_model=schemas.Page[schemas.AssociationOut],
                tags=["associations"])
    def list_associations(session: Db, calling_ae: str | None = None,
                          outcome: str | None = None, since: Since = None,
                          until: Until = None, limit: Limit = 50, offset: Offset = 0) -> Any:
        """Associations peers opened to the SCP (recorded when they end), newest first."""
        query = select(Association)
        query = _equal(query, (Association.calling_ae_title, calling_ae),
                              (Association.outcome, outcome))
        query = _window(query, Association.started_at, since, until)
        rows, total = _page(session, query.order_by(Association.id.desc()), limit, offset)
        return schemas.Page[schemas.AssociationOut](
            items=[schemas.AssociationOut.model_validate(a) for a in rows], total=total,
            limit=limit, offset=offset)

    @router.get("/audit", response_model=schemas.Page[schemas.AuditOut], tags=["audit"])
    def list_audit(session: Db, _admin: Admin, action: str | None = None, actor_name: Annotated[
                       str | None, Query(alias="actor")] = None,
                   since: Since = None, until: Until = None, limit: Limit = 100,
                   offset: Offset = 0) -> Any:
        """The audit trail, newest first."""
        query = select(AuditEvent)
        query = _equal(query, (AuditEvent.action, action), (AuditEvent.actor, actor_name))
        query = _window(query, AuditEvent.at, since, until)
        rows, total = _page(session, query.order_by(AuditEvent.id.desc()), limit, offset)
        return schemas.Page[schemas.AuditOut](
            items=[schemas.AuditOut.model_validate(e) for e in rows], total=total,
            limit=limit, offset=offset)

    @router.get("/audit/export", tags=["audit"], response_class=StreamingResponse)
    def export_audit(session: Db, _admin: Admin, since: Since = None, until: Until = None,
                     format: Literal["csv", "json"] = "csv") -> Any:
        """The audit trail in time order as CSV or JSON lines, for a date range."""
        rows = audit.events(session, since=as_utc(since) if since else None,
                            until=as_utc(until) if until else None)
        media = "text/csv" if format == "csv" else "application/x-ndjson"
        return StreamingResponse(audit.export(rows, format), media_type=media, headers={
            "Content-Disposition": f"attachment; filename=radnode-audit.{format}"})

    @router.get("/deid/pseudonyms/{pseudonym}", response_model=schemas.PseudonymOut,
                tags=["de-identification"])
    def lookup_pseudonym(pseudonym: str, session: Db, who: Admin,
                         scope: str | None = None) -> Any:
        """What a pseudonym (UID or patient pseudonym) of a de-identifying destination stands for.

        Admins only; every look-up, found or not, is written to the audit trail.
        The answer holds patient data (docs/deidentification.md).
        """
        from service.deid import lookup

        found = lookup(session, scope, pseudonym)
        audit.record(session, actor=who.actor, action="deid.lookup", target_type="pseudonym",
                     target_id=pseudonym[:80], detail={"found": found is not None})
        session.commit()
        if found is None:
            raise HTTPException(404, "not a known pseudonym")
        return schemas.PseudonymOut(scope=found.scope, kind=found.kind,
                                    pseudonym=found.pseudonym, original=found.original,
                                    attributes=found.attributes)

    @router.get("/destinations", response_model=list[schemas.DestinationOut],
                tags=["destinations"])
    def list_destinations(session: Db, ctx: Ctx) -> Any:
        """Configured destinations with their deliveries by state."""
        counts: dict[str, dict[str, int]] = {}
        for name, state, count in session.execute(
                select(Delivery.destination, Delivery.state, func.count())
                .group_by(Delivery.destination, Delivery.state)):
            counts.setdefault(name, {})[state] = int(count)
        return [_destination_row(d, counts.get(d.name, {}))
                for d in ctx.settings().destinations]

    @router.post("/destinations/{name}/echo", response_model=schemas.EchoOut,
                 tags=["actions"])
    def echo_destination(name: str, session: Db, ctx: Ctx, who: Actor) -> Any:
        """Send a C-ECHO to a DICOM destination and say whether it answered Success."""
        settings = ctx.settings()
        try:
            destination = settings.destination(name)
        except KeyError as exc:
            raise HTTPException(404, f"no destination named {name!r}") from exc
        if not isinstance(destination, Destination):
            raise HTTPException(409, f"destination {name} is {destination.kind}, not DICOM: "
                                     "no C-ECHO")
        send = ctx.echo or _scu_echo
        status = send(destination, settings.delivery.ae_title)
        ok = status == 0
        detail = ("Success" if ok else "no association (refused, unreachable or timed out)"
                  if status is None else f"status 0x{status:04X}")
        audit.record(session, actor=who, action="destination.echo", target_type="destination",
                     target_id=name, detail={"ok": ok, "status": status})
        session.commit()
        return schemas.EchoOut(destination=name, ok=ok, status=status, detail=detail)

    @router.get("/models", response_model=list[schemas.ModelOut], tags=["models"])
    def list_models(session: Db, ctx: Ctx) -> Any:
        """Declared models, whether rules route to them, and where they are loaded."""
        settings = ctx.settings()
        routed = set(settings.routed_models())
        alive_after = utcnow() - WORKER_STALE
        holders: dict[tuple[str, str], list[str]] = {}
        for worker in session.scalars(select(WorkerStatus)):
            if as_utc(worker.heartbeat_at) < alive_after:
                continue
            for model in worker.models:
                key = (str(model.get("name")), str(model.get("version")))
                holders.setdefault(key, []).append(f"{worker.name} ({model.get('device')})")
        return [schemas.ModelOut(name=m.name, version=m.version, kind=m.kind, queue=m.queue,
                                 device=m.device, routed=m.name in routed,
                                 loaded_on=holders.get((m.name, m.version), []))
                for m in settings.models]

    @router.get("/workers", response_model=list[schemas.WorkerOut], tags=["models"])
    def list_workers(session: Db) -> Any:
        """Worker processes as they last reported, newest report first."""
        alive_after = utcnow() - WORKER_STALE
        rows = session.scalars(select(WorkerStatus).order_by(WorkerStatus.heartbeat_at.desc()))
        return [schemas.WorkerOut.model_validate(w).model_copy(
            update={"alive": as_utc(w.heartbeat_at) >= alive_after}) for w in rows]

    @router.get("/rules", tags=["rules"])
    def list_rules(ctx: Ctx) -> dict[str, Any]:
        """The routing rules and fallback in force, and the configuration version."""
        settings = ctx.settings()
        return {"config_version": settings.config_version,
                "rules": [r.model_dump(mode="json", exclude_none=True) for r in settings.rules],
                "fallback": settings.fallback.model_dump(mode="json", exclude_none=True)}

    return router


def _scu_echo(destination: Destination, calling_ae: str) -> int | None:
    from service.dicom.scu import echo

    return echo(destination, calling_ae=calling_ae, timeout_s=10.0)


def _database_probe(factory: sessionmaker[Session]) -> Probe:
    def probe() -> tuple[bool, str]:
        try:
            with factory() as session:
                session.execute(text("SELECT 1"))
            return True, "reachable"
        except Exception as exc:  # any failure means not ready; say which
            return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return probe


def create_app(context: ApiContext, *, dashboard: bool = True) -> FastAPI:
    """Build the HTTP application for ``context``.

    Routes: ``/healthz``, ``/readyz``, ``/metrics``, ``/api/v1/...`` (REST,
    schema at ``/openapi.json``) and, with ``dashboard``, the HTML dashboard
    at ``/`` with its ``/login`` and ``/logout``.

    Every route but ``/healthz`` (and the login page, and ``/metrics`` when
    ``http.metrics_auth`` is false) needs an API token or a dashboard login
    (:class:`service.api.auth.AuthMiddleware`); reading needs the ``viewer``
    role, actions ``operator``, the audit trail ``admin``.
    """
    app = FastAPI(title="radnode", version="1", summary="DICOM AI node: API and dashboard",
                  docs_url="/docs", redoc_url=None)
    app.state.radnode = context
    app.add_middleware(AuthMiddleware)
    probes = {"database": _database_probe(context.session_factory), **context.probes}

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is alive (nothing else is checked)."""
        return {"status": "alive"}

    @app.get("/readyz", response_model=schemas.Readiness, tags=["health"])
    def readyz(response: Response) -> Any:
        """Ready to take studies: database, broker, spool and SCP; 503 with what failed."""
        checks = {}
        for name, probe in probes.items():
            try:
                ok, detail = probe()
            except Exception as exc:  # a probe must not break the endpoint
                ok, detail = False, f"{type(exc).__name__}"
            checks[name] = schemas.Check(ok=ok, detail=detail)
        ready = all(check.ok for check in checks.values())
        if not ready:
            response.status_code = 503
        return schemas.Readiness(ready=ready, checks=checks)

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    def metrics() -> Response:
        """Prometheus metrics (text exposition format); any valid token unless open by config."""
        if context.render_metrics is None:
            raise HTTPException(404, "metrics are not enabled")
        body, content_type = context.render_metrics()
        return Response(content=body, media_type=content_type)

    app.include_router(api_router())
    if dashboard:
        from service.api.dashboard import mount

        mount(app)
    return app

