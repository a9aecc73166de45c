"""ORM models: the database is the source of truth for every series, job and delivery.

States
------
Series.state: ``receiving`` → ``complete`` (back to ``receiving`` when a late
instance arrives; the series is analysed again once complete again) →
``purged`` (retention removed its instances from the spool).
Job.state: ``pending`` (row written) → ``queued`` (published to the broker) →
``running`` → ``succeeded`` | ``failed``; ``superseded`` when the series was
completed again (late instances) before the job started. A running job whose worker stopped
renewing ``heartbeat_at`` goes back to ``queued`` (or ``failed`` after the
last attempt); a queued job not started in time is published again.
An operator may cancel a ``pending``, ``queued`` or ``running`` job:
``cancelled`` (a running one finishes its computation, then records and delivers nothing).
Delivery.state: ``pending`` → ``sending`` → ``sent`` → ``committed`` (only
for destinations with Storage Commitment, when the destination confirms), or
``failed`` (after the last retry, or a refusal that cannot change). A
commitment failure reported by the destination sends the instance again.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

#: Constraint names that Alembic can rely on (same on SQLite and PostgreSQL).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = String(64)


class Base(DeclarativeBase):
    """Declarative base with radnode's naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Series(Base):
    """One series as received (DICOM PS3.3 C.7.3.1 General Series)."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    #: The AE title the sender called, and its IP address (first instance).
    called_ae_title: Mapped[str] = mapped_column(String(16), default="", server_default="")
    peer_address: Mapped[str] = mapped_column(String(64), default="", server_default="")
    state: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completion_reason: Mapped[str | None] = mapped_column(String(32))
    #: Images in Acquisition (0020,1002) when the data carries it.
    expected_count: Mapped[int | None] = mapped_column(Integer)
    #: When an association that stored instances of this series was released.
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: When retention removed the instances from the spool (rows are kept).
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: When the complete series was routed (jobs added); cleared by a late instance.
    routed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    jobs: Mapped[list[Job]] = relationship(back_populates="series")


class Instance(Base):
    """One stored SOP instance; ``path`` is relative to the spool directory."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(400))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    #: How many more times the same SOP Instance UID arrived (kept: the first).
    duplicates: Mapped[int] = mapped_column(Integer, default=0)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One analysis of one series by one model, run by a Celery worker."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    task_name: Mapped[str] = mapped_column(String(100))
    queue: Mapped[str] = mapped_column(String(50))
    model_name: Mapped[str] = mapped_column(String(100))
    model_version: Mapped[str | None] = mapped_column(String(50))
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    #: Destination names chosen when the job was routed.
    destinations: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: ``stat`` jobs are published before ``routine`` ones.
    priority: Mapped[str] = mapped_column(String(8), default="routine",
                                          server_default="routine")
    #: The rules that routed the job (comma-separated), and the configuration
    #: version (:attr:`service.config.Settings.config_version`).
    rule_names: Mapped[str] = mapped_column(String(400), default="", server_default="")
    config_version: Mapped[str] = mapped_column(String(16), default="", server_default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    #: Timings of the worker's steps, seconds (load, inference, encode, ...).
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: Renewed by the worker while it runs the job; a stale lease means it was lost.
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    series: Mapped[Series] = relationship(back_populates="jobs")
    results: Mapped[list[Result]] = relationship(back_populates="job")


class Result(Base):
    """An encoded result object (SEG or SR) written by a worker."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    #: Absolute path of the encoded file.
    path: Mapped[str] = mapped_column(String(400))
    #: What the result says (segments, volumes in mL, mean values), for display.
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    job: Mapped[Job] = relationship(back_populates="results")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="result")


class Delivery(Base):
    """One (result instance, destination) pair and its state."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("result_id", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    destination: Mapped[str] = mapped_column(String(120))
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Last DIMSE status received from the destination.
    status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: Storage Commitment (Push Model, DICOM PS3.4 J.3): the Transaction UID
    #: of the last request, when it was sent, how many were sent, and when
    #: the destination confirmed the instance.
    transaction_uid: Mapped[str | None] = mapped_column(UID, index=True)
    commit_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    commit_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    committed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    result: Mapped[Result] = relationship(back_populates="deliveries")


class Association(Base):
    """One DICOM association a peer opened to the node's SCP (for the API and audit).

    ``outcome``: ``accepted`` while open, then ``released`` or ``aborted``;
    ``rejected`` when the node refused it (unknown AE title, no acceptable
    presentation context, too many associations). ``statuses`` counts the
    C-STORE response statuses sent, keyed by hexadecimal status (``"0x0000"``).
    """

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16), index=True)
    called_ae_title: Mapped[str] = mapped_column(String(16), default="")
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    outcome: Mapped[str] = mapped_column(String(16), index=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    instances: Mapped[int] = mapped_column(Integer, default=0)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    statuses: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    #: Series Instance UIDs the association stored into (at most 100).
    series_uids: Mapped[list[str]] = mapped_column(JSON, default=list)


class AuditEvent(Base):
    """One row of the append-only audit trail: who did what, when, to what.

    The database refuses UPDATE and DELETE on this table (triggers installed
    by migration 0004). ``actor`` is an AE title (``ae:STORESCU``), an
    operator (``api:pacsadmin``, ``cli:root``, ``anonymous@127.0.0.1``) or a
    radnode component (``node``, ``worker:host:pid``). ``detail`` never holds
    patient data, only UIDs, counts, states and reasons.
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(String(120))
    action: Mapped[str] = mapped_column(String(40), index=True)
    target_type: Mapped[str] = mapped_column(String(20))
    target_id: Mapped[str] = mapped_column(String(80), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class WorkerStatus(Base):
    """What a worker process last reported: its models, device and GPU memory.

    Written by the worker when it is ready and with each job heartbeat; read
    by the API's models page. ``name`` is ``host:pid``.
    """

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    queues: Mapped[list[str]] = mapped_column(JSON, default=list)
    device: Mapped[str] = mapped_column(String(40), default="cpu")
    #: ``[{"name": ..., "version": ..., "device": ...}]``
    models: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    gpu_memory_allocated_mb: Mapped[float | None] = mapped_column(Float)
    gpu_memory_total_mb: Mapped[float | None] = mapped_column(Float)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


# -- HTTP users, API tokens and dashboard sessions (migration 0005, service.auth) -----------


class User(Base):
    """Someone allowed to use the HTTP API or the dashboard, with a role.

    ``role`` is ``viewer``, ``operator`` or ``admin`` (:data:`service.auth.ROLES`).
    ``password_hash`` is an Argon2id hash (RFC 9106) or None for a user who
    only uses API tokens. Users are never deleted (the audit trail names
    them): ``disabled_at`` set means refused everywhere.
    """

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user")


class ApiToken(Base):
    """A bearer token of a user; only its SHA-256 is stored.

    The token (``rn_<prefix>_<secret>``, 256 random bits) is shown once
    when created; ``prefix`` (not secret) names it in listings.
    """

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    label: Mapped[str] = mapped_column(String(100), default="")
    prefix: Mapped[str] = mapped_column(String(16))
    #: Hex SHA-256 of the whole token.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    user: Mapped[User] = relationship(back_populates="tokens")


class WebSession(Base):
    """A dashboard login: the cookie's session id is stored as its SHA-256 only.

    Deleted at logout, when the user is disabled or changes password, and
    once expired (idle since ``last_seen_at`` or past ``expires_at``).
    """

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    #: Hex SHA-256 of the session id in the cookie.
    session_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: The absolute end of the session (``http.session_max_hours`` after login).
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)

    user: Mapped[User] = relationship()


# -- de-identification (service.deid) --------------------------------------------------------


class DeidMapping(Base):
    """One pseudonym of a de-identification scope (DICOM PS3.15 E.1, re-identification).

    ``kind`` is ``uid`` (an original UID and the UID that replaces it) or
    ``patient`` (an original Patient ID and the pseudonym that replaces
    Patient ID and Patient's Name). ``attributes`` keeps what re-identification
    restores: the patient's identifying attributes on a ``patient`` row, the
    study's (Accession Number, Study ID, dates, patient key) on the ``uid``
    row of a Study Instance UID. ``date_shift_days`` is the patient's shift
    for the Modified Dates option. The table holds patient data: only the
    service user (the database file) and admins (API) may read it.
    """

    __tablename__ = "deid_mappings"
    __table_args__ = (
        UniqueConstraint("scope", "kind", "original", name="uq_deid_mappings_original"),
        UniqueConstraint("scope", "kind", "pseudonym", name="uq_deid_mappings_pseudonym"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    original: Mapped[str] = mapped_column(String(128))
    pseudonym: Mapped[str] = mapped_column(String(128), index=True)
    attributes: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    date_shift_days: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
