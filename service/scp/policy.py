"""Who may associate with the node: Called and Calling AE Titles, peer addresses, caps.

The policy comes from ``dicom.aes`` (the node's AE titles, and for each the
Calling AE Titles and peer addresses allowed to call it) and
``dicom.max_associations_per_peer``. A refused association request gets an
A-ASSOCIATE-RJ (DICOM PS3.8 9.3.4, Table 9-21) with:

* ``called-ae-title-not-recognized``: the Called AE Title is not in
  ``dicom.aes``: result 1, source 1, diagnostic 7;
* ``calling-ae-title-not-recognized``: the Calling AE Title may not call that
  AE title: result 1, source 1, diagnostic 3;
* ``peer-address-not-allowed``: the peer's IP address may not call that AE
  title: result 1, source 1, diagnostic 1;
* ``peer-association-limit``: the peer (IP address) already holds
  ``max_associations_per_peer`` associations: result 2, source 3, diagnostic 2;
* ``association-limit``: the node already holds ``max_associations`` (this
  check is pynetdicom's own): result 2, source 3, diagnostic 2.

Result 1 is rejected-permanent, 2 rejected-transient; source 1 is the DICOM
UL service-user, 3 the service-provider (presentation related function);
diagnostic 7 is called-AE-title-not-recognized, 3 calling-AE-title-not-
recognized, 1 no-reason-given (Table 9-21 has no reason for a peer address,
so an address refusal gives none), and with source 3, 2 is
local-limit-exceeded. The checks run in that order; the first that fails
decides.

How it hooks into pynetdicom
----------------------------
pynetdicom 3 calls the ``EVT_REQUESTED`` handlers after it received the
A-ASSOCIATE-RQ and before its own negotiation, and skips the negotiation if
a handler rejected the request (``Association.run_reactor``: "User used
EVT_REQUESTED to send an A-ABORT or A-ASSOCIATE-RJ"). :meth:`AssociationPolicy.
handle_requested` is that handler: for a refusal it does what pynetdicom's
own ACSE does for its rejections (``ACSE._negotiate_as_acceptor``): send the
A-ASSOCIATE-RJ, trigger ``EVT_REJECTED`` (with ``reason`` and ``detail``
attributes on the event) and kill the association, which stops its DUL
thread once the connection is closed. pynetdicom's ``require_called_aet`` and
``require_calling_aet`` are not used: they know one Called AE Title and one
list of callers for the whole AE, not per AE title, and nothing of addresses.
No pynetdicom code is replaced or patched.

A handler error fails closed: the request is rejected (no reason given) and
the error logged.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt

from service.config import AePolicy, DicomSettings
from service.dicom.uids import printable

log = logging.getLogger("radnode.scp")

# A-ASSOCIATE-RJ fields (DICOM PS3.8 Table 9-21).
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
SOURCE_SERVICE_USER = 0x01
SOURCE_PROVIDER_ACSE = 0x02
SOURCE_PROVIDER_PRESENTATION = 0x03
NO_REASON_GIVEN = 0x01
CALLING_AE_NOT_RECOGNIZED = 0x03
CALLED_AE_NOT_RECOGNIZED = 0x07
LOCAL_LIMIT_EXCEEDED = 0x02

#: Reasons (label values of ``radnode_associations_rejected_total``).
CALLED_AE = "called-ae-title-not-recognized"
CALLING_AE = "calling-ae-title-not-recognized"
PEER_ADDRESS = "peer-address-not-allowed"
PEER_LIMIT = "peer-association-limit"
NODE_LIMIT = "association-limit"
#: Refused before any association request: too many connections of one peer
#: that have not sent one yet (``max_associations_per_peer``).
PEER_CONNECTIONS = "peer-connection-limit"
#: Refused before any association request: the TLS handshake failed
#: (protocol version, no or untrusted client certificate...).
TLS_HANDSHAKE = "tls-handshake-failed"
#: The policy itself failed (a bug): the request was rejected, fail closed.
POLICY_ERROR = "policy-error"
#: A rejection by pynetdicom for another reason (e.g. user identity).
OTHER = "other"
REJECTION_REASONS = (CALLED_AE, CALLING_AE, PEER_ADDRESS, PEER_LIMIT, NODE_LIMIT,
                     PEER_CONNECTIONS, TLS_HANDSHAKE, POLICY_ERROR, OTHER)


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ to send (DICOM PS3.8 Table 9-21), and why.

    Attributes
    ----------
    result, source, diagnostic : int
        The fields of the A-ASSOCIATE-RJ PDU.
    reason : str
        One of :data:`REJECTION_REASONS`.
    detail : str
        For the log: AE titles and addresses only.
    """

    result: int
    source: int
    diagnostic: int
    reason: str
    detail: str


def reason_of(result: int | None, source: int | None, diagnostic: int | None) -> str:
    """The reason label of an A-ASSOCIATE-RJ that pynetdicom sent on its own.

    Parameters
    ----------
    result, source, diagnostic : int or None
        The fields of the A-ASSOCIATE-RJ (DICOM PS3.8 Table 9-21).

    Returns
    -------
    str
        :data:`CALLED_AE`, :data:`CALLING_AE`, :data:`NODE_LIMIT` or :data:`OTHER`.
    """
    if source == SOURCE_SERVICE_USER and diagnostic == CALLED_AE_NOT_RECOGNIZED:
        return CALLED_AE
    if source == SOURCE_SERVICE_USER and diagnostic == CALLING_AE_NOT_RECOGNIZED:
        return CALLING_AE
    if (result == REJECTED_TRANSIENT and source == SOURCE_PROVIDER_PRESENTATION
            and diagnostic == LOCAL_LIMIT_EXCEEDED):
        return NODE_LIMIT
    return OTHER


def peer_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's IP address (IPv4-mapped IPv6 as IPv4), None if it is not one."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class _Entry:
    ae_title: str
    callers: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


class AssociationPolicy:
    """Decides, per association request, whether the node accepts it.

    Parameters
    ----------
    settings : DicomSettings
        ``aes``, ``ae_title_case_sensitive`` and ``max_associations_per_peer``.

    Notes
    -----
    With ``aes`` empty the policy is open (any Called and Calling AE Title,
    any address); ``max_associations_per_peer`` applies either way.
    """

    def __init__(self, settings: DicomSettings) -> None:
        self._settings = settings
        self._entries = {settings.ae_key(a.ae_title): self._entry(a) for a in settings.aes}
        self.max_per_peer = settings.max_associations_per_peer
        self._lock = threading.Lock()
        #: Associations admitted per peer address, pruned at each request.
        self._admitted: dict[str, list[Any]] = {}
        #: With several SCP processes (:mod:`service.scp.pool`): how many
        #: connections of an association's peer other processes hold; they
        #: count against ``max_associations_per_peer`` too.
        self.elsewhere: Callable[[Any], int] | None = None
        #: With several SCP processes: how many connections (all peers) other
        #: processes hold; with this process's associations they count against
        #: ``max_associations``, which the policy then checks node-wide (last).
        self.elsewhere_all: Callable[[Any], int] | None = None
        self.max_associations = settings.max_associations

    def _entry(self, policy: AePolicy) -> _Entry:
        return _Entry(policy.ae_title,
                      frozenset(self._settings.ae_key(t) for t in policy.calling_ae_titles),
                      tuple(ipaddress.ip_network(n) for n in policy.peer_addresses))

    @property
    def is_open(self) -> bool:
        """True if any peer may call any AE title (``dicom.aes`` is empty)."""
        return not self._entries

    @property
    def ae_titles(self) -> list[str]:
        """The AE titles the node answers to (empty: any)."""
        return [e.ae_title for e in self._entries.values()]

    def check(self, called_ae: str, calling_ae: str, address: str) -> Rejection | None:
        """Check the AE titles and the address of a request (not the caps).

        Parameters
        ----------
        called_ae, calling_ae : str
            The Called and Calling AE Titles of the A-ASSOCIATE-RQ.
        address : str
            The peer's IP address.

        Returns
        -------
        Rejection or None
            None if the request may go on.
        """
        if self.is_open:
            return None
        called = printable(called_ae, 16).strip()
        calling = printable(calling_ae, 16).strip()
        entry = self._entries.get(self._settings.ae_key(called_ae))
        if entry is None:
            return Rejection(REJECTED_PERMANENT, SOURCE_SERVICE_USER, CALLED_AE_NOT_RECOGNIZED,
                             CALLED_AE, f"the node is not AE {called!r}")
        if entry.callers and self._settings.ae_key(calling_ae) not in entry.callers:
            return Rejection(REJECTED_PERMANENT, SOURCE_SERVICE_USER, CALLING_AE_NOT_RECOGNIZED,
                             CALLING_AE, f"AE {calling!r} may not call {entry.ae_title}")
        if entry.networks:
            ip = peer_ip(address)
            if ip is None or not any(ip in network for network in entry.networks):
                return Rejection(REJECTED_PERMANENT, SOURCE_SERVICE_USER, NO_REASON_GIVEN,
                                 PEER_ADDRESS,
                                 f"address {printable(address, 64)} may not call "
                                 f"{entry.ae_title}")
        return None

    def admit(self, assoc: Any) -> Rejection | None:
        """Check a request and, if accepted, count it against its peer's cap.

        Parameters
        ----------
        assoc : pynetdicom.association.Association
            An acceptor whose A-ASSOCIATE-RQ has arrived (``EVT_REQUESTED``).

        Returns
        -------
        Rejection or None
            None if the association may be negotiated.
        """
        request = assoc.requestor.primitive
        address = str(assoc.requestor.address)
        refused = self.check(str(request.called_ae_title), str(request.calling_ae_title),
                             address)
        if refused is None and self.max_per_peer is not None:
            refused = self._admit_for_peer(assoc, address)
        if refused is None and self.elsewhere_all is not None:
            refused = self._admit_for_node(assoc)
        return refused

    def _admit_for_node(self, assoc: Any) -> Rejection | None:
        """``max_associations`` across SCP processes (pynetdicom checks one process only)."""
        assert self.elsewhere_all is not None
        holds = self.elsewhere_all(assoc) + sum(
            1 for a in assoc.ae.active_associations if a is not assoc)
        if holds < self.max_associations:
            return None
        return Rejection(REJECTED_TRANSIENT, SOURCE_PROVIDER_PRESENTATION, LOCAL_LIMIT_EXCEEDED,
                         NODE_LIMIT, f"the node holds {holds} associations, "
                         "dicom.max_associations")

    def _admit_for_peer(self, assoc: Any, address: str) -> Rejection | None:
        """``max_associations_per_peer``: count ``assoc`` against its peer if there is room."""
        assert self.max_per_peer is not None
        with self._lock:
            for peer in list(self._admitted):
                live = [a for a in self._admitted[peer] if _holds_slot(a)]
                if live:
                    self._admitted[peer] = live
                else:
                    del self._admitted[peer]
            held = self._admitted.setdefault(address, [])
            holds = len(held) + (self.elsewhere(assoc) if self.elsewhere is not None else 0)
            if holds >= self.max_per_peer:
                return Rejection(REJECTED_TRANSIENT, SOURCE_PROVIDER_PRESENTATION,
                                 LOCAL_LIMIT_EXCEEDED, PEER_LIMIT,
                                 f"address {printable(address, 64)} holds {holds} "
                                 f"associations, the most allowed per peer")
            held.append(assoc)
        return None

    def connecting(self, address: str, associations: Iterable[Any]) -> int:
        """How many of ``associations`` from ``address`` have not sent a request yet."""
        return sum(1 for a in associations
                   if a.is_acceptor and a.is_alive() and a.requestor.primitive is None
                   and str(a.requestor.address) == address)

    def handle_requested(self, event: evt.Event) -> None:
        """``EVT_REQUESTED``: reject the request if the policy refuses it.

        Sends the A-ASSOCIATE-RJ, triggers ``EVT_REJECTED`` with ``reason``
        and ``detail`` attributes and stops the association, as pynetdicom's
        ACSE does for its own rejections. An error here rejects the request.
        """
        assoc: Any = event.assoc
        try:
            refusal = self.admit(assoc)
        except Exception:
            log.exception("association policy failed: rejecting the request")
            refusal = Rejection(REJECTED_PERMANENT, SOURCE_SERVICE_USER, NO_REASON_GIVEN,
                                POLICY_ERROR, "the association policy failed")
        if refusal is None:
            return
        assoc.acse.send_reject(refusal.result, refusal.source, refusal.diagnostic)
        evt.trigger(assoc, evt.EVT_REJECTED,
                    {"reason": refusal.reason, "detail": refusal.detail})
        assoc.kill()


def _holds_slot(assoc: Any) -> bool:
    """True while an admitted association counts against its peer's cap."""
    return bool(assoc.is_alive() and not assoc.is_released and not assoc.is_aborted
                and not assoc.is_rejected)
