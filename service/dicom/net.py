"""What radnode's SCP and SCUs share: their implementation identity and socket tuning."""

from __future__ import annotations

import socket
from importlib.metadata import PackageNotFoundError, version
from typing import cast

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
    does the same when ``TCP_NODELAY`` is set in its environment. On an
    accepted plain TCP association the socket is also wrapped in
    :class:`QuickAckSocket`, for senders that keep Nagle on.
    """
    transport = event.assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if transport is None or sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return  # not a TCP socket (tests with socket pairs) or already closed
    # Receiving: acknowledge at once, so a sender that keeps Nagle on is not stalled.
    if event.assoc.is_acceptor and type(sock) is socket.socket and _HAS_QUICKACK:
        quick = QuickAckSocket(sock)
        transport.socket = cast(socket.socket, quick)
        # pynetdicom reads a PDU 4 KiB at a time; one read takes what has arrived. Its
        # only caller (DULServiceProvider._read_pdu_data) appends the bytes to a bytearray.
        setattr(transport, "recv", quick.read_exactly)  # noqa: B010 (shadows the method)


_HAS_QUICKACK = hasattr(socket, "TCP_QUICKACK")  # Linux


class QuickAckSocket:
    """A TCP socket that sets ``TCP_QUICKACK`` before every read (Linux).

    A sender with Nagle's algorithm on (dcmtk's default) holds back the
    small last segment of a PDU until the previous one is acknowledged, and
    Linux delays that ACK by up to 40 ms when it has nothing to send back:
    every DIMSE message then stalls ~40 ms. ``TCP_QUICKACK`` makes the
    kernel acknowledge at once; it is not permanent (the kernel leaves
    quick-ack mode on its own), so it is set again before each read.
    Everything else is the wrapped socket's, so pynetdicom's transport uses
    it unchanged (``select`` takes its ``fileno``).

    Parameters
    ----------
    sock : socket.socket
        The connected TCP socket of an accepted association.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        #: Bytes handed back by :meth:`unread`, returned before the socket's.
        self._unread = b""

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """``socket.recv`` after re-arming ``TCP_QUICKACK``."""
        self._arm_quickack()
        return self._sock.recv(bufsize, flags)

    def _arm_quickack(self) -> None:
        try:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass  # closing: the read reports it

    def read_exactly(self, nr_bytes: int) -> bytes:
        """Read ``nr_bytes`` (less only if the peer closes), as few reads as arrival allows.

        Stands in for pynetdicom's ``AssociationSocket.recv``, which reads a
        PDU in pieces of 4 KiB: a 256 KiB P-DATA-TF PDU took 64 reads, each
        with its ``TCP_QUICKACK``. Here each read asks for all that is still
        missing, up to :data:`MAX_READ` bytes (a PDU length is the peer's
        word: memory follows the bytes that arrive, not the length).

        Parameters
        ----------
        nr_bytes : int
            How many bytes the caller needs (a PDU header, or its body).

        Returns
        -------
        bytes
            ``nr_bytes`` bytes, or what arrived before the peer closed the
            connection (as pynetdicom returns it; its caller reports the
            short PDU).

        Raises
        ------
        OSError
            If the socket fails or times out (``TimeoutError``), as a read does.
        """
        pieces: list[bytes] = []
        missing = nr_bytes
        if self._unread:
            first, self._unread = self._unread[:nr_bytes], self._unread[nr_bytes:]
            pieces.append(first)
            missing -= len(first)
        while missing > 0:
            piece = self.recv(min(missing, MAX_READ))
            if not piece:
                break  # the peer closed the connection
            pieces.append(piece)
            missing -= len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def read_into(self, buffer: memoryview) -> int:
        """Fill ``buffer`` from the socket, as :meth:`read_exactly` reads, with no copy.

        Each read asks for all that is still missing, up to :data:`MAX_READ`
        bytes, after re-arming ``TCP_QUICKACK``. Bytes handed back by
        :meth:`unread` come first.

        Parameters
        ----------
        buffer : memoryview
            Writable, of bytes; its length is how many bytes are wanted.

        Returns
        -------
        int
            How many bytes were read: ``len(buffer)``, or fewer if the peer
            closed the connection first.

        Raises
        ------
        OSError
            If the socket fails or times out (``TimeoutError``), as a read does.
        """
        got = 0
        if self._unread:
            first, self._unread = self._unread[:len(buffer)], self._unread[len(buffer):]
            buffer[:len(first)] = first
            got = len(first)
        while got < len(buffer):
            self._arm_quickack()
            n = self._sock.recv_into(buffer[got:], min(len(buffer) - got, MAX_READ))
            if not n:
                break  # the peer closed the connection
            got += n
        return got

    def unread(self, data: bytes) -> None:
        """Hand ``data`` back: the next :meth:`read_exactly` or :meth:`read_into` returns it first.

        For a reader that looked at a PDU's header and leaves the PDU to
        pynetdicom (:mod:`service.scp.pdata`).
        """
        self._unread = data + self._unread

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


#: The most bytes :meth:`QuickAckSocket.read_exactly` asks the kernel for in one read.
MAX_READ = 256 << 10
