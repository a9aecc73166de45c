"""TCP tuning of the SCP's sockets: TCP_NODELAY, and TCP_QUICKACK before every read."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from service.config import DicomSettings
from service.db import migrate
from service.db.session import make_engine, make_session_factory
from service.dicom.net import QuickAckSocket, set_tcp_nodelay
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
