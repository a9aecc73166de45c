"""Prometheus metrics of the node, served by ``GET /metrics``.

Two sources feed one registry (never the process-wide default one):

* in-process counters that the SCP's association threads increment
  (:meth:`NodeMetrics.association`, :meth:`NodeMetrics.stored`);
* :class:`DatabaseCollector`, which reads the database at scrape time with a
  few aggregate queries: jobs by state, queue depth, deliveries, job durations
  and the latency of each hop of the pipeline
  (:data:`HOPS`: received → complete → started → encoded → delivered → committed).

Label values are bounded: states are a fixed set, queues, models and
destinations come from the configuration, and calling AE titles, which any
peer chooses, are capped (:attr:`NodeMetrics.OTHER_AE` past the cap). No label
and no log line holds patient data.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from sqlalchemy import (
    ColumnElement,
    Float,
    Select,
    SQLColumnExpression,
    and_,
    case,
    cast,
    extract,
    func,
    select,
    type_coerce,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.models import Delivery, Job, Result, Series

log = logging.getLogger("radnode.metrics")

#: Content type of :func:`prometheus_client.generate_latest`'s text format,
#: version 0.0.4 (understood by every Prometheus 2.x and 3.x server).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Upper bounds (seconds) of the duration histograms, from half a second to an
#: hour; ``+Inf`` is added. Negative durations (clock skew) fall in the first.
DURATION_BUCKETS: tuple[float, ...] = (
    0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600,
)

#: Upper bounds (seconds) of ``radnode_cstore_store_seconds``: from half a millisecond
#: (a flush on a disk with a fast cache) to five seconds (a disk that stalls).
STORE_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)

#: Every job state (see :mod:`service.db.models`), reported even when zero.
JOB_STATES = ("pending", "queued", "running", "succeeded", "failed", "superseded", "cancelled")
#: Every delivery state, reported as zero for each configured destination.
DELIVERY_STATES = ("pending", "sending", "sent", "committed", "failed")
#: Job priorities, published ``stat`` first.
PRIORITIES = ("stat", "routine")
#: Outcomes :meth:`NodeMetrics.association` accepts.
ASSOCIATION_OUTCOMES = ("accepted", "rejected", "released", "aborted")
#: Reasons :meth:`NodeMetrics.rejected` labels (as :mod:`service.scp.policy`).
REJECTION_REASONS = (
    "called-ae-title-not-recognized", "calling-ae-title-not-recognized",
    "peer-address-not-allowed", "peer-association-limit", "association-limit",
    "peer-connection-limit", "tls-handshake-failed", "policy-error", "other",
)
#: The hops of ``radnode_hop_seconds``, in pipeline order, then end to end.
HOPS = (
    "received_to_complete",
    "complete_to_started",
    "started_to_encoded",
    "encoded_to_delivered",
    "delivered_to_committed",
    "end_to_end",
)

_WAITING_STATES = ("pending", "queued")
_DELIVERED_STATES = ("sent", "committed")
_AE_MAX_CHARS = 16


def seconds_between(later: SQLColumnExpression[Any], earlier: SQLColumnExpression[Any],
                    dialect: str) -> ColumnElement[float]:
    """Return an SQL expression for ``later - earlier`` in seconds.

    Parameters
    ----------
    later, earlier : sqlalchemy.SQLColumnExpression
        Timestamp expressions (``DateTime(timezone=True)`` columns, or an
        aggregate of one such as ``MAX(sent_at)``).
    dialect : str
        The engine's dialect name (``engine.dialect.name``): ``"sqlite"``
        stores timestamps as ISO text, read with ``julianday`` (days, as a
        double: about 50 µs of resolution today); any other dialect gets the
        standard ``EXTRACT(EPOCH FROM later - earlier)`` of PostgreSQL.

    Returns
    -------
    sqlalchemy.ColumnElement[float]
        Seconds, negative when ``later`` is before ``earlier``; NULL when
        either timestamp is NULL.

    Examples
    --------
    >>> from service.db.models import Job
    >>> print(seconds_between(Job.finished_at, Job.started_at, "sqlite"))
    (julianday(jobs.finished_at) - julianday(jobs.started_at)) * :param_1
    >>> print(seconds_between(Job.finished_at, Job.started_at, "postgresql"))
    CAST(EXTRACT(epoch FROM jobs.finished_at - jobs.started_at) AS FLOAT)
    """
    if dialect == "sqlite":
        days = func.julianday(later) - func.julianday(earlier)
        return type_coerce(days * 86400.0, Float)
    return cast(extract("epoch", later - earlier), Float)


def _bucket_columns(duration: ColumnElement[Any]) -> list[ColumnElement[Any]]:
    """Return the aggregates of one histogram row: cumulative buckets, count, sum.

    The sum counts negative durations as zero, like the buckets do.
    """
    columns: list[ColumnElement[Any]] = [
        func.sum(case((duration <= float(bound), 1), else_=0)) for bound in DURATION_BUCKETS
    ]
    columns.append(func.count())
    columns.append(func.sum(case((duration < 0, 0.0), else_=duration)))
    return columns


def _histogram_buckets(row: Sequence[Any]) -> tuple[list[tuple[str, float]], float]:
    """Turn the aggregates of :func:`_bucket_columns` into (buckets, sum)."""
    counts = [int(value or 0) for value in row[: len(DURATION_BUCKETS) + 1]]
    buckets = [(_bound_label(bound), float(count))
               for bound, count in zip(DURATION_BUCKETS, counts, strict=False)]
    buckets.append(("+Inf", float(counts[-1])))
    return buckets, float(row[len(DURATION_BUCKETS) + 1] or 0.0)


def _empty_buckets() -> list[tuple[str, float]]:
    return [(_bound_label(bound), 0.0) for bound in DURATION_BUCKETS] + [("+Inf", 0.0)]


def _bound_label(bound: float) -> str:
    """Format a bucket bound as Prometheus clients do (``1.0``, ``0.5``)."""
    return repr(float(bound))


def _spool_usage_path(spool_dir: Path) -> Path:
    """Return ``spool_dir`` or its nearest existing parent."""
    path = spool_dir.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _short_error(exc: BaseException) -> str:
    """Describe a database error without its SQL text or parameters."""
    origin = getattr(exc, "orig", None) or exc
    first_line = str(origin).splitlines()[0] if str(origin) else ""
    return f"{type(origin).__name__}: {first_line[:200]}"


class DatabaseCollector:
    """Prometheus collector that reads the database at each scrape.

    Each scrape runs one read-only session of ten aggregate queries (GROUP BY,
    and for each histogram one query computing every bucket count with
    ``SUM(CASE WHEN d <= bound ...)``), on SQLite or PostgreSQL. A database
    error does not fail the scrape: the families already read are reported,
    ``radnode_scrape_errors_total`` goes up by one and the error is logged once
    (until a scrape succeeds again).

    Parameters
    ----------
    settings_provider : callable
        Returns the current settings (spool directory, reserve, configured
        models and destinations, which get zero-valued series).
    session_factory : sqlalchemy.orm.sessionmaker
        Sessions on the node's database.
    """

    def __init__(self, settings_provider: Callable[[], Settings],
                 session_factory: sessionmaker[Session]) -> None:
        self._settings_provider = settings_provider
        self._session_factory = session_factory
        self._lock = threading.Lock()
        self._errors = 0
        self._failing: set[str] = set()

    # -- prometheus_client.registry.Collector -----------------------------
    def describe(self) -> Iterable[Metric]:
        """Return the families (without samples), so registering runs no query."""
        return [
            GaugeMetricFamily("radnode_jobs", "", labels=["state"]),
            GaugeMetricFamily("radnode_queue_depth", "", labels=["queue", "priority"]),
            HistogramMetricFamily("radnode_job_duration_seconds", "", labels=["model"]),
            GaugeMetricFamily("radnode_deliveries", "", labels=["destination", "state"]),
            HistogramMetricFamily("radnode_hop_seconds", "", labels=["hop"]),
            GaugeMetricFamily("radnode_spool_free_bytes", ""),
            GaugeMetricFamily("radnode_spool_reserve_bytes", ""),
            CounterMetricFamily("radnode_scrape_errors", ""),
        ]

    def collect(self) -> Iterator[Metric]:
        """Yield the database and disk metrics, then ``radnode_scrape_errors_total``."""
        settings = self._settings_provider()
        yield from self._disk_families(settings)
        families: list[Metric] = []
        try:
            with self._session_factory() as session:
                for family in self._database_families(session, settings):
                    families.append(family)
        except SQLAlchemyError as exc:
            self._count_error("database", exc)
        else:
            self._recovered("database")
        yield from families
        errors = CounterMetricFamily(
            "radnode_scrape_errors",
            "Scrapes of /metrics that could not read the database or the spool's disk.",
        )
        with self._lock:
            errors.add_metric([], float(self._errors))
        yield errors

    # -- errors ---------------------------------------------------------------
    def _count_error(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self._errors += 1
            first = what not in self._failing
            self._failing.add(what)
        if first:
            log.warning("metrics: cannot read the %s (%s); reporting the rest, "
                        "further errors are counted in radnode_scrape_errors_total",
                        what, _short_error(exc))

    def _recovered(self, what: str) -> None:
        with self._lock:
            was_failing = what in self._failing
            self._failing.discard(what)
        if was_failing:
            log.info("metrics: the %s can be read again", what)

    # -- disk ---------------------------------------------------------------
    def _disk_families(self, settings: Settings) -> Iterator[Metric]:
        reserve = GaugeMetricFamily(
            "radnode_spool_reserve_bytes",
            "Free space the spool keeps: below it instances are refused with 0xA700.",
            value=float(settings.storage.min_free_mb) * 1024 * 1024,
        )
        try:
            free = shutil.disk_usage(_spool_usage_path(settings.spool_dir)).free
        except OSError as exc:
            self._count_error("spool's disk", exc)
        else:
            self._recovered("spool's disk")
            yield GaugeMetricFamily(
                "radnode_spool_free_bytes",
                "Free space on the spool's file system.",
                value=float(free),
            )
        yield reserve

    # -- database -----------------------------------------------------------
    def _database_families(self, session: Session, settings: Settings) -> Iterator[Metric]:
        dialect = session.get_bind().dialect.name
        yield self._jobs(session)
        yield self._queue_depth(session, settings)
        yield self._job_durations(session, settings, dialect)
        yield self._deliveries(session, settings)
        yield self._hops(session, dialect)

    @staticmethod
    def _jobs(session: Session) -> Metric:
        counts = dict.fromkeys(JOB_STATES, 0)
        rows = session.execute(select(Job.state, func.count()).group_by(Job.state))
        for state, count in rows:
            counts[state] = int(count)
        family = GaugeMetricFamily("radnode_jobs", "Jobs by state.", labels=["state"])
        for state, count in counts.items():
            family.add_metric([state], float(count))
        return family

    @staticmethod
    def _queue_depth(session: Session, settings: Settings) -> Metric:
        depth = {(spec.queue, priority): 0 for spec in settings.models for priority in PRIORITIES}
        rows = session.execute(
            select(Job.queue, Job.priority, func.count())
            .where(Job.state.in_(_WAITING_STATES))
            .group_by(Job.queue, Job.priority)
        )
        for queue, priority, count in rows:
            depth[(queue, priority)] = int(count)
        family = GaugeMetricFamily(
            "radnode_queue_depth", "Jobs pending or queued, not yet started.",
            labels=["queue", "priority"],
        )
        for (queue, priority), count in sorted(depth.items()):
            family.add_metric([queue, priority], float(count))
        return family

    @staticmethod
    def _job_durations(session: Session, settings: Settings, dialect: str) -> Metric:
        durations = (
            select(Job.model_name.label("model"),
                   seconds_between(Job.finished_at, Job.started_at, dialect).label("d"))
            .where(Job.state.in_(("succeeded", "failed")),
                   Job.started_at.is_not(None), Job.finished_at.is_not(None))
            .subquery()
        )
        rows = session.execute(
            select(durations.c.model, *_bucket_columns(durations.c.d))
            .group_by(durations.c.model)
        )
        histograms = {spec.name: (_empty_buckets(), 0.0) for spec in settings.models}
        for row in rows:
            histograms[row[0]] = _histogram_buckets(row[1:])
        family = HistogramMetricFamily(
            "radnode_job_duration_seconds",
            "Run time of succeeded and failed jobs (finished_at - started_at).",
            labels=["model"],
        )
        for model, (buckets, total) in sorted(histograms.items()):
            family.add_metric([model], buckets, total)
        return family

    @staticmethod
    def _deliveries(session: Session, settings: Settings) -> Metric:
        counts = {(destination.name, state): 0
                  for destination in settings.destinations for state in DELIVERY_STATES}
        rows = session.execute(
            select(Delivery.destination, Delivery.state, func.count())
            .group_by(Delivery.destination, Delivery.state)
        )
        for destination, state, count in rows:
            counts[(destination, state)] = int(count)
        family = GaugeMetricFamily("radnode_deliveries", "Deliveries by destination and state.",
                                   labels=["destination", "state"])
        for (destination, state), count in sorted(counts.items()):
            family.add_metric([destination, state], float(count))
        return family

    @staticmethod
    def _hops(session: Session, dialect: str) -> Metric:
        family = HistogramMetricFamily(
            "radnode_hop_seconds",
            "Latency of each step of the pipeline, and from the last instance received "
            "to the last result sent (end_to_end).",
            labels=["hop"],
        )
        for hop in HOPS:
            row = session.execute(_hop_query(hop, dialect)).one()
            buckets, total = _histogram_buckets(row)
            family.add_metric([hop], buckets, total)
        return family


def _hop_query(hop: str, dialect: str) -> Select[Any]:
    """Return the one-row query of the histogram aggregates of ``hop``."""
    def histogram(later: SQLColumnExpression[Any], earlier: SQLColumnExpression[Any],
                  source: Select[Any]) -> Select[Any]:
        durations = (
            source.add_columns(seconds_between(later, earlier, dialect).label("d"))
            .where(later.is_not(None), earlier.is_not(None))
            .subquery()
        )
        return select(*_bucket_columns(durations.c.d))

    if hop == "received_to_complete":
        return histogram(Series.completed_at, Series.last_received_at, select().select_from(Series))
    if hop == "complete_to_started":
        return histogram(Job.started_at, Series.completed_at,
                         select().select_from(Job).join(Series, Series.id == Job.series_id))
    if hop == "started_to_encoded":
        return histogram(Job.finished_at, Job.started_at,
                         select().select_from(Job).where(Job.state == "succeeded"))
    if hop == "encoded_to_delivered":
        return histogram(Delivery.sent_at, Job.finished_at,
                         select().select_from(Delivery)
                         .join(Result, Result.id == Delivery.result_id)
                         .join(Job, Job.id == Result.job_id))
    if hop == "delivered_to_committed":
        return histogram(Delivery.committed_at, Delivery.sent_at, select().select_from(Delivery))
    if hop == "end_to_end":
        undelivered = case(
            (and_(Delivery.state.in_(_DELIVERED_STATES), Delivery.sent_at.is_not(None)), 0),
            else_=1,
        )
        per_job = (
            select(Job.series_id.label("series_id"),
                   func.max(Delivery.sent_at).label("last_sent"))
            .select_from(Job)
            .join(Result, Result.job_id == Job.id)
            .join(Delivery, Delivery.result_id == Result.id)
            .group_by(Job.id, Job.series_id)
            .having(func.sum(undelivered) == 0)
            .subquery()
        )
        return histogram(per_job.c.last_sent, Series.last_received_at,
                         select().select_from(per_job)
                         .join(Series, Series.id == per_job.c.series_id))
    raise ValueError(f"unknown hop {hop!r}; expected one of {', '.join(HOPS)}")


class NodeMetrics:
    """In-process counters of the node (SCP side) plus the database collector, one registry.

    The SCP's association threads call :meth:`association` and :meth:`stored`
    concurrently (prometheus-client metrics are thread-safe); the HTTP API
    answers ``GET /metrics`` with :meth:`render`.

    Parameters
    ----------
    settings_provider : callable
        Returns the current settings; called at each scrape.
    session_factory : sqlalchemy.orm.sessionmaker
        Sessions on the node's database, read at each scrape.
    max_ae_labels : int, optional
        How many distinct calling AE titles become label values; later ones
        are counted under :attr:`OTHER_AE`, so that a peer trying many AE
        titles cannot grow the number of series without bound.

    Attributes
    ----------
    registry : prometheus_client.CollectorRegistry
        This node's own registry (never the process-wide default).

    Examples
    --------
    >>> metrics = NodeMetrics(lambda: settings, session_factory)  # doctest: +SKIP
    >>> metrics.association("CT_SCANNER", "accepted")  # doctest: +SKIP
    >>> metrics.stored("CT_SCANNER", 0x0000, 524_288)  # doctest: +SKIP
    >>> body, content_type = metrics.render()  # doctest: +SKIP
    """

    #: Label value of calling AE titles past ``max_ae_labels``.
    OTHER_AE = "_other"
    #: Label value of an AE title with no printable character.
    EMPTY_AE = "_empty"

    def __init__(self, settings_provider: Callable[[], Settings],
                 session_factory: sessionmaker[Session], *, max_ae_labels: int = 100) -> None:
        if max_ae_labels < 0:
            raise ValueError(f"max_ae_labels must be 0 or more, not {max_ae_labels}")
        self._max_ae_labels = max_ae_labels
        self._ae_labels: set[str] = set()
        self._ae_lock = threading.Lock()
        #: Children of the C-STORE counters per raw calling AE title / per status.
        self._stored_children: dict[str, tuple[Any, Any]] = {}
        self._response_children: dict[int, Any] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self._associations = Counter(
            "radnode_associations", "Associations peers opened to the SCP, by outcome.",
            ["calling_ae", "outcome"], registry=self.registry,
        )
        self._rejected = Counter(
            "radnode_associations_rejected",
            "Association requests and connections the SCP refused, by reason "
            "(service.scp.policy.REJECTION_REASONS).",
            ["reason"], registry=self.registry,
        )
        for reason in REJECTION_REASONS:  # every reason reported, 0 until it happens
            self._rejected.labels(reason)
        self._instances = Counter(
            "radnode_instances_received",
            "Instances stored (C-STORE answered with status 0x0000).",
            ["calling_ae"], registry=self.registry,
        )
        self._bytes = Counter(
            "radnode_received_bytes", "Bytes of the instances stored.",
            ["calling_ae"], registry=self.registry,
        )
        self._responses = Counter(
            "radnode_cstore_responses", "C-STORE responses sent, by DIMSE status.",
            ["status"], registry=self.registry,
        )
        self._store_seconds = Histogram(
            "radnode_cstore_store_seconds",
            "Seconds from a C-STORE data set received whole to its Success: the structure "
            "check, the file's fsync and the database commit. A slow or stalling spool disk "
            "shows here.",
            buckets=STORE_BUCKETS, registry=self.registry,
        )
        self.database = DatabaseCollector(settings_provider, session_factory)
        self.registry.register(self.database)

    def association(self, calling_ae: str, outcome: str) -> None:
        """Count an association event of a peer.

        Parameters
        ----------
        calling_ae : str
            The peer's Calling AE Title, as received (sanitised and capped here).
        outcome : {"accepted", "rejected", "released", "aborted"}
            ``accepted`` when it opens, then ``released`` or ``aborted``;
            ``rejected`` when the node refused it.

        Raises
        ------
        ValueError
            On another ``outcome``.
        """
        if outcome not in ASSOCIATION_OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(ASSOCIATION_OUTCOMES)}, "
                             f"not {outcome!r}")
        self._associations.labels(self.ae_label(calling_ae), outcome).inc()

    def rejected(self, reason: str) -> None:
        """Count an association request or a connection the SCP refused.

        Parameters
        ----------
        reason : str
            One of :data:`REJECTION_REASONS` (``called-ae-title-not-recognized``,
            ``peer-address-not-allowed``, ``tls-handshake-failed``...); another
            value is counted as ``other``, so the label set stays bounded.
        """
        self._rejected.labels(reason if reason in REJECTION_REASONS else "other").inc()

    def stored(self, calling_ae: str, status: int, size_bytes: int,
               seconds: float | None = None) -> None:
        """Count one C-STORE response.

        Parameters
        ----------
        calling_ae : str
            The peer's Calling AE Title, as received.
        status : int
            The DIMSE status sent (``0x0000`` success; ``0xA700`` out of
            resources, ...): labelled ``"0x0000"``, ``"0xA700"``.
        size_bytes : int
            Bytes of the stored instance; 0 when it was refused.
        seconds : float, optional
            Seconds the handler took to store the instance before its Success
            (``radnode_cstore_store_seconds``); observed only with ``0x0000``.
        """
        # The labelled children are looked up once per AE title and status: this runs on
        # every C-STORE, and prometheus_client's labels() costs a lock and a few calls.
        per_ae = self._stored_children.get(calling_ae)
        if per_ae is None:
            ae = self.ae_label(calling_ae)
            per_ae = (self._instances.labels(ae), self._bytes.labels(ae))
            if len(self._stored_children) >= self._max_ae_labels + 16:
                self._stored_children.clear()  # many raw titles: bounded, like the labels
            self._stored_children[calling_ae] = per_ae
        response = self._response_children.get(status)
        if response is None:
            response = self._responses.labels(f"0x{status & 0xFFFF:04X}")
            if len(self._response_children) < 256:
                self._response_children[status] = response
        response.inc()
        # A peer whose instances are all refused still gets a series (at 0).
        instances, received = per_ae
        if status == 0x0000:
            instances.inc()
            if seconds is not None:
                self._store_seconds.observe(max(0.0, seconds))
        received.inc(max(0, size_bytes))

    def ae_label(self, calling_ae: str) -> str:
        """Return the label value for ``calling_ae``.

        Printable ASCII characters only, stripped, at most 16; :attr:`EMPTY_AE`
        when nothing is left; :attr:`OTHER_AE` once ``max_ae_labels`` distinct
        values have been used.
        """
        text = "".join(ch for ch in calling_ae if " " <= ch <= "~").strip()
        label = text[:_AE_MAX_CHARS].rstrip() or self.EMPTY_AE
        with self._ae_lock:
            if label in self._ae_labels:
                return label
            if len(self._ae_labels) < self._max_ae_labels:
                self._ae_labels.add(label)
                return label
        return self.OTHER_AE

    def render(self) -> tuple[bytes, str]:
        """Return the body and content type of ``GET /metrics``.

        Returns
        -------
        tuple of (bytes, str)
            The Prometheus text exposition format (0.0.4) and its content type.
        """
        return generate_latest(self.registry), CONTENT_TYPE
