"""JSON shapes of the REST API (``/api/v1``); published in the OpenAPI schema.

Times are ISO 8601 in UTC. No patient data appears in any of them: series
and studies are named by their UIDs, peers by AE title and address.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

T = TypeVar("T")


def _utc(value: datetime | None) -> str | None:
    if value is None:
        return None
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return aware.isoformat()


#: A timestamp, serialised as ISO 8601 UTC (SQLite returns naive UTC datetimes).
Time = Annotated[datetime | None, PlainSerializer(_utc, return_type=str | None)]


class _Row(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Page(BaseModel, Generic[T]):
    """One page of a list: ``items``, the ``total`` matching, and the window."""

    items: list[T]
    total: int
    limit: int
    offset: int


class JobBrief(_Row):
    """A job as listed under its series."""

    id: int
    model_name: str
    state: str
    priority: str
    rule_names: str


class SeriesOut(_Row):
    """A series and where it is in the pipeline."""

    id: int
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    calling_ae_title: str
    called_ae_title: str
    peer_address: str
    state: str
    instance_count: int
    expected_count: int | None
    first_received_at: Time
    last_received_at: Time
    completed_at: Time
    completion_reason: str | None
    routed_at: Time
    purged_at: Time
    jobs: list[JobBrief] = Field(default_factory=list)


class StudyOut(BaseModel):
    """A study: its series, counts and overall state (the least advanced series' state)."""

    study_instance_uid: str
    series_count: int
    instance_count: int
    modalities: list[str]
    calling_ae_titles: list[str]
    first_received_at: Time
    last_received_at: Time
    state: str
    jobs: dict[str, int]
    series: list[SeriesOut]


class JobOut(_Row):
    """A job: one model on one series, and what routed it."""

    id: int
    series_id: int
    series_instance_uid: str
    study_instance_uid: str
    task_name: str
    queue: str
    model_name: str
    model_version: str | None
    state: str
    priority: str
    rule_names: str
    config_version: str
    destinations: list[str]
    attempts: int
    worker: str | None
    error: str | None
    timings: dict[str, Any] | None
    created_at: Time
    queued_at: Time
    started_at: Time
    finished_at: Time
    heartbeat_at: Time


class DeliveryOut(_Row):
    """One result to one destination."""

    id: int
    result_id: int
    destination: str
    state: str
    attempts: int
    status: int | None
    error: str | None
    created_at: Time
    next_attempt_at: Time
    sent_at: Time
    transaction_uid: str | None
    commit_requested_at: Time
    committed_at: Time


class ResultOut(_Row):
    """A result object (SEG, SR or SC) of a job, with its deliveries."""

    id: int
    job_id: int
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    summary: dict[str, Any] | None
    created_at: Time
    deliveries: list[DeliveryOut] = Field(default_factory=list)


class DeliveryRow(DeliveryOut):
    """A delivery in the deliveries list, with what it carries."""

    kind: str
    sop_instance_uid: str
    job_id: int


class Stage(BaseModel):
    """One step of a series' pipeline, for the dashboard's timeline."""

    name: str
    at: Time
    detail: str = ""
    state: str = "done"


class SeriesDetail(SeriesOut):
    """A series with its jobs, results, deliveries and pipeline stages."""

    job_details: list[JobOut]
    results: list[ResultOut]
    stages: list[Stage]


class AssociationOut(_Row):
    """One DICOM association to the node's SCP."""

    id: int
    calling_ae_title: str
    called_ae_title: str
    peer_address: str
    outcome: str
    started_at: Time
    ended_at: Time
    instances: int
    bytes_received: int
    statuses: dict[str, int]
    series_uids: list[str]


class AuditOut(_Row):
    """One audit event."""

    id: int
    at: Time
    actor: str
    action: str
    target_type: str
    target_id: str
    detail: dict[str, Any]


class PseudonymOut(BaseModel):
    """What a pseudonym of the de-identification mapping stands for (admins only).

    Holds patient data: ``original`` (a UID, or a Patient ID for ``kind``
    ``patient``) and ``attributes`` (what re-identification restores).
    """

    scope: str
    kind: str
    pseudonym: str
    original: str
    attributes: dict[str, Any] | None = None


class DestinationOut(BaseModel):
    """A configured destination and its deliveries by state."""

    name: str
    kind: str
    address: str
    storage_commitment: bool
    deliveries: dict[str, int]


class WorkerOut(_Row):
    """What a worker process last reported."""

    name: str
    queues: list[str]
    device: str
    models: list[dict[str, Any]]
    gpu_memory_allocated_mb: float | None
    gpu_memory_total_mb: float | None
    started_at: Time
    heartbeat_at: Time
    alive: bool = False


class ModelOut(BaseModel):
    """A declared model, and the workers that hold it loaded."""

    name: str
    version: str
    kind: str
    queue: str
    device: str | None
    routed: bool
    loaded_on: list[str]


class ActionOut(BaseModel):
    """What an action did."""

    message: str
    ids: list[int]


class EchoOut(BaseModel):
    """The outcome of a C-ECHO to a destination."""

    destination: str
    ok: bool
    status: int | None
    detail: str


class Check(BaseModel):
    """One readiness check."""

    ok: bool
    detail: str


class Readiness(BaseModel):
    """``/readyz``: ready only if every check passed."""

    ready: bool
    checks: dict[str, Check]


class MeOut(BaseModel):
    """The user behind a request's credentials."""

    name: str
    role: str = Field(description="viewer, operator or admin")
    method: str = Field(description="token (API) or session (dashboard)")
    actor: str = Field(description="how the audit trail names this user's actions")
