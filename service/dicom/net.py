"""What radnode's SCP and SCUs share: their implementation identity and socket tuning."""

from __future__ import annotations

import socket
from importlib.metadata import PackageNotFoundError, version

from pynetdicom import AE, evt

#: radnode's Implementation Class UID (DICOM PS3.7 D.3.3.2), sent in every
#: A-ASSOCIATE-RQ and -AC; a UUID-derived UID (PS3.5 B.2), so that no
#: organisation root is needed. It names radnode, not the pynetdicom library.
IMPLEMENTATION_CLASS_UID = "2.25.251216382113634133451072284260845450289"


def _version_name() -> str:
    try:
        number = version("radnode")
    except PackageNotFoundError:  # running from a source tree that is not installed
        number = "0"
    return f"RADNODE_{number}"[:16]


#: Implementation Version Name (PS3.7 D.3.3.2.3): ``RADNODE_<version>``, at most 16 characters.
IMPLEMENTATION_VERSION_NAME = _version_name()


def make_ae(ae_title: str) -> AE:
    """A pynetdicom Application Entity with radnode's implementation identity.

    Parameters
    ----------
    ae_title : str
        The AE title it calls (SCU) or answers to (SCP).
    """
    ae = AE(ae_title=ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return ae


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
