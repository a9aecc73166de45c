"""The node's Application Entity: a pynetdicom SCP for C-ECHO, C-STORE and commitment reports.

Storage Commitment reports (DICOM PS3.4 J.3.3)
----------------------------------------------
A PACS that radnode asked to commit instances (:mod:`service.delivery.commitment`)
usually reports on a *new* association that it opens to this SCP: it is the
association requestor, yet the SCP of the Storage Commitment Push Model SOP
Class, and proposes that with SCP/SCU Role Selection (PS3.7 D.3.3.4). The
context is supported with ``scu_role=False, scp_role=True``: pynetdicom
accepts a requestor that proposes the SCP role (alone or with the SCU role)
and one that proposes no role selection at all, and rejects a requestor that
offers only the SCU role (radnode is no Storage Commitment SCP). The
N-EVENT-REPORT goes to :func:`service.delivery.commitment.handle_event_report`.

Listeners
---------
:func:`start_scp` starts the plain listener (``dicom.port``) and, with
``dicom.tls``, a TLS listener (DICOM PS3.15 B.9) beside it: one AE, the same
handlers, policy (:mod:`service.scp.policy`) and ``max_associations`` for
both. Each listener is a :class:`DicomServer`, a pynetdicom
``ThreadedAssociationServer`` made with ``AE.make_server(server_class=...)``,
pynetdicom's documented way to use a custom server class, that changes three
things:

* the TLS handshake runs in the connection's own thread with a timeout
  (``acse_timeout_s``), not in the accepting thread as pynetdicom does, where
  a peer that connects and never sends a ClientHello would stop the listener
  from accepting anyone else;
* each accepted socket gets ``network_timeout_s`` as its timeout, so a peer
  that stops in the middle of a PDU is aborted instead of holding a thread
  for ever (a peer that sends nothing at all is closed by the ARTIM timer,
  ``acse_timeout_s``, DICOM PS3.8 9.1.5);
* with ``max_associations_per_peer``, a connection from a peer that already
  has that many connections that have not sent an A-ASSOCIATE-RQ yet is
  closed at once (a connection counts in the listener until pynetdicom has
  made its association, then as that association, never as both);
* pynetdicom deep-copies the server's presentation contexts for every
  association; with every storage SOP class and transfer syntax that took
  ~38 ms of CPU per association (:class:`AcceptorContexts` copies them in
  ~1 ms).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, cast

from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from service.config import DicomSettings
from service.delivery.commitment import (
    STORAGE_COMMITMENT_PUSH_MODEL,
    CommitmentReport,
    handle_event_report,
    report_recorder,
)
from service.dicom.net import make_ae, set_tcp_nodelay
from service.dicom.tls import server_context
from service.dicom.uids import printable
from service.scp.commands import read_store_commands
from service.scp.handlers import (
    StoreContext,
    handle_aborted,
    handle_accepted,
    handle_echo,
    handle_rejected,
    handle_release_requested,
    handle_released,
    handle_store,
)
from service.scp.inline import serve_stores_inline
from service.scp.pdata import read_pdata_directly
from service.scp.policy import PEER_CONNECTIONS, TLS_HANDSHAKE, AssociationPolicy
from service.scp.responses import answer_successes_directly
from service.scp.wakeups import release_waits, wake_on_events

log = logging.getLogger("radnode.scp")



def _preference(syntax: UID) -> int:
    if syntax == ExplicitVRLittleEndian:
        return 0
    lossless = "Lossless" in syntax.name and "Lossy" not in syntax.name
    if syntax.is_compressed and (lossless or syntax == RLELossless):
        return 1
    if syntax.is_deflated:
        return 2
    if syntax.is_compressed:
        return 3
    if syntax == ImplicitVRLittleEndian:
        return 4
    return 5


#: Transfer syntaxes the SCP accepts for storage: every one pydicom knows
#: (implicit/explicit little endian, explicit big endian, deflate, JPEG
#: baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE, ...). The received
#: bytes are stored as sent; nothing is decoded in the SCP.
#:
#: pynetdicom accepts, from the syntaxes a peer proposes in one presentation
#: context, the first in this list. The order never makes a sender compress
#: lossily: explicit VR little endian first (its VRs travel with the data),
#: then lossless compressed syntaxes, deflate, lossy syntaxes (chosen only
#: when the peer offers nothing better, i.e. the data is already lossy),
#: implicit VR little endian and big endian.
STORAGE_TRANSFER_SYNTAXES = [str(ts) for ts in sorted(AllTransferSyntaxes, key=_preference)]

#: Storage Commitment reports are small data sets in a little endian syntax.
COMMITMENT_TRANSFER_SYNTAXES = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]


def build_ae(settings: DicomSettings) -> AE:
    """Return the node's AE with every storage SOP class and transfer syntax.

    Parameters
    ----------
    settings : DicomSettings
        AE title, limits and timeouts (seconds).
    """
    # Chunked receive (process-wide in pynetdicom): each C-STORE data set is
    # written to a temporary file as it arrives, never held in memory whole.
    _config.STORE_RECV_CHUNKED_DATASET = True
    ae = make_ae(settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, STORAGE_TRANSFER_SYNTAXES)
    # Storage Commitment reports from a PACS acting as requestor in the SCP role.
    ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL, COMMITMENT_TRANSFER_SYNTAXES,
                             scu_role=False, scp_role=True)
    return ae


def commitment_callback(context: StoreContext) -> Callable[[CommitmentReport], None]:
    """Where the SCP passes Storage Commitment reports.

    ``context.on_commitment_report`` if set; otherwise a recorder that applies
    each report to the deliveries table with ``context.session_factory``
    (:func:`service.delivery.commitment.report_recorder`).
    """
    if context.on_commitment_report is not None:
        return context.on_commitment_report
    return report_recorder(context.session_factory)


class AcceptorContexts(list[PresentationContext]):
    """The presentation contexts a listener supports, cheap to deep-copy.

    pynetdicom gives each association ``deepcopy(server.contexts)``, which
    it may then change during negotiation. A generic deep copy of ~170
    contexts with ~6600 transfer syntax UIDs walks every UID; this copy
    makes new context objects with their own transfer syntax lists, which
    is all negotiation changes (the UIDs themselves are immutable ``str``).
    """

    def __init__(self, contexts: Iterable[PresentationContext] = ()) -> None:
        super().__init__(contexts)

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            new = PresentationContext.__new__(PresentationContext)
            new.__dict__.update(context.__dict__)
            new._transfer_syntax = list(context._transfer_syntax)
            copies.append(new)
        return copies


class _RequestHandler(RequestHandler):
    """pynetdicom's request handler, telling the listener when the association exists."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        cast(DicomServer, self.server).handed_over(self.request, assoc)
        return assoc


class DicomServer(ThreadedAssociationServer):
    """A pynetdicom association server with timeouts before association and a per-peer cap.

    Made by :meth:`pynetdicom.AE.make_server` with ``server_class=DicomServer``;
    see the module's docstring for what differs from pynetdicom's server.

    Parameters
    ----------
    *args
        As :class:`pynetdicom.transport.AssociationServer`.
    policy : AssociationPolicy
        Its ``max_associations_per_peer`` caps connections that have not
        sent an association request yet.
    on_refused : callable, optional
        Called with the reason (:data:`service.scp.policy.PEER_CONNECTIONS`,
        :data:`service.scp.policy.TLS_HANDSHAKE`) of each connection closed
        before an association request.
    listener : {"plain", "tls"}
        Which of the node's listeners this is.
    **kwargs
        As :class:`pynetdicom.transport.AssociationServer`.
    """

    def __init__(self, *args: Any, policy: AssociationPolicy,
                 on_refused: Callable[[str], None] | None = None, listener: str = "plain",
                 **kwargs: Any) -> None:
        self.policy = policy
        self.listener = listener
        self.on_refused = on_refused
        self._connecting: Counter[str] = Counter()
        self._connecting_lock = threading.Lock()
        #: Connections counted in ``_connecting`` whose association is being made.
        self._counted: dict[int, str] = {}
        kwargs.setdefault("request_handler", _RequestHandler)
        super().__init__(*args, **kwargs)
        self.contexts = AcceptorContexts(self.contexts)

    @property
    def is_listening(self) -> bool:
        """True while the listening socket is open."""
        return self.socket is not None and self.socket.fileno() >= 0

    def shutdown(self) -> None:
        """Refuse new connections at once, then stop the accept loop and close the socket.

        ``socketserver`` sees a shutdown request only between its polls (every
        0.5 s) and accepts connections until then: a peer that connected just
        after a SIGTERM got an association. Shutting the listening socket down
        first takes it out of ``LISTEN`` on Linux (new connections are
        refused) and wakes the accept loop, whose ``accept`` then fails and is
        ignored until the loop stops.
        """
        listening = self.socket
        if listening is not None:
            try:
                listening.shutdown(socket.SHUT_RDWR)
            except OSError:  # closed already, or not a listening socket
                pass
        super().shutdown()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; TLS is set up later, in the connection's thread."""
        sock = cast(socket.socket, self.socket)
        client, address = sock.accept()
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse a peer that already has its cap of connections without a request."""
        cap = self.policy.max_per_peer
        address = str(client_address[0])
        with self._connecting_lock:
            waiting = self._connecting[address]
            if cap is not None:
                waiting += self.policy.connecting(address, self.ae.active_associations)
                if waiting >= cap:
                    log.warning("connection from %s closed: it has %d connections that have "
                                "not requested an association", address, waiting)
                    self._refused(PEER_CONNECTIONS)
                    return False
            self._connecting[address] += 1
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: TLS handshake, socket timeout, then pynetdicom."""
        address = str(client_address[0])
        connection = None
        try:
            connection = self._secure(request, address)
            if connection is not None:
                connection.settimeout(self.ae.network_timeout)
                self.awaiting_association(connection, request, address)
                super().process_request_thread(connection, client_address)
        finally:
            self.connection_done(connection, request, address)

    def awaiting_association(self, connection: Any, request: Any, address: str) -> None:
        """``connection`` (made from ``request``) now waits for pynetdicom's association.

        Until :meth:`handed_over` it counts as a connection of ``address``
        without an association request.
        """
        with self._connecting_lock:
            self._counted[id(connection)] = address

    def connection_done(self, connection: Any, request: Any, address: str) -> None:
        """The connection's thread is done: stop counting it, unless its association did.

        pynetdicom's handler returns once the association's own thread has
        started, so this runs for every connection: ``connection`` is None if
        the TLS handshake failed; one that got an association was uncounted
        by :meth:`handed_over` already and is not uncounted twice.
        """
        if connection is None:
            self.uncount(address)
        else:
            self.handed_over(connection)

    def handed_over(self, connection: Any, assoc: Association | None = None) -> bool:
        """Stop counting ``connection`` here: its association now counts for the cap.

        Called once pynetdicom has made the association (not yet started),
        so that a connection counts either here or as an association that
        has not sent its request, never as both. Counting it twice refused a
        peer's second connection while its first association was starting.

        Parameters
        ----------
        connection : socket.socket
            The connection (TLS-wrapped with a TLS listener).
        assoc : pynetdicom.association.Association, optional
            Its association (used by :class:`service.scp.pool.ChildServer`).

        Returns
        -------
        bool
            False if it was not counted (any more).
        """
        with self._connecting_lock:
            address = self._counted.pop(id(connection), None)
        if address is None:
            return False
        self.uncount(address)
        return True

    def uncount(self, address: str) -> None:
        """One connection of ``address`` no longer waits for its association request."""
        with self._connecting_lock:
            self._connecting[address] -= 1
            if self._connecting[address] <= 0:
                del self._connecting[address]

    def _secure(self, request: socket.socket, address: str) -> socket.socket | None:
        """The TLS connection (plain: ``request``); None if the handshake failed."""
        context = self.ssl_context
        if context is None:
            return request
        try:
            connection = context.wrap_socket(request, server_side=True,
                                             do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            log.info("connection from %s closed before the TLS handshake: %s", address, exc)
            self.shutdown_request(request)
            return None
        try:
            connection.settimeout(self.ae.acse_timeout)
            connection.do_handshake()
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError, TimeoutError) as exc:
            log.info("TLS connection from %s closed during the handshake: %s", address,
                     type(exc).__name__)
            self.shutdown_request(connection)
            return None
        except (OSError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else exc
            log.warning("TLS handshake with %s failed: %s", address, reason)
            self._refused(TLS_HANDSHAKE)
            self.shutdown_request(connection)
            return None
        return connection

    def _refused(self, reason: str) -> None:
        if self.on_refused is not None:
            try:
                self.on_refused(reason)
            except Exception:  # counting must never break the listener
                log.exception("cannot count a refused connection")


class Scp:
    """The node's SCP: one AE, its plain and TLS listeners, and its policy.

    Attributes
    ----------
    ae : pynetdicom.AE
        The Application Entity both listeners serve.
    policy : AssociationPolicy
        Who may associate.
    listeners : dict[str, DicomServer]
        ``plain`` and/or ``tls``.
    """

    def __init__(self, ae: AE, policy: AssociationPolicy,
                 listeners: dict[str, DicomServer]) -> None:
        self.ae = ae
        self.policy = policy
        self.listeners = listeners

    @property
    def active_associations(self) -> list[Any]:
        """The associations peers hold with either listener (being negotiated or established)."""
        return [a for server in self.listeners.values() for a in server.active_associations]

    @property
    def is_listening(self) -> bool:
        """True if every listener accepts connections."""
        return bool(self.listeners) and all(s.is_listening for s in self.listeners.values())

    def describe(self) -> str:
        """E.g. ``plain 0.0.0.0:11112, TLS 0.0.0.0:2762`` (for logs and ``/readyz``)."""
        names = {"plain": "plain", "tls": "TLS"}
        parts = []
        for name, server in self.listeners.items():
            host, port = server.server_address[:2]
            parts.append(f"{names.get(name, name)} {host}:{port}")
        return ", ".join(parts)

    def shutdown(self) -> None:
        """Stop accepting on every listener (associations in flight go on)."""
        for server in self.listeners.values():
            if server.is_listening:
                server.shutdown()

    def drain(self, timeout_s: float) -> None:
        """Stop accepting, let established associations finish, abort them after ``timeout_s``.

        Connections that never completed association negotiation do not hold
        the drain (a port probe, a peer that sends nothing): they are aborted.
        Whatever an aborted association had stored and acknowledged is on
        disk and recorded.
        """
        self.shutdown()  # stops accepting and closes the listening sockets
        deadline = time.monotonic() + timeout_s
        while (any(a.is_established for a in self.active_associations)
               and time.monotonic() < deadline):
            time.sleep(0.1)
        for assoc in self.active_associations:
            if assoc.is_established:
                log.warning("drain timeout: aborting association with AE %s",
                            printable(assoc.requestor.ae_title, 16))
            assoc.abort()


def scp_handlers(context: StoreContext, policy: AssociationPolicy) -> list[Any]:
    """The SCP's pynetdicom event handlers (``evt_handlers`` of ``AE.make_server``).

    Parameters
    ----------
    context : StoreContext
        Where instances go and associations are recorded.
    policy : AssociationPolicy
        Decides on each association request (``EVT_REQUESTED``).
    """
    return [
        (evt.EVT_CONN_OPEN, set_tcp_nodelay),
        (evt.EVT_CONN_OPEN, read_pdata_directly),  # after set_tcp_nodelay: its socket
        (evt.EVT_CONN_OPEN, wake_on_events),
        (evt.EVT_CONN_OPEN, serve_stores_inline),  # after wake_on_events: keeps its wake-up
        (evt.EVT_CONN_OPEN, read_store_commands),
        (evt.EVT_CONN_CLOSE, release_waits),
        (evt.EVT_REQUESTED, policy.handle_requested),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [context]),
        (evt.EVT_N_EVENT_REPORT, handle_event_report, [commitment_callback(context)]),
        (evt.EVT_ACCEPTED, handle_accepted, [context]),
        (evt.EVT_ACCEPTED, answer_successes_directly),
        (evt.EVT_REJECTED, handle_rejected, [context]),
        (evt.EVT_ACSE_RECV, handle_release_requested, [context]),  # before the RP
        (evt.EVT_RELEASED, handle_released, [context]),
        (evt.EVT_ABORTED, handle_aborted, [context]),
    ]


def listener_ports(settings: DicomSettings, ssl_context: ssl.SSLContext | None
                   ) -> list[tuple[str, int, ssl.SSLContext | None]]:
    """``(name, port, SSL context)`` of each listener: ``plain`` and/or ``tls``."""
    ports: list[tuple[str, int, ssl.SSLContext | None]] = []
    if settings.port is not None:
        ports.append(("plain", settings.port, None))
    if settings.tls is not None:
        ports.append(("tls", settings.tls.port, ssl_context))
    return ports


def open_listeners(scp: Scp, settings: DicomSettings, server_class: type[DicomServer], *,
                   evt_handlers: list[Any], ssl_context: ssl.SSLContext | None,
                   **kwargs: Any) -> None:
    """Bind ``dicom.port`` and/or ``dicom.tls.port`` and serve each in a thread.

    Each listener is a ``server_class`` made by ``scp.ae.make_server`` with
    ``listener="plain"`` or ``"tls"`` and ``kwargs``; it goes into
    ``scp.listeners``. ``ssl_context`` is given to the TLS listener only.

    Raises
    ------
    OSError
        If a port cannot be bound; the listeners already open are shut down.
    """
    try:
        for name, port, tls in listener_ports(settings, ssl_context):
            server = cast(DicomServer, scp.ae.make_server(
                (settings.host, port), ssl_context=tls, evt_handlers=evt_handlers,
                server_class=server_class, listener=name, **kwargs))
            thread = threading.Thread(target=server.serve_forever, daemon=True,
                                      name=f"AcceptorServer-{name}-{port}")
            thread.start()
            # As AE.start_server does: AE.shutdown() and server.shutdown() use this list.
            scp.ae._servers.append(server)
            scp.listeners[name] = server
    except BaseException:
        scp.shutdown()
        raise


def start_scp(settings: DicomSettings, context: StoreContext) -> Scp:
    """Start the plain and/or TLS listeners on ``settings.host`` in background threads.

    Parameters
    ----------
    settings : DicomSettings
        AE titles, policy, listeners, limits and timeouts.
    context : StoreContext
        Where instances go and associations are recorded.

    Returns
    -------
    Scp
        Call ``shutdown()`` on it to stop accepting.

    Raises
    ------
    OSError
        If a port cannot be bound (in use, no permission).
    service.errors.ConfigError
        If the TLS certificate, key or CA file cannot be used.
    """
    ae = build_ae(settings)
    policy = open_policy(settings)
    handlers = scp_handlers(context, policy)
    ssl_context = server_context(settings.tls) if settings.tls is not None else None
    recorder = context.associations
    on_refused = recorder.refused if recorder is not None else None
    scp = Scp(ae, policy, {})
    open_listeners(scp, settings, DicomServer, evt_handlers=handlers, ssl_context=ssl_context,
                   policy=policy, on_refused=on_refused)
    log_listening(scp, settings)
    return scp


def open_policy(settings: DicomSettings) -> AssociationPolicy:
    """The association policy of ``settings``; warns if any peer may associate."""
    policy = AssociationPolicy(settings)
    if policy.is_open:
        log.warning("dicom.aes is not set: any peer may associate with any Called AE Title "
                    "and store; list the node's AE titles, callers and addresses in "
                    "dicom.aes to restrict that")
    return policy


def log_listening(scp: Scp, settings: DicomSettings) -> None:
    """Log the AE titles and listeners of a started SCP."""
    titles = ", ".join(scp.policy.ae_titles) or f"{settings.ae_title} (and any other)"
    log.info("SCP AE %s listening: %s", titles, scp.describe())

