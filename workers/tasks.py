"""Celery tasks run by workers: analyse a series and encode SEG + TID 1500 SR."""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydicom import dcmwrite
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db import repository
from service.db.models import Delivery, Job, Result
from service.db.session import make_engine, make_session_factory, utcnow
from service.dicom.spool import write_durably
from workers.inference.volume import load_series
from workers.models.registry import get_model
from workers.results.measure import measure_segments
from workers.results.seg import build_seg
from workers.results.sr import build_sr
from workers.results.uids import result_uid

log = logging.getLogger("radnode.worker")

_factories: dict[tuple[int, str], sessionmaker[Session]] = {}


def session_factory_for(settings: Settings) -> sessionmaker[Session]:
    """Session factory of this process (engines are never shared across fork)."""
    key = (os.getpid(), settings.database_url)
    if key not in _factories:
        _factories[key] = make_session_factory(make_engine(settings.database_url))
    return _factories[key]


class _Lease:
    """Renew a running job's heartbeat from a background thread until stopped."""

    def __init__(self, job_id: int, session_factory: sessionmaker[Session],
                 interval_s: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(job_id, session_factory, interval_s),
            name=f"lease-{job_id}", daemon=True)
        self._thread.start()

    def _run(self, job_id: int, session_factory: sessionmaker[Session],
             interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                with session_factory() as session:
                    repository.renew_lease(job_id, session=session, now=utcnow())
                    session.commit()
            except Exception:  # the next renewal may succeed; the sweeper decides
                log.exception("cannot renew the lease of job %d", job_id)

    def stop(self) -> None:
        """Stop renewing (the job is about to be recorded as finished)."""
        self._stop.set()
        self._thread.join(timeout=10)


def resolve_device(requested: str) -> str:
    """Map ``"auto"`` to ``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _encode(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def _store_result(
    session: Session, job: Job, *, kind: str, dataset: Dataset, path: Path,
    summary: dict[str, Any] | None,
) -> Result:
    """Insert or update the result row (same UID on a re-run) and reset its deliveries."""
    now = utcnow()
    result = session.scalars(
        select(Result).where(Result.sop_instance_uid == str(dataset.SOPInstanceUID))
    ).first()
    if result is None:
        result = Result(sop_instance_uid=str(dataset.SOPInstanceUID), created_at=now)
        session.add(result)
    result.job_id = job.id
    result.kind = kind
    result.sop_class_uid = str(dataset.SOPClassUID)
    result.series_instance_uid = str(dataset.SeriesInstanceUID)
    result.path = str(path)
    result.summary = summary
    session.flush()
    for destination in job.destinations:
        delivery = session.scalars(
            select(Delivery).where(Delivery.result_id == result.id,
                                   Delivery.destination == destination)
        ).first()
        if delivery is None:
            delivery = Delivery(result_id=result.id, destination=destination, created_at=now)
            session.add(delivery)
        delivery.state = "pending"
        delivery.attempts = 0
        delivery.error = None
        delivery.next_attempt_at = now
    return result


def run_analysis(job_id: int, *, settings: Settings, session_factory: sessionmaker[Session],
                 hostname: str = "") -> str:
    """Run job ``job_id``: load the series, run its model, write SEG and SR.

    The job runs only if this worker can claim it (``pending``/``queued``, or
    ``running`` with a stale lease: its worker was lost), so a duplicate or
    redelivered message is dropped. While it runs, a thread renews its lease.
    The outcome is recorded on the job row: ``succeeded`` with result and
    delivery rows, or ``failed`` with the reason.

    Returns
    -------
    str
        The job's final state.
    """
    now = utcnow()
    stale = now - timedelta(seconds=settings.worker.heartbeat_timeout_s)
    with session_factory() as session:
        if not repository.claim_job(job_id, session=session, now=now, stale_before=stale):
            session.rollback()
            found = session.get(Job, job_id)
            state = found.state if found is not None else "missing"
            log.info("job %d is %s: not running it (duplicate or stale message)", job_id, state)
            return state
        job = session.get(Job, job_id)
        assert job is not None
        job.worker = hostname or socket.gethostname()
        series_uid = job.series.series_instance_uid
        paths = [settings.spool_dir / p
                 for p in repository.instance_paths(job.series_id, session=session)]
        model_name = job.model_name
        session.commit()
    log.info("job %d: %s on series %s (%d instances)", job_id, model_name, series_uid, len(paths))

    timings: dict[str, float] = {}
    lease = _Lease(job_id, session_factory, settings.worker.heartbeat_interval_s)
    try:
        t0 = time.perf_counter()
        model = get_model(model_name)
        volume = load_series(paths)
        t1 = time.perf_counter()
        device = resolve_device(settings.worker.device)
        masks = model.predict(volume, device=device)
        t2 = time.perf_counter()
        measurements = measure_segments(volume, masks, model.segments)
        uid = {
            (kind, part): result_uid(series_uid, model.name, model.version, kind, part)
            for kind in ("SEG", "SR") for part in ("series", "instance")
        }
        seg = build_seg(
            volume, masks, model.segments, algorithm_name=model.name,
            algorithm_version=model.version, series_instance_uid=uid["SEG", "series"],
            sop_instance_uid=uid["SEG", "instance"],
        )
        sr = build_sr(
            seg, volume, measurements, model.segments, algorithm_name=model.name,
            algorithm_version=model.version, series_instance_uid=uid["SR", "series"],
            sop_instance_uid=uid["SR", "instance"],
        )
        t3 = time.perf_counter()
        out_dir = settings.results_dir / series_uid
        seg_path = out_dir / f"SEG-{seg.SOPInstanceUID}.dcm"
        sr_path = out_dir / f"SR-{sr.SOPInstanceUID}.dcm"
        write_durably(seg_path, _encode(seg))
        write_durably(sr_path, _encode(sr))
        t4 = time.perf_counter()
        timings = {"load_s": t1 - t0, "inference_s": t2 - t1, "encode_s": t3 - t2,
                   "write_s": t4 - t3, "device": device}  # type: ignore[dict-item]
    except Exception as exc:
        lease.stop()
        with session_factory() as session:
            failed = session.get(Job, job_id)
            assert failed is not None
            failed.state = "failed"
            failed.error = f"{type(exc).__name__}: {exc}"[:2000]
            failed.finished_at = utcnow()
            session.commit()
        log.exception("job %d on series %s failed", job_id, series_uid)
        return "failed"

    lease.stop()
    summary = {
        "model": model.name,
        "version": model.version,
        "segments": [
            {"number": m.segment_number, "label": m.label, "voxels": m.voxel_count,
             "volume_ml": round(m.volume_ml, 3),
             "mean": None if m.mean != m.mean else round(m.mean, 2)}
            for m in measurements
        ],
    }
    with session_factory() as session:
        done = session.get(Job, job_id)
        assert done is not None
        _store_result(session, done, kind="SEG", dataset=seg, path=seg_path, summary=summary)
        _store_result(session, done, kind="SR", dataset=sr, path=sr_path, summary=summary)
        done.state = "succeeded"
        done.model_version = model.version
        done.timings = timings
        done.finished_at = utcnow()
        session.commit()
    log.info("job %d succeeded: load %.2f s, inference %.2f s on %s, encode %.2f s",
             job_id, timings["load_s"], timings["inference_s"], device, timings["encode_s"])
    return "succeeded"
