"""HTTP API and metrics: response time with a realistic history in the database.

Fills a fresh SQLite database (migrated as the node does) with ``--studies``
studies of two series each; each series has one succeeded job with a SEG and
an SR, each delivered to two destinations (a few failed), plus one
association and the audit rows the node would write. Then, served by the real
application through uvicorn on loopback, it times (median and p95 over
``--repeats`` requests) the dashboard's polls and the Prometheus scrape:
``/api/v1/studies`` (20 newest), ``/api/v1/jobs``, ``/api/v1/deliveries``,
``/api/v1/series/{id}``, ``/metrics`` and ``/readyz``, each with an admin's
API token (so the time includes the token check).

    .venv/bin/python benchmarks/api.py [--studies 5000] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service import auth  # noqa: E402
from service.api.app import ApiContext, create_app  # noqa: E402
from service.api.server import ApiServer  # noqa: E402
from service.config import load_settings  # noqa: E402
from service.db import migrate  # noqa: E402
from service.db.models import (  # noqa: E402
    Association,
    AuditEvent,
    Delivery,
    Job,
    Result,
    Series,
)
from service.db.session import make_engine, make_session_factory  # noqa: E402
from service.metrics import NodeMetrics  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def fill(factory, studies: int) -> None:  # type: ignore[no-untyped-def]
    with factory() as session:
        for s in range(studies):
            start = T0 + timedelta(minutes=s)
            study = generate_uid()
            session.add(Association(calling_ae_title="CT1", called_ae_title="RADNODE",
                                    peer_address="10.0.0.5", outcome="released",
                                    started_at=start, ended_at=start + timedelta(seconds=20),
                                    instances=400, bytes_received=200 << 20,
                                    statuses={"0x0000": 400}, series_uids=[]))
            for k in range(2):
                series = Series(series_instance_uid=generate_uid(), study_instance_uid=study,
                                modality="CT", calling_ae_title="CT1", called_ae_title="RADNODE",
                                peer_address="10.0.0.5", state="complete", instance_count=200,
                                first_received_at=start, last_received_at=start +
                                timedelta(seconds=20), completed_at=start + timedelta(seconds=21),
                                completion_reason="association_released",
                                routed_at=start + timedelta(seconds=21))
                session.add(series)
                session.flush()
                job = Job(series_id=series.id, task_name="radnode.analyse_series", queue="gpu",
                          model_name="radnode-builtin-ct", model_version="1.0.0",
                          state="succeeded", destinations=["PACS", "ARCHIVE"],
                          priority="stat" if k else "routine", rule_names="ct",
                          config_version="bench", attempts=1, worker="gpu1:1",
                          created_at=start + timedelta(seconds=21),
                          queued_at=start + timedelta(seconds=21),
                          started_at=start + timedelta(seconds=22),
                          finished_at=start + timedelta(seconds=30))
                session.add(job)
                session.flush()
                for kind in ("SEG", "SR"):
                    result = Result(job_id=job.id, kind=kind, sop_class_uid="1.2.3",
                                    sop_instance_uid=generate_uid(),
                                    series_instance_uid=generate_uid(), path="/x.dcm",
                                    summary={"segments": 3}, created_at=job.finished_at)
                    session.add(result)
                    session.flush()
                    for name in ("PACS", "ARCHIVE"):
                        failed = name == "ARCHIVE" and s % 50 == 0
                        session.add(Delivery(
                            result_id=result.id, destination=name,
                            state="failed" if failed else "sent", attempts=1,
                            status=0xA700 if failed else 0,
                            error="refused: 0xA700" if failed else None,
                            created_at=job.finished_at, next_attempt_at=job.finished_at,
                            sent_at=None if failed else start + timedelta(seconds=31)))
                session.add(AuditEvent(at=start + timedelta(seconds=30), actor="worker:gpu1",
                                       action="job.succeeded", target_type="job",
                                       target_id=str(job.id), detail={"results": 2}))
            if s % 500 == 499:
                session.commit()
        session.commit()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="radnode-api-bench-") as tmp:
        settings = load_settings(data_dir=Path(tmp),
                                 destinations=["PACS@127.0.0.1:104", "ARCHIVE@127.0.0.1:105"])
        migrate.upgrade(settings.database_url)
        factory = make_session_factory(make_engine(settings.database_url))
        t = time.perf_counter()
        fill(factory, args.studies)
        print(f"database: {args.studies} studies, {2 * args.studies} series and jobs, "
              f"{8 * args.studies} deliveries ({time.perf_counter() - t:.1f} s to fill)")
        with factory() as session:
            auth.add_user(session, "bench", "admin", None, actor="benchmark")
            _, token = auth.create_token(session, "bench", actor="benchmark")
            session.commit()
        metrics = NodeMetrics(lambda: settings, factory)
        app = create_app(ApiContext(settings=lambda: settings, session_factory=factory,
                                    render_metrics=metrics.render))
        server = ApiServer(app, "127.0.0.1", 0)
        server.start()
        base = f"http://127.0.0.1:{server.port}"
        paths = ["/api/v1/studies?limit=20", "/api/v1/jobs?limit=50",
                 "/api/v1/deliveries?limit=100", "/api/v1/series/1", "/metrics", "/readyz"]
        try:
            with httpx.Client(base_url=base, timeout=60,
                              headers={"Authorization": f"Bearer {token}"}) as client:
                print(f"{'path':34} {'median ms':>10} {'p95 ms':>8} {'bytes':>8}")
                for path in paths:
                    client.get(path).raise_for_status()  # warm
                    times = []
                    size = 0
                    for _ in range(args.repeats):
                        t = time.perf_counter()
                        response = client.get(path)
                        times.append((time.perf_counter() - t) * 1000)
                        response.raise_for_status()
                        size = len(response.content)
                    times.sort()
                    p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
                    print(f"{path:34} {statistics.median(times):10.1f} {p95:8.1f} {size:8d}")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
