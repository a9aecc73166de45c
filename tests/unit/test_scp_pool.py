"""The SCP process pool's parts that need no child process: messages, shares, hand-off."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.config import DicomSettings
from service.scp.pool import (
    ParentCounters,
    ScpPool,
    bounded_sends,
    effective_processes,
    receive_message,
    send_message,
    share_of,
)


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def test_a_message_and_a_descriptor_cross_the_channel() -> None:
    a, b = _pair()
    with a, b, open(os.devnull, "rb") as passed:
        send_message(a, {"t": "conn", "id": 7, "a": ["127.0.0.1", 4242]}, [passed.fileno()])
        message, fds = receive_message(b)
        assert message == {"t": "conn", "id": 7, "a": ["127.0.0.1", 4242]}
        assert len(fds) == 1 and fds[0] != passed.fileno()
        # The received descriptor is the same open file.
        assert os.fstat(fds[0]).st_ino == os.fstat(passed.fileno()).st_ino
        os.close(fds[0])
        a.close()
        assert receive_message(b) == (None, [])  # the other end closed


def test_a_message_that_is_not_an_object_is_refused() -> None:
    a, b = _pair()
    with a, b:
        a.send(b"[1, 2]")
        with pytest.raises(ValueError, match="not a JSON object"):
            receive_message(b)


@pytest.mark.parametrize(("maximum", "processes", "share"),
                         [(16, 2, 8), (16, 3, 6), (1, 4, 1), (5, 1, 5)])
def test_each_process_gets_its_share_of_max_associations(maximum: int, processes: int,
                                                          share: int) -> None:
    assert share_of(maximum, processes) == share
    assert share_of(maximum, processes) * processes >= maximum


def test_zero_processes_means_one_per_core() -> None:
    assert effective_processes(DicomSettings(processes=3)) == 3
    assert effective_processes(DicomSettings(processes=1)) == 1
    assert effective_processes(DicomSettings(processes=0)) == len(os.sched_getaffinity(0))


class _Counted:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def association(self, calling_ae: str, outcome: str) -> None:
        self.calls.append(("association", (calling_ae, outcome)))

    def rejected(self, reason: str) -> None:
        self.calls.append(("rejected", (reason,)))

    def stored(self, calling_ae: str, status: int, size_bytes: int,
               seconds: float | None = None) -> None:
        self.calls.append(("stored", (calling_ae, status, size_bytes, seconds)))


class _Listener:
    """Stands in for a PoolListener: counts connections without a request per address."""

    listener = "plain"

    def __init__(self) -> None:
        self.waiting: dict[str, int] = {}

    def uncount(self, address: str) -> None:
        self.waiting[address] -= 1


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[tuple[ScpPool, list[socket.socket], _Counted]]:
    """A pool of two 'children' that are the far ends of real socket pairs."""
    counters = _Counted()
    pool = ScpPool(DicomSettings(processes=2), tmp_path / "config.yaml", 2, counters)
    far = []
    for child in pool.children:
        near, end = _pair()
        child.channel = near
        child.ready.set()
        far.append(end)
    yield pool, far, counters
    for child in pool.children:
        assert child.channel is not None
        child.channel.close()
    for end in far:
        end.close()


def _connect(pool: ScpPool, listener: _Listener, address: str) -> None:
    listener.waiting[address] = listener.waiting.get(address, 0) + 1  # as verify_request
    a, b = socket.socketpair()
    with b:
        pool.hand_over(listener, a, (address, 50000))  # type: ignore[arg-type]
    assert a.fileno() == -1  # the node's copy is closed once handed over


def test_connections_go_to_the_least_loaded_process_and_are_counted_until_requested(
        pool: tuple[ScpPool, list[socket.socket], _Counted]) -> None:
    scp, far, counters = pool
    listener = _Listener()
    for _ in range(3):
        _connect(scp, listener, "10.0.0.1")
    got = []
    for end in far:
        end.setblocking(False)
        while True:
            try:
                message, fds = receive_message(end)
            except BlockingIOError:
                break
            assert message is not None and len(fds) == 1
            os.close(fds[0])
            got.append((far.index(end), message["id"], message["e"]))
    # Alternating: the second goes to the idle process, the third to either (equals).
    per_child = [sum(1 for c, _, _ in got if c == index) for index in (0, 1)]
    assert sorted(per_child) == [1, 2]
    assert scp.loads() == per_child
    # Each hand-off says how many of the peer's connections the other process holds.
    assert sorted(e for _, _, e in got) == [0, 1, 1]
    assert listener.waiting == {"10.0.0.1": 3}

    busy = per_child.index(2)
    one, two = (i for c, i, _ in got if c == busy)
    scp._apply(scp.children[busy], {"t": "requested", "id": one})
    scp._apply(scp.children[busy], {"t": "requested", "id": one})  # once only
    assert listener.waiting == {"10.0.0.1": 2}
    scp._apply(scp.children[busy], {"t": "closed", "id": one})
    assert listener.waiting == {"10.0.0.1": 2}  # it was uncounted at its request
    assert scp.loads() == [1, 1]
    scp._apply(scp.children[busy], {"t": "closed", "id": two})  # closed without a request
    assert listener.waiting == {"10.0.0.1": 1}
    assert scp.connections == 1

    scp._apply(scp.children[1], {"t": "count", "m": "stored", "a": ["CT1", 0, 9000, 0.002]})
    scp._apply(scp.children[1], {"t": "count", "m": "stored", "a": ["CT1", 0xA700, 0]})
    scp._apply(scp.children[1], {"t": "count", "m": "rejected", "a": ["peer-address"]})
    scp._apply(scp.children[1], {"t": "count", "m": "render", "a": []})  # not a counter
    assert counters.calls == [("stored", ("CT1", 0, 9000, 0.002)),
                              ("stored", ("CT1", 0xA700, 0, None)),
                              ("rejected", ("peer-address",))]


def test_a_child_reports_counter_moves_to_the_node() -> None:
    a, b = _pair()
    with a, b:
        counters = ParentCounters(a)
        counters.association("CT1", "accepted")
        counters.stored("CT1", 0xA700, 0)
        counters.stored("CT1", 0, 9000, 0.0015)
        assert receive_message(b)[0] == {"t": "count", "m": "association",
                                         "a": ["CT1", "accepted"]}
        assert receive_message(b)[0] == {"t": "count", "m": "stored",
                                         "a": ["CT1", 0xA700, 0, None]}
        assert receive_message(b)[0] == {"t": "count", "m": "stored",
                                         "a": ["CT1", 0, 9000, 0.0015]}
        b.close()
        counters.rejected("tls-handshake-failed")  # the node is gone: no error


def test_a_send_to_a_process_that_stopped_reading_fails_instead_of_hanging() -> None:
    a, b = _pair()
    with a, b:
        bounded_sends(a, 0.2)
        with pytest.raises(OSError):
            for _ in range(100_000):  # fills the channel: nobody reads b
                send_message(a, {"t": "count", "m": "stored", "a": ["CT1", 0, 1]})
