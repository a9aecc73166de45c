"""The association threads' waits (service/scp/wakeups.py): woken by work, else the old sleep."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynetdicom.association as pynetdicom_association
import pynetdicom.dul as pynetdicom_dul
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

from service.config import DicomSettings
from service.db import migrate
from service.db.session import make_engine, make_session_factory
from service.scp import inline, wakeups
from service.scp.handlers import StoreContext
from service.scp.server import start_scp
from tests.unit.dicom_factory import make_ct_dataset

LONG_S = 5.0  # a wait's timeout that a woken wait must not reach


def _prepared(peer: socket.socket | None = None) -> Association:
    assoc = Association(AE(ae_title="RADNODE"), "acceptor")
    if peer is not None:
        assoc.set_socket(AssociationSocket(assoc, client_socket=peer))
    wakeups.wake_on_events(SimpleNamespace(assoc=assoc))  # type: ignore[arg-type]
    return assoc


def _timed(wait: Any, seconds: float) -> tuple[threading.Thread, list[float]]:
    """Run ``wait(seconds)`` in a thread; the list gets its duration."""
    took: list[float] = []

    def run() -> None:
        start = time.monotonic()
        wait(seconds)
        took.append(time.monotonic() - start)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, took


def test_a_signalling_queue_notifies_once_the_item_is_in() -> None:
    seen: list[int] = []
    q: wakeups.SignallingQueue = wakeups.SignallingQueue(lambda: seen.append(q.qsize()))
    q.put("a")
    q.put("b")
    assert seen == [1, 2]
    assert [q.get(), q.get()] == ["a", "b"]


def test_wake_on_events_replaces_the_three_queues_and_gives_both_threads_a_wait() -> None:
    assoc = _prepared()
    for q in (assoc.dul.to_provider_queue, assoc.dul.to_user_queue, assoc.dimse.msg_queue):
        assert isinstance(q, wakeups.SignallingQueue)
    assert callable(assoc._radnode_wait)  # type: ignore[attr-defined]
    assert callable(assoc.dul._radnode_wait)  # type: ignore[attr-defined]
    dul_wait = assoc.dul._radnode_wait  # type: ignore[attr-defined]
    wakeups.wake_on_events(SimpleNamespace(assoc=assoc))  # type: ignore[arg-type]
    assert assoc.dul._radnode_wait is dul_wait  # type: ignore[attr-defined]  # once only


def test_the_association_wait_ends_when_a_message_is_queued() -> None:
    assoc = _prepared()
    thread, took = _timed(assoc._radnode_wait, LONG_S)  # type: ignore[attr-defined]
    time.sleep(0.05)
    assoc.dimse.msg_queue.put((1, "message"))
    thread.join(LONG_S * 2)
    assert took and took[0] < LONG_S / 2


def test_the_association_wait_ends_when_a_release_is_queued() -> None:
    assoc = _prepared()
    thread, took = _timed(assoc._radnode_wait, LONG_S)  # type: ignore[attr-defined]
    time.sleep(0.05)
    assoc.dul.to_user_queue.put("A-RELEASE")  # type: ignore[arg-type]
    thread.join(LONG_S * 2)
    assert took and took[0] < LONG_S / 2


def test_a_message_already_waiting_is_not_slept_on() -> None:
    assoc = _prepared()
    assoc.dimse.msg_queue.put((1, "first"))
    assoc.dimse.msg_queue.put((1, "second"))
    assoc._radnode_wait(0)  # type: ignore[attr-defined]  # clears the event
    start = time.monotonic()
    assoc._radnode_wait(LONG_S)  # type: ignore[attr-defined]
    assert time.monotonic() - start < LONG_S / 2


def test_without_work_the_association_wait_lasts_its_timeout() -> None:
    assoc = _prepared()
    start = time.monotonic()
    assoc._radnode_wait(0.2)  # type: ignore[attr-defined]
    assert time.monotonic() - start >= 0.19


def test_an_established_reactor_turn_waits_longer_than_1_ms_unless_woken(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's 1 ms reactor sleep becomes ASSOCIATION_IDLE_WAIT, ended by any work."""
    assoc = _prepared()
    assoc.is_established = True
    start = time.monotonic()
    assoc._radnode_wait(0.001)  # type: ignore[attr-defined]
    assert time.monotonic() - start >= wakeups.ASSOCIATION_IDLE_WAIT * 0.9
    # Woken long before a stretched turn ends (a long one here: a loaded machine can stall
    # the test's own thread for tens of milliseconds between its sleep and its put).
    monkeypatch.setattr(wakeups, "ASSOCIATION_IDLE_WAIT", LONG_S)
    thread, took = _timed(assoc._radnode_wait, 0.001)  # type: ignore[attr-defined]
    time.sleep(0.01)
    assoc.dul.to_user_queue.put("A-ABORT")  # type: ignore[arg-type]
    thread.join(LONG_S * 2)
    assert took and took[0] < LONG_S / 2


@pytest.mark.parametrize("state", ["not established", "being killed", "other sleep"])
def test_other_sleeps_of_the_association_thread_keep_their_length(state: str) -> None:
    """Set-up, kill() (10 ms loops) and the send_* pause loops (0.1 ms) are not stretched."""
    assoc = _prepared()
    assoc.is_established = state != "not established"
    assoc._kill = state == "being killed"
    seconds = 0.0001 if state == "other sleep" else 0.001
    start = time.monotonic()
    for _ in range(5):
        assoc._radnode_wait(seconds)  # type: ignore[attr-defined]
    assert time.monotonic() - start < wakeups.ASSOCIATION_IDLE_WAIT


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


def test_the_dul_wait_ends_when_the_peer_sends(
        connection: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = connection
    assoc = _prepared(ours)
    thread, took = _timed(assoc.dul._radnode_wait, LONG_S)  # type: ignore[attr-defined]
    time.sleep(0.05)
    theirs.send(b"\x04\x00")
    thread.join(LONG_S * 2)
    assert took and took[0] < LONG_S / 2
    assert ours.recv(2) == b"\x04\x00"  # the wait does not read the peer's bytes


def test_the_dul_wait_ends_when_a_primitive_is_queued_to_send(
        connection: tuple[socket.socket, socket.socket]) -> None:
    assoc = _prepared(connection[0])
    thread, took = _timed(assoc.dul._radnode_wait, LONG_S)  # type: ignore[attr-defined]
    time.sleep(0.05)
    assoc.dul.send_pdu(P_DATA())
    thread.join(LONG_S * 2)
    assert took and took[0] < LONG_S / 2
    # The wake-up was consumed: with the primitive still queued the next wait returns at
    # once, and once the DUL has taken it a wait lasts its timeout again.
    start = time.monotonic()
    assoc.dul._radnode_wait(LONG_S)  # type: ignore[attr-defined]
    assert time.monotonic() - start < LONG_S / 2
    assoc.dul.to_provider_queue.get()
    start = time.monotonic()
    assoc.dul._radnode_wait(0.2)  # type: ignore[attr-defined]
    assert time.monotonic() - start >= 0.19


def test_after_release_waits_a_dul_wait_falls_back_to_sleeping(
        connection: tuple[socket.socket, socket.socket]) -> None:
    assoc = _prepared(connection[0])
    wakeups.release_waits(SimpleNamespace(assoc=assoc))  # type: ignore[arg-type]
    assoc.dul.send_pdu(P_DATA())  # the dropped wake-up raises nothing
    assoc.dul.to_provider_queue.get()
    start = time.monotonic()
    assoc.dul._radnode_wait(0.1)  # type: ignore[attr-defined]
    assert time.monotonic() - start >= 0.09


def test_sleep_is_plain_for_threads_that_were_not_prepared(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    slept: list[float] = []
    monkeypatch.setattr(wakeups.time, "sleep", slept.append)
    wakeups.WakeableTime.sleep(0.001)
    assert slept == [0.001]
    assert wakeups.WakeableTime().monotonic is time.monotonic  # every other name is time's


def test_install_is_counted_and_uninstall_restores_time() -> None:
    assert pynetdicom_dul.time is time
    wakeups.install()
    wakeups.install()
    try:
        for module in (pynetdicom_dul, pynetdicom_association):
            assert isinstance(module.time, wakeups.WakeableTime)
        wakeups.uninstall()
        assert isinstance(pynetdicom_dul.time, wakeups.WakeableTime)  # one install left
    finally:
        wakeups.uninstall()
    assert pynetdicom_dul.time is time
    assert pynetdicom_association.time is time


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def scp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, Path]]:
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")
    url = f"sqlite:///{tmp_path / 'radnode.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    port = _free_port()
    server = start_scp(DicomSettings(ae_title="RADNODE", host="127.0.0.1", port=port,
                                     acse_timeout_s=10, dimse_timeout_s=10,
                                     network_timeout_s=10),
                       StoreContext(tmp_path / "spool", make_session_factory(engine)))
    wakeups.install()
    try:
        yield port, tmp_path / "spool"
    finally:
        server.shutdown()
        wakeups.uninstall()
        engine.dispose()


@pytest.mark.parametrize("inline_stores", [False, True], ids=["queued", "inline"])
def test_a_real_association_is_served_by_woken_threads(
        scp: tuple[int, Path], monkeypatch: pytest.MonkeyPatch, inline_stores: bool) -> None:
    port, spool = scp
    timeout_s = 2.0  # each wait of the SCP's two threads, instead of pynetdicom's 1 ms
    woken = {"dul": 0, "association": 0}
    served_by: list[str] = []
    serve = inline.MessageQueue._serve

    def counted_serve(self: Any, *args: Any) -> None:
        served_by.append(type(threading.current_thread()).__name__)
        serve(self, *args)

    monkeypatch.setattr(inline.MessageQueue, "_serve", counted_serve)
    if not inline_stores:  # every C-STORE handed to the association thread, as pynetdicom does
        monkeypatch.setattr(inline.MessageQueue, "_inline_service", lambda self, item: None)

    def counted(name: str, original: Any) -> Any:
        def wait(self: Any, seconds: float) -> None:
            start = time.monotonic()
            original(self, timeout_s)
            if time.monotonic() - start < timeout_s / 2:
                woken[name] += 1
        return wait

    monkeypatch.setattr(wakeups._DulWait, "__call__",
                        counted("dul", wakeups._DulWait.__call__))
    monkeypatch.setattr(wakeups._AssociationWait, "__call__",
                        counted("association", wakeups._AssociationWait.__call__))
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    sent = [make_ct_dataset(rows=16, columns=16) for _ in range(10)]
    assoc = ae.associate("127.0.0.1", port, ae_title="RADNODE")
    assert assoc.is_established
    start = time.monotonic()
    try:
        statuses = [int(assoc.send_c_store(ds).Status) for ds in sent]
    finally:
        assoc.release()
    took = time.monotonic() - start
    assert statuses == [0x0000] * 10
    for ds in sent:
        assert len(list(spool.rglob(f"{ds.SOPInstanceUID}.dcm"))) == 1
    # Every request woke the thread that serves it and every response the DUL thread; had
    # one waited for its timeout instead, the ten would have taken 20 s or more.
    if inline_stores:  # served by the DUL thread as it decoded them: no hand-off
        assert served_by == ["DULServiceProvider"] * 10
        assert woken["association"] < 10  # the release only
    else:
        assert served_by == []
        assert woken["association"] >= 10
    assert woken["dul"] >= 10
    assert took < 10 * timeout_s
