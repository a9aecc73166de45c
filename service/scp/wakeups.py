"""Wake pynetdicom's two association threads when there is work, instead of on a 1 ms poll.

Every accepted association runs two threads that poll (pynetdicom 3.0):

- the DUL thread (``DULServiceProvider.run_reactor``) checks the socket and
  the queue of primitives to send, and sleeps ``_run_loop_delay`` (1 ms)
  whenever a turn found nothing;
- the association thread (``Association._run_reactor``) sleeps 1 ms before
  each look at the DIMSE message queue.

A C-STORE waits on up to three of those sleeps: the DUL noticing the
request's first PDU, the association thread noticing the complete message,
and the DUL noticing the response to send. On this project's 2-core test
machine a ``time.sleep(0.001)`` lasts 1.06–1.1 ms; per small instance the
polls cost ~1.5 ms of the ~6 ms the peer waits.

:func:`install` puts :class:`WakeableTime` in place of the ``time`` module in
``pynetdicom.dul`` and ``pynetdicom.association``. Its ``sleep`` is
``time.sleep`` for every thread except the two of an association that
:func:`wake_on_events` (an ``EVT_CONN_OPEN`` handler) has prepared, for
which it becomes a wait with the same timeout that ends early when there is
work:

- the DUL thread waits in ``select`` on the association's socket and on a
  socket pair that is written whenever a primitive is queued for it to send;
- the association thread waits on a :class:`threading.Event` set whenever a
  complete DIMSE message or an A-RELEASE/A-ABORT is queued for it.

pynetdicom's state machine, its queues' contents and its timeouts are
unchanged: each loop still runs the same checks in the same order. The DUL
thread's turns come at worst after the same 1 ms; an established
association thread's at worst after :data:`ASSOCIATION_IDLE_WAIT` (50 ms),
since everything it serves wakes it and its timers (network timeout, the
DUL thread's end) need no millisecond. No CPU is spent spinning (shorter
polls were tried and dropped, see ``benchmarks/README.md``).
"""

from __future__ import annotations

import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import pynetdicom.association as pynetdicom_association
import pynetdicom.dul as pynetdicom_dul
from pynetdicom import evt

#: The attribute on a pynetdicom thread object (a DUL or an Association) that holds its wait.
_WAIT = "_radnode_wait"


class SignallingQueue(queue.Queue):  # type: ignore[type-arg]
    """A :class:`queue.Queue` that calls ``notify()`` after every ``put``.

    Parameters
    ----------
    notify : callable
        Called with no argument once the item is in the queue; it must not block.
    """

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Queue ``item`` (see :meth:`queue.Queue.put`), then notify the waiting thread."""
        super().put(item, block, timeout)
        self._notify()


class WakeableTime:
    """Stands in for the ``time`` module inside pynetdicom's DUL and association modules.

    Every name is the ``time`` module's, except :meth:`sleep`.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        """Sleep ``seconds``, or less when the calling association thread gets work.

        Parameters
        ----------
        seconds : float
            The longest wait, in seconds; the wait of a thread that
            :func:`wake_on_events` did not prepare is ``time.sleep(seconds)``.
        """
        wait = getattr(threading.current_thread(), _WAIT, None)
        if wait is None:
            time.sleep(seconds)
        else:
            wait(seconds)


class _DulWait:
    """The DUL thread's wait: its socket readable, or a primitive queued to send."""

    def __init__(self, dul: Any) -> None:
        self.dul = dul
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)

    def notify(self) -> None:
        if threading.current_thread() is self.dul:
            return  # queued by the DUL thread itself: its next turn looks at the queue
        try:
            self.writer.send(b"\x00")
        except OSError:  # closed (association over), or already full: a wake-up is pending
            pass

    def __call__(self, seconds: float) -> None:
        dul = self.dul
        if dul.to_provider_queue.qsize():
            return
        transport = dul.socket
        peer = transport.socket if transport is not None else None
        watched: list[Any] = [self.reader]
        if peer is not None and getattr(transport, "_is_connected", False):
            if isinstance(peer, ssl.SSLSocket) and peer.pending():
                return  # decrypted bytes already buffered; select would not see them
            watched.append(peer)
        try:
            ready, _, _ = select.select(watched, [], [], seconds)
        except (OSError, ValueError):  # a socket closed under us: pynetdicom's next turn sees it
            time.sleep(seconds)
            return
        if self.reader in ready:
            try:
                while self.reader.recv(4096):
                    pass
            except OSError:  # drained (BlockingIOError) or closed
                pass

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


#: The sleep of pynetdicom's ``Association._run_reactor`` loop (seconds).
_REACTOR_SLEEP = 0.001
#: The longest wait of an established association's thread between its turns (seconds).
#: DIMSE messages, A-RELEASE and A-ABORT wake it at once; what it also checks each turn
#: needs no millisecond: whether the DUL thread still runs, the network timeout, a
#: request to pause the reactor. Most C-STOREs are served by the DUL thread
#: (:mod:`service.scp.inline`), so a 1 ms turn only took the GIL from the thread working.
ASSOCIATION_IDLE_WAIT = 0.05


class _AssociationWait:
    """The association thread's wait: a complete DIMSE message, or an ACSE primitive."""

    def __init__(self, assoc: Any) -> None:
        self.assoc = assoc
        self.work = threading.Event()

    def __call__(self, seconds: float) -> None:
        assoc = self.assoc
        if assoc.dimse.msg_queue.qsize():  # one message per turn: a second one is ready now
            return
        if seconds == _REACTOR_SLEEP and assoc.is_established and not assoc._kill:
            # The reactor loop's own sleep, while the association runs: everything it
            # waits for sets the event, so only its timers need a turn now and then.
            seconds = ASSOCIATION_IDLE_WAIT
        # Cleared after the wait: anything queued before the clear is found by the checks
        # that follow this sleep in pynetdicom's loop, anything after it sets the event again.
        if self.work.wait(seconds):
            self.work.clear()


def wake_on_events(event: evt.Event) -> None:
    """``EVT_CONN_OPEN``: let this association's two threads wait for work, not poll.

    Replaces the DUL's ``to_provider_queue`` and ``to_user_queue`` and the
    DIMSE provider's ``msg_queue`` (all empty this early: the threads start
    after this event) with :class:`SignallingQueue` objects and gives both
    threads a wait that :class:`WakeableTime` calls. Without :func:`install`
    the waits are never called and the association polls as pynetdicom does.
    """
    assoc: Any = event.assoc
    dul = assoc.dul
    if getattr(dul, _WAIT, None) is not None:
        return
    dul_wait = _DulWait(dul)
    assoc_wait = _AssociationWait(assoc)
    dul.to_provider_queue = SignallingQueue(dul_wait.notify)
    dul.to_user_queue = SignallingQueue(assoc_wait.work.set)
    assoc.dimse.msg_queue = SignallingQueue(assoc_wait.work.set)
    setattr(dul, _WAIT, dul_wait)
    setattr(assoc, _WAIT, assoc_wait)


def association_wakeup(assoc: Any) -> Callable[[], None] | None:
    """What wakes ``assoc``'s association thread (set by :func:`wake_on_events`), else None."""
    wait = getattr(assoc, _WAIT, None)
    return wait.work.set if isinstance(wait, _AssociationWait) else None


def release_waits(event: evt.Event) -> None:
    """``EVT_CONN_CLOSE``: close the socket pair of this association's DUL wait.

    A closed pair is harmless to a thread still in its loop: a wake-up is
    dropped, and a wait falls back to ``time.sleep``.
    """
    dul_wait = getattr(event.assoc.dul, _WAIT, None)
    if isinstance(dul_wait, _DulWait):
        dul_wait.close()


_MODULES = (pynetdicom_dul, pynetdicom_association)
_lock = threading.Lock()
_installs = 0


def install() -> None:
    """Put :class:`WakeableTime` in place of ``time`` in pynetdicom's DUL and association modules.

    Counted: every call needs its :func:`uninstall`; the last one restores ``time``.
    """
    global _installs
    with _lock:
        _installs += 1
        for module in _MODULES:
            setattr(module, "time", WakeableTime())  # noqa: B010 (mypy: pynetdicom does not re-export time)


def uninstall() -> None:
    """Undo one :func:`install`; the last restores the ``time`` module in both modules."""
    global _installs
    with _lock:
        _installs = max(0, _installs - 1)
        if _installs == 0:
            for module in _MODULES:
                setattr(module, "time", time)  # noqa: B010
