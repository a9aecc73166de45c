"""C-STORE requests served by the thread that decoded them (service/scp/inline.py)."""

from __future__ import annotations

import threading
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.presentation import build_context
from pynetdicom.service_class import StorageServiceClass

from service.scp import inline, wakeups
from tests.unit.dicom_factory import make_ct_dataset


def _store(message_id: int = 1, sop_class: str = CTImageStorage) -> C_STORE:
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = f"1.2.3.{message_id}"
    request.Priority = 2
    request.DataSet = BytesIO()  # as pynetdicom leaves it when the data set went to a file
    return request


def _echo(message_id: int = 1) -> C_ECHO:
    request = C_ECHO()
    request.MessageID = message_id
    return request


class _Dul(threading.Thread):
    """Stands in for the DUL thread: runs ``work`` and keeps what it raised."""

    def __init__(self, work: Any) -> None:
        super().__init__()
        self.work = work
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.work()
        except BaseException as exc:  # noqa: BLE001 (reported to the test)
            self.error = exc


def _association() -> Any:
    context = build_context(CTImageStorage, ExplicitVRLittleEndian)
    context.context_id = 1
    assoc = SimpleNamespace(
        dul=None, _sent_release=False, is_established=True, _accepted_cx={1: context},
        acceptor=SimpleNamespace(accepted_common_extended={}),
        dimse=SimpleNamespace(cancel_req={"stale": 1}), aborted=0)
    assoc._abort_nonblocking = lambda: setattr(assoc, "aborted", assoc.aborted + 1)
    return assoc


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, Any]]:
    """Each StorageServiceClass.SCP call: (thread name, Message ID, context)."""
    calls: list[tuple[str, int, Any]] = []

    def scp(service: StorageServiceClass, request: C_STORE, context: Any) -> None:
        calls.append((threading.current_thread().name, int(request.MessageID), context))

    monkeypatch.setattr(inline, "store_scp", scp)
    return calls


def _put_from_dul(assoc: Any, queue: inline.MessageQueue, *items: Any) -> None:
    def work() -> None:
        for item in items:
            queue.put(item)
    dul = _Dul(work)
    dul.name = "dul"
    assoc.dul = dul
    dul.start()
    dul.join(10)
    assert dul.error is None


def test_a_store_is_served_by_the_dul_thread_and_not_queued(
        served: list[tuple[str, int, Any]]) -> None:
    assoc = _association()
    notified: list[int] = []
    queue = inline.MessageQueue(assoc, lambda: notified.append(1))
    _put_from_dul(assoc, queue, (1, _store(1)), (1, _store(2)))
    assert [(name, message_id) for name, message_id, _ in served] == [("dul", 1), ("dul", 2)]
    assert served[0][2] is assoc._accepted_cx[1]
    assert queue.served_inline == 2
    assert queue.qsize() == 0 and notified == []
    assert assoc.dimse.cancel_req == {}  # cleared as Association._serve_request does


def test_other_messages_and_stores_behind_them_are_queued_in_order(
        served: list[tuple[str, int, Any]]) -> None:
    assoc = _association()
    notified: list[int] = []
    queue = inline.MessageQueue(assoc, lambda: notified.append(1))
    echo, store = _echo(1), _store(2)
    _put_from_dul(assoc, queue, (1, echo), (1, store))
    assert served == [] and len(notified) == 2
    assert queue.get(block=False) == (1, echo)
    # The association thread holds the C-ECHO: a store arriving now waits its turn too.
    _put_from_dul(assoc, queue, (1, _store(3)))
    assert served == []
    assert queue.get(block=False) == (1, store)
    assert queue.get(block=False)[1].MessageID == 3
    with pytest.raises(inline.queue.Empty):
        queue.get(block=False)  # its next look finds nothing: nothing is in hand any more
    _put_from_dul(assoc, queue, (1, _store(4)))
    assert [message_id for _, message_id, _ in served] == [4]


@pytest.mark.parametrize("change", ["not_dul_thread", "released", "not_established",
                                    "unknown_context", "not_storage", "invalid"])
def test_a_store_that_may_not_be_served_now_is_queued(
        served: list[tuple[str, int, Any]], change: str) -> None:
    assoc = _association()
    queue = inline.MessageQueue(assoc, lambda: None)
    request = _store(1)
    context_id = 1
    if change == "released":
        assoc._sent_release = True
    elif change == "not_established":
        assoc.is_established = False
    elif change == "unknown_context":
        context_id = 3
    elif change == "not_storage":
        request.AffectedSOPClassUID = "1.2.840.10008.1.1"  # Verification
    elif change == "invalid":
        request = C_STORE()
    if change == "not_dul_thread":
        assoc.dul = _Dul(lambda: None)
        queue.put((context_id, request))  # from this thread, not the DUL's
    else:
        _put_from_dul(assoc, queue, (context_id, request))
    assert served == []
    assert queue.get(block=False) == (context_id, request)


def test_a_failing_service_class_aborts_without_waiting_for_its_own_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(service: StorageServiceClass, request: C_STORE, context: Any) -> None:
        raise RuntimeError("pynetdicom failed")

    monkeypatch.setattr(inline, "store_scp", broken)
    assoc = _association()
    queue = inline.MessageQueue(assoc, lambda: None)
    _put_from_dul(assoc, queue, (1, _store(1)))
    assert assoc.aborted == 1 and queue.qsize() == 0


def test_serve_stores_inline_keeps_the_wakeup_of_the_association_thread() -> None:
    assoc = SimpleNamespace(dimse=SimpleNamespace(msg_queue=None))
    assoc._radnode_wait = wakeups._AssociationWait(assoc)  # as wake_on_events leaves it
    work = assoc._radnode_wait.work
    inline.serve_stores_inline(SimpleNamespace(assoc=assoc))  # type: ignore[arg-type]
    queue = assoc.dimse.msg_queue
    assert isinstance(queue, inline.MessageQueue)
    queue.put((1, _echo(1)))
    assert work.is_set()
    inline.serve_stores_inline(SimpleNamespace(assoc=assoc))  # type: ignore[arg-type]
    assert assoc.dimse.msg_queue is queue  # once per association


# -- store_scp on real associations ---------------------------------------------------------


def _answers(handler: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[str], list[Path]]:
    """Send one C-STORE to a pynetdicom SCP whose stores are served inline by ``handler``.

    Returns the response's status data set, the names of the threads that ran the
    handler, and the received files the handler saw.
    """
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    threads: list[str] = []
    files: list[Path] = []

    def on_store(event: Any) -> Any:
        threads.append(type(threading.current_thread()).__name__)
        files.append(Path(event.dataset_path))
        assert files[-1].is_file()
        return handler(event)

    scp_ae = AE(ae_title="RADNODE")
    scp_ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = scp_ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
        (evt.EVT_CONN_OPEN, inline.serve_stores_inline), (evt.EVT_C_STORE, on_store)])
    try:
        scu = AE(ae_title="TESTSCU")
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="RADNODE")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(make_ct_dataset(rows=8, columns=8))
        finally:
            assoc.release()
    finally:
        server.shutdown()
    return status, threads, files


def test_store_scp_answers_success_failure_and_handler_errors(
        monkeypatch: pytest.MonkeyPatch) -> None:
    status, threads, files = _answers(lambda event: 0x0000, monkeypatch)
    assert int(status.Status) == 0x0000 and "ErrorComment" not in status
    assert threads == ["DULServiceProvider"]
    assert not files[0].exists()  # closed and deleted after the handler, as pynetdicom does

    def refused(event: Any) -> Dataset:
        answer = Dataset()
        answer.Status = 0xA900
        answer.ErrorComment = "does not match"
        return answer

    status, _, _ = _answers(refused, monkeypatch)
    assert int(status.Status) == 0xA900 and status.ErrorComment == "does not match"
    status, _, _ = _answers(lambda event: 0xA700, monkeypatch)
    assert int(status.Status) == 0xA700

    def broken(event: Any) -> int:
        raise RuntimeError("handler failed")

    status, _, files = _answers(broken, monkeypatch)
    assert int(status.Status) == 0xC211
    assert files[0].exists()  # pynetdicom leaves it when the handler raised; so does store_scp
    files[0].unlink()
