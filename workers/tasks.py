"""Celery tasks run by workers: analyse a series and encode SEG + TID 1500 SR."""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service import audit
from service.config import Settings
from service.db import repository
from service.db.models import Job, Result, WorkerStatus
from service.db.session import make_engine, make_session_factory, utcnow
from service.dicom.spool import write_durably
from workers.inference.base import ClassificationModel, SegmentationModel, Volume
from workers.inference.volume import load_volumes
from workers.models.registry import Model, get_model, warm_models
from workers.results.classification_sr import build_classification_sr
from workers.results.measure import measure_segments
from workers.results.overlay_sc import build_overlay_sc
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


#: Index of this Celery pool process (set after fork by the worker), used to
#: give each process its own GPU when a machine has several.
PROCESS_INDEX = 0


def resolve_device(requested: str) -> str:
    """The torch device a job runs on.

    ``"auto"`` is CUDA when a GPU is visible, else ``"cpu"``; ``"auto"`` and
    ``"cuda"`` on a machine with N GPUs give pool process i the GPU
    ``cuda:(i mod N)``, so that ``worker.concurrency`` = N runs one worker
    process per GPU. ``"cpu"`` and ``"cuda:K"`` are kept as they are.
    """
    if requested not in ("auto", "cuda"):
        return requested
    import torch

    if not torch.cuda.is_available():
        if requested == "cuda":
            raise RuntimeError("device cuda was asked for but no CUDA device is visible")
        return "cpu"
    return f"cuda:{PROCESS_INDEX % torch.cuda.device_count()}"


@dataclass
class _Output:
    """One encoded result object and the destinations it goes to."""

    kind: str
    dataset: Dataset
    path: Path
    summary: dict[str, Any]
    destinations: list[str]


def _uid(series_uid: str, model: Model, kind: str, part: str, key: str) -> str:
    # a whole-series volume keeps the UIDs of earlier releases ("series"),
    # a part of a split series gets its own ("series:echo2-phase").
    return result_uid(series_uid, model.name, model.version, kind,
                      f"{part}:{key}" if key else part)


def _add(timings: dict[str, Any], key: str, since: float) -> float:
    now = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + now - since
    return now


def _segmentation_outputs(model: SegmentationModel, volume: Volume, device: str,
                          out_dir: Path, destinations: list[str],
                          sc_destinations: list[str], timings: dict[str, Any]) -> list[_Output]:
    series_uid = str(volume.datasets[0].SeriesInstanceUID)
    t0 = time.perf_counter()
    masks = model.predict(volume, device=device)
    t0 = _add(timings, "inference_s", t0)
    measurements = measure_segments(volume, masks, model.segments)
    key = volume.key
    seg = build_seg(
        volume, masks, model.segments, algorithm_name=model.name,
        algorithm_version=model.version,
        series_instance_uid=_uid(series_uid, model, "SEG", "series", key),
        sop_instance_uid=_uid(series_uid, model, "SEG", "instance", key),
    )
    sr = build_sr(
        seg, volume, measurements, model.segments, algorithm_name=model.name,
        algorithm_version=model.version,
        series_instance_uid=_uid(series_uid, model, "SR", "series", key),
        sop_instance_uid=_uid(series_uid, model, "SR", "instance", key),
    )
    summary: dict[str, Any] = {
        "model": model.name, "version": model.version, "volume": key,
        "segments": [
            {"number": m.segment_number, "label": m.label, "voxels": m.voxel_count,
             "volume_ml": round(m.volume_ml, 3),
             "mean": None if m.mean != m.mean else round(m.mean, 2)}
            for m in measurements
        ],
    }
    outputs = [
        _Output("SEG", seg, out_dir / f"SEG-{seg.SOPInstanceUID}.dcm", summary, destinations),
        _Output("SR", sr, out_dir / f"SR-{sr.SOPInstanceUID}.dcm", summary, destinations),
    ]
    if sc_destinations:
        slices = volume.array.shape[0]
        images = build_overlay_sc(
            volume, masks, model.segments,
            series_instance_uid=_uid(series_uid, model, "SC", "series", key),
            sop_instance_uids=[_uid(series_uid, model, "SC", f"instance{i}", key)
                               for i in range(slices)],
            algorithm_name=model.name, algorithm_version=model.version,
        )
        outputs.extend(_Output("SC", image, out_dir / f"SC-{image.SOPInstanceUID}.dcm",
                               summary, sc_destinations) for image in images)
    _add(timings, "encode_s", t0)
    return outputs


def _classification_outputs(model: ClassificationModel, volume: Volume, device: str,
                            out_dir: Path, destinations: list[str],
                            timings: dict[str, Any]) -> list[_Output]:
    series_uid = str(volume.datasets[0].SeriesInstanceUID)
    t0 = time.perf_counter()
    probabilities = model.classify(volume, device=device)
    t0 = _add(timings, "inference_s", t0)
    sr = build_classification_sr(
        volume, probabilities, model.classes, concept=model.concept,
        algorithm_name=model.name, algorithm_version=model.version,
        series_instance_uid=_uid(series_uid, model, "SR", "series", volume.key),
        sop_instance_uid=_uid(series_uid, model, "SR", "instance", volume.key),
    )
    best = int(np.argmax(probabilities))
    summary: dict[str, Any] = {
        "model": model.name, "version": model.version, "volume": volume.key,
        "finding": model.classes[best].label,
        "probabilities": {c.label: round(float(p), 4)
                          for c, p in zip(model.classes, probabilities, strict=True)},
    }
    _add(timings, "encode_s", t0)
    return [_Output("SR", sr, out_dir / f"SR-{sr.SOPInstanceUID}.dcm", summary, destinations)]


def _encode(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def _store_result(
    session: Session, job: Job, *, kind: str, dataset: Dataset, path: Path,
    summary: dict[str, Any] | None, destinations: list[str],
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
    for destination in destinations:  # a re-run sends the new result afresh
        repository.schedule_delivery(result, destination, session=session, now=now)
    return result


def _file_error(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was caused by, an OS error (a file missing or unreadable)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return True
        seen = seen.__cause__
    return False


def run_analysis(job_id: int, *, settings: Settings, session_factory: sessionmaker[Session],
                 hostname: str = "") -> str:
    """Run job ``job_id``: load the series, run its model, write the results.

    A segmentation model gives, per volume of the series (a series that mixes
    echoes or magnitude/phase is split into several volumes), a SEG and a TID
    1500 SR with segment volumes, plus a burned-in Secondary Capture series
    for destinations that ask for one; a classification model gives a TID
    1500 SR with the coded finding and each class's probability.

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
        destinations = list(job.destinations)
        session.commit()
    log.info("job %d: %s on series %s (%d instances)", job_id, model_name, series_uid, len(paths))

    timings: dict[str, Any] = {}
    lease = _Lease(job_id, session_factory, settings.worker.heartbeat_interval_s)
    try:
        spec = settings.model(model_name)
        t0 = time.perf_counter()
        device = resolve_device(spec.device or settings.worker.device)
        model = get_model(spec, device, max_models=settings.worker.max_warm_models,
                          min_free_gpu_mb=settings.worker.min_free_gpu_mb)
        t1 = time.perf_counter()
        volumes = load_volumes(paths)
        t2 = time.perf_counter()
        wants_sc = {d.name for d in settings.destinations if d.secondary_capture}
        sc_destinations = [d for d in destinations if d in wants_sc]
        out_dir = settings.results_dir / series_uid
        outputs: list[_Output] = []
        for volume in volumes:
            if spec.kind == "classification":
                outputs += _classification_outputs(
                    cast(ClassificationModel, model), volume, device, out_dir, destinations,
                    timings)
            else:
                outputs += _segmentation_outputs(
                    cast(SegmentationModel, model), volume, device, out_dir, destinations,
                    sc_destinations, timings)
        t3 = time.perf_counter()
        for output in outputs:
            write_durably(output.path, _encode(output.dataset))
        timings.update({"model_load_s": t1 - t0, "load_s": t2 - t1,
                        "write_s": time.perf_counter() - t3, "device": device,
                        "volumes": len(volumes)})
    except Exception as exc:
        lease.stop()
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, SoftTimeLimitExceeded):
            reason = f"time limit exceeded (soft limit of model {model_name}); not retried"
        elif isinstance(exc, KeyError) and "is declared" in str(exc):
            reason = f"model {model_name!r} is not declared in this worker's config"
        with session_factory() as session:
            failed = session.get(Job, job_id)
            assert failed is not None
            if failed.state == "cancelled":
                session.rollback()
                log.info("job %d was cancelled while it ran (then failed: %s)", job_id,
                         type(exc).__name__)
                return "cancelled"
            if _file_error(exc) and failed.attempts < settings.worker.max_attempts:
                # The shared data directory (NFS) is unreachable from this worker, or a
                # file went missing: queue the job again, for this or another worker.
                failed.state = "pending"
                failed.error = (f"{reason[:1800]} (queued again: attempt {failed.attempts} "
                                f"of {settings.worker.max_attempts})")
                audit.record(session, actor=f"worker:{failed.worker}", action="job.requeued",
                             target_type="job", target_id=job_id,
                             detail={"model": model_name, "series_instance_uid": series_uid,
                                     "attempt": failed.attempts, "error": reason[:500]})
                session.commit()
                log.warning("job %d on series %s: file error on attempt %d of %d (%s); "
                            "queued again", job_id, series_uid, failed.attempts,
                            settings.worker.max_attempts, type(exc).__name__)
                return "pending"
            failed.state = "failed"
            failed.error = reason[:2000]
            failed.finished_at = utcnow()
            audit.record(session, actor=f"worker:{failed.worker}", action="job.failed",
                         target_type="job", target_id=job_id,
                         detail={"model": model_name, "series_instance_uid": series_uid,
                                 "attempt": failed.attempts, "error": reason[:500]})
            session.commit()
        log.exception("job %d on series %s failed", job_id, series_uid)
        return "failed"

    lease.stop()
    with session_factory() as session:
        done = session.get(Job, job_id)
        assert done is not None
        if done.state == "cancelled":  # by an operator while it ran: deliver nothing
            # The files stay: their deterministic paths may be an earlier job's results.
            session.rollback()
            log.info("job %d was cancelled while it ran: %d result object(s) neither recorded "
                     "nor delivered", job_id, len(outputs))
            return "cancelled"
        for output in outputs:
            _store_result(session, done, kind=output.kind, dataset=output.dataset,
                          path=output.path, summary=output.summary,
                          destinations=output.destinations)
        done.state = "succeeded"
        done.model_version = model.version
        done.timings = timings
        done.finished_at = utcnow()
        audit.record(session, actor=f"worker:{done.worker}", action="job.succeeded",
                     target_type="job", target_id=job_id,
                     detail={"model": model_name, "model_version": model.version,
                             "series_instance_uid": series_uid, "results": len(outputs),
                             "destinations": destinations})
        session.commit()
    log.info("job %d succeeded: %d volume(s), %d result object(s); load %.2f s, inference "
             "%.2f s on %s, encode %.2f s", job_id, len(volumes), len(outputs),
             timings["load_s"], timings.get("inference_s", 0.0), device,
             timings.get("encode_s", 0.0))
    return "succeeded"


def _gpu_memory_mb(devices: list[str]) -> tuple[float | None, float | None]:
    """(allocated, total) MiB on the first CUDA device among ``devices``; Nones without one."""
    cuda = next((d for d in devices if d.startswith("cuda")), None)
    if cuda is None:
        return None, None
    import torch

    index = torch.device(cuda).index or 0
    allocated = torch.cuda.memory_allocated(index) / 2**20
    total = torch.cuda.get_device_properties(index).total_memory / 2**20
    return float(allocated), float(total)


def report_status(settings: Settings, session_factory: sessionmaker[Session], *,
                  name: str | None = None) -> None:
    """Write what this worker process holds to the ``workers`` table (the models page).

    One row per process, ``name`` ``host:pid``: queues, device, warm models
    (name, version, device) and, on a CUDA device, allocated and total GPU
    memory in MiB. Database errors are logged, never raised: status is
    informative, jobs must not fail for it.
    """
    name = name or f"{socket.gethostname()}:{os.getpid()}"
    warm = warm_models()
    devices = [device for _, _, device in warm]
    try:
        allocated, total = _gpu_memory_mb(devices)
    except Exception:  # a broken CUDA context must not stop the report
        allocated = total = None
    now = utcnow()
    try:
        with session_factory() as session:
            row = session.scalars(select(WorkerStatus).where(WorkerStatus.name == name)).first()
            if row is None:
                row = WorkerStatus(name=name, started_at=now)
                session.add(row)
            row.queues = sorted(settings.worker.queues)
            row.device = devices[0] if devices else resolve_device(settings.worker.device)
            row.models = [{"name": n, "version": v, "device": d} for n, v, d in warm]
            row.gpu_memory_allocated_mb = allocated
            row.gpu_memory_total_mb = total
            row.heartbeat_at = now
            session.commit()
    except Exception:
        log.exception("cannot report the status of worker %s", name)


def start_status_reports(settings: Settings, session_factory: sessionmaker[Session],
                         interval_s: float = 30.0) -> threading.Thread:
    """Report this process's status now and every ``interval_s`` seconds (daemon thread)."""
    def loop() -> None:
        while True:
            report_status(settings, session_factory)
            time.sleep(interval_s)

    thread = threading.Thread(target=loop, name="worker-status", daemon=True)
    thread.start()
    return thread
