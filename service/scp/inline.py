"""Serve each C-STORE request in the thread that received it, not by a hand-off to another.

pynetdicom (3.0) runs two threads per association. The DUL thread reads
the PDUs and, in ``DIMSEServiceProvider.receive_primitive``, decodes them
into a DIMSE message, which it puts on ``dimse.msg_queue``. The association
thread takes the message from that queue and runs the service class
(``Association._serve_request``), whose response goes back to the DUL
thread's queue to be sent. A C-STORE thus passes between the two threads
twice, and each pass is a wake-up of a sleeping thread and a hand-over of
Python's GIL: on this project's 2-core test machine ~70 ``futex`` calls per
instance.

:class:`MessageQueue` takes the place of ``dimse.msg_queue`` on the SCP's
associations (:func:`serve_stores_inline`, an ``EVT_CONN_OPEN`` handler).
When the DUL thread puts a C-STORE request on it while the association
thread has nothing queued or in hand, it serves the request there and then:
the Storage service class's ``SCP`` (the ``EVT_C_STORE`` handler and the
response, DICOM PS3.4 B.2.3), as ``Association._serve_request`` would. The
DUL thread's next turn sends the response. Every other message, and a
C-STORE that arrives while another message waits or is served, goes on the
queue as before, so requests are still answered in the order they came.

Nothing else changes: the peer waits for each response (radnode accepts
one outstanding operation per association, the default of PS3.7 D.3.3.3),
and while the handler runs the DUL thread would otherwise only wait for
the next PDU, which the peer sends after the response. pynetdicom itself
serves N-EVENT-REPORT requests outside the association thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from service.scp.responses import send_store_success
from service.scp.wakeups import association_wakeup

log = logging.getLogger("radnode.scp")
#: pynetdicom's logger, where its service classes log a handler's exception.
pynetdicom_log = logging.getLogger("pynetdicom")


class MessageQueue(queue.Queue):  # type: ignore[type-arg]
    """An SCP association's DIMSE message queue that serves C-STORE requests when they arrive.

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        The association (acceptor) whose ``dimse.msg_queue`` this becomes.
    notify : callable
        Called with no argument after an item is queued (the association
        thread's wake-up, :mod:`service.scp.wakeups`); must not block.

    Attributes
    ----------
    served_inline : int
        C-STORE requests served by the receiving thread.
    """

    def __init__(self, assoc: Any, notify: Callable[[], None]) -> None:
        super().__init__()
        self._assoc = assoc
        self._notify = notify
        #: True from the association thread's taking a message until its next look finds
        #: none: a message it took may still be being served.
        self._taken = False
        self.served_inline = 0

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Take a message (see :meth:`queue.Queue.get`); remember whether one was taken."""
        try:
            item = super().get(block, timeout)
        except queue.Empty:
            self._taken = False
            raise
        self._taken = True
        return item

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Serve ``item`` now if it is a C-STORE request that may be; else queue it.

        Parameters
        ----------
        item : tuple of (int, DIMSE primitive)
            The presentation context ID and the decoded message, as
            ``DIMSEServiceProvider.receive_primitive`` queues them.
        block, timeout
            As for :meth:`queue.Queue.put` (the queue has no size limit).
        """
        service = self._inline_service(item)
        if service is None:
            super().put(item, block, timeout)
            self._notify()
            return
        context_id, message = item
        self._serve(service, message, context_id)

    def _inline_service(self, item: Any) -> StorageServiceClass | None:
        """The Storage service class to serve ``item`` with now, else None (queue it)."""
        try:
            context_id, message = item
        except (TypeError, ValueError):
            return None
        assoc = self._assoc
        if (not isinstance(message, C_STORE) or not message.is_valid_request
                or threading.current_thread() is not assoc.dul
                or assoc._sent_release or not assoc.is_established
                or context_id not in assoc._accepted_cx):
            return None
        with self.mutex:  # only this thread puts: nothing can be queued after this look
            if self.queue or self._taken:
                return None
        class_uid = message.AffectedSOPClassUID
        class_uid = assoc.acceptor.accepted_common_extended.get(class_uid, (class_uid,))[0]
        service = uid_to_service_class(class_uid)(assoc)
        return service if isinstance(service, StorageServiceClass) else None

    def _serve(self, service: StorageServiceClass, message: C_STORE, context_id: int) -> None:
        """Serve the request as ``Association._serve_request`` would, in this thread."""
        assoc = self._assoc
        dimse = assoc.dimse
        dimse.cancel_req = {}
        try:
            store_scp(service, message, assoc._accepted_cx[context_id])
        except Exception as exc:  # noqa: BLE001 (pynetdicom's _serve_request aborts too)
            # The handler's own exceptions are answered 0xC211 by store_scp; this is
            # pynetdicom failing. The blocking abort would wait for this very thread.
            log.error("C-STORE could not be served (%s): aborting the association",
                      type(exc).__name__)
            assoc._abort_nonblocking()
        finally:
            dimse.cancel_req = {}
        self.served_inline += 1


def store_scp(service: StorageServiceClass, request: C_STORE, context: Any) -> None:
    """``StorageServiceClass.SCP``, a plain Success answered without building its primitive.

    The same steps and statuses as pynetdicom 3.0's (DICOM PS3.4 B.2.3):
    the ``EVT_C_STORE`` handler is called; an exception in it is logged and
    answered 0xC211; the received file is closed and deleted if still there;
    nothing is sent once the association is no longer established; the
    handler's status is validated and sent. A handler's ``int`` 0x0000 is
    sent by :func:`service.scp.responses.send_store_success`, without the
    ``C_STORE`` response primitive whose UIDs pynetdicom validates again as
    it copies them from the request; every other answer is built and sent
    as pynetdicom does.

    Parameters
    ----------
    service : pynetdicom.service_class.StorageServiceClass
        The service class of the association.
    request : pynetdicom.dimse_primitives.C_STORE
        The C-STORE request.
    context : pynetdicom.presentation.PresentationContext
        Its accepted presentation context.
    """
    assoc: Any = service.assoc
    dimse = service.dimse
    context_id = int(context.context_id)

    def response() -> C_STORE:
        rsp = C_STORE()
        rsp.MessageID = request.MessageID
        rsp.MessageIDBeingRespondedTo = request.MessageID
        rsp.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
        rsp.AffectedSOPClassUID = request.AffectedSOPClassUID
        return rsp

    assoc.abort = assoc._abort_nonblocking  # as pynetdicom's attempt() does around handlers
    try:
        status: Any = evt.trigger(
            assoc, evt.EVT_C_STORE, {"request": request, "context": context.as_tuple})
        received = request._dataset_file
        if received:
            received.close()
            try:
                os.unlink(received.name)
            except OSError:  # the handler renamed it into the spool
                pass
    except Exception as exc:  # noqa: BLE001 (answered as pynetdicom does: 0xC211)
        assoc.abort = assoc._abort_blocking
        pynetdicom_log.error("Exception in handler bound to 'evt.EVT_C_STORE'")
        pynetdicom_log.exception(exc)
        rsp = response()
        rsp.Status = 0xC211
        dimse.send_msg(rsp, context_id)
        return
    assoc.abort = assoc._abort_blocking
    if not assoc.is_established:
        return
    if type(status) is int and status == 0x0000 and send_store_success(
            assoc, context_id, int(cast(int, request.MessageID)), str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID)):
        return
    dimse.send_msg(service.validate_status(status, response()), context_id)


def serve_stores_inline(event: evt.Event) -> None:
    """``EVT_CONN_OPEN``: serve this association's C-STORE requests in its DUL thread.

    Bind after :func:`service.scp.wakeups.wake_on_events`, whose wake-up of
    the association thread the new queue keeps. Replaces the empty
    ``dimse.msg_queue`` (the association's threads start after this event).
    """
    assoc: Any = event.assoc
    if isinstance(assoc.dimse.msg_queue, MessageQueue):
        return
    assoc.dimse.msg_queue = MessageQueue(assoc, association_wakeup(assoc) or _nothing)


def _nothing() -> None:
    """No wake-up: the association thread polls."""
