"""TCP tuning of the SCP's sockets: TCP_NODELAY, and TCP_QUICKACK before every read."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from service.config import DicomSettings
from service.db import migrate
from service.db.session import make_engine, make_session_factory
from service.dicom.net import MAX_READ, QuickAckSocket, set_tcp_nodelay
from service.scp.handlers import StoreContext
from service.scp.server import start_scp

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="Linux only")


class _RecordingSocket:
    """Stands in for a socket: records the calls in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def setsockopt(self, *args: Any) -> None:
        self.calls.append(("setsockopt", *args))

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.calls.append(("recv", bufsize, flags))
        return b"pdu"

    def fileno(self) -> int:
        return 42


def test_quickack_is_armed_before_every_read() -> None:
    raw = _RecordingSocket()
    wrapped = QuickAckSocket(raw)  # type: ignore[arg-type]
    assert wrapped.recv(16) == b"pdu"
    assert wrapped.recv(8) == b"pdu"
    quickack = ("setsockopt", socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    assert raw.calls == [quickack, ("recv", 16, 0), quickack, ("recv", 8, 0)]
    assert wrapped.fileno() == 42  # everything else is the socket's (select uses fileno)


class _Pieces(_RecordingSocket):
    """Hands out the given pieces, one per read (never more than asked), then b"" (closed)."""

    def __init__(self, *pieces: bytes) -> None:
        super().__init__()
        self.pieces = list(pieces)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.calls.append(("recv", bufsize, flags))
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        assert len(piece) <= bufsize
        return piece

    def recv_into(self, buffer: memoryview, nbytes: int = 0, flags: int = 0) -> int:
        self.calls.append(("recv_into", len(buffer), nbytes))
        if not self.pieces:
            return 0
        piece = self.pieces.pop(0)
        assert len(piece) <= min(nbytes, len(buffer))
        buffer[:len(piece)] = piece
        return len(piece)


def test_read_exactly_asks_for_all_that_is_missing_with_quickack_each_time() -> None:
    raw = _Pieces(b"a" * 5000, b"b" * 3000, b"c" * 2000)
    got = QuickAckSocket(raw).read_exactly(10_000)  # type: ignore[arg-type]
    assert got == b"a" * 5000 + b"b" * 3000 + b"c" * 2000
    quickack = ("setsockopt", socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    assert raw.calls == [quickack, ("recv", 10_000, 0), quickack, ("recv", 5000, 0),
                         quickack, ("recv", 2000, 0)]


def test_read_exactly_returns_what_arrived_before_the_peer_closed() -> None:
    raw = _Pieces(b"x" * 10)
    assert QuickAckSocket(raw).read_exactly(20) == b"x" * 10  # type: ignore[arg-type]
    assert QuickAckSocket(_Pieces()).read_exactly(6) == b""  # type: ignore[arg-type]


def test_read_exactly_never_asks_for_more_than_max_read() -> None:
    """A PDU length is the peer's word: a hostile 4 GiB costs no 4 GiB buffer."""
    raw = _Pieces(b"y" * 100)
    assert QuickAckSocket(raw).read_exactly(1 << 32) == b"y" * 100  # type: ignore[arg-type]
    assert [c[1] for c in raw.calls if c[0] == "recv"] == [MAX_READ, MAX_READ]


def test_read_into_fills_the_buffer_with_quickack_before_each_read() -> None:
    raw = _Pieces(b"a" * 5000, b"b" * 3000, b"c" * 2000)
    buffer = bytearray(10_000)
    assert QuickAckSocket(raw).read_into(memoryview(buffer)) == 10_000  # type: ignore[arg-type]
    assert buffer == b"a" * 5000 + b"b" * 3000 + b"c" * 2000
    quickack = ("setsockopt", socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    assert raw.calls == [quickack, ("recv_into", 10_000, 10_000), quickack,
                         ("recv_into", 5000, 5000), quickack, ("recv_into", 2000, 2000)]


def test_read_into_stops_when_the_peer_closes_and_never_asks_for_more_than_max_read() -> None:
    raw = _Pieces(b"z" * 10)
    buffer = bytearray(MAX_READ + 100)
    assert QuickAckSocket(raw).read_into(memoryview(buffer)) == 10  # type: ignore[arg-type]
    assert [c[2] for c in raw.calls if c[0] == "recv_into"] == [MAX_READ, MAX_READ]


def test_unread_bytes_come_first_then_the_socket() -> None:
    raw = _Pieces(b"EF", b"GHI", b"KLM")
    quick = QuickAckSocket(raw)  # type: ignore[arg-type]
    quick.unread(b"CD")
    quick.unread(b"AB")  # handed back last: read first
    assert quick.read_exactly(1) == b"A"
    assert quick.read_exactly(5) == b"BCDEF"  # the rest handed back, then a read for 2
    assert quick.read_exactly(3) == b"GHI"
    quick.unread(b"J")
    buffer = bytearray(4)
    assert quick.read_into(memoryview(buffer)) == 4 and buffer == b"JKLM"
    assert [c for c in raw.calls if c[0] != "setsockopt"] == [
        ("recv", 2, 0), ("recv", 3, 0), ("recv_into", 3, 3)]


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = socket.create_connection(server.getsockname())
        receiver, _ = server.accept()
    with sender, receiver:
        yield sender, receiver


def test_read_exactly_on_loopback_takes_pdus_apart(
        tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """Real TCP: a large body sent in bursts, then a header; each read gets its own bytes."""
    sender, receiver = tcp_pair
    body = bytes(range(256)) * 1200  # 300 KiB: more than one read's worth
    header = b"\x04\x00" + len(body).to_bytes(4, "big")

    def send() -> None:
        for start in range(0, len(body), 100_000):
            sender.sendall(body[start:start + 100_000])
            time.sleep(0.02)
        sender.sendall(header + b"tail")

    thread = threading.Thread(target=send)
    thread.start()
    quick = QuickAckSocket(receiver)
    assert quick.read_exactly(len(body)) == body
    assert quick.read_exactly(6) == header  # not one byte of the next PDU more
    thread.join()
    sender.close()
    assert quick.read_exactly(10) == b"tail"  # closed after 4 of 10


def test_accepted_associations_read_through_quickack(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db' / 'radnode.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = start_scp(DicomSettings(ae_title="RADNODE", host="127.0.0.1", port=port),
                       StoreContext(tmp_path / "spool", make_session_factory(engine)))
    try:
        scu = AE(ae_title="SENDER")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port, ae_title="RADNODE",
                              evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)])
        assert assoc.is_established
        try:
            accepted = [a for a in server.active_associations if a.is_established]
            assert len(accepted) == 1
            tcp = accepted[0].dul.socket.socket
            assert isinstance(tcp, QuickAckSocket)
            assert accepted[0].dul.socket.recv == tcp.read_exactly  # whole PDUs per read
            assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            # The wrapper carries the whole association: reads and answers work.
            assert assoc.send_c_echo().Status == 0x0000
            assert assoc.send_c_echo().Status == 0x0000
            # The requesting side (radnode's SCUs bind the same handler) gets
            # TCP_NODELAY only: it sends, and reads nothing but short answers.
            requestor = assoc.dul.socket.socket
            assert type(requestor) is socket.socket
            assert requestor.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        finally:
            assoc.release()
    finally:
        server.shutdown()
        engine.dispose()
