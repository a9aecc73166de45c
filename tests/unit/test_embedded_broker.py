"""The embedded broker (service.queue.SpoolTransport) against torn and damaged messages.

kombu's own file-system transport lets a consumer claim a message file while it
is still being written; the worker then crashed on the empty JSON and the job's
message was lost (seen in CI after a SIGKILL test). These tests use a real
Celery application and kombu connection on the broker folder.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
from kombu import Connection

from service.config import Settings
from service.queue import ANALYSE_SERIES, make_celery, publish


def _consume(settings: Settings, queue: str, count: int, timeout_s: float = 10) -> list[int]:
    """Return the job ids of the next ``count`` messages on ``queue``."""
    app = make_celery(settings)
    received: list[int] = []
    with app.connection_for_read() as connection:
        simple = connection.SimpleQueue(queue, no_ack=True)
        try:
            for _ in range(count):
                message = simple.get(timeout=timeout_s)
                received.append(int(message.payload[0][0]))
        finally:
            simple.close()
    return received


def _messages(settings: Settings) -> Path:
    return settings.data_dir / "broker" / "messages"


def test_published_messages_arrive_in_order_and_leave_nothing_behind(settings: Settings) -> None:
    app = make_celery(settings)
    assert app.conf.broker_url.startswith("radnode-spool://")
    for job_id in (1, 2, 3):
        publish(app, task_name=ANALYSE_SERIES, queue="gpu", job_id=job_id)
    names = sorted(os.listdir(_messages(settings)))
    assert len(names) == 3 and all(name.endswith(".gpu.msg") for name in names)
    assert _consume(settings, "gpu", 3) == [1, 2, 3]
    assert os.listdir(_messages(settings)) == []
    assert os.listdir(settings.data_dir / "broker" / "processed") == []


def test_a_message_being_written_is_invisible_to_consumers(settings: Settings) -> None:
    # What a publisher killed mid-write leaves: the temporary file, never a .msg file.
    folder = _messages(settings)
    make_celery(settings)  # makes the broker folders
    (folder / ".writing-0123").write_bytes(b'{"body": "')
    publish(make_celery(settings), task_name=ANALYSE_SERIES, queue="gpu", job_id=7)
    assert _consume(settings, "gpu", 1) == [7]
    assert (folder / ".writing-0123").exists()  # untouched, and never read as a message


def test_a_damaged_message_is_quarantined_and_the_next_one_delivered(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    app = make_celery(settings)
    publish(app, task_name=ANALYSE_SERIES, queue="gpu", job_id=1)  # makes the folders
    folder = _messages(settings)
    for name in os.listdir(folder):
        os.unlink(folder / name)
    # An empty and a truncated message, named to sort before a good one.
    (folder / "00000000000000000000_empty.gpu.msg").write_bytes(b"")
    (folder / "00000000000000000001_torn.gpu.msg").write_bytes(b'{"body": "eyJh')
    publish(app, task_name=ANALYSE_SERIES, queue="gpu", job_id=42)
    with caplog.at_level(logging.ERROR, logger="radnode.queue"):
        assert _consume(settings, "gpu", 1) == [42]
    corrupt = settings.data_dir / "broker" / "corrupt"
    assert sorted(os.listdir(corrupt)) == ["00000000000000000000_empty.gpu.msg",
                                           "00000000000000000001_torn.gpu.msg"]
    assert sum("is damaged" in record.getMessage() for record in caplog.records) == 2
    assert os.listdir(folder) == []


def test_concurrent_publishers_and_consumers_lose_and_duplicate_nothing(
        settings: Settings) -> None:
    app = make_celery(settings)
    total = 200

    def publisher(offset: int) -> None:
        for job_id in range(offset, total, 2):
            publish(app, task_name=ANALYSE_SERIES, queue="gpu", job_id=job_id)

    results: list[list[int]] = [[], []]

    def consumer(index: int) -> None:
        with Connection(app.conf.broker_url,
                        transport_options=app.conf.broker_transport_options) as connection:
            simple = connection.SimpleQueue("gpu", no_ack=True)
            try:
                while sum(len(r) for r in results) < total:
                    try:
                        message = simple.get(timeout=0.5)
                    except simple.Empty:
                        continue
                    results[index].append(int(message.payload[0][0]))
            finally:
                simple.close()

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=consumer, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    received = results[0] + results[1]
    assert sorted(received) == list(range(total))  # each exactly once
    assert not (settings.data_dir / "broker" / "corrupt").exists()
