"""The worker side of the Celery application: registers radnode's tasks."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from service.config import Settings
from service.queue import ANALYSE_SERIES, make_celery

log = logging.getLogger("radnode.worker")


def create_worker_app(settings: Settings) -> Celery:
    """Return the Celery app with the analysis task registered.

    Models are loaded lazily inside the worker process that runs the task
    (never in the parent before fork) and stay warm for the next job.
    """
    app = make_celery(settings)

    @worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def _warm_up(**_kwargs: Any) -> None:
        # In the pool's child process, after fork (the parent never touches
        # torch or CUDA): import the analysis code and load the configured
        # models now, so that the first series does not wait for them.
        from billiard.process import current_process

        from workers import tasks
        from workers.models.registry import get_model, warm_models

        tasks.PROCESS_INDEX = int(getattr(current_process(), "index", 0) or 0)
        factory = tasks.session_factory_for(settings)
        if not settings.worker.warm_up:
            tasks.start_status_reports(settings, factory)
            return
        names = [name for name in settings.routed_models()
                 if settings.model(name).queue in settings.worker.queues]
        for name in names[: settings.worker.max_warm_models]:
            spec = settings.model(name)
            try:
                device = tasks.resolve_device(spec.device or settings.worker.device)
                get_model(spec, device, max_models=settings.worker.max_warm_models,
                          min_free_gpu_mb=settings.worker.min_free_gpu_mb)
            except Exception:  # the job of this model will fail with the reason
                log.exception("cannot load model %s %s at start-up", spec.name, spec.version)
        log.info("worker process %d ready; models warm: %s", tasks.PROCESS_INDEX,
                 ", ".join(f"{n} {v} on {d}" for n, v, d in warm_models()) or "none")
        tasks.start_status_reports(settings, factory)

    @app.task(name=ANALYSE_SERIES, acks_late=True, ignore_result=True)  # type: ignore[untyped-decorator]
    def analyse_series(job_id: int) -> str:
        from workers.tasks import report_status, run_analysis, session_factory_for

        factory = session_factory_for(settings)
        try:
            # host:pid, as the workers table names this process
            return run_analysis(job_id, settings=settings, session_factory=factory,
                                hostname=f"{socket.gethostname()}:{os.getpid()}")
        finally:
            report_status(settings, factory)  # the models it loaded, its GPU memory now

    return app


def run_worker(settings: Settings, *, queues: list[str], concurrency: int,
               loglevel: str = "INFO", name: str = "radnode-worker") -> None:
    """Run a Celery worker in this process until it is stopped (SIGTERM: warm shutdown).

    Parameters
    ----------
    settings : Settings
        ``worker.queues`` is replaced by ``queues`` (what the worker reports).
    queues : list of str
        Celery queues to consume.
    concurrency : int
        Pool processes (one job each at a time).
    loglevel : str
        Celery's log level.
    name : str
        Celery node name, before ``@host``; the process ID is appended so
        that several workers on one machine have names of their own.
    """
    settings = settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"queues": list(queues)})})
    app = create_worker_app(settings)
    argv = [
        "worker",
        f"--loglevel={loglevel}",
        f"--queues={','.join(queues)}",
        f"--concurrency={concurrency}",
        f"--hostname={name}-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    log.info("worker consuming %s with concurrency %d", ",".join(queues), concurrency)
    app.worker_main(argv=argv)
