"""Prometheus metrics: in-process SCP counters and the database collector (real SQLite)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.models import Base, Delivery, Job, Result, Series
from service.db.session import make_engine, make_session_factory
from service.metrics import (
    DURATION_BUCKETS,
    HOPS,
    STORE_BUCKETS,
    NodeMetrics,
    seconds_between,
)
from tests.unit.conftest import T0

CT = "radnode-builtin-ct"
MR = "radnode-builtin-mr"
BOUNDS = [repr(float(b)) for b in DURATION_BUCKETS] + ["+Inf"]

Key = tuple[str, frozenset[tuple[str, str]]]

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "radnode.json"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def parse(body: bytes) -> dict[Key, float]:
    """Every sample of an exposition, keyed by (sample name, labels)."""
    samples: dict[Key, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def value(samples: dict[Key, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: dict[Key, float]) -> set[str]:
    return {name for name, _ in samples}


def histogram(samples: dict[Key, float], name: str, **labels: str) -> tuple[list[float], float]:
    """Return (cumulative bucket counts in BOUNDS order, sum) of one histogram series."""
    buckets = [value(samples, f"{name}_bucket", le=bound, **labels) for bound in BOUNDS]
    assert value(samples, f"{name}_count", **labels) == buckets[-1]
    return buckets, value(samples, f"{name}_sum", **labels)


def expected_buckets(durations: list[float]) -> list[float]:
    """Cumulative counts as Prometheus defines them; negative durations count as 0."""
    return [float(sum(1 for d in durations if max(d, 0.0) <= bound))
            for bound in DURATION_BUCKETS] + [float(len(durations))]


# -- a realistic database --------------------------------------------------------------------
#: Durations the scenario below stores, seconds, per hop (see ``populate``).
HOP_DURATIONS = {
    "received_to_complete": [9, 0.3, -1, 1.5],  # A, B, D (clock skew), E; C is still receiving
    "complete_to_started": [3, 4.7, 99.7, 3, 0.4],  # A1, B1, B2, D6 (running), E1
    "started_to_encoded": [45, 3800, 31],  # succeeded only: A1, B2, E1
    "encoded_to_delivered": [1.8, 700, 1.25, 1.8, 8.5],  # every delivery with sent_at
    "delivered_to_committed": [1.5, 0.2],  # A1-SEG → PACS, E1-SR → PACS
    "end_to_end": [757, 41.4],  # A1, E1; B2 has a pending and a failed delivery
}
JOB_DURATIONS = {CT: [45, 19], MR: [3800, 31]}  # succeeded and failed jobs


def populate(factory: sessionmaker[Session]) -> None:
    """Five series, their jobs, results and deliveries, times relative to T0 (seconds)."""
    serial = iter(range(1, 1000))

    def series(received: float, completed: float | None) -> Series:
        n = next(serial)
        return Series(series_instance_uid=f"1.2.826.0.1.{n}", study_instance_uid=f"1.2.826.1.{n}",
                      modality="CT", calling_ae_title="CT_SCANNER",
                      state="receiving" if completed is None else "complete",
                      instance_count=100, first_received_at=at(received - 30),
                      last_received_at=at(received),
                      completed_at=None if completed is None else at(completed))

    def job(s: Series, model: str, state: str, *, queue: str = "gpu", priority: str = "routine",
            started: float | None = None, finished: float | None = None) -> Job:
        return Job(series=s, task_name="radnode.run_model", queue=queue, model_name=model,
                   state=state, priority=priority, destinations=["PACS", "ARCHIVE"],
                   created_at=s.completed_at or s.last_received_at,
                   started_at=None if started is None else at(started),
                   finished_at=None if finished is None else at(finished))

    def result(j: Job, kind: str) -> Result:
        n = next(serial)
        return Result(job=j, kind=kind, sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                      sop_instance_uid=f"1.2.826.2.{n}", series_instance_uid=f"1.2.826.3.{n}",
                      path=f"/results/{n}.dcm", created_at=j.finished_at)

    def delivery(r: Result, destination: str, state: str, *, sent: float | None = None,
                 committed: float | None = None) -> Delivery:
        return Delivery(result=r, destination=destination, state=state,
                        created_at=r.created_at, next_attempt_at=r.created_at,
                        sent_at=None if sent is None else at(sent),
                        committed_at=None if committed is None else at(committed))

    a = series(0, 9)
    a1 = job(a, CT, "succeeded", priority="stat", started=12, finished=57)
    a1_seg = result(a1, "SEG")
    b = series(100, 100.3)
    b1 = job(b, CT, "failed", started=105, finished=124)
    b2 = job(b, MR, "succeeded", started=200, finished=4000)
    b2_seg, b2_sr = result(b2, "SEG"), result(b2, "SR")
    c = series(4500, None)
    d = series(5000, 4999)  # completed "before" the last instance: clock skew
    e = series(6000, 6001.5)
    e1 = job(e, MR, "succeeded", started=6001.9, finished=6032.9)
    e1_seg, e1_sr = result(e1, "SEG"), result(e1, "SR")
    rows = [
        a, b, c, d, e, a1, b1, b2, e1, a1_seg, b2_seg, b2_sr, e1_seg, e1_sr,
        job(d, CT, "queued", priority="stat"),
        job(d, CT, "pending", priority="stat"),
        job(d, CT, "pending"),
        job(d, MR, "queued", queue="cpu"),
        job(d, MR, "superseded", finished=5001),
        job(d, CT, "cancelled", finished=5001),
        job(d, CT, "running", started=5002),
        delivery(a1_seg, "PACS", "committed", sent=58.8, committed=60.3),
        delivery(a1_seg, "ARCHIVE", "sent", sent=757),
        delivery(b2_seg, "PACS", "pending"),
        delivery(b2_seg, "ARCHIVE", "sent", sent=4001.25),
        delivery(b2_sr, "ARCHIVE", "failed"),
        delivery(e1_seg, "PACS", "sent", sent=6034.7),
        delivery(e1_sr, "PACS", "committed", sent=6041.4, committed=6041.6),
    ]
    with factory() as session:
        session.add_all(rows)
        session.commit()


@pytest.fixture
def metrics(settings: Settings, session_factory: sessionmaker[Session]) -> NodeMetrics:
    return NodeMetrics(lambda: settings, session_factory)


@pytest.fixture
def populated(metrics: NodeMetrics, session_factory: sessionmaker[Session]) -> dict[Key, float]:
    populate(session_factory)
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return parse(body)


# -- database collector ----------------------------------------------------------------------
def test_expected_buckets_helper_is_cumulative() -> None:
    # The helper the tests trust, checked by hand once.
    assert expected_buckets([0.3, -1, 9, 4000]) == [2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4]


@pytest.mark.parametrize("hop", HOPS)
def test_hop_histogram_counts_each_duration_once(populated: dict[Key, float], hop: str) -> None:
    buckets, total = histogram(populated, "radnode_hop_seconds", hop=hop)
    durations = HOP_DURATIONS[hop]
    assert buckets == expected_buckets(durations)
    assert total == pytest.approx(sum(max(d, 0) for d in durations), abs=1e-3)


def test_hop_histograms_exact_values(populated: dict[Key, float]) -> None:
    buckets, total = histogram(populated, "radnode_hop_seconds", hop="end_to_end")
    #                  0.5 1  2  5  10 20 30 60 120 300 600 1800 3600 +Inf
    assert buckets == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert total == pytest.approx(798.4, abs=1e-3)
    # The skewed series (completed 1 s "before" its last instance) is in the first bucket.
    buckets, total = histogram(populated, "radnode_hop_seconds", hop="received_to_complete")
    assert buckets == [2, 2, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]
    assert total == pytest.approx(10.8, abs=1e-3)
    buckets, _ = histogram(populated, "radnode_hop_seconds", hop="started_to_encoded")
    assert buckets == [0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 3]


def test_job_duration_by_model(populated: dict[Key, float]) -> None:
    for model, durations in JOB_DURATIONS.items():
        buckets, total = histogram(populated, "radnode_job_duration_seconds", model=model)
        assert buckets == expected_buckets(durations)
        assert total == pytest.approx(sum(durations), abs=1e-3)
    # The running job (started, not finished) is not counted.
    assert value(populated, "radnode_job_duration_seconds_count", model=CT) == 2


def test_jobs_by_state(populated: dict[Key, float]) -> None:
    states = {labels: v for (name, labels), v in populated.items() if name == "radnode_jobs"}
    assert states == {
        frozenset({("state", "pending")}): 2,
        frozenset({("state", "queued")}): 2,
        frozenset({("state", "running")}): 1,
        frozenset({("state", "succeeded")}): 3,
        frozenset({("state", "failed")}): 1,
        frozenset({("state", "superseded")}): 1,
        frozenset({("state", "cancelled")}): 1,
    }


def test_queue_depth_by_queue_and_priority(populated: dict[Key, float]) -> None:
    depth = {tuple(sorted(labels)): v
             for (name, labels), v in populated.items() if name == "radnode_queue_depth"}
    assert depth == {
        (("priority", "stat"), ("queue", "gpu")): 2,  # one pending, one queued
        (("priority", "routine"), ("queue", "gpu")): 1,
        (("priority", "routine"), ("queue", "cpu")): 1,
    }


def test_deliveries_by_destination_and_state(populated: dict[Key, float]) -> None:
    def deliveries(destination: str, state: str) -> float:
        return value(populated, "radnode_deliveries", destination=destination, state=state)

    assert deliveries("PACS", "committed") == 2
    assert deliveries("PACS", "sent") == 1
    assert deliveries("PACS", "pending") == 1
    assert deliveries("PACS", "failed") == 0
    assert deliveries("ARCHIVE", "sent") == 2
    assert deliveries("ARCHIVE", "failed") == 1
    assert deliveries("ARCHIVE", "sending") == 0
    total = sum(v for (name, _), v in populated.items() if name == "radnode_deliveries")
    assert total == 7


def test_empty_database_reports_zeros(metrics: NodeMetrics, settings: Settings) -> None:
    samples = parse(metrics.render()[0])
    assert value(samples, "radnode_jobs", state="cancelled") == 0
    assert value(samples, "radnode_queue_depth", queue="gpu", priority="stat") == 0
    assert value(samples, "radnode_deliveries", destination="ARCHIVE", state="committed") == 0
    for hop in HOPS:
        assert histogram(samples, "radnode_hop_seconds", hop=hop) == ([0.0] * 14, 0.0)
    assert histogram(samples, "radnode_job_duration_seconds", model=MR) == ([0.0] * 14, 0.0)
    assert value(samples, "radnode_scrape_errors_total") == 0


def test_spool_free_and_reserve(metrics: NodeMetrics, settings: Settings, tmp_path: Path) -> None:
    assert not settings.spool_dir.exists()  # measured on its nearest existing parent
    samples = parse(metrics.render()[0])
    assert value(samples, "radnode_spool_reserve_bytes") == 1024 * 1024 * 1024
    free = value(samples, "radnode_spool_free_bytes")
    assert free == pytest.approx(shutil.disk_usage(tmp_path).free, abs=256 * 1024 * 1024)


def test_seconds_between_on_sqlite(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session:
        session.add(Series(series_instance_uid="1.2.3.4", study_instance_uid="1.2.3",
                           first_received_at=at(0), last_received_at=at(0.25),
                           completed_at=at(3600 * 30 + 0.75)))
        session.commit()
        seconds = session.scalar(
            select(seconds_between(Series.completed_at, Series.last_received_at, "sqlite")))
    assert seconds == pytest.approx(3600 * 30 + 0.5, abs=1e-3)


# -- database errors -------------------------------------------------------------------------
def test_broken_table_counts_one_error_and_keeps_the_rest(
        metrics: NodeMetrics, session_factory: sessionmaker[Session],
        caplog: pytest.LogCaptureFixture) -> None:
    populate(session_factory)
    metrics.association("CT_SCANNER", "accepted")
    metrics.stored("CT_SCANNER", 0x0000, 1000)
    with session_factory() as session:
        session.execute(text("DROP TABLE deliveries"))
        session.commit()

    with caplog.at_level(logging.INFO, logger="radnode.metrics"):
        first = parse(metrics.render()[0])
        second = parse(metrics.render()[0])

    assert value(first, "radnode_scrape_errors_total") == 1
    assert value(second, "radnode_scrape_errors_total") == 2
    # Families read before the failing query are reported; the others are left out.
    assert value(first, "radnode_jobs", state="succeeded") == 3
    assert value(first, "radnode_job_duration_seconds_count", model=MR) == 2
    assert "radnode_deliveries" not in names(first)
    assert "radnode_hop_seconds_count" not in names(first)
    # In-process counters and the spool still render.
    assert value(first, "radnode_associations_total",
                 calling_ae="CT_SCANNER", outcome="accepted") == 1
    assert value(first, "radnode_received_bytes_total", calling_ae="CT_SCANNER") == 1000
    assert "radnode_spool_free_bytes" in names(first)
    # Logged once, without the SQL.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "SELECT" not in warnings[0].getMessage()

    with session_factory() as session:
        Base.metadata.tables["deliveries"].create(session.connection())
        session.commit()
    with caplog.at_level(logging.INFO, logger="radnode.metrics"):
        third = parse(metrics.render()[0])
    assert value(third, "radnode_scrape_errors_total") == 2
    assert value(third, "radnode_hop_seconds_count", hop="end_to_end") == 0
    assert caplog.records[-1].getMessage() == "metrics: the database can be read again"


def test_unreachable_database(settings: Settings, tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'missing' / 'radnode.db'}")
    try:
        metrics = NodeMetrics(lambda: settings, make_session_factory(engine))
        metrics.stored("MR_SCANNER", 0xA700, 0)
        samples = parse(metrics.render()[0])
    finally:
        engine.dispose()
    assert value(samples, "radnode_scrape_errors_total") == 1
    assert "radnode_jobs" not in names(samples)
    assert value(samples, "radnode_cstore_responses_total", status="0xA700") == 1
    assert value(samples, "radnode_spool_reserve_bytes") == 1024 * 1024 * 1024


# -- in-process counters ---------------------------------------------------------------------
def test_cstore_statuses_instances_and_bytes(metrics: NodeMetrics) -> None:
    metrics.stored("CT_SCANNER", 0x0000, 500_000)
    metrics.stored("CT_SCANNER", 0x0000, 250_000)
    metrics.stored("CT_SCANNER", 0xA700, 0)
    metrics.stored("CT_SCANNER", 0xC210, 0)
    metrics.stored("MR_SCANNER", 0xB000, 100)
    samples = parse(metrics.render()[0])
    assert value(samples, "radnode_cstore_responses_total", status="0x0000") == 2
    assert value(samples, "radnode_cstore_responses_total", status="0xA700") == 1
    assert value(samples, "radnode_cstore_responses_total", status="0xC210") == 1
    assert value(samples, "radnode_cstore_responses_total", status="0xB000") == 1
    assert value(samples, "radnode_instances_received_total", calling_ae="CT_SCANNER") == 2
    # Only 0x0000 counts as an instance received.
    assert value(samples, "radnode_instances_received_total", calling_ae="MR_SCANNER") == 0
    assert value(samples, "radnode_received_bytes_total", calling_ae="CT_SCANNER") == 750_000
    assert value(samples, "radnode_received_bytes_total", calling_ae="MR_SCANNER") == 100


def test_store_seconds_of_successes_only(metrics: NodeMetrics) -> None:
    metrics.stored("CT_SCANNER", 0x0000, 500_000, 0.0004)  # first bucket (0.5 ms)
    metrics.stored("CT_SCANNER", 0x0000, 500_000, 0.003)  # 5 ms
    metrics.stored("MR_SCANNER", 0x0000, 9_000, 0.35)  # a stalling disk: 0.5 s
    metrics.stored("CT_SCANNER", 0x0000, 9_000)  # no time given: counted, not observed
    metrics.stored("CT_SCANNER", 0xA700, 0, 0.9)  # refused: not a store time
    samples = parse(metrics.render()[0])

    def bucket(bound: float) -> float:
        return value(samples, "radnode_cstore_store_seconds_bucket", le=str(float(bound)))

    assert [bucket(b) for b in STORE_BUCKETS] == [
        1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3]
    assert value(samples, "radnode_cstore_store_seconds_bucket", le="+Inf") == 3
    assert value(samples, "radnode_cstore_store_seconds_count") == 3
    assert value(samples, "radnode_cstore_store_seconds_sum") == pytest.approx(0.3534)
    assert value(samples, "radnode_instances_received_total", calling_ae="CT_SCANNER") == 3


def test_every_metric_the_grafana_dashboard_queries_is_exposed(
        metrics: NodeMetrics, session_factory: sessionmaker[Session]) -> None:
    populate(session_factory)
    metrics.association("CT_SCANNER", "accepted")
    metrics.stored("CT_SCANNER", 0x0000, 1000, 0.001)
    exposed = names(parse(metrics.render()[0]))
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queried = {name for panel in dashboard["panels"] for target in panel.get("targets", [])
               for name in re.findall(r"radnode_[a-z_]+", target["expr"])}
    assert "radnode_cstore_store_seconds_bucket" in queried
    assert queried - exposed == set()


def test_associations_by_outcome(metrics: NodeMetrics) -> None:
    for outcome in ("accepted", "accepted", "released", "aborted", "rejected"):
        metrics.association("CT_SCANNER", outcome)
    samples = parse(metrics.render()[0])

    def count(outcome: str) -> float:
        return value(samples, "radnode_associations_total",
                     calling_ae="CT_SCANNER", outcome=outcome)

    assert (count("accepted"), count("released"), count("aborted"), count("rejected")) == (
        2, 1, 1, 1)
    with pytest.raises(ValueError, match="outcome must be one of"):
        metrics.association("CT_SCANNER", "closed")


def test_ae_label_cap_then_other(settings: Settings,
                                 session_factory: sessionmaker[Session]) -> None:
    metrics = NodeMetrics(lambda: settings, session_factory, max_ae_labels=3)
    for n in range(10):
        metrics.association(f"PEER{n}", "rejected")
    metrics.association("PEER1", "rejected")  # already a label: keeps it
    samples = parse(metrics.render()[0])
    peers = {dict(labels)["calling_ae"]: v for (name, labels), v in samples.items()
             if name == "radnode_associations_total"}
    assert peers == {"PEER0": 1, "PEER1": 2, "PEER2": 1, "_other": 7}


def test_ae_label_is_printable_stripped_and_short(metrics: NodeMetrics) -> None:
    assert metrics.ae_label("  CT_SCANNER  ") == "CT_SCANNER"
    assert metrics.ae_label("A" * 40) == "A" * 16
    assert metrics.ae_label("EVIL\x00\n\x1b[31mAE\u00e9") == "EVIL[31mAE"
    assert metrics.ae_label("\x00\x01  ") == "_empty"
    assert metrics.ae_label('quote"back\\slash') == 'quote"back\\slash'
    # Such values survive the exposition format.
    metrics.stored('quote"back\\slash', 0x0000, 1)
    samples = parse(metrics.render()[0])
    assert value(samples, "radnode_instances_received_total",
                 calling_ae='quote"back\\slash') == 1


def test_concurrent_association_threads(settings: Settings,
                                        session_factory: sessionmaker[Session]) -> None:
    metrics = NodeMetrics(lambda: settings, session_factory, max_ae_labels=10)

    def association_thread(worker: int) -> None:
        for n in range(300):
            metrics.stored(f"AE{(worker * 300 + n) % 25}", 0x0000, 10)

    threads = [threading.Thread(target=association_thread, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    samples = parse(metrics.render()[0])
    received = {dict(labels)["calling_ae"]: v for (name, labels), v in samples.items()
                if name == "radnode_instances_received_total"}
    assert len(received) == 11  # the cap, plus _other
    assert "_other" in received
    assert sum(received.values()) == 8 * 300
    assert value(samples, "radnode_cstore_responses_total", status="0x0000") == 8 * 300


def test_own_registry(settings: Settings, session_factory: sessionmaker[Session]) -> None:
    # Two instances in one process (tests, API and SCP) never collide.
    first = NodeMetrics(lambda: settings, session_factory)
    second = NodeMetrics(lambda: settings, session_factory)
    first.stored("CT_SCANNER", 0x0000, 1)
    assert parse(second.render()[0]).get(
        ("radnode_instances_received_total", frozenset({("calling_ae", "CT_SCANNER")}))) is None
