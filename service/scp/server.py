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
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from service.config import DicomSettings
from service.delivery.commitment import (
    STORAGE_COMMITMENT_PUSH_MODEL,
    CommitmentReport,
    handle_event_report,
    report_recorder,
)
from service.dicom.net import set_tcp_nodelay
from service.scp.handlers import (
    StoreContext,
    handle_aborted,
    handle_accepted,
    handle_echo,
    handle_rejected,
    handle_released,
    handle_store,
)

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
    ae = AE(ae_title=settings.ae_title)
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


def start_scp(settings: DicomSettings, context: StoreContext) -> ThreadedAssociationServer:
    """Start listening on ``settings.host:settings.port`` in background threads.

    Returns
    -------
    pynetdicom.transport.ThreadedAssociationServer
        Call ``shutdown()`` on it to stop.

    Raises
    ------
    OSError
        If the port cannot be bound (in use, no permission).
    """
    ae = build_ae(settings)
    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, set_tcp_nodelay),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [context]),
        (evt.EVT_N_EVENT_REPORT, handle_event_report, [commitment_callback(context)]),
        (evt.EVT_ACCEPTED, handle_accepted, [context]),
        (evt.EVT_REJECTED, handle_rejected, [context]),
        (evt.EVT_RELEASED, handle_released, [context]),
        (evt.EVT_ABORTED, handle_aborted, [context]),
    ]
    server = ae.start_server(
        (settings.host, settings.port), block=False, evt_handlers=handlers
    )
    log.info("SCP %s listening on %s:%d", settings.ae_title, settings.host, settings.port)
    assert server is not None
    return server
