"""The node: SCP, scheduler loops and (embedded mode) a Celery worker process."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from celery import Celery
from pydicom.filereader import read_file_meta_info
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings, dump_settings
from service.db import migrate, repository
from service.db.models import Delivery
from service.db.session import check_connection, make_engine, make_session_factory, utcnow
from service.delivery.dispatch import Dispatcher
from service.dicom import spool
from service.errors import ConfigError, InvalidInstanceError
from service.metrics import NodeMetrics
from service.queue import broker_probe, describe_broker, make_celery
from service.retention import purge_due
from service.scheduler import Loop, Router, complete_and_route, publish_pending, sweep_jobs
from service.scp import receive, wakeups
from service.scp.durability import StoredMark
from service.scp.handlers import StoreContext, begin_structure_check, read_stored_file
from service.scp.pool import effective_processes, start_scp_pool
from service.scp.server import Scp, start_scp

if TYPE_CHECKING:
    from service.api.server import ApiServer

log = logging.getLogger("radnode.node")


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to send this process SIGTERM when its parent dies (PR_SET_PDEATHSIG).

    Called by an embedded worker at start, so that a node killed outright
    (SIGKILL, OOM) leaves no orphan worker behind. Elsewhere it does nothing.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def remove_interrupted_writes(*folders: Path) -> int:
    """Delete temporary files of writes a crash interrupted; return how many.

    They were never renamed into place, so never acknowledged to a peer
    (the SCP answers Success only after the rename and the database row), or
    never became a broker message (:class:`service.queue.SpoolChannel`: the
    job stays queued in the database and the sweeper publishes it again).
    The SCP's received files (``<spool>/.incoming``) are :func:`recover_incoming`'s.
    """
    removed = 0
    for folder in folders:
        partials = [*folder.rglob(".incoming-*.tmp"), *folder.glob(".writing-*")]
        for partial in partials:
            partial.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.warning("removed %d partial file(s) left by an interrupted write", removed)
    return removed


def recover_incoming(spool_dir: Path, session_factory: sessionmaker[Session]) -> int:
    """Put back into the spool and the database each instance a crash left in ``.incoming``.

    The SCP receives each data set into a file made ahead in
    ``<spool>/.incoming`` (:mod:`service.scp.receive`), whose name is on disk
    before the data set arrives. Before it answers Success it fsyncs the
    file's data, renames it into the spool and commits the instance's row,
    but it does not wait for the rename to reach the disk: after a power
    loss the file can be back under its ``receiving-*`` name. Such a file is
    the instance of a row whose file is missing: same SOP Instance UID (its
    File Meta), same size, series not purged. It is renamed to the row's
    path, the directories fsynced.

    A file marked as stored (:mod:`service.scp.durability`: its row was
    committed without a flush of its own, and the file keeps its received
    name until a batch flush) whose row is missing is recorded again from
    its data set and its mark, and linked at its spool path; one whose row
    is there loses its received name (the spool name stays), or is put back
    as above. A marked file that cannot be read back is kept, renamed
    ``unrecoverable-*``, and the log says so. Every other file there was
    never acknowledged (cut off, refused, a duplicate, or made ahead and
    never used) and is deleted.

    Parameters
    ----------
    spool_dir : pathlib.Path
        The spool; its ``.incoming`` folder is searched.
    session_factory : sessionmaker
        The node's database.

    Returns
    -------
    int
        How many instances were put back (renamed back, or recorded again).

    Raises
    ------
    OSError, sqlalchemy.exc.SQLAlchemyError
        If a file cannot be moved or a row recorded: the start stops, and
        nothing was deleted that a later start would need.
    """
    incoming = spool_dir / ".incoming"
    if not incoming.is_dir():
        return 0
    recovered = partial = 0
    found: list[tuple[int, int, Path]] = []  # (mtime, size, path): the earliest copy first
    for path in incoming.glob("receiving-*"):
        try:
            status = path.stat()
        except FileNotFoundError:
            continue
        found.append((status.st_mtime_ns, status.st_size, path))
    root = spool_dir.resolve()
    with session_factory() as session:
        for _mtime, size, path in sorted(found):
            mark = spool.stored_mark(path) if size else None
            if mark is not None:
                recorded, placed = _recover_marked(path, mark, root, session)
                recovered += recorded
                if placed is None:
                    continue  # recorded again, or kept aside
                if placed.exists() and os.path.samefile(path, placed):
                    spool.sync_directory_chain(placed.parent, root)  # then the spare name goes
                    path.unlink()
                    continue
            target = _recovery_target(path, size, spool_dir, session) if size else None
            if target is not None:  # an OSError here stops the start: nothing is deleted
                target.parent.mkdir(parents=True, exist_ok=True)
                spool.move_into_place(path, target, root=spool_dir)
                log.warning("recovered %s into the spool: its rename was cut off by a crash",
                            target.stem)
                recovered += 1
                continue
            partial += 1 if size else 0
            path.unlink(missing_ok=True)
    if partial:
        log.warning("removed %d received file(s) that were never acknowledged (cut off by a "
                    "stop or crash, or refused)", partial)
    return recovered


def _recover_marked(path: Path, raw_mark: bytes, root: Path,
                    session: Session) -> tuple[int, Path | None]:
    """A marked ``receiving-*`` file: recorded again if its row is missing.

    Returns how many instances it recorded again (0 or 1) and None once the
    file is dealt with (recorded again and linked at its spool path, or kept
    aside as unreadable), or else the spool path of its row, which exists.
    """
    try:
        mark = StoredMark.decode(raw_mark)
        stored, transfer_syntax_uid = read_stored_file(path)
    except (ValueError, InvalidInstanceError) as exc:
        kept = path.with_name("unrecoverable-" + path.name.removeprefix("receiving-"))
        path.rename(kept)
        log.error("a received file marked as stored cannot be read back (%s); kept as %s",
                  exc, kept.name)
        return 0, None
    row = repository.stored_instance(stored.sop_instance_uid, session=session)
    relative = spool.relative_path(stored.study_uid, stored.series_uid,
                                   stored.sop_instance_uid)
    target = root / relative
    if row is not None:
        if row.path != relative and target.exists() and os.path.samefile(path, target):
            target.unlink()  # a duplicate from another series, linked before its row was refused
        return 0, root / row.path
    target.parent.mkdir(parents=True, exist_ok=True)
    if not (target.exists() and os.path.samefile(path, target)):
        spool.link_into_place(path, target)
    repository.record_instance(
        session=session, study_instance_uid=stored.study_uid,
        series_instance_uid=stored.series_uid, sop_instance_uid=stored.sop_instance_uid,
        sop_class_uid=stored.sop_class_uid, transfer_syntax_uid=transfer_syntax_uid,
        modality=stored.modality, path=relative, size_bytes=stored.size_bytes,
        calling_ae_title=mark.calling_ae_title, called_ae_title=mark.called_ae_title,
        peer_address=mark.peer_address, received_at=mark.received_at,
        expected_count=stored.expected_count)
    session.commit()
    spool.sync_directory_chain(target.parent, root)
    path.unlink()
    log.warning("recorded %s (series %s) again from its file: a crash or a power cut lost "
                "its row",
                stored.sop_instance_uid, stored.series_uid)
    return 1, None


def _recovery_target(path: Path, size: int, spool_dir: Path,
                     session: Session) -> Path | None:
    """The spool path a ``receiving-*`` file belongs at, or None if it is no stored instance."""
    try:
        meta = read_file_meta_info(path)
        sop_instance_uid = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    except Exception:  # anything unreadable is no acknowledged instance
        return None
    row = repository.stored_instance(sop_instance_uid, session=session)
    if row is None or row.size_bytes != size or row.series.purged_at is not None:
        return None
    root = spool_dir.resolve()
    target = (root / row.path).resolve()
    if not target.is_relative_to(root) or target.exists():
        return None
    return target


def private_data_dir(data_dir: Path) -> bool:
    """Create ``data_dir`` readable by the service user only (0700); True if created.

    It holds patient data: received instances, results and, with
    de-identifying destinations, the pseudonym mapping. An existing folder
    keeps its mode (an admin may have chosen it), with a warning if others
    can read it.
    """
    if not data_dir.exists():
        data_dir.mkdir(parents=True, mode=0o700)
        data_dir.chmod(0o700)  # mkdir's mode is masked by the umask
        return True
    mode = data_dir.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("data directory %s has mode %o: other users can read patient data in it; "
                    "chmod 700 it", data_dir, mode)
    return False


#: Written into the data directory by the node; a worker on another machine
#: finds it only if the node's shared data directory is mounted there.
DATA_DIR_MARKER = ".radnode-data-dir"


def mark_data_dir(data_dir: Path) -> None:
    """Write :data:`DATA_DIR_MARKER` into ``data_dir`` if it is not there yet."""
    marker = data_dir / DATA_DIR_MARKER
    if not marker.exists():
        marker.write_text("radnode data directory: spool/ and results/ are shared with the "
                          f"workers (written by the node on {socket.gethostname()})\n",
                          encoding="utf-8")


def check_shared_data_dir(data_dir: Path) -> None:
    """Check that ``data_dir`` is the node's data directory (on a worker machine).

    A worker on another machine reads the received instances from
    ``<data_dir>/spool`` and writes SEG/SR into ``<data_dir>/results``, so the
    node's data directory must be mounted there at the same path (NFS or
    any shared file system; deploy/README.md).

    Raises
    ------
    ConfigError
        If the marker file the node writes is not there: the shared file
        system is not mounted, or ``data_dir`` names another folder.
    """
    if not (data_dir / DATA_DIR_MARKER).is_file():
        raise ConfigError(
            f"data_dir {data_dir.resolve()} on this machine is not the node's data directory "
            f"(no {DATA_DIR_MARKER} in it): mount the node's shared data directory at this "
            "same path, or set data_dir to where it is mounted, and start the node at least "
            "once (deploy/README.md, shared data directory)")


class WorkerProcess:
    """A ``radnode worker`` child process, restarted if it dies unexpectedly.

    Parameters
    ----------
    config_path : pathlib.Path or None
        The ``--config`` file of the child; the environment is inherited too.
    queues : list of str
        Celery queues it consumes.
    gpu : str, optional
        GPU index: the child runs ``--gpus <gpu>`` (one process, pinned with
        ``CUDA_VISIBLE_DEVICES``).
    name : str
        Used in log lines.
    """

    def __init__(self, config_path: Path | None, queues: list[str], *, gpu: str | None = None,
                 name: str = "embedded worker") -> None:
        self.config_path = config_path
        self.queues = queues
        self.gpu = gpu
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="worker-watch", daemon=True)

    def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "service.cli", "worker", "--queues", ",".join(self.queues)]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        if self.gpu is not None:
            cmd += ["--gpus", self.gpu]
        # Own session: the parent decides when the worker stops (warm shutdown); and
        # the worker asks for SIGTERM should the parent be killed outright.
        env = {**os.environ, "RADNODE_PARENT_PID": str(os.getpid())}
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        self.process = subprocess.Popen(cmd, start_new_session=True, env=env)
        log.info("%s started (pid %d)", self.name, self.process.pid)

    def start(self) -> None:
        """Start the worker and a thread that restarts it if it exits."""
        self._spawn()
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            if self.process is not None and self.process.poll() is not None:
                log.error("%s exited with %s; restarting", self.name, self.process.returncode)
                try:  # its pool processes, orphaned if it was killed, hold no job of value
                    os.killpg(self.process.pid, signal.SIGKILL)
                except OSError:
                    pass
                time.sleep(2.0)
                if not self._stopping.is_set():
                    self._spawn()

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the worker (warm shutdown, then kill after ``timeout_s``)."""
        self._stopping.set()
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def supervise_gpu_workers(config_file: Path | None, queues: list[str],
                          gpus: list[str]) -> int:
    """Run one ``radnode worker --gpus <i>`` child per GPU until SIGTERM/SIGINT; return 0.

    Each child is pinned to its GPU with ``CUDA_VISIBLE_DEVICES`` and restarted
    if it dies. SIGTERM stops them all with a warm shutdown (running jobs
    finish, or are redelivered after their lease if they do not).
    """
    children = [WorkerProcess(config_file, queues, gpu=gpu, name=f"GPU {gpu} worker")
                for gpu in gpus]
    stop = threading.Event()

    def _handle(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping %d GPU workers", signum, len(children))
        stop.set()

    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)
    for child in children:
        child.start()
    stop.wait()
    stoppers = [threading.Thread(target=child.stop, kwargs={"timeout_s": 120.0})
                for child in children]
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join()
    return 0


def embedded_worker(settings: Settings) -> WorkerProcess:
    """The worker ``radnode serve`` starts beside the node (``broker.embedded_worker``).

    It gets the node's effective settings (flags included) in a file under
    ``<data_dir>/run`` and consumes ``broker.embedded_worker_queues``.
    """
    config_path = settings.data_dir / "run" / "worker-config.yaml"
    dump_settings(settings, config_path)
    return WorkerProcess(config_path, settings.embedded_worker_queues)


#: Sections that a reload applies at once; the others need a restart.
RELOADABLE = ("rules", "fallback", "destinations", "completion", "delivery", "retention")


class Node:
    """Everything ``radnode serve`` runs, in one object with start and stop.

    Parameters
    ----------
    settings : Settings
        The configuration at start.
    reload : callable, optional
        Builds the settings again (from the same file, environment and
        flags): on SIGHUP, or when ``config_file`` changes, the node applies
        the new routing and delivery sections without dropping associations.
    config_file : pathlib.Path, optional
        Watched for changes (modification time) when ``reload`` is given.
    """

    def __init__(self, settings: Settings, *, reload: Callable[[], Settings] | None = None,
                 config_file: Path | None = None) -> None:
        self.settings = settings
        self._reload = reload
        self._config_file = config_file
        self._config_mtime = self._mtime()
        self._reload_requested = threading.Event()
        self._router = Router()
        self._dispatcher = Dispatcher()
        self._stop = threading.Event()
        self._loops: list[Loop] = []
        self._worker: WorkerProcess | None = None
        self._server: Scp | None = None
        self._incoming: receive.IncomingFiles | None = None
        self._wakeups = False
        self.store_context: StoreContext | None = None
        self.metrics: NodeMetrics | None = None
        self.http: ApiServer | None = None

    def start(self) -> None:
        """Prepare directories and database, then start SCP, loops and worker.

        Raises
        ------
        OSError
            If a DICOM port cannot be bound or the data directory is not writable.
        ConfigError
            If the SCP's TLS certificate, key or CA file cannot be used.
        """
        s = self.settings
        private_data_dir(s.data_dir)
        for folder in (s.spool_dir, s.results_dir):
            folder.mkdir(parents=True, exist_ok=True)
        remove_interrupted_writes(s.spool_dir, s.results_dir, s.data_dir / "broker" / "messages")
        # pynetdicom writes received data sets to temporary files: keep them on
        # the spool's file system so that storing one is a rename, not a copy.
        incoming = s.spool_dir / ".incoming"
        incoming.mkdir(exist_ok=True)
        tempfile.tempdir = str(incoming.resolve())
        mark_data_dir(s.data_dir)
        if s.database.auto_upgrade:
            migrate.upgrade(s.database_url)
        else:
            migrate.require_head(s.database_url)
        engine = make_engine(s.database_url, pool_size=s.database_pool_size,
                             pool_timeout_s=s.database.pool_timeout_s)
        check_connection(engine)
        factory = make_session_factory(engine)
        recover_incoming(s.spool_dir, factory)  # before the SCP makes files there again
        with factory() as session:
            # A delivery interrupted by a stop is tried again.
            session.execute(update(Delivery).where(Delivery.state == "sending")
                            .values(state="pending"))
            session.commit()
        app = make_celery(s)
        if not s.embedded_broker:
            reachable, detail = broker_probe(app, s)
            if not reachable:  # jobs wait in the database until it is back
                log.error("the broker at %s is %s; the node starts anyway and publishes jobs "
                          "when it is back", describe_broker(app), detail)
        if s.broker.embedded_worker:
            self._worker = embedded_worker(s)
            self._worker.start()
        interval = s.completion.check_interval_s
        # Each loop reads self.settings on every tick, so a reload applies at once.
        loops = [
            Loop("completion", lambda: (
                complete_and_route(self.settings, factory, self._router),
                publish_pending(app, factory, self.settings)), interval),
            Loop("delivery", lambda: self._dispatcher.tick(self.settings, factory), interval),
            Loop("sweeper", lambda: sweep_jobs(self.settings, factory),
                 min(5.0, s.worker.heartbeat_timeout_s / 4)),
            Loop("retention", lambda: purge_due(self.settings, factory),
                 s.retention.check_interval_s),
        ]
        if self._reload is not None:
            loops.append(Loop("config", self._check_reload, 1.0))
        self.metrics = NodeMetrics(lambda: self.settings, factory)
        processes = effective_processes(s.dicom)
        if processes > 1:  # each SCP process makes its own StoreContext
            config_path = s.data_dir / "run" / "scp-config.yaml"
            dump_settings(s, config_path)
            self._server = start_scp_pool(s.dicom, config_path, processes, self.metrics)
        else:
            self.store_context = StoreContext.for_node(s, factory, self.metrics)
            self._server = start_scp(s.dicom, self.store_context)
            # Files made ahead of the data sets; each data set's check begins as it arrives.
            self._incoming = receive.install(incoming, begin=begin_structure_check)
            wakeups.install()  # association threads wait for work instead of polling
            self._wakeups = True
        # Only now can the sender resend: a series cut off by the stop gets a full quiet
        # period from here (SCP processes take seconds to start), then the loops run.
        with factory() as session:
            interrupted = repository.restart_completion_clock(session=session, now=utcnow())
            session.commit()
        if interrupted:
            log.info("%d series were receiving when the node stopped: their quiet period "
                     "starts again now", interrupted)
        self._loops = loops  # stop() joins them: only once they run
        for loop in loops:
            loop.start()
        if s.http.enabled:
            self._start_http(factory, app)
        log.info("radnode ready: AE %s on %s, data in %s, database %s, broker %s",
                 s.dicom.ae_title, self._server.describe(), s.data_dir,
                 engine.url.render_as_string(hide_password=True),
                 "embedded" if s.embedded_broker else describe_broker(app))

    def _start_http(self, factory: sessionmaker[Session], app: Celery) -> None:
        from sqlalchemy import func, select

        from service.api.app import ApiContext, create_app
        from service.api.server import ApiServer
        from service.db.models import User

        s = self.settings
        context = ApiContext(
            settings=lambda: self.settings, session_factory=factory,
            probes={"broker": lambda: broker_probe(app, self.settings),
                    "spool": self._spool_probe, "scp": self._scp_probe},
            render_metrics=self.metrics.render if self.metrics is not None else None)
        self.http = ApiServer(create_app(context), s.http.host, s.http.port,
                              cert_file=s.http.tls.cert_file, key_file=s.http.tls.key_file,
                              trusted_proxies=s.http.trusted_proxies)
        self.http.start()
        with factory() as session:
            users = session.scalar(select(func.count()).select_from(User)
                                   .where(User.disabled_at.is_(None)))
        if not users:
            log.warning("the HTTP API and dashboard have no user yet: add one with "
                        "`radnode users add NAME --role admin` (docs/http-security.md)")
        if not s.http.tls.enabled and s.http.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("the HTTP API listens on %s without TLS: set http.tls or put it "
                        "behind a TLS reverse proxy (docs/http-security.md)", s.http.host)

    def _spool_probe(self) -> tuple[bool, str]:
        """The spool is writable and above its free-space reserve."""
        spool_dir = self.settings.spool_dir
        try:
            with tempfile.NamedTemporaryFile(dir=spool_dir, prefix=".incoming-probe-",
                                             suffix=".tmp"):
                pass
            free = shutil.disk_usage(spool_dir).free
        except OSError as exc:
            return False, f"spool not writable: {exc.strerror}"
        reserve = self.settings.storage.min_free_mb << 20
        detail = f"{free >> 20} MiB free, reserve {reserve >> 20} MiB"
        if free < reserve:
            return False, f"below the free-space reserve: {detail}; refusing instances (0xA700)"
        return True, detail

    def _scp_probe(self) -> tuple[bool, str]:
        """The SCP is listening, on every listener (plain and TLS)."""
        server = self._server
        d = self.settings.dicom
        if server is None or not server.is_listening:
            return False, "not listening (stopped or draining)"
        return True, f"AE {d.ae_title} listening on {server.describe()}"

    def handle_signals(self) -> None:
        """SIGTERM/SIGINT stop the node cleanly, SIGHUP reloads; from the main thread only.

        Called before :meth:`start`, so that a SIGTERM that arrives while the
        node starts (an SCP already receiving, HTTP not up yet) drains too
        instead of killing the process mid-transfer.
        """

        def _handle(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: stopping", signum)
            self._stop.set()

        def _hangup(_signum: int, _frame: FrameType | None) -> None:
            self._reload_requested.set()

        signal.signal(signal.SIGTERM, _handle)
        signal.signal(signal.SIGINT, _handle)
        signal.signal(signal.SIGHUP, _hangup)

    def serve_forever(self) -> None:
        """Block until SIGINT or SIGTERM, then stop cleanly."""
        self.handle_signals()
        self._stop.wait()
        self.stop()

    def stop(self) -> None:
        """Drain: refuse new associations, let those in flight finish, then stop.

        Associations still open after ``dicom.drain_timeout_s`` are aborted;
        whatever they had stored and acknowledged is on disk and recorded.
        """
        server = self._server
        if server is not None:
            self._server = None
            server.drain(self.settings.dicom.drain_timeout_s)
        if self.store_context is not None:
            self.store_context.close()  # the SCP's kept database connections
        if self._incoming is not None:
            receive.uninstall(self._incoming)  # deletes the files kept ready
            self._incoming = None
        if self._wakeups:
            wakeups.uninstall()
            self._wakeups = False
        for loop in self._loops:
            loop.stop()
        if self.http is not None:
            self.http.stop()
            self.http = None
        self._dispatcher.shutdown()
        if self._worker is not None:
            self._worker.stop()
        log.info("radnode stopped")

    def request_reload(self) -> None:
        """Ask for a reload of the configuration (what SIGHUP does)."""
        self._reload_requested.set()

    def _mtime(self) -> float:
        try:
            return self._config_file.stat().st_mtime if self._config_file else 0.0
        except OSError:
            return 0.0

    def _check_reload(self) -> None:
        mtime = self._mtime()
        if mtime != self._config_mtime:
            self._config_mtime = mtime
            self._reload_requested.set()
        if self._reload_requested.is_set():
            self._reload_requested.clear()
            self.reload()

    def reload(self) -> bool:
        """Apply the configuration again without dropping associations; True if applied.

        The sections in :data:`RELOADABLE` (rules, fallback, destinations,
        completion, delivery, retention) take effect at once; jobs routed from
        now on record the new configuration version. Changes elsewhere (DICOM
        port, database, broker, models, worker) are logged and wait for a
        restart. An invalid file changes nothing: the error is logged and the
        running configuration stays.
        """
        if self._reload is None:
            return False
        try:
            new = self._reload()
        except ConfigError as exc:
            log.error("configuration not reloaded, the running one stays: %s", exc)
            return False
        old = self.settings
        later = [key for key in type(old).model_fields
                 if key not in RELOADABLE and getattr(new, key) != getattr(old, key)]
        update = {key: getattr(new, key) for key in RELOADABLE}
        candidate = old.model_copy(update=update)
        try:  # the new rules against the running models
            type(old).model_validate(candidate.model_dump())
        except ValueError as exc:
            log.error("configuration not reloaded, the running one stays: %s", exc)
            return False
        self.settings = candidate
        self._router.reset()
        log.info("configuration reloaded: version %s (was %s)%s", candidate.config_version,
                 old.config_version,
                 f"; changes to {', '.join(later)} take effect on restart" if later else "")
        return True

