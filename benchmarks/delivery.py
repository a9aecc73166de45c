"""Routing and delivery: rule evaluation per series, and delivery throughput per destination kind.

1. **Rules.** The headers of the first instance of every series in
   ``../shared/data`` (read once, without Pixel Data) are routed through a
   realistic rule set of eight rules (attribute and association conditions,
   regex, range, a final exclusion); prints the microseconds per routed series.
2. **Delivery.** ``--count`` result files (copies of a real SEG from the shared
   data, each with its own SOP Instance UID) get delivery rows in a fresh
   SQLite database and are sent by the dispatcher (:func:`deliver_due`) to

   * dcmtk ``storescp`` on loopback (C-STORE, one association), started with
     ``TCP_NODELAY=1`` unless the environment says otherwise: Debian's dcmtk
     (and Orthanc, built on it) leave Nagle's algorithm on, and then each
     C-STORE response waits for radnode's delayed ACK (~40 ms on Linux);
     run with ``TCP_NODELAY=0`` to see that,
   * the same with Storage Commitment against Orthanc (when installed): the
     time until every delivery is ``committed`` (N-EVENT-REPORT recorded),
   * Orthanc's DICOMweb STOW-RS,
   * a folder (temporary file, fsync, rename);

   and prints instances/s, the median over ``--repeats`` runs.

    .venv/bin/python benchmarks/delivery.py [--count 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.config import DicomSettings, Settings, load_settings  # noqa: E402
from service.db import migrate  # noqa: E402
from service.db.models import Delivery, Job, Result, Series  # noqa: E402
from service.db.session import make_engine, make_session_factory, utcnow  # noqa: E402
from service.delivery.dispatch import deliver_due  # noqa: E402
from service.dicom.scu import find_dicom_files  # noqa: E402
from service.routing import Rule, SeriesFacts, route  # noqa: E402
from service.scp.handlers import StoreContext  # noqa: E402
from service.scp.server import start_scp  # noqa: E402

DATA = Path(os.environ.get("RADNODE_TEST_DATA",
                           Path(__file__).resolve().parents[2] / "shared" / "data"))
SEG = DATA / "seg_sr" / "dcmqi_ct_liver_seg" / "liver.dcm"

RULES: list[dict[str, Any]] = [
    {"name": "exclude-derived", "final": True, "models": [],
     "when": {"any": [{"attribute": "Modality", "in": ["SEG", "SR", "RWV", "PR", "KO"]},
                      {"attribute": "ImageType", "equals": "LOCALIZER"}]}},
    {"name": "er-ct", "priority": "stat", "models": ["radnode-builtin-ct"],
     "when": {"all": [{"attribute": "Modality", "equals": "CT"},
                      {"association": "calling_ae", "in": ["ER_CT", "TRAUMA_CT"]}]}},
    {"name": "chest-ct", "models": ["radnode-builtin-ct"],
     "when": {"all": [{"attribute": "Modality", "equals": "CT"},
                      {"attribute": "BodyPartExamined", "in": ["CHEST", "THORAX"]},
                      {"attribute": "SliceThickness", "range": {"min": 0.5, "max": 5}}]}},
    {"name": "abdomen-ct", "models": ["radnode-builtin-ct"],
     "when": {"all": [{"attribute": "Modality", "equals": "CT"},
                      {"not": {"attribute": "SeriesDescription",
                               "regex": "scout|topogram|dose"}}]}},
    {"name": "mr-brain", "models": ["radnode-builtin-mr"],
     "when": {"all": [{"attribute": "Modality", "equals": "MR"},
                      {"attribute": "SeriesDescription", "regex": "t1|mprage|flair"}]}},
    {"name": "mr-any", "models": ["radnode-builtin-mr"],
     "when": {"attribute": "Modality", "equals": "MR"}},
    {"name": "research", "models": [], "destinations": [],
     "when": {"association": "peer_address", "in": ["10.99.0.0/16"]}},
    {"name": "contrast", "models": [], "when": {"attribute": "ContrastBolusAgent",
                                                "present": True}},
]


def bench_rules(iterations: int) -> None:
    rules = [Rule.model_validate(r) for r in RULES]
    from service.routing import Fallback, header_keywords

    fallback = Fallback()
    keywords = sorted(header_keywords(rules, fallback))
    first: dict[str, Path] = {}
    for path in find_dicom_files([DATA]):
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        first.setdefault(str(ds.get("SeriesInstanceUID", path)), path)
    facts = [SeriesFacts(header=pydicom.dcmread(p, stop_before_pixels=True,
                                                specific_tags=keywords),
                         calling_ae="CT_SCANNER_1", called_ae="RADNODE",
                         peer_address="10.1.2.3") for p in first.values()]
    start = time.perf_counter()
    matched = 0
    for _ in range(iterations):
        for fact in facts:
            matched += bool(route(rules, fallback, fact).targets)
    elapsed = time.perf_counter() - start
    per = elapsed / (iterations * len(facts)) * 1e6
    print(f"rules: {len(rules)} rules, {len(facts)} real series headers, "
          f"{iterations * len(facts)} routings: {per:.0f} µs per series "
          f"({matched // iterations} of {len(facts)} series get a model)")


def make_results(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True)
    template = pydicom.dcmread(SEG)
    paths = []
    for i in range(count):
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"{i:05d}.dcm"
        template.save_as(path)
        paths.append(path)
    return paths


def fresh_db(folder: Path, paths: list[Path], destination: str) -> sessionmaker[Session]:
    url = f"sqlite:///{folder / 'radnode.db'}"
    migrate.upgrade(url)
    factory = make_session_factory(make_engine(url))
    now = utcnow()
    with factory() as session:
        series = Series(series_instance_uid=generate_uid(), study_instance_uid="1.2.3",
                        modality="CT", state="complete", instance_count=1,
                        first_received_at=now, last_received_at=now, routed_at=now)
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, task_name="radnode.analyse_series", queue="gpu",
                  model_name="bench", state="succeeded", destinations=[destination],
                  created_at=now)
        session.add(job)
        session.flush()
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            result = Result(job_id=job.id, kind="SEG", path=str(path),
                            sop_class_uid=str(ds.SOPClassUID),
                            sop_instance_uid=str(ds.SOPInstanceUID),
                            series_instance_uid=str(ds.SeriesInstanceUID), created_at=now)
            session.add(result)
            session.flush()
            session.add(Delivery(result_id=result.id, destination=destination, created_at=now,
                                 next_attempt_at=now, state="pending", attempts=0))
        session.commit()
    return factory


def count_state(factory: sessionmaker[Session], state: str) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(Delivery)
                                  .where(Delivery.state == state)) or 0)


def run_once(work: Path, paths: list[Path], settings_for: Callable[[Path], Settings],
             name: str, final_state: str) -> float:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    factory = fresh_db(work, paths, name)
    settings = settings_for(work)
    start = time.perf_counter()
    deliver_due(settings, factory)
    deadline = time.monotonic() + 120
    while count_state(factory, final_state) < len(paths):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: only {count_state(factory, final_state)} of "
                               f"{len(paths)} reached {final_state}")
        time.sleep(0.01)
    return time.perf_counter() - start


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rule-iterations", type=int, default=2000)
    args = parser.parse_args()
    os.environ.setdefault("TCP_NODELAY", "1")  # for storescp and Orthanc (dcmtk reads it)

    bench_rules(args.rule_iterations)

    tmp = Path(tempfile.mkdtemp(prefix="radnode-bench-delivery-"))
    try:
        paths = make_results(tmp / "results", args.count)
        size_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"delivery: {args.count} SEG instances ({size_mb:.1f} MB), "
              f"median of {args.repeats} runs")
        base: dict[str, Any] = {"rules": [], "delivery": {"retry_backoff_s": 0.2}}
        timings: dict[str, list[float]] = {}

        port = free_port()
        scp_dir = tmp / "storescp"
        scp_dir.mkdir()
        storescp = subprocess.Popen(
            ["/usr/bin/storescp", "-aet", "PACS", "-od", str(scp_dir), "+xa", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": os.environ.get("TCP_NODELAY", "1")})
        time.sleep(0.5)
        try:
            def dicom(work: Path) -> Settings:
                return load_settings(data_dir=work, destinations=[{
                    "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
                    **base)
            timings["C-STORE to dcmtk storescp"] = [
                run_once(tmp / "work", paths, dicom, "pacs", "sent")
                for _ in range(args.repeats)]
        finally:
            storescp.terminate()
            storescp.wait()

        folder = tmp / "folder"
        folder.mkdir()

        def to_folder(work: Path) -> Settings:
            return load_settings(data_dir=work, destinations=[
                {"kind": "folder", "name": "scripts", "path": str(folder)}], **base)
        timings["folder (fsync + rename)"] = [
            run_once(tmp / "work", paths, to_folder, "scripts", "sent")
            for _ in range(args.repeats)]

        if shutil.which("Orthanc"):
            from tests.peers import orthanc

            node_port = free_port()
            for repeat in range(args.repeats):
                with orthanc(tmp / f"orthanc-{repeat}",
                             modalities={"radnode": ("RADNODE", "127.0.0.1", node_port)}) as pacs:
                    work = tmp / "work"

                    def commit(work: Path) -> Settings:
                        return load_settings(data_dir=work, destinations=[{
                            "name": "orthanc", "ae_title": pacs.aet, "host": "127.0.0.1",
                            "port": pacs.dicom_port, "storage_commitment": True}], **base)

                    if work.exists():
                        shutil.rmtree(work)
                    work.mkdir(parents=True)
                    factory = fresh_db(work, paths, "orthanc")
                    (work / "spool").mkdir()
                    server = start_scp(DicomSettings(ae_title="RADNODE", host="127.0.0.1",
                                                     port=node_port),
                                       StoreContext(work / "spool", factory))
                    try:
                        start = time.perf_counter()
                        deliver_due(commit(work), factory)
                        sent = time.perf_counter() - start
                        while count_state(factory, "committed") < len(paths):
                            time.sleep(0.01)
                        timings.setdefault("C-STORE to Orthanc", []).append(sent)
                        timings.setdefault("C-STORE to Orthanc + Storage Commitment", []).append(
                            time.perf_counter() - start)
                    finally:
                        server.shutdown()

                    def stow(work: Path) -> Settings:
                        return load_settings(data_dir=work, destinations=[{
                            "kind": "stow", "name": "web", "url": pacs.dicomweb_url}], **base)
                    pacs.clear()
                    timings.setdefault("STOW-RS to Orthanc", []).append(
                        run_once(tmp / "work", paths, stow, "web", "sent"))
        else:
            print("(Orthanc not installed: commitment and STOW-RS rows left out)")

        print("| destination | seconds | instances/s | MB/s |\n|---|---|---|---|")
        for name, values in timings.items():
            median = statistics.median(values)
            print(f"| {name} | {median:.2f} | {args.count / median:.0f} | "
                  f"{size_mb / median:.1f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
