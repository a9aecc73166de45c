"""The Celery application as the node sees it: it publishes tasks by name only.

The node never imports the worker code (or torch); it sends ``"run job N"``
messages by task name after the job row is committed. The workers build the
same application with :func:`make_celery` and register the tasks.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from queue import Empty
from time import monotonic_ns
from typing import Any

from celery import Celery
from kombu.entity import Queue
from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.json import dumps, loads

from service.config import Settings

log = logging.getLogger("radnode.queue")

#: Task names: the contract between the node and the workers.
ANALYSE_SERIES = "radnode.analyse_series"

#: The embedded broker's URL scheme (:class:`SpoolTransport`).
EMBEDDED_SCHEME = "radnode-spool"

#: Redis message priorities (lower is served first in kombu's Redis transport).
PRIORITY_STAT = 0
PRIORITY_ROUTINE = 5


class SpoolChannel(filesystem.Channel):  # type: ignore[misc]
    """kombu's file-system channel, made safe against torn and corrupt messages.

    kombu's own channel writes a message file in place and a consumer may
    claim it before the writer has finished (or after the writer was killed),
    read an empty or partial file and crash the worker on the JSON error; the
    message is then lost until the sweeper publishes the job again. Here:

    * messages are named by the publish time in nanoseconds, so consumers take
      them in publish order (the scheduler publishes STAT jobs first);
    * a message is written under a temporary name (which no queue matches),
      flushed to disk with ``fsync``, and renamed into place, so a consumer
      only ever sees whole messages;
    * a consumer claims a message by renaming it into the ``processed`` folder
      of the same file system (atomic: one consumer wins) and reads it there;
    * a message that still cannot be decoded (damaged disk, a foreign file) is
      moved to ``corrupt/`` with a log line, and the next message is taken.
      Nothing is lost by that: the database is the source of truth and the
      sweeper publishes any job whose message disappeared.
    """

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:  # type: ignore[override]
        # Consumers take messages in name order: nanoseconds, zero-padded, keep
        # publish order (kombu's milliseconds tie, and the UUID then decides).
        name = f"{monotonic_ns():020d}_{uuid.uuid4()}.{queue}.msg"
        folder = self.data_folder_out
        temporary = os.path.join(folder, f".writing-{uuid.uuid4()}")
        try:
            with open(temporary, "wb") as file:
                file.write(dumps(message).encode("utf-8"))  # type: ignore[no-untyped-call]
                file.flush()
                os.fsync(file.fileno())
            os.rename(temporary, os.path.join(folder, name))
        except OSError as exc:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise ChannelError(f"cannot add message {name} to {folder}: {exc}") from exc

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        wanted = f"{queue}.msg"
        claimed_folder = self.processed_folder
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != wanted:
                continue
            claimed = os.path.join(claimed_folder, name)
            try:
                os.rename(os.path.join(self.data_folder_in, name), claimed)
            except OSError:
                continue  # another consumer took it first
            try:
                with open(claimed, "rb") as file:
                    payload = file.read()
            except OSError as exc:
                raise ChannelError(f"cannot read message {name}: {exc}") from exc
            try:
                message = loads(payload.decode("utf-8"))  # type: ignore[no-untyped-call]
            except (UnicodeDecodeError, json.JSONDecodeError):
                corrupt = os.path.join(os.path.dirname(claimed_folder), "corrupt")
                os.makedirs(corrupt, exist_ok=True)
                os.replace(claimed, os.path.join(corrupt, name))
                log.error("embedded broker: message %s on queue %s is damaged (%d bytes); "
                          "moved to %s, the sweeper publishes its job again",
                          name, queue, len(payload), corrupt)
                continue
            if not self.store_processed:
                os.unlink(claimed)
            return message
        raise Empty()


class SpoolTransport(filesystem.Transport):  # type: ignore[misc]
    """The embedded broker: kombu's file-system transport with :class:`SpoolChannel`."""

    Channel = SpoolChannel
    driver_type = EMBEDDED_SCHEME
    driver_name = EMBEDDED_SCHEME


TRANSPORT_ALIASES.setdefault(EMBEDDED_SCHEME, f"{__name__}:SpoolTransport")


def broker_options(settings: Settings) -> tuple[str, dict[str, Any]]:
    """Return the broker URL and transport options.

    With no broker URL configured, the embedded broker is kombu's file-system
    transport (made atomic by :class:`SpoolTransport`) under
    ``<data_dir>/broker``: no server to run, and the same Celery code path as
    with Redis.
    """
    if not settings.embedded_broker:
        # Redis: redeliver an unacknowledged job (late ack: its worker died) only
        # after the longest job could have finished.
        longest = max([settings.worker.time_limit_s,
                       *(m.time_limit_s or 0 for m in settings.models)])
        options: dict[str, Any] = {
            "visibility_timeout": longest * 2 + 60,
            # One Redis list per step; workers take the lowest step first, so a
            # STAT message overtakes routine ones already in the broker.
            "priority_steps": [PRIORITY_STAT, PRIORITY_ROUTINE],
            "sep": ":",
            "queue_order_strategy": "priority",
            "socket_connect_timeout": 5,
        }
        if settings.broker.key_prefix:
            options["global_keyprefix"] = settings.broker.key_prefix
        return settings.broker.url, options
    root = (settings.data_dir / "broker").resolve()
    messages = root / "messages"
    processed = root / "processed"
    control = root / "control"
    for folder in (messages, processed, control):
        folder.mkdir(parents=True, exist_ok=True)
    return f"{EMBEDDED_SCHEME}://", {
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
    queues = sorted({"gpu", "cpu", *settings.worker.queues, *(m.queue for m in settings.models),
                     *(settings.broker.embedded_worker_queues or [])})
    app.conf.update(
        # Declared, not made up on the fly: a worker asked for a queue that no
        # model uses still starts (its queue is empty), with the name in its banner.
        task_queues=[Queue(name, routing_key=name)  # type: ignore[no-untyped-call]
                     for name in queues],
        task_routes={ANALYSE_SERIES: {"queue": "gpu"}},
        task_default_priority=PRIORITY_ROUTINE,
        broker_connection_timeout=5,
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue="gpu",
        task_create_missing_queues=True,  # `radnode worker --queues` names one of its own
        task_time_limit=settings.worker.time_limit_s,
        task_soft_time_limit=max(int(settings.worker.time_limit_s * 0.9), 5),
        worker_hijack_root_logger=False,
        worker_enable_remote_control=not settings.embedded_broker,
        worker_send_task_events=False,
        timezone="UTC",
    )
    return app


def publish(app: Celery, *, task_name: str, queue: str, job_id: int,
            time_limits: tuple[int, int] | None = None, stat: bool = False) -> None:
    """Send "run job ``job_id``" to ``queue`` by task name.

    ``time_limits`` (hard, soft) in seconds override the worker's defaults
    for this job (per-model limits); Celery kills the worker process at the
    hard limit and raises ``SoftTimeLimitExceeded`` in the task at the soft one.
    A ``stat`` job gets the broker's highest priority (Redis only; the
    embedded broker keeps publish order, and the scheduler publishes STAT first).

    Raises
    ------
    kombu.exceptions.OperationalError
        If the broker cannot be reached; the job stays ``pending`` and is
        published again on the next scheduler tick.
    """
    options: dict[str, Any] = {"priority": PRIORITY_STAT if stat else PRIORITY_ROUTINE}
    if time_limits is not None:
        options["time_limit"], options["soft_time_limit"] = time_limits
    app.send_task(task_name, args=[job_id], queue=queue, **options)


def broker_probe(app: Celery, settings: Settings, timeout_s: float = 2.0) -> tuple[bool, str]:
    """Readiness of the broker: ``(ok, detail)``; never raises.

    The embedded broker is ready when its message folder is writable; an
    external one (Redis) when a connection opens within ``timeout_s``.
    """
    if settings.embedded_broker:
        folder = settings.data_dir / "broker" / "messages"
        if folder.is_dir() and os.access(folder, os.W_OK):
            return True, "embedded broker folder writable"
        return False, f"embedded broker folder {folder} is missing or not writable"
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout_s)
        return True, "reachable"
    except Exception as exc:  # any failure means not ready; say what it was
        return False, f"unreachable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def describe_broker(app: Celery) -> str:
    """The broker's URL for logs and messages, without its password."""
    try:
        if str(app.conf.broker_url).startswith(EMBEDDED_SCHEME):
            return "the embedded broker"
        return str(app.connection_for_write().as_uri(include_password=False))
    except Exception:  # an unparsable URL must not break the message about it
        return "(the configured broker)"
