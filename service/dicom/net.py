"""Socket tuning shared by radnode's SCP and SCU."""

from __future__ import annotations

import socket

from pynetdicom import evt


def set_tcp_nodelay(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler: turn Nagle's algorithm off on the association's socket.

    DIMSE messages are small and answered one at a time; with Nagle on, each
    response can wait for the peer's delayed ACK (~40 ms on Linux). dcmtk
    does the same when ``TCP_NODELAY`` is set in its environment.
    """
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not a TCP socket (tests with socket pairs) or already closed
