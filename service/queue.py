"""The Celery application as the node sees it: it publishes tasks by name only.

The node never imports the worker code (or torch); it sends ``"run job N"``
messages by task name after the job row is committed. The workers build the
same application with :func:`make_celery` and register the tasks.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from service.config import Settings

#: Task names: the contract between the node and the workers.
ANALYSE_SERIES = "radnode.analyse_series"


def broker_options(settings: Settings) -> tuple[str, dict[str, Any]]:
    """Return the broker URL and transport options.

    With no broker URL configured, the embedded broker is kombu's file-system
    transport under ``<data_dir>/broker``: no server to run, and the same
    Celery code path as with Redis.
    """
    if not settings.embedded_broker:
        # Redis: redeliver a job only after it could have finished.
        longest = max([settings.worker.time_limit_s,
                       *(m.time_limit_s or 0 for m in settings.models)])
        return settings.broker.url, {"visibility_timeout": longest * 2 + 60}
    root = (settings.data_dir / "broker").resolve()
    messages = root / "messages"
    processed = root / "processed"
    control = root / "control"
    for folder in (messages, processed, control):
        folder.mkdir(parents=True, exist_ok=True)
    return "filesystem://", {
        "data_folder_in": str(messages),
        "data_folder_out": str(messages),
        "processed_folder": str(processed),
        "control_folder": str(control),
        "store_processed": False,
        "polling_interval": 0.2,
    }


def make_celery(settings: Settings) -> Celery:
    """Build the Celery application for ``settings``.

    Settings for long GPU jobs: late acknowledgement, prefetch 1, JSON only,
    no result backend (the database holds every outcome), explicit queues.
    """
    url, options = broker_options(settings)
    app = Celery("radnode", broker=url, set_as_current=False)
    app.conf.update(
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue="gpu",
        task_create_missing_queues=True,
        task_time_limit=settings.worker.time_limit_s,
        task_soft_time_limit=max(int(settings.worker.time_limit_s * 0.9), 5),
        worker_hijack_root_logger=False,
        worker_enable_remote_control=not settings.embedded_broker,
        worker_send_task_events=False,
        timezone="UTC",
    )
    return app


def publish(app: Celery, *, task_name: str, queue: str, job_id: int,
            time_limits: tuple[int, int] | None = None) -> None:
    """Send "run job ``job_id``" to ``queue`` by task name.

    ``time_limits`` (hard, soft) in seconds override the worker's defaults
    for this job (per-model limits); Celery kills the worker process at the
    hard limit and raises ``SoftTimeLimitExceeded`` in the task at the soft one.

    Raises
    ------
    kombu.exceptions.OperationalError
        If the broker cannot be reached; the job stays ``pending`` and is
        published again on the next scheduler tick.
    """
    if time_limits is None:
        app.send_task(task_name, args=[job_id], queue=queue)
    else:
        hard, soft = time_limits
        app.send_task(task_name, args=[job_id], queue=queue, time_limit=hard,
                      soft_time_limit=soft)
