"""The HTTP API, probes, metrics, actions and audit trail of a real node with real data.

Each test starts ``radnode serve`` as its own process (SCP, scheduler, embedded
Celery worker, uvicorn), sends the real pancreas CT with dcmtk's storescu,
lets the results reach a dcmtk storescp PACS, and talks to the node over HTTP
(httpx), its CLI (subprocesses) and its SQLite file (read-only).
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.integration.conftest import Peer, require_tool, start_node, stop
from tests.integration.test_recovery import pacs_results, query, storescu, wait_until

pytestmark = pytest.mark.integration

SENDER = "SCANNER"  # the calling AE title of test_recovery.storescu
ADMIN = "api:test-admin"  # the actor of the token Peer.auth() sends


# -- helpers --------------------------------------------------------------------------------


@contextmanager
def api(node: Peer, role: str | None = "admin") -> Iterator[httpx.Client]:
    """An HTTP client for the node, once its server answers, with a token of ``role``."""
    headers = node.auth(role) if role is not None else {}
    with httpx.Client(base_url=node.api, timeout=30, headers=headers) as client:
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or node.process.poll() is not None:
                raise AssertionError(
                    f"the HTTP API never answered:\n{node.log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield client


def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, (response.status_code, response.text)
    return response.json()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics(client: httpx.Client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, (key, sorted(n for n, _ in samples if n.startswith(name[:20])))
    return samples[key]


def radnode(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    run = subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True,
                         text=True, timeout=timeout, check=False,
                         env={**os.environ, "COLUMNS": "300"})
    return run


def job_state(node: Peer, job_id: int) -> str:
    rows = query(node.folder, f"select state from jobs where id = {int(job_id)}")
    return str(rows[0][0]) if rows else "missing"


def wait_job_delivered(node: Peer, job_id: int, what: str) -> None:
    """The job succeeded and each of its results reached every destination."""
    def done() -> bool:
        state = job_state(node, job_id)
        assert state not in ("failed", "cancelled"), f"job {job_id} is {state}"
        if state != "succeeded":
            return False
        rows = query(node.folder, "select d.state from deliveries d join results r "
                                  f"on d.result_id = r.id where r.job_id = {int(job_id)}")
        return len(rows) >= 2 and all(state == "sent" for (state,) in rows)

    wait_until(done, 300, what, node.log)


def parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@pytest.fixture
def pacs_node(tmp_path: Path, storescp_pacs: Peer) -> Iterator[Peer]:
    node = start_node(tmp_path, destinations=(storescp_pacs.address,))
    try:
        yield node
    finally:
        stop(node.process)


# -- 1 and 2: a node with data flowing ------------------------------------------------------


def test_api_metrics_actions_and_audit_on_a_live_node(
    ct_series_dir: Path, pacs_node: Peer, storescp_pacs: Peer
) -> None:
    node = pacs_node
    files = sorted(ct_series_dir.glob("*.dcm"))
    n = len(files)
    total_bytes = sum(p.stat().st_size for p in files)
    with api(node) as client:
        sender = storescu(node.port, ct_series_dir)
        assert sender.wait(timeout=300) == 0, sender.stdout.read() if sender.stdout else ""
        wait_until(lambda: len(pacs_results(storescp_pacs.folder)) == 2, 300,
                   "SEG and SR in the PACS", node.log)
        wait_until(lambda: query(node.folder, "select state, count(*) from deliveries "
                                              "group by state") == [("sent", 2)],
                   60, "both deliveries recorded as sent", node.log)
        assert sorted(pacs_results(storescp_pacs.folder).values()) == ["SEG", "SR"]

        # -- probes
        assert ok(client.get("/healthz")) == {"status": "alive"}
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        checks = ready.json()["checks"]
        assert set(checks) == {"database", "broker", "spool", "scp"}
        assert all(check["ok"] for check in checks.values()), checks
        assert "listening" in checks["scp"]["detail"]

        # -- studies, filters, pagination
        studies = ok(client.get("/api/v1/studies"))
        assert studies["total"] == 1
        (study,) = studies["items"]
        assert study["series_count"] == 1 and study["instance_count"] == n
        assert study["jobs"] == {"succeeded": 1}
        assert study["modalities"] == ["CT"] and study["calling_ae_titles"] == [SENDER]
        future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
        assert ok(client.get("/api/v1/studies", params={"modality": "MR"}))["total"] == 0
        assert ok(client.get("/api/v1/studies", params={"calling_ae": SENDER}))["total"] == 1
        assert ok(client.get("/api/v1/studies", params={"calling_ae": "NOBODY"}))["total"] == 0
        assert ok(client.get("/api/v1/studies", params={"since": future}))["total"] == 0
        page = ok(client.get("/api/v1/series", params={"limit": 1, "offset": 1}))
        assert page["items"] == [] and page["total"] == 1
        (series,) = ok(client.get("/api/v1/series"))["items"]
        assert series["study_instance_uid"] == study["study_instance_uid"]
        assert series["called_ae_title"] == "RADNODE"

        # -- one series in detail
        detail = ok(client.get(f"/api/v1/series/{series['id']}"))
        assert detail["state"] == "complete" and detail["instance_count"] == n
        (job,) = detail["job_details"]
        assert job["state"] == "succeeded" and job["model_name"] == "radnode-builtin-ct"
        job_id = job["id"]
        names = [stage["name"] for stage in detail["stages"]]
        for name in ("first instance", "last instance", "complete", "routed",
                     f"job {job_id} radnode-builtin-ct started",
                     f"job {job_id} radnode-builtin-ct succeeded",
                     "SEG to PACS sent", "SR to PACS sent"):
            assert name in names, (name, names)
        assert all(stage["state"] == "done" for stage in detail["stages"])
        assert sorted(r["kind"] for r in detail["results"]) == ["SEG", "SR"]
        assert client.get("/api/v1/series/999999").status_code == 404

        deliveries = ok(client.get("/api/v1/deliveries", params={"state": "sent"}))
        assert deliveries["total"] >= 2
        assert {d["kind"] for d in deliveries["items"]} == {"SEG", "SR"}
        assert {d["destination"] for d in deliveries["items"]} == {"PACS"}

        # -- the storescu association
        (assoc,) = ok(client.get("/api/v1/associations", params={"calling_ae": SENDER}))["items"]
        assert assoc["outcome"] == "released" and assoc["called_ae_title"] == "RADNODE"
        assert assoc["instances"] == n and assoc["statuses"] == {"0x0000": n}
        assert assoc["series_uids"] == [series["series_instance_uid"]]
        assert abs(assoc["bytes_received"] - total_bytes) < 0.05 * total_bytes
        assert assoc["peer_address"] == "127.0.0.1"

        # -- Prometheus
        samples = metrics(client)
        assert sample(samples, "radnode_instances_received_total", calling_ae=SENDER) == n
        assert sample(samples, "radnode_cstore_responses_total", status="0x0000") == n
        assert sample(samples, "radnode_cstore_store_seconds_count") == n
        assert 0 < sample(samples, "radnode_cstore_store_seconds_sum") < 60
        assert sample(samples, "radnode_associations_total", calling_ae=SENDER,
                      outcome="accepted") == 1
        assert sample(samples, "radnode_associations_total", calling_ae=SENDER,
                      outcome="released") == 1
        assert sample(samples, "radnode_jobs", state="succeeded") == 1
        assert sample(samples, "radnode_hop_seconds_count", hop="end_to_end") == 1
        assert sample(samples, "radnode_deliveries", destination="PACS", state="sent") == 2

        paths = ok(client.get("/openapi.json"))["paths"]
        for path in ("/api/v1/jobs/{job_id}/retry", "/api/v1/jobs/{job_id}/cancel",
                     "/api/v1/series/{series_id}/complete",
                     "/api/v1/deliveries/{delivery_id}/resend",
                     "/api/v1/results/{result_id}/resend", "/api/v1/deliveries/retry-failed"):
            assert "post" in paths[path], path

        # -- 2. actions: retry through the API; the node runs and delivers it again
        before_retry = datetime.now(UTC)
        pacs_mtimes = {p.name: p.stat().st_mtime for p in storescp_pacs.folder.iterdir()}
        retried = ok(client.post(f"/api/v1/jobs/{job_id}/retry"))
        (new_job,) = retried["ids"]
        assert new_job != job_id
        wait_job_delivered(node, new_job, "the retried job to succeed and be delivered")
        again = ok(client.get("/api/v1/deliveries", params={"state": "sent"}))["items"]
        assert {d["job_id"] for d in again} == {new_job}  # the same results, sent afresh
        assert all(parse_time(d["sent_at"]) >= before_retry for d in again)
        assert all(p.stat().st_mtime > pacs_mtimes[p.name]
                   for p in storescp_pacs.folder.iterdir() if p.name in pacs_mtimes)
        assert ok(client.get(f"/api/v1/jobs/{new_job}"))["state"] == "succeeded"

        refused = client.post(f"/api/v1/jobs/{job_id}/cancel")
        assert refused.status_code == 409
        assert refused.json()["detail"] == (f"job {job_id} is succeeded: only a pending, "
                                            "queued or running job can be cancelled")
        missing = client.post("/api/v1/series/999999/complete")
        assert missing.status_code == 404
        assert missing.json()["detail"] == "no series with id 999999"

        # -- resend one delivery: pending, then sent again by the node
        delivery = again[0]
        before_resend = datetime.now(UTC)
        resent = ok(client.post(f"/api/v1/deliveries/{delivery['id']}/resend"))
        assert resent["ids"] == [delivery["id"]]

        def resent_and_sent() -> bool:
            rows = ok(client.get("/api/v1/deliveries",
                                 params={"since": before_resend.isoformat()}))["items"]
            return [(d["id"], d["state"]) for d in rows] == [(delivery["id"], "sent")] and \
                parse_time(rows[0]["sent_at"]) >= before_resend

        wait_until(resent_and_sent, 60, "the resent delivery to be sent again", node.log)

        # -- the audit trail of those actions
        for action in ("job.retry", "delivery.resend"):
            events = ok(client.get("/api/v1/audit", params={"action": action}))["items"]
            assert [e["actor"] for e in events] == [ADMIN], (action, events)
        (retry_event,) = ok(client.get("/api/v1/audit", params={"action": "job.retry"}))["items"]
        assert retry_event["target_id"] == str(job_id)
        assert retry_event["detail"]["new_job"] == new_job
        assert ok(client.get("/api/v1/audit", params={"action": "job.cancel"}))["total"] == 0

        # -- 2. the CLI against the live node's database
        me = f"cli:{getpass.getuser()}"
        run = radnode("retry", str(new_job), "--data-dir", str(node.folder))
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"job {new_job} queued again as job" in run.stdout
        cli_job = int(run.stdout.split("as job")[1].split()[0])
        wait_job_delivered(node, cli_job, "the job retried from the CLI to be delivered")
        (cli_event,) = ok(client.get("/api/v1/audit", params={"actor": me,
                                                              "action": "job.retry"}))["items"]
        assert (cli_event["action"], cli_event["target_id"]) == ("job.retry", str(new_job))

        status = radnode("status", "--data-dir", str(node.folder))
        assert status.returncode == 0, status.stdout + status.stderr
        assert series["series_instance_uid"] in status.stdout
        assert f"{cli_job}:radnode-builtin-ct succeeded" in status.stdout
        assert f"last association: AE {SENDER}" in status.stdout

        export = radnode("audit", "export", "--data-dir", str(node.folder), "--format", "json")
        assert export.returncode == 0, export.stderr
        events = [json.loads(line) for line in export.stdout.splitlines()]
        assert f"{len(events)} audit event(s)" in export.stderr
        by_action: dict[str, list[dict[str, Any]]] = {}
        for event in events:
            by_action.setdefault(event["action"], []).append(event)
        (association,) = by_action["association"]
        assert association["actor"] == f"ae:{SENDER}"
        assert association["detail"]["instances"] == n
        assert association["detail"]["statuses"] == {"0x0000": n}
        assert [e["target_id"] for e in by_action["job.succeeded"]] == [
            str(job_id), str(new_job), str(cli_job)]
        assert all(e["actor"].startswith("worker:") for e in by_action["job.succeeded"])
        assert [e["actor"] for e in by_action["job.retry"]] == [ADMIN, me]
        assert [e["target_id"] for e in by_action["user.add"]] == ["test-admin"]
        assert [e["target_id"] for e in by_action["delivery.resend"]] == [str(delivery["id"])]
        assert [e["at"] for e in events] == sorted(e["at"] for e in events)  # time order
        assert node.process.poll() is None


# -- 3: API tokens and roles ----------------------------------------------------------------


def test_api_needs_a_token_and_the_role_for_each_route(
    tmp_path: Path, ct_series_dir: Path, storescp_pacs: Peer
) -> None:
    part = tmp_path / "part"
    part.mkdir()
    for path in sorted(ct_series_dir.glob("*.dcm"))[:40]:
        shutil.copy(path, part / path.name)
    node = start_node(tmp_path, quiet_period=600, destinations=(storescp_pacs.address,),
                      # the release of the association would complete the series
                      env={"RADNODE_COMPLETION__RELEASE_QUIET_S": "0"})
    try:
        with api(node, role=None) as anonymous, api(node, "viewer") as viewer, \
                api(node, "operator") as operator, api(node, "admin") as admin:
            sender = storescu(node.port, part)
            assert sender.wait(timeout=120) == 0, sender.stdout.read() if sender.stdout else ""
            time.sleep(2)  # several scheduler ticks: the series stays receiving
            (series,) = ok(viewer.get("/api/v1/series"))["items"]
            assert (series["state"], series["instance_count"]) == ("receiving", 40)
            complete = f"/api/v1/series/{series['id']}/complete"

            # no token: 401 on every route of the schema, and on the rest but /healthz
            schema = ok(viewer.get("/openapi.json"))
            routes = [(method.upper(), path.replace("{series_id}", str(series["id"]))
                       .replace("{job_id}", "1").replace("{result_id}", "1")
                       .replace("{delivery_id}", "1").replace("{name}", "PACS"))
                      for path, item in schema["paths"].items() for method in item]
            assert len(routes) >= 20 and ("POST", complete) in routes
            for method, path in [*routes, ("GET", "/docs"), ("GET", "/openapi.json"),
                                 ("GET", "/"), ("GET", "/static/dashboard.js")]:
                if path == "/healthz":
                    continue
                for headers in ({}, {"Authorization": "Bearer rn_00000000_" + "A" * 43},
                                {"Authorization": f"Basic {node.token}"}):
                    refused = anonymous.request(method, path, headers=headers)
                    assert refused.status_code == 401, (method, path, headers, refused.text)
                    assert refused.headers["www-authenticate"] == "Bearer"
            assert ok(anonymous.get("/healthz")) == {"status": "alive"}

            # below the role: 403, nothing done
            assert viewer.post(complete).status_code == 403
            assert viewer.post("/api/v1/deliveries/retry-failed").status_code == 403
            for path in ("/api/v1/audit", "/api/v1/audit/export"):
                assert viewer.get(path).status_code == 403, path
                assert operator.get(path).status_code == 403, path
            assert ok(viewer.get(f"/api/v1/series/{series['id']}"))["state"] == "receiving"
            assert ok(admin.get("/api/v1/audit", params={"action": "series.complete"}
                                ))["total"] == 0

            # the operator acts; the node completes, analyses and delivers the series
            done = ok(operator.post(complete))
            assert done["message"] == f"series {series['id']} complete (40 instances)"
            wait_until(lambda: query(node.folder, "select state from jobs") == [("succeeded",)],
                       300, "the job of the forced series to succeed", node.log)
            detail = ok(viewer.get(f"/api/v1/series/{series['id']}"))
            assert (detail["state"], detail["completion_reason"]) == ("complete", "forced")
            (event,) = ok(admin.get("/api/v1/audit",
                                    params={"action": "series.complete"}))["items"]
            assert event["actor"] == "api:test-operator"
            assert event["detail"]["instances"] == 40
            for reading in ("/api/v1/studies", "/api/v1/jobs", "/api/v1/models",
                            "/api/v1/workers", "/api/v1/destinations", "/readyz", "/metrics"):
                assert viewer.get(reading).status_code == 200, reading
            assert ok(viewer.get("/api/v1/me"))["actor"] == "api:test-viewer"

            # a revoked token is refused at once by the running node
            listed = node.radnode("tokens", "list", "--user", "test-viewer")
            assert listed.returncode == 0, listed.stderr
            token_id = next(line.split("│")[1].strip() for line in listed.stdout.splitlines()
                            if "test-viewer" in line)
            assert node.radnode("tokens", "revoke", token_id).returncode == 0
            assert viewer.get("/api/v1/studies").status_code == 401
    finally:
        stop(node.process)
    # the tokens are nowhere in the log, the worker's settings or the database file
    secrets = [token.split("_", 2)[2] for token in node.tokens.values()]
    assert len(secrets) == 3
    stored = b"".join(p.read_bytes() for p in node.folder.glob("radnode.db*"))
    for secret in secrets:
        assert secret not in node.log.read_text()
        assert secret not in (node.folder / "run" / "worker-config.yaml").read_text()
        assert secret.encode() not in stored


# -- 4 and 5: not ready (disk reserve), refused instances, a rejected association -----------


def test_disk_reserve_makes_the_node_unready_and_associations_are_recorded(
    tmp_path: Path, ct_series_dir: Path
) -> None:
    # start_node's port probe (connect, close) holds an association slot until the ACSE
    # timeout: keep that short, so that with one slot the peers below are not refused for it
    node = start_node(tmp_path, "--no-worker",
                      env={"RADNODE_STORAGE__MIN_FREE_MB": str(1 << 40),
                           "RADNODE_HTTP__METRICS_AUTH": "false",  # /metrics open
                           "RADNODE_DICOM__MAX_ASSOCIATIONS": "1",
                           "RADNODE_DICOM__ACSE_TIMEOUT_S": "2"})
    try:
        with api(node) as client:
            time.sleep(3)
            ready = client.get("/readyz")
            assert ready.status_code == 503, ready.text
            body = ready.json()
            assert body["ready"] is False
            spool = body["checks"]["spool"]
            assert spool["ok"] is False and "below the free-space reserve" in spool["detail"]
            assert all(body["checks"][name]["ok"] for name in ("database", "broker", "scp"))
            assert ok(client.get("/healthz")) == {"status": "alive"}

            first = sorted(ct_series_dir.glob("*.dcm"))[0]
            sent = subprocess.run(
                [require_tool("storescu"), "-v", "-aet", SENDER, "-aec", "RADNODE",
                 "127.0.0.1", str(node.port), str(first)],
                capture_output=True, text=True, timeout=60, check=False)
            assert sent.returncode != 0
            assert "Refused: OutOfResources" in sent.stdout + sent.stderr  # 0xA700

            def association(ae: str) -> list[dict[str, Any]]:
                items: list[dict[str, Any]] = ok(client.get(
                    "/api/v1/associations", params={"calling_ae": ae}))["items"]
                return items

            wait_until(lambda: len(association(SENDER)) == 1, 30,
                       "the refused association's row", node.log)
            (refused,) = association(SENDER)
            assert refused["statuses"] == {"0xA700": 1}
            assert (refused["instances"], refused["bytes_received"]) == (0, 0)
            assert refused["outcome"] == "released" and refused["series_uids"] == []
            assert query(node.folder, "select count(*) from instances") == [(0,)]

            # 5. one association held open: with dicom.max_associations 1, the next is rejected
            holder = AE(ae_title="HOLDER")
            holder.add_requested_context(Verification)
            held = holder.associate("127.0.0.1", node.port, ae_title="RADNODE")
            assert held.is_established
            try:
                echo = subprocess.run(
                    [require_tool("echoscu"), "-aet", "INTRUDER", "-aec", "RADNODE",
                     "127.0.0.1", str(node.port)],
                    capture_output=True, text=True, timeout=60, check=False)
                assert echo.returncode != 0
                assert "reject" in (echo.stdout + echo.stderr).lower()
            finally:
                held.release()
            wait_until(lambda: len(association("HOLDER")) == 1, 30, "the held association's row",
                       node.log)
            time.sleep(1)  # anything else recorded for the rejected one arrives now
            (rejected,) = association("INTRUDER")
            assert rejected["outcome"] == "rejected" and rejected["instances"] == 0
            assert rejected["called_ae_title"] == "RADNODE"
            assert ok(client.get("/api/v1/associations",
                                 params={"outcome": "rejected"}))["total"] == 1
            assert association("HOLDER")[0]["outcome"] == "released"

            with httpx.Client(base_url=node.api, timeout=30) as anonymous:
                samples = metrics(anonymous)  # open by config, without a token
                assert anonymous.get("/api/v1/associations").status_code == 401
            assert sample(samples, "radnode_cstore_responses_total", status="0xA700") == 1
            assert sample(samples, "radnode_instances_received_total", calling_ae=SENDER) == 0
            assert sample(samples, "radnode_associations_total", calling_ae="INTRUDER",
                          outcome="rejected") == 1
            assert sample(samples, "radnode_spool_free_bytes") < sample(
                samples, "radnode_spool_reserve_bytes")
            audited = ok(client.get("/api/v1/audit", params={"action": "association"}))
            assert sorted(e["actor"] for e in audited["items"]) == [
                "ae:HOLDER", "ae:INTRUDER", f"ae:{SENDER}"]
    finally:
        stop(node.process)
