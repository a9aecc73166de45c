"""Several SCP processes behind the node's listeners: associations on every CPU core.

pynetdicom runs each association in Python threads, so one process serves
all its associations with one core's worth of the GIL: four scanners sending
at once share one core. With ``dicom.processes`` above 1, ``radnode serve``
starts that many SCP child processes (``python -m service.scp.pool``) and
keeps the listening sockets itself:

* the node accepts each connection (plain or TLS port) and passes the
  connected socket to the child that serves the fewest connections, over a
  Unix socket pair (``SCM_RIGHTS``, :func:`socket.send_fds`), then closes its
  own copy. Least-loaded hand-off spreads four scanners over the children
  evenly, which ``SO_REUSEPORT``'s hash of the peer's address and port does
  not (two of four connections land on the same process one time in two);
* each child runs the same pynetdicom AE, handlers and policy as the
  single-process SCP (TLS handshake, C-STORE to the spool and database,
  association records, Storage Commitment reports) and tells the node when
  a connection's peer sent its association request and when it closed;
* limits stay node-wide: the node counts each peer's connections that have
  not requested an association yet (``max_associations_per_peer``) across
  children, and tells the child, with each connection, how many connections
  the other children hold, of the same peer and of all peers. The child's
  policy counts those with its own associations against
  ``max_associations_per_peer`` and ``max_associations`` (pynetdicom's own
  check sees one process only), so a refusal is the same A-ASSOCIATE-RJ as
  with one process. The counts are taken at the hand-off: a connection that
  ends in another child just then still counts (a transient refusal, never
  one association too many);
* the children report their Prometheus counter moves to the node, which
  serves ``/metrics``; rows (instances, associations, audit) they write to
  the database themselves;
* a child that dies is started again (its in-flight associations are lost to
  the peer, which sends again; what it acknowledged is on disk and recorded);
  a node that dies takes its children down, as one process would go: the
  node holds the only other end of each child's channel, so its death is an
  end of file there, and the child aborts its associations and exits (a
  restarted node then never runs beside the old children). On SIGTERM the
  node stops accepting and asks each child to drain: associations in flight
  finish within ``dicom.drain_timeout_s``;
* a connection stops counting for the node's limits when its peer asks for
  the release (``EVT_ACSE_RECV``, before the A-RELEASE-RP goes out), so a
  peer that opens its next association at once finds its slot free.

Messages are JSON objects, one per ``SOCK_SEQPACKET`` datagram.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE

from service.config import DicomSettings, Settings
from service.dicom.tls import server_context
from service.scp.associations import Counters
from service.scp.policy import AssociationPolicy
from service.scp.server import (
    DicomServer,
    Scp,
    build_ae,
    listener_ports,
    log_listening,
    open_listeners,
    open_policy,
)

log = logging.getLogger("radnode.scp")

#: Largest message, bytes (connection hand-offs and counter moves are < 300).
MESSAGE_SIZE = 4096
#: Seconds a child may take to start (imports, database connection).
START_TIMEOUT_S = 60.0
#: Seconds a message may wait for room in a channel before the send fails.
SEND_TIMEOUT_S = 5.0


def share_of(max_associations: int, processes: int) -> int:
    """Associations each of ``processes`` children may hold: ``ceil(max / processes)``."""
    return max(1, math.ceil(max_associations / processes))


def effective_processes(settings: DicomSettings) -> int:
    """``dicom.processes``, with 0 meaning one per CPU core this process may use."""
    if settings.processes > 0:
        return settings.processes
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def bounded_sends(channel: socket.socket, timeout_s: float = SEND_TIMEOUT_S) -> socket.socket:
    """Make a blocking send on ``channel`` fail (``OSError``) after ``timeout_s``.

    ``SO_SNDTIMEO`` bounds sends only: a reader may block in ``recv`` for ever,
    while a process whose peer stopped reading gets an error instead of hanging
    (the node's listener must never wait on a stuck child).
    """
    seconds = int(timeout_s)
    micros = int((timeout_s - seconds) * 1_000_000)
    channel.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, micros))
    return channel


def send_message(channel: socket.socket, message: dict[str, Any],
                 fds: Sequence[int] = ()) -> None:
    """Send one JSON message (and file descriptors) as one datagram."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if fds:
        socket.send_fds(channel, [data], list(fds))
    else:
        channel.send(data)


def receive_message(channel: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """Receive one message; ``(None, [])`` when the other end has closed."""
    data, fds, _flags, _address = socket.recv_fds(channel, MESSAGE_SIZE, 1)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("message is not a JSON object")
    return message, fds


# --------------------------------------------------------------------- the node


@dataclass
class _Connection:
    listener: PoolListener
    address: str
    child: _Child
    #: Still counted in the listener as a connection without an association request.
    counted: bool = True


@dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes] | None = None
    channel: socket.socket | None = None
    ready: threading.Event = field(default_factory=threading.Event)


class PoolListener(DicomServer):
    """A listener of the node that hands each accepted connection to a child.

    :meth:`verify_request` (the per-peer cap of connections without an
    association request) runs here, as in the single-process SCP; the TLS
    handshake and everything after it run in the child.
    """

    def __init__(self, *args: Any, pool: ScpPool, **kwargs: Any) -> None:
        self.pool = pool
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Pass ``request`` (a connected socket) to a child; never raises."""
        self.pool.hand_over(self, request, client_address)


class ScpPool(Scp):
    """The node's listeners and its SCP child processes.

    Parameters
    ----------
    settings : DicomSettings
        Listeners, policy, limits and timeouts.
    config_path : pathlib.Path
        The node's effective settings (YAML), which each child loads.
    processes : int
        How many children.
    counters : Counters, optional
        Where the children's counter moves go (the node's Prometheus metrics).
    """

    def __init__(self, settings: DicomSettings, config_path: Path, processes: int,
                 counters: Counters | None = None) -> None:
        ae = build_ae(settings)
        super().__init__(ae, open_policy(settings), {})
        self.settings = settings
        self.config_path = config_path
        self.counters = counters
        self.children = [_Child(index) for index in range(processes)]
        self._connections: dict[int, _Connection] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    # ---- children

    def start(self) -> None:
        """Start the children, wait until each is ready, then open the listeners.

        Raises
        ------
        OSError
            If a child exits or is not ready within :data:`START_TIMEOUT_S`,
            or a port cannot be bound.
        """
        if self.settings.tls is not None:
            server_context(self.settings.tls)  # a clear error here, not in each child
        for child in self.children:
            self._spawn(child)
        deadline = time.monotonic() + START_TIMEOUT_S
        for child in self.children:
            while not child.ready.wait(0.1):
                process = child.process
                exited = process is not None and process.poll() is not None
                if exited or time.monotonic() > deadline:
                    self.stop_children(0.0)
                    raise OSError(f"SCP process {child.index} did not start (see its log "
                                  "lines above)")
        on_refused = self.counters.rejected if self.counters is not None else None
        try:
            open_listeners(self, self.settings, PoolListener, evt_handlers=[],
                           ssl_context=None, policy=self.policy, on_refused=on_refused,
                           pool=self)
        except BaseException:
            self.stop_children(0.0)  # a port in use: no child is left behind
            raise

    def _spawn(self, child: _Child) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        share = share_of(self.settings.max_associations, len(self.children))
        cmd = [sys.executable, "-m", "service.scp.pool", "--config", str(self.config_path),
               "--fd", str(child_end.fileno()), "--index", str(child.index),
               "--max-associations", str(share)]
        child.ready.clear()
        # Own session: a terminal's Ctrl-C reaches the node only, which drains the children.
        child.process = subprocess.Popen(cmd, pass_fds=[child_end.fileno()],
                                         start_new_session=True)
        child_end.close()
        child.channel = bounded_sends(parent_end)
        threading.Thread(target=self._read, args=(child, parent_end), daemon=True,
                         name=f"scp-child-{child.index}").start()
        log.info("SCP process %d started (pid %d)", child.index, child.process.pid)

    def _read(self, child: _Child, channel: socket.socket) -> None:
        """Apply a child's messages until it exits; then start it again unless stopping."""
        try:
            while True:
                message, fds = receive_message(channel)
                for fd in fds:  # children send none
                    os.close(fd)
                if message is None:
                    break
                self._apply(child, message)
        except (OSError, ValueError) as exc:
            log.error("SCP process %d: broken channel: %s", child.index, exc)
        was_ready = child.ready.is_set()
        with self._lock:
            child.ready.clear()
            child.channel = None
            gone = [cid for cid, c in self._connections.items() if c.child is child]
        for conn_id in gone:
            self._closed(conn_id)
        channel.close()
        process = child.process
        code = process.wait() if process is not None else None
        if self._stopping.is_set() or not was_ready:
            return  # stopping, or it failed to start: start() or is_listening says so
        log.error("SCP process %d exited (%s) with %d connection(s): starting it again",
                  child.index, code, len(gone))
        time.sleep(1.0)
        if not self._stopping.is_set():
            self._spawn(child)

    def _apply(self, child: _Child, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "ready":
            child.ready.set()
        elif kind == "requested":
            self._requested(int(message["id"]))
        elif kind == "closed":
            self._closed(int(message["id"]))
        elif kind == "count" and self.counters is not None:
            method, args = message.get("m"), message.get("a", [])
            if method in ("association", "rejected", "stored") and isinstance(args, list):
                try:
                    getattr(self.counters, method)(*args)
                except (TypeError, ValueError) as exc:
                    log.error("SCP process %d: bad counter message: %s", child.index, exc)

    # ---- connections

    def hand_over(self, listener: PoolListener, request: socket.socket,
                  client_address: Any) -> None:
        """Pass an accepted connection to the least loaded child, then close our copy."""
        address = str(client_address[0])
        with self._lock:
            live = [c for c in self.children if c.channel is not None and c.ready.is_set()]
            conn_id = next(self._ids)
            # The least loaded; among equals, in turn (so that one sender after
            # another also alternates between the processes).
            count = len(self.children)
            loads = self._loads()
            child = min(live or self.children,
                        key=lambda c: (loads[c.index], (c.index - conn_id) % count))
            others = [c for c in self._connections.values() if c.child is not child]
            elsewhere = sum(1 for c in others if c.address == address)
            self._connections[conn_id] = _Connection(listener, address, child)
        channel = child.channel
        try:
            if channel is None:
                raise OSError("no SCP process is running")
            send_message(channel, {"t": "conn", "id": conn_id, "l": listener.listener,
                                   "a": list(client_address), "e": elsewhere,
                                   "n": len(others)},
                         [request.fileno()])
        except OSError as exc:
            log.error("connection from %s closed: cannot pass it to SCP process %d: %s",
                      address, child.index, exc)
            self._closed(conn_id)
        finally:
            request.close()  # the child has its own descriptor; no shutdown() here

    def _requested(self, conn_id: int) -> None:
        with self._lock:
            conn = self._connections.get(conn_id)
            if conn is None or not conn.counted:
                return
            conn.counted = False
        conn.listener.uncount(conn.address)

    def _closed(self, conn_id: int) -> None:
        with self._lock:
            conn = self._connections.pop(conn_id, None)
            if conn is None:
                return
        if conn.counted:
            conn.listener.uncount(conn.address)

    def _loads(self) -> list[int]:
        """Connections each child serves now, by child index (call with the lock held)."""
        loads = [0] * len(self.children)
        for conn in self._connections.values():
            loads[conn.child.index] += 1
        return loads

    def loads(self) -> list[int]:
        """Connections each child serves now (associations and those being made)."""
        with self._lock:
            return self._loads()

    @property
    def connections(self) -> int:
        """Connections the children serve now (associations and those being made)."""
        with self._lock:
            return len(self._connections)

    # ---- Scp

    @property
    def is_listening(self) -> bool:
        """True if every listener accepts connections and every child runs."""
        return super().is_listening and all(
            c.channel is not None and c.ready.is_set() for c in self.children)

    def describe(self) -> str:
        """The listeners and the number of SCP processes."""
        return f"{super().describe()}; {len(self.children)} SCP processes"

    def drain(self, timeout_s: float) -> None:
        """Stop accepting; each child finishes its associations (aborts after ``timeout_s``)."""
        self.shutdown()
        self.stop_children(timeout_s)

    def stop_children(self, timeout_s: float) -> None:
        """Ask every child to drain within ``timeout_s`` and wait; kill one that hangs."""
        self._stopping.set()
        for child in self.children:
            if child.channel is not None:
                try:
                    send_message(child.channel, {"t": "drain", "timeout": timeout_s})
                except OSError:
                    pass
        deadline = time.monotonic() + timeout_s + 10.0
        for child in self.children:
            process = child.process
            if process is None:
                continue
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("SCP process %d did not stop: killing it", child.index)
                process.kill()
                process.wait()


def start_scp_pool(settings: DicomSettings, config_path: Path, processes: int,
                   counters: Counters | None = None) -> ScpPool:
    """Start ``processes`` SCP children and the node's listeners in front of them.

    Parameters
    ----------
    settings : DicomSettings
        Listeners, policy, limits and timeouts.
    config_path : pathlib.Path
        The node's effective settings (YAML), loaded by each child.
    processes : int
        How many children (2 or more makes sense).
    counters : Counters, optional
        The node's Prometheus counters; the children's moves go there.

    Raises
    ------
    OSError
        If a child does not start or a port cannot be bound.
    """
    pool = ScpPool(settings, config_path, processes, counters)
    pool.start()
    log_listening(pool, settings)
    return pool


# -------------------------------------------------------------------- a child


class ParentCounters:
    """:class:`~service.scp.associations.Counters` that moves the node's counters."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel

    def _send(self, method: str, *args: Any) -> None:
        try:
            send_message(self.channel, {"t": "count", "m": method, "a": list(args)})
        except OSError:
            pass  # the node is gone; this child aborts and exits

    def association(self, calling_ae: str, outcome: str) -> None:
        """As :meth:`service.metrics.NodeMetrics.association`."""
        self._send("association", calling_ae, outcome)

    def rejected(self, reason: str) -> None:
        """As :meth:`service.metrics.NodeMetrics.rejected`."""
        self._send("rejected", reason)

    def stored(self, calling_ae: str, status: int, size_bytes: int,
               seconds: float | None = None) -> None:
        """As :meth:`service.metrics.NodeMetrics.stored`."""
        self._send("stored", calling_ae, status, size_bytes, seconds)


class ChildServer(DicomServer):
    """A listener without a socket: serves the connections the node passes to it.

    Parameters
    ----------
    *args, **kwargs
        As :class:`~service.scp.server.DicomServer`.
    channel : socket.socket
        The Unix socket to the node.
    """

    def __init__(self, *args: Any, channel: socket.socket, **kwargs: Any) -> None:
        self.channel = channel
        #: id(socket) -> (connection id, connections of the peer in other children,
        #: connections in other children)
        self._incoming: dict[int, tuple[int, int, int]] = {}
        self._waiting: dict[int, tuple[int, int, int]] = {}
        self._live: dict[int, tuple[int, int, int, Association]] = {}
        self._ids_lock = threading.Lock()
        super().__init__(*args, **kwargs)
        cast(socket.socket, self.socket).close()  # made by TCPServer, never bound
        self.socket = None  # type: ignore[assignment]

    def server_bind(self) -> None:
        """Bind nothing: the node holds the listening socket."""

    def server_activate(self) -> None:
        """Listen on nothing: the node holds the listening socket."""

    def take(self, connection: socket.socket, client_address: tuple[Any, ...], conn_id: int,
             elsewhere: int = 0, elsewhere_all: int = 0) -> None:
        """Serve a connection the node accepted, in its own thread.

        ``elsewhere`` and ``elsewhere_all`` are the connections of the same
        peer, and of all peers, that other children held at the hand-off.
        """
        with self._ids_lock:
            self._incoming[id(connection)] = (conn_id, elsewhere, elsewhere_all)
        self.process_request(connection, client_address)

    def awaiting_association(self, connection: Any, request: Any, address: str) -> None:
        """Remember the node's ids of ``request`` for its association (:meth:`handed_over`)."""
        with self._ids_lock:
            self._waiting[id(connection)] = self._incoming.pop(id(request))

    def connection_done(self, connection: Any, request: Any, address: str) -> None:
        """The connection's thread is done: if it got no association, tell the node it closed."""
        with self._ids_lock:
            if connection is None:  # the TLS handshake failed
                ids = self._incoming.pop(id(request), None)
            else:
                ids = self._waiting.pop(id(connection), None)
        if ids is not None:
            self._report("closed", ids[0])

    def handed_over(self, connection: Any, assoc: Association | None = None) -> bool:
        """The connection's association is made: remember it until it ends.

        The node keeps counting the connection as one without an association
        request until :meth:`requested`.
        """
        with self._ids_lock:
            ids = self._waiting.pop(id(connection), None)
            if ids is None:
                return False
            if assoc is not None:
                self._live[id(assoc)] = (*ids, assoc)
        if assoc is None:  # nothing to follow: the connection is done with
            self._report("closed", ids[0])
        return True

    def requested(self, assoc: Any) -> None:
        """``EVT_REQUESTED``: the peer sent its A-ASSOCIATE-RQ; tell the node."""
        with self._ids_lock:
            live = self._live.get(id(assoc))
        if live is not None:
            self._report("requested", live[0])

    def elsewhere(self, assoc: Any) -> int:
        """Connections of this association's peer that other children held at hand-off."""
        with self._ids_lock:
            live = self._live.get(id(assoc))
        return live[1] if live is not None else 0

    def elsewhere_all(self, assoc: Any) -> int:
        """Connections (all peers) that other children held at this one's hand-off."""
        with self._ids_lock:
            live = self._live.get(id(assoc))
        return live[2] if live is not None else 0

    def ended(self, assoc: Any) -> None:
        """The association ended (or its connection closed): tell the node, once."""
        with self._ids_lock:
            live = self._live.pop(id(assoc), None)
        if live is not None:
            self._report("closed", live[0])

    def reap(self) -> None:
        """Report associations whose thread ended without an event (a safety net)."""
        with self._ids_lock:
            done = [live[3] for live in self._live.values() if not live[3].is_alive()]
        for assoc in done:
            self.ended(assoc)

    def _report(self, kind: str, conn_id: int) -> None:
        try:
            send_message(self.channel, {"t": kind, "id": conn_id})
        except OSError:
            pass  # the node is gone


class _Drain(Exception):
    """SIGTERM in a child: stop taking connections and drain."""


def _raise_drain(_signum: int, _frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the drain is under way
    raise _Drain


def run_child(settings: Settings, channel: socket.socket, index: int,
              max_associations: int) -> int:
    """Serve the connections the node passes over ``channel`` until told to drain.

    Parameters
    ----------
    settings : Settings
        The node's effective settings.
    channel : socket.socket
        ``SOCK_SEQPACKET`` Unix socket to the node.
    index : int
        This child's number (log lines).
    max_associations : int
        This child's share of ``dicom.max_associations`` (``ceil(max / processes)``):
        the least loaded child gets each connection, so it serves about that many;
        its database pool is sized for them.

    Returns
    -------
    int
        The exit status: 0 after a drain.
    """
    from service.db.session import make_engine, make_session_factory
    from service.scp import receive, wakeups
    from service.scp.handlers import StoreContext, begin_structure_check
    from service.scp.server import scp_handlers

    incoming = settings.spool_dir / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(incoming.resolve())  # received data sets: a rename away
    engine = make_engine(settings.database_url, pool_size=max_associations + 2,
                         pool_timeout_s=settings.database.pool_timeout_s)
    factory = make_session_factory(engine)
    counters = ParentCounters(channel)
    context = StoreContext.for_node(settings, factory, counters)
    d = settings.dicom
    ae = build_ae(d)  # maximum_associations: the policy checks it node-wide
    policy = AssociationPolicy(d)
    scp = Scp(ae, policy, {})
    servers: dict[str, ChildServer] = {}

    def _requested(event: evt.Event) -> None:
        for server in servers.values():
            server.requested(event.assoc)

    def _ended(event: evt.Event) -> None:
        for server in servers.values():
            server.ended(event.assoc)

    def _acse(event: evt.Event) -> None:
        primitive: Any = getattr(event, "primitive", None)
        if isinstance(primitive, (A_ABORT, A_P_ABORT)) or (
                isinstance(primitive, A_RELEASE) and primitive.result is None):
            _ended(event)  # released or aborted by the peer: its slot is free

    # The node learns of the request before the policy decides on it.
    handlers = [(evt.EVT_REQUESTED, _requested), *scp_handlers(context, policy)] + [
        (event, _ended) for event in (evt.EVT_RELEASED, evt.EVT_ABORTED, evt.EVT_REJECTED,
                                      evt.EVT_CONN_CLOSE)] + [(evt.EVT_ACSE_RECV, _acse)]
    tls = server_context(d.tls) if d.tls is not None else None
    for name, port, ssl_context in listener_ports(d, tls):
        server = cast(ChildServer, ae.make_server(
            (d.host, port), ssl_context=ssl_context, evt_handlers=handlers,
            server_class=ChildServer, policy=policy, on_refused=counters.rejected,
            listener=name, channel=channel))
        servers[name] = server
        scp.listeners[name] = server
    policy.elsewhere = lambda assoc: sum(s.elsewhere(assoc) for s in servers.values())
    policy.elsewhere_all = lambda assoc: sum(s.elsewhere_all(assoc) for s in servers.values())
    stop = threading.Event()

    def _reaper() -> None:
        while not stop.wait(0.5):
            for server in servers.values():
                server.reap()

    threading.Thread(target=_reaper, daemon=True, name="scp-reaper").start()
    signal.signal(signal.SIGTERM, _raise_drain)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    timeout_s = d.drain_timeout_s
    ready_files = receive.install(incoming, begin=begin_structure_check)  # made ahead
    wakeups.install()  # association threads wait for work instead of polling
    send_message(channel, {"t": "ready"})
    log.info("SCP process %d ready (its share: %d associations)", index, max_associations)
    try:
        while True:
            try:
                message, fds = receive_message(channel)
            except (OSError, ValueError):  # a reset channel: the node died
                message, fds = None, []
            if message is None:
                log.warning("SCP process %d: the node is gone; aborting its associations",
                            index)
                timeout_s = 0.0
                break
            if message.get("t") == "drain":
                timeout_s = float(message.get("timeout", timeout_s))
                break
            if message.get("t") != "conn" or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                continue
            connection = socket.socket(fileno=fds[0])
            target = servers.get(str(message.get("l")))
            if target is None:
                connection.close()
                _report_closed(channel, int(message["id"]))
                continue
            target.take(connection, tuple(message["a"]), int(message["id"]),
                        int(message.get("e", 0)), int(message.get("n", 0)))
    except _Drain:
        log.info("SCP process %d: SIGTERM; draining", index)
    scp.drain(timeout_s)
    receive.uninstall(ready_files)
    wakeups.uninstall()
    stop.set()
    for server in servers.values():
        server.reap()
    context.close()
    engine.dispose()
    log.info("SCP process %d stopped", index)
    return 0


def _report_closed(channel: socket.socket, conn_id: int) -> None:
    try:
        send_message(channel, {"t": "closed", "id": conn_id})
    except OSError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m service.scp.pool``: one SCP child process of ``radnode serve``."""
    parser = argparse.ArgumentParser(prog="python -m service.scp.pool",
                                     description="An SCP process of radnode serve.")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--max-associations", type=int, required=True)
    args = parser.parse_args(argv)
    from service.config import load_settings
    from service.logging import configure

    channel = bounded_sends(socket.socket(fileno=args.fd))
    settings = load_settings(args.config)
    configure(settings.log_level)
    return run_child(settings, channel, args.index, args.max_associations)


if __name__ == "__main__":
    sys.exit(main())
