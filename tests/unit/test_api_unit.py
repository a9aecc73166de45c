"""The HTTP application in process (FastAPI's TestClient) on a real, migrated SQLite database.

Lists with filters, date windows and pagination; 404s; actions; readiness
probes; the models page fed by the worker's own status report. Every client
here authenticates with an API token of an admin (authentication and roles
themselves are tested in test_auth.py).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service import audit, auth
from service.api.app import ApiContext, Probe, _database_probe, create_app
from service.config import Settings
from service.db.models import (
    ApiToken,
    Association,
    AuditEvent,
    Delivery,
    Job,
    User,
    WorkerStatus,
)
from service.db.session import make_engine, make_session_factory, utcnow
from service.metrics import NodeMetrics
from tests.unit.conftest import DESTINATIONS, T0
from tests.unit.test_actions_audit import make_job, make_result, make_series
from workers import tasks
from workers.models import registry

CLIENT_ACTOR = "api:admin"  # the admin whose token make_client sends


def provision(factory: sessionmaker[Session], name: str = "admin", role: str = "admin") -> str:
    """A user (if new) and a new API token of it, written straight to the tables.

    No audit event is written, so the tests of the audit trail see only their own.
    """
    with factory() as session:
        user = session.scalar(select(User).where(User.name == name))
        if user is None:
            user = User(name=name, role=role, created_at=utcnow())
            session.add(user)
            session.flush()
        token, prefix = auth.new_token()
        session.add(ApiToken(user_id=user.id, prefix=prefix, token_hash=auth.sha256_hex(token),
                             created_at=utcnow()))
        session.commit()
    return token


def iso(at: datetime) -> str:
    return at.isoformat()


def make_client(settings: Settings, factory: sessionmaker[Session],
                probes: dict[str, Probe] | None = None,
                render_metrics: Callable[[], tuple[bytes, str]] | None = None,
                echo: Callable[..., int | None] | None = None, role: str = "admin") -> TestClient:
    context = ApiContext(settings=lambda: settings, session_factory=factory,
                         probes=probes or {}, render_metrics=render_metrics, echo=echo)
    token = provision(factory, role, role)
    return TestClient(create_app(context, dashboard=False),
                      headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def client(settings: Settings, session_factory: sessionmaker[Session]) -> Iterator[TestClient]:
    with make_client(settings, session_factory) as test_client:
        yield test_client


@dataclass
class Rows:
    """Ids of the rows of :func:`rows`."""

    a_ct: int
    a_mr: int
    b_ct: int
    c_ct: int
    a_job: int
    b_job: int
    c_stat_job: int
    seg: int
    sr: int
    deliveries: dict[str, int]


@pytest.fixture
def rows(session_factory: sessionmaker[Session]) -> Rows:
    """Three studies: A (CT done and delivered + MR receiving), B (CT failed), C (CT receiving).

    Last instances: A's CT at T0+1s, A's MR at T0+10min+2s, B at T0+1h+1s, C at T0+2h+1s.
    """
    f = session_factory
    a_ct = make_series(f, study_uid="1.2.100", calling_ae="CT_SCANNER", at=T0, state="complete")
    a_mr = make_series(f, modality="MR", study_uid="1.2.100", calling_ae="MR_SCANNER",
                       at=T0 + timedelta(minutes=10), instances=3)
    b_ct = make_series(f, study_uid="1.2.200", calling_ae="CT_SCANNER",
                       at=T0 + timedelta(hours=1), state="complete")
    c_ct = make_series(f, study_uid="1.2.300", calling_ae="OTHER", at=T0 + timedelta(hours=2))
    a_job = make_job(f, a_ct, "succeeded", created=T0 + timedelta(seconds=10))
    b_job = make_job(f, b_ct, "failed", created=T0 + timedelta(hours=1, seconds=10))
    c_stat_job = make_job(f, c_ct, "queued", priority="stat",
                          created=T0 + timedelta(hours=2, seconds=10))
    seg, seg_deliveries = make_result(f, a_job, "SEG", {"PACS": "sent"})
    sr, sr_deliveries = make_result(f, a_job, "SR", {"PACS": "sent", "ARCHIVE": "failed"})
    return Rows(a_ct, a_mr, b_ct, c_ct, a_job, b_job, c_stat_job, seg, sr,
                {"seg-PACS": seg_deliveries["PACS"], "sr-PACS": sr_deliveries["PACS"],
                 "sr-ARCHIVE": sr_deliveries["ARCHIVE"]})


def get(client: TestClient, path: str, **params: Any) -> Any:
    response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def uids(page: dict[str, Any]) -> list[str]:
    return [item["study_instance_uid"] for item in page["items"]]


def ids(page: dict[str, Any]) -> list[int]:
    return [item["id"] for item in page["items"]]


# -- health ---------------------------------------------------------------------------------


def test_healthz_and_readyz_with_only_the_database(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"ready": True,
                               "checks": {"database": {"ok": True, "detail": "reachable"}}}


def test_readyz_is_503_naming_the_failed_check(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("the probe itself broke")

    probes: dict[str, Probe] = {
        "broker": lambda: (True, "embedded broker folder writable"),
        "spool": lambda: (False, "below the free-space reserve: 10 MiB free, reserve 1024 MiB"),
        "scp": broken,
    }
    with make_client(settings, session_factory, probes) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["ready"] is False
    assert body["checks"] == {
        "database": {"ok": True, "detail": "reachable"},
        "broker": {"ok": True, "detail": "embedded broker folder writable"},
        "spool": {"ok": False,
                  "detail": "below the free-space reserve: 10 MiB free, reserve 1024 MiB"},
        "scp": {"ok": False, "detail": "RuntimeError"},  # a raising probe is a failed check
    }


def test_readyz_with_an_unreachable_database(settings: Settings, tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'folder' / 'radnode.db'}")
    context = ApiContext(settings=lambda: settings, session_factory=make_session_factory(engine))
    with TestClient(create_app(context, dashboard=False),
                    headers={"Authorization": "Bearer rn_00000000_" + "a" * 43}) as client:
        response = client.get("/readyz")  # no database: no credentials can be checked
        assert client.get("/healthz").status_code == 200  # alive all the same
    assert response.status_code == 503
    assert "database is unreachable" in response.json()["detail"]
    ok, detail = _database_probe(make_session_factory(engine))()
    assert ok is False and detail.startswith("OperationalError")


def test_metrics_endpoint(settings: Settings, session_factory: sessionmaker[Session],
                          rows: Rows) -> None:
    with make_client(settings, session_factory) as client:
        assert client.get("/metrics").status_code == 404  # no metrics given to the app
    metrics = NodeMetrics(lambda: settings, session_factory)
    metrics.association("CT_SCANNER", "accepted")
    metrics.stored("CT_SCANNER", 0x0000, 1000)
    with make_client(settings, session_factory, render_metrics=metrics.render) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.text)
               for s in family.samples}
    assert samples[("radnode_jobs", (("state", "succeeded"),))] == 1
    assert samples[("radnode_jobs", (("state", "failed"),))] == 1
    assert samples[("radnode_instances_received_total", (("calling_ae", "CT_SCANNER"),))] == 1
    assert samples[("radnode_deliveries", (("destination", "ARCHIVE"), ("state", "failed")))] == 1


def test_openapi_lists_every_route(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/v1/studies", "/api/v1/series/{series_id}", "/api/v1/jobs/{job_id}/retry",
                 "/api/v1/jobs/{job_id}/cancel", "/api/v1/series/{series_id}/complete",
                 "/api/v1/results/{result_id}/resend", "/api/v1/deliveries/{delivery_id}/resend",
                 "/api/v1/deliveries/retry-failed", "/api/v1/audit/export", "/readyz"):
        assert path in paths, path
    assert "post" in paths["/api/v1/jobs/{job_id}/retry"]


# -- lists ----------------------------------------------------------------------------------


def test_studies_newest_first_with_pagination(client: TestClient, rows: Rows) -> None:
    page = get(client, "/api/v1/studies")
    assert (page["total"], page["limit"], page["offset"]) == (3, 20, 0)
    assert uids(page) == ["1.2.300", "1.2.200", "1.2.100"]
    first = get(client, "/api/v1/studies", limit=2)
    assert uids(first) == ["1.2.300", "1.2.200"] and first["total"] == 3
    second = get(client, "/api/v1/studies", limit=2, offset=2)
    assert uids(second) == ["1.2.100"] and second["total"] == 3
    beyond = get(client, "/api/v1/studies", limit=2, offset=3)
    assert beyond["items"] == [] and beyond["total"] == 3

    study_a = page["items"][2]
    assert study_a["series_count"] == 2 and study_a["instance_count"] == 5
    assert study_a["modalities"] == ["CT", "MR"]
    assert study_a["calling_ae_titles"] == ["CT_SCANNER", "MR_SCANNER"]
    assert study_a["state"] == "receiving"  # its least advanced series
    assert study_a["jobs"] == {"succeeded": 1}
    assert study_a["first_received_at"] == iso(T0)
    assert study_a["last_received_at"] == iso(T0 + timedelta(minutes=10, seconds=2))
    assert [s["id"] for s in study_a["series"]] == [rows.a_ct, rows.a_mr]
    assert study_a["series"][0]["jobs"][0]["state"] == "succeeded"
    assert page["items"][1]["state"] == "complete" and page["items"][1]["jobs"] == {"failed": 1}


def test_studies_filters_and_date_window(client: TestClient, rows: Rows) -> None:
    def studies(**params: Any) -> list[str]:
        page = get(client, "/api/v1/studies", **params)
        assert page["total"] == len(page["items"])
        return uids(page)

    assert studies(modality="MR") == ["1.2.100"]
    assert studies(modality="US") == []
    assert studies(calling_ae="CT_SCANNER") == ["1.2.200", "1.2.100"]
    assert studies(state="receiving") == ["1.2.300", "1.2.100"]
    b_last = T0 + timedelta(hours=1, seconds=1)
    assert studies(since=iso(b_last)) == ["1.2.300", "1.2.200"]  # inclusive
    assert studies(until=iso(b_last)) == ["1.2.100"]  # exclusive
    assert studies(since=iso(T0 + timedelta(minutes=30)),
                   until=iso(T0 + timedelta(hours=1, minutes=30))) == ["1.2.200"]
    # the same instant with another UTC offset
    assert studies(since=(b_last + timedelta(hours=2)).isoformat().replace("+00:00", "+02:00")
                   ) == ["1.2.300", "1.2.200"]
    assert studies(since=iso(utcnow() + timedelta(days=1))) == []
    # no offset: UTC
    assert studies(since=b_last.replace(tzinfo=None).isoformat()) == ["1.2.300", "1.2.200"]
    # the filter selects studies; a selected study shows all of its series
    (study,) = get(client, "/api/v1/studies", modality="MR")["items"]
    assert study["series_count"] == 2


def test_series_list_and_detail(client: TestClient, rows: Rows) -> None:
    page = get(client, "/api/v1/series")
    assert ids(page) == [rows.c_ct, rows.b_ct, rows.a_mr, rows.a_ct] and page["total"] == 4
    page = get(client, "/api/v1/series", limit=1, offset=3)
    assert ids(page) == [rows.a_ct] and page["total"] == 4
    page = get(client, "/api/v1/series", limit=1, offset=4)
    assert page["items"] == [] and page["total"] == 4
    assert ids(get(client, "/api/v1/series", study="1.2.100")) == [rows.a_mr, rows.a_ct]
    assert ids(get(client, "/api/v1/series", modality="MR")) == [rows.a_mr]
    assert ids(get(client, "/api/v1/series", state="complete")) == [rows.b_ct, rows.a_ct]
    assert ids(get(client, "/api/v1/series", calling_ae="OTHER")) == [rows.c_ct]
    assert ids(get(client, "/api/v1/series", since=iso(T0 + timedelta(minutes=5)),
                   until=iso(T0 + timedelta(hours=1, seconds=1)))) == [rows.a_mr]

    detail = get(client, f"/api/v1/series/{rows.a_ct}")
    assert detail["state"] == "complete" and detail["instance_count"] == 2
    assert detail["first_received_at"] == iso(T0)
    assert [j["id"] for j in detail["job_details"]] == [rows.a_job]
    assert detail["job_details"][0]["study_instance_uid"] == "1.2.100"
    assert sorted(r["kind"] for r in detail["results"]) == ["SEG", "SR"]
    stages = {s["name"]: s for s in detail["stages"]}
    label = f"job {rows.a_job} radnode-builtin-ct"
    for name in ("first instance", "last instance", "complete", "routed",
                 f"{label} started", f"{label} succeeded", "SEG to PACS sent",
                 "SR to PACS sent", "SR to ARCHIVE failed"):
        assert name in stages, (name, list(stages))
    assert stages["first instance"]["detail"] == "from CT_SCANNER"
    assert stages["routed"]["detail"] == "ct"
    assert stages["SR to ARCHIVE failed"]["state"] == "failed"
    assert stages["SR to ARCHIVE failed"]["detail"] == "refused: 0xA700"

    failed = {s["name"]: s for s in get(client, f"/api/v1/series/{rows.b_ct}")["stages"]}
    assert failed[f"job {rows.b_job} radnode-builtin-ct failed"]["state"] == "failed"
    waiting = {s["name"]: s for s in get(client, f"/api/v1/series/{rows.c_ct}")["stages"]}
    assert waiting["complete"]["state"] == "waiting" and waiting["complete"]["at"] is None
    assert waiting[f"job {rows.c_stat_job} radnode-builtin-ct queued"]["state"] == "waiting"

    missing = client.get("/api/v1/series/9999")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "no series with id 9999"}


def test_jobs_results_deliveries_lists(client: TestClient, rows: Rows) -> None:
    assert ids(get(client, "/api/v1/jobs")) == [rows.c_stat_job, rows.b_job, rows.a_job]
    assert ids(get(client, "/api/v1/jobs", state="failed")) == [rows.b_job]
    assert ids(get(client, "/api/v1/jobs", priority="stat")) == [rows.c_stat_job]
    assert ids(get(client, "/api/v1/jobs", calling_ae="CT_SCANNER")) == [rows.b_job, rows.a_job]
    assert ids(get(client, "/api/v1/jobs", modality="MR")) == []
    assert ids(get(client, "/api/v1/jobs", model="radnode-builtin-mr")) == []
    assert ids(get(client, "/api/v1/jobs", since=iso(T0 + timedelta(hours=1)),
                   until=iso(T0 + timedelta(hours=2)))) == [rows.b_job]
    page = get(client, "/api/v1/jobs", limit=1, offset=1)
    assert ids(page) == [rows.b_job] and page["total"] == 3
    assert client.get("/api/v1/jobs", params={"priority": "urgent"}).status_code == 422
    job = get(client, f"/api/v1/jobs/{rows.b_job}")
    assert job["error"] == "VolumeError: no geometry" and job["destinations"] == ["PACS"]
    assert job["created_at"] == iso(T0 + timedelta(hours=1, seconds=10))
    assert client.get("/api/v1/jobs/9999").status_code == 404

    assert ids(get(client, "/api/v1/results")) == [rows.sr, rows.seg]
    (sr,) = get(client, "/api/v1/results", kind="SR")["items"]
    assert sorted(d["destination"] for d in sr["deliveries"]) == ["ARCHIVE", "PACS"]
    assert get(client, "/api/v1/results", job_id=rows.b_job)["total"] == 0

    sent = get(client, "/api/v1/deliveries", state="sent")
    assert sent["total"] == 2
    assert {(d["kind"], d["job_id"]) for d in sent["items"]} == {("SEG", rows.a_job),
                                                                 ("SR", rows.a_job)}
    assert ids(get(client, "/api/v1/deliveries", destination="ARCHIVE")) == [
        rows.deliveries["sr-ARCHIVE"]]
    assert get(client, "/api/v1/deliveries", study="1.2.200")["total"] == 0
    assert get(client, "/api/v1/deliveries", study="1.2.100")["total"] == 3


def test_limits_are_validated(client: TestClient) -> None:
    for params in ({"limit": 0}, {"limit": 501}, {"offset": -1}, {"since": "yesterday"}):
        assert client.get("/api/v1/series", params=params).status_code == 422, params
    assert client.get("/api/v1/series", params={"limit": 500}).status_code == 200


def test_associations_list(client: TestClient, session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session:
        for i, (ae, outcome, statuses) in enumerate([
                ("CT_SCANNER", "released", {"0x0000": 134}),
                ("CT_SCANNER", "released", {"0x0000": 1, "0xA700": 2}),
                ("INTRUDER", "rejected", {})]):
            session.add(Association(calling_ae_title=ae, called_ae_title="RADNODE",
                                    peer_address="10.0.0.9", outcome=outcome,
                                    started_at=T0 + timedelta(minutes=i),
                                    ended_at=T0 + timedelta(minutes=i, seconds=30),
                                    instances=statuses.get("0x0000", 0), bytes_received=0,
                                    statuses=statuses, series_uids=["1.2.3.4"] if statuses
                                    else []))
        session.commit()
    page = get(client, "/api/v1/associations")
    assert page["total"] == 3
    assert [a["calling_ae_title"] for a in page["items"]] == ["INTRUDER", "CT_SCANNER",
                                                              "CT_SCANNER"]
    assert page["items"][1]["statuses"] == {"0x0000": 1, "0xA700": 2}
    assert page["items"][2]["ended_at"] == iso(T0 + timedelta(seconds=30))
    assert get(client, "/api/v1/associations", outcome="rejected")["total"] == 1
    assert get(client, "/api/v1/associations", calling_ae="CT_SCANNER")["total"] == 2
    assert get(client, "/api/v1/associations", since=iso(T0 + timedelta(minutes=1)),
               until=iso(T0 + timedelta(minutes=2)))["items"][0]["statuses"] == {
        "0x0000": 1, "0xA700": 2}


def test_destinations_rules_and_echo(settings: Settings, session_factory: sessionmaker[Session],
                                     rows: Rows) -> None:
    called: list[tuple[str, str]] = []

    def echo(destination: Any, calling_ae: str) -> int | None:
        called.append((destination.name, calling_ae))
        return 0 if destination.name == "PACS" else None

    with make_client(settings, session_factory, echo=echo) as client:
        destinations = {d["name"]: d for d in get(client, "/api/v1/destinations")}
        assert destinations["PACS"]["address"] == DESTINATIONS[0]
        assert destinations["PACS"]["deliveries"] == {"sent": 2}
        assert destinations["ARCHIVE"]["deliveries"] == {"failed": 1}
        rules = get(client, "/api/v1/rules")
        assert [r["name"] for r in rules["rules"]] == ["ct", "mr"]
        assert rules["config_version"] == settings.config_version

        ok = client.post("/api/v1/destinations/PACS/echo")
        assert ok.status_code == 200
        assert ok.json() == {"destination": "PACS", "ok": True, "status": 0,
                             "detail": "Success"}
        down = client.post("/api/v1/destinations/ARCHIVE/echo").json()
        assert down["ok"] is False and down["status"] is None
        assert "no association" in down["detail"]
        assert client.post("/api/v1/destinations/NOWHERE/echo").status_code == 404
    assert called == [("PACS", settings.delivery.ae_title),
                      ("ARCHIVE", settings.delivery.ae_title)]
    with session_factory() as session:
        events = audit.events(session, action="destination.echo")
    assert [(e.actor, e.target_id, e.detail["ok"]) for e in events] == [
        (CLIENT_ACTOR, "PACS", True), (CLIENT_ACTOR, "ARCHIVE", False)]


# -- actions --------------------------------------------------------------------------------


def _job(factory: sessionmaker[Session], job_id: int) -> Job:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_job_actions(client: TestClient, session_factory: sessionmaker[Session],
                     rows: Rows) -> None:
    response = client.post(f"/api/v1/jobs/{rows.b_job}/retry")
    assert response.status_code == 200, response.text
    (new_id,) = response.json()["ids"]
    assert response.json()["message"] == f"job {rows.b_job} queued again as job {new_id}"
    assert _job(session_factory, new_id).state == "pending"

    conflict = client.post(f"/api/v1/jobs/{new_id}/retry")  # still pending
    assert conflict.status_code == 409
    assert f"job {new_id} is pending" in conflict.json()["detail"]

    cancelled = client.post(f"/api/v1/jobs/{new_id}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json() == {"message": f"job {new_id} cancelled (was pending)",
                                "ids": [new_id]}
    assert _job(session_factory, new_id).error == f"cancelled by {CLIENT_ACTOR}"
    again = client.post(f"/api/v1/jobs/{new_id}/cancel")
    assert again.status_code == 409 and "cancelled" in again.json()["detail"]
    assert client.post("/api/v1/jobs/9999/cancel").status_code == 404
    assert client.post("/api/v1/jobs/9999/retry").status_code == 404

    with session_factory() as session:
        events = audit.events(session)
    assert [(e.actor, e.action, e.target_id) for e in events] == [
        (CLIENT_ACTOR, "job.retry", str(rows.b_job)), (CLIENT_ACTOR, "job.cancel", str(new_id))]
    listed = get(client, "/api/v1/audit", action="job.cancel")
    assert listed["total"] == 1 and listed["items"][0]["actor"] == CLIENT_ACTOR
    assert listed["items"][0]["detail"]["previous_state"] == "pending"


def test_force_complete_action(client: TestClient, session_factory: sessionmaker[Session],
                               rows: Rows) -> None:
    response = client.post(f"/api/v1/series/{rows.a_mr}/complete")
    assert response.status_code == 200
    assert response.json() == {"message": f"series {rows.a_mr} complete (3 instances)",
                               "ids": [rows.a_mr]}
    detail = get(client, f"/api/v1/series/{rows.a_mr}")
    assert (detail["state"], detail["completion_reason"]) == ("complete", "forced")
    assert client.post(f"/api/v1/series/{rows.a_mr}/complete").status_code == 409
    assert client.post("/api/v1/series/9999/complete").status_code == 404
    assert get(client, "/api/v1/studies", state="receiving")["total"] == 1  # only C now
    assert get(client, "/api/v1/audit", action="series.complete")["total"] == 1


def test_delivery_actions(client: TestClient, session_factory: sessionmaker[Session],
                          rows: Rows) -> None:
    def delivery(delivery_id: int) -> Delivery:
        with session_factory() as session:
            row = session.get(Delivery, delivery_id)
            assert row is not None
            return row

    response = client.post(f"/api/v1/deliveries/{rows.deliveries['seg-PACS']}/resend")
    assert response.status_code == 200
    assert response.json()["ids"] == [rows.deliveries["seg-PACS"]]
    assert delivery(rows.deliveries["seg-PACS"]).state == "pending"
    assert client.post("/api/v1/deliveries/9999/resend").status_code == 404

    retried = client.post("/api/v1/deliveries/retry-failed", params={"destination": "PACS"})
    assert retried.json() == {"message": "0 deliveries scheduled", "ids": []}
    retried = client.post("/api/v1/deliveries/retry-failed")
    assert retried.json()["ids"] == [rows.deliveries["sr-ARCHIVE"]]
    again = delivery(rows.deliveries["sr-ARCHIVE"])
    assert (again.state, again.attempts, again.error) == ("pending", 0, None)

    unknown = client.post(f"/api/v1/results/{rows.seg}/resend",
                          json={"destinations": ["NOWHERE"]})
    assert unknown.status_code == 422 and "NOWHERE" in unknown.json()["detail"]
    named = client.post(f"/api/v1/results/{rows.seg}/resend", json={"destinations": ["ARCHIVE"]})
    assert named.status_code == 200
    (archive_id,) = named.json()["ids"]
    assert (delivery(archive_id).result_id, delivery(archive_id).destination) == (rows.seg,
                                                                                 "ARCHIVE")
    everywhere = client.post(f"/api/v1/results/{rows.sr}/resend")
    assert sorted(everywhere.json()["ids"]) == sorted([rows.deliveries["sr-PACS"],
                                                       rows.deliveries["sr-ARCHIVE"]])
    assert client.post("/api/v1/results/9999/resend").status_code == 404

    actions_done = [e["action"] for e in reversed(get(client, "/api/v1/audit")["items"])]
    assert actions_done == ["delivery.resend", "delivery.retry", "result.resend",
                            "result.resend", "result.resend"]


def test_timeline_of_a_resent_delivery_shows_it_waiting(client: TestClient, rows: Rows) -> None:
    """After a resend the delivery is pending again: its stage must not say "sent"."""
    assert client.post(f"/api/v1/deliveries/{rows.deliveries['seg-PACS']}/resend"
                       ).status_code == 200
    (row,) = [d for d in get(client, "/api/v1/deliveries", destination="PACS")["items"]
              if d["id"] == rows.deliveries["seg-PACS"]]
    assert row["state"] == "pending"
    stages = {s["name"]: s for s in get(client, f"/api/v1/series/{rows.a_ct}")["stages"]}
    assert "SEG to PACS pending" in stages, list(stages)
    assert stages["SEG to PACS pending"]["state"] == "waiting"
    assert "SEG to PACS sent" not in stages


def test_audit_list_and_export(client: TestClient, session_factory: sessionmaker[Session]
                               ) -> None:
    with session_factory() as session:
        for i, (actor, action) in enumerate([("ae:CT", "association"),
                                             ("api:pacsadmin", "job.retry"),
                                             ("cli:root", "job.cancel"),
                                             ("api:pacsadmin", "delivery.resend")]):
            audit.record(session, actor=actor, action=action, target_type="job",
                         target_id=i, detail={"n": i, "text": "a,b\n\"c\""},
                         at=T0 + timedelta(hours=i))
        session.commit()
    page = get(client, "/api/v1/audit")
    assert [e["action"] for e in page["items"]] == ["delivery.resend", "job.cancel",
                                                    "job.retry", "association"]
    assert page["items"][0]["at"] == iso(T0 + timedelta(hours=3))
    assert get(client, "/api/v1/audit", actor="api:pacsadmin")["total"] == 2
    assert get(client, "/api/v1/audit", action="job.retry")["items"][0]["detail"]["n"] == 1
    window = get(client, "/api/v1/audit", since=iso(T0 + timedelta(hours=1)),
                 until=iso(T0 + timedelta(hours=3)))
    assert [e["action"] for e in window["items"]] == ["job.cancel", "job.retry"]
    paged = get(client, "/api/v1/audit", limit=1, offset=3)
    assert [e["action"] for e in paged["items"]] == ["association"] and paged["total"] == 4

    exported = client.get("/api/v1/audit/export", params={"since": iso(T0 + timedelta(hours=1))})
    assert exported.status_code == 200
    assert exported.headers["content-type"].startswith("text/csv")
    assert "radnode-audit.csv" in exported.headers["content-disposition"]
    table = list(csv.reader(io.StringIO(exported.text)))
    assert table[0] == list(audit.EXPORT_FIELDS)
    assert [row[3] for row in table[1:]] == ["job.retry", "job.cancel", "delivery.resend"]
    assert json.loads(table[1][6]) == {"n": 1, "text": "a,b\n\"c\""}

    lines = client.get("/api/v1/audit/export",
                       params={"format": "json", "until": iso(T0 + timedelta(hours=1))})
    assert lines.headers["content-type"].startswith("application/x-ndjson")
    assert [json.loads(line)["action"] for line in lines.text.splitlines()] == ["association"]
    assert client.get("/api/v1/audit/export", params={"format": "xml"}).status_code == 422


# -- models and workers ---------------------------------------------------------------------


def test_worker_status_feeds_the_models_page(
    client: TestClient, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    spec = settings.model("radnode-builtin-ct")
    registry.clear()
    try:
        registry.get_model(spec, "cpu")
        tasks.report_status(settings, session_factory, name="gpu-box:4242")
    finally:
        registry.clear()
    with session_factory() as session:
        (row,) = session.scalars(select(WorkerStatus)).all()
        assert row.name == "gpu-box:4242" and row.queues == ["gpu"] and row.device == "cpu"
        assert row.models == [{"name": "radnode-builtin-ct", "version": spec.version,
                               "device": "cpu"}]
        assert row.gpu_memory_allocated_mb is None  # no CUDA device in use
        first_heartbeat = row.heartbeat_at

    models = {m["name"]: m for m in get(client, "/api/v1/models")}
    assert models["radnode-builtin-ct"]["loaded_on"] == ["gpu-box:4242 (cpu)"]
    assert models["radnode-builtin-ct"]["routed"] is True
    assert models["radnode-builtin-mr"]["loaded_on"] == []
    (worker,) = get(client, "/api/v1/workers")
    assert worker["alive"] is True and worker["name"] == "gpu-box:4242"

    # a second report of the same process updates its row (nothing warm any more)
    tasks.report_status(settings, session_factory, name="gpu-box:4242")
    with session_factory() as session:
        (row,) = session.scalars(select(WorkerStatus)).all()
        assert row.models == [] and row.heartbeat_at >= first_heartbeat

    # a worker silent for more than two minutes holds nothing any more
    with session_factory() as session:
        session.execute(update(WorkerStatus).values(
            models=[{"name": "radnode-builtin-ct", "version": spec.version, "device": "cpu"}],
            heartbeat_at=utcnow() - timedelta(minutes=2, seconds=5)))
        session.add(WorkerStatus(name="fresh:1", queues=["gpu"], device="cuda:0",
                                 models=[{"name": "radnode-builtin-mr",
                                          "version": settings.model("radnode-builtin-mr").version,
                                          "device": "cuda:0"}],
                                 started_at=utcnow(), heartbeat_at=utcnow()))
        session.commit()
    models = {m["name"]: m for m in get(client, "/api/v1/models")}
    assert models["radnode-builtin-ct"]["loaded_on"] == []
    assert models["radnode-builtin-mr"]["loaded_on"] == ["fresh:1 (cuda:0)"]
    workers = {w["name"]: w["alive"] for w in get(client, "/api/v1/workers")}
    assert workers == {"fresh:1": True, "gpu-box:4242": False}


def test_report_status_never_raises(settings: Settings, tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'missing' / 'radnode.db'}")
    tasks.report_status(settings, make_session_factory(engine), name="x:1")  # logged only


def test_action_rolls_back_on_conflict(client: TestClient, session_factory: sessionmaker[Session],
                                       rows: Rows) -> None:
    """A refused action leaves neither a change nor an audit row behind."""
    assert client.post(f"/api/v1/jobs/{rows.c_stat_job}/retry").status_code == 409
    assert client.post(f"/api/v1/series/{rows.a_ct}/complete").status_code == 409
    with session_factory() as session:
        assert session.scalars(select(AuditEvent)).all() == []
        assert len(session.scalars(select(Job)).all()) == 3


# -- de-identification mapping ------------------------------------------------------------


def test_pseudonym_lookup_is_for_admins_and_audited(
        settings: Settings, session_factory: sessionmaker[Session], client: TestClient) -> None:
    from service.deid.mapping import get_or_create

    with session_factory() as session:
        get_or_create(session, "RESEARCH", "patient", "PID-0042", lambda: "ANON-7F00",
                      attributes={"PatientID": "PID-0042", "PatientName": "Doe^Jane"})
        session.commit()

    found = get(client, "/api/v1/deid/pseudonyms/ANON-7F00")
    assert found == {"scope": "RESEARCH", "kind": "patient", "pseudonym": "ANON-7F00",
                     "original": "PID-0042",
                     "attributes": {"PatientID": "PID-0042", "PatientName": "Doe^Jane"}}
    assert client.get("/api/v1/deid/pseudonyms/ANON-7F00",
                      params={"scope": "OTHER"}).status_code == 404
    assert client.get("/api/v1/deid/pseudonyms/2.25.1").status_code == 404
    for role in ("viewer", "operator"):
        with make_client(settings, session_factory, role=role) as other:
            assert other.get("/api/v1/deid/pseudonyms/ANON-7F00").status_code == 403

    with session_factory() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "deid.lookup")
                                 .order_by(AuditEvent.id)).all()
        assert [(e.actor, e.target_id, e.detail["found"]) for e in events] == [
            (CLIENT_ACTOR, "ANON-7F00", True), (CLIENT_ACTOR, "ANON-7F00", False),
            (CLIENT_ACTOR, "2.25.1", False)]
