"""Scale-out: series per minute through the whole pipeline, one worker process versus two.

Every part runs as its own process, as in production
(tests/integration/test_production.py): ``radnode serve``, the Celery
workers, dcmtk ``storescu`` as the scanner and dcmtk ``storescp`` as the
PACS, all on loopback. Four cases:

* ``pg1``, ``pg2``: PostgreSQL + Redis. A fresh database per run
  (``CREATE DATABASE``, ``radnode db upgrade``, ``DROP ... WITH (FORCE)``),
  a Redis key prefix of its own (its keys deleted afterwards),
  ``radnode serve`` with ``broker.embedded_worker: false`` and one or two
  separate ``radnode worker --queues gpu`` processes (the production layout,
  one worker process per GPU machine).
* ``emb1``, ``emb2``: the embedded default (SQLite and the file broker in
  the data directory): ``radnode serve`` with its embedded worker and
  ``worker.concurrency`` 1 or 2, which is how a one-machine install scales.

Each run waits until every worker process reports in the ``workers`` table
(models loaded), then sends N distinct series on one association (or
``--senders`` concurrent ones) and waits until every SEG and SR is
acknowledged by the PACS (``deliveries.state = 'sent'``). Series per minute
= N / (first instance received → last delivery acknowledged) x 60. It also
reads from the database where each series' time went, and from /proc the
CPU seconds of the node, the workers, the PostgreSQL and Redis servers, the
dcmtk programs and the rest of the machine.

    .venv/bin/python benchmarks/scale_out.py [--series 6] [--repeats 1]
        [--cases pg1,pg2,emb1,emb2] [--phantom] [--senders 1] [--quiet-period 2]
        [--idle-wait 60] [--torch-threads T] [--markdown FILE] [--keep]

Input: the real CT in ``$RADNODE_TEST_DATA/ct_abdomen_pancreas_tcia`` (134
slices; by default ``../shared/data`` beside the repository), copied N times
with new Study, Series and SOP Instance UIDs into a temporary folder; or, with
``--phantom``, N synthetic CT series (``write_ct_phantom``, 60 x 192 x 192).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Engine, func, select

from service.db.models import Delivery, Job, Result, Series, WorkerStatus
from service.db.session import as_utc, make_engine

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RADNODE_TEST_DATA", ROOT.parent / "shared" / "data"))
REAL_CT = DATA / "ct_abdomen_pancreas_tcia"
POSTGRES_ADMIN_URL = os.environ.get("RADNODE_BENCH_POSTGRES",
                                    "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("RADNODE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The worker's step timings (workers/tasks.py), in the order they happen.
STEP_KEYS = ("model_load_s", "load_s", "inference_s", "encode_s", "write_s")


class BenchmarkError(RuntimeError):
    """A run did not complete: a process failed, a job failed, a timeout."""


@dataclass(frozen=True)
class Case:
    """One configuration: the backend and the number of worker processes."""

    key: str
    backend: str  # "postgres" or "embedded"
    workers: int

    @property
    def label(self) -> str:
        """How the tables name the case."""
        if self.backend == "postgres":
            return f"PostgreSQL + Redis, {self.workers} × `radnode worker`"
        return f"embedded (SQLite + file broker), worker.concurrency {self.workers}"


CASES = {
    "pg1": Case("pg1", "postgres", 1),
    "pg2": Case("pg2", "postgres", 2),
    "emb1": Case("emb1", "embedded", 1),
    "emb2": Case("emb2", "embedded", 2),
}


# --------------------------------------------------------------------------- input


def _tool(name: str) -> str:
    """dcmtk's program (not pynetdicom's app of the same name in the venv)."""
    path = shutil.which(name, path="/usr/bin") or shutil.which(name)
    if path is None:
        raise SystemExit(f"{name} is not installed (apt-get install dcmtk)")
    return path


def write_input(folder: Path, count: int, *, phantom: bool) -> list[list[Path]]:
    """Write ``count`` distinct CT series under ``folder``; return each one's files.

    Parameters
    ----------
    folder : pathlib.Path
        An empty temporary folder (never the repository).
    count : int
        Number of series.
    phantom : bool
        Synthetic series (``write_ct_phantom``) instead of copies of the real CT.

    Returns
    -------
    list of list of pathlib.Path
        The files of each series, in slice order.
    """
    series: list[list[Path]] = []
    if phantom:
        from service.dicom.phantom import write_ct_phantom

        for k in range(count):
            series.append(sorted(write_ct_phantom(folder / f"series-{k + 1}", seed=k + 1)))
        return series
    import pydicom
    from pydicom.uid import generate_uid

    sources = sorted(REAL_CT.glob("*.dcm"))
    if not sources:
        raise SystemExit(f"no real CT at {REAL_CT} (set RADNODE_TEST_DATA, or use --phantom)")
    datasets = [pydicom.dcmread(path) for path in sources]
    for k in range(count):
        out = folder / f"series-{k + 1}"
        out.mkdir(parents=True)
        study, series_uid, frame = generate_uid(), generate_uid(), generate_uid()
        files = []
        for index, ds in enumerate(datasets):
            sop = generate_uid()
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            if "FrameOfReferenceUID" in ds:
                ds.FrameOfReferenceUID = frame
            path = out / f"{index + 1:04d}.dcm"
            ds.save_as(path)
            files.append(path)
        series.append(files)
    return series


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: Set by ``--torch-threads``: OMP_NUM_THREADS for the radnode processes.
TORCH_THREADS: dict[str, str] = {}


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without RADNODE_* (the YAML file decides), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADNODE_")}
    env.update(extra)
    return env


def _spawn(log: Path, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _radnode(log: Path, *args: str) -> subprocess.Popen[bytes]:
    return _spawn(log, [sys.executable, "-m", "service.cli", *args],
                  _clean_env(**TORCH_THREADS))


def _stop(process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    if process.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_port(port: int, process: subprocess.Popen[bytes], log: Path,
               timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(f"{log.name}: exited with {process.returncode} before "
                                 f"listening\n{_tail(log)}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise BenchmarkError(f"nothing listens on port {port} after {timeout_s:.0f} s\n{_tail(log)}")


def _tail(log: Path, chars: int = 3000) -> str:
    return f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}" if log.exists() else ""


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new PostgreSQL database on the machine's server; dropped afterwards."""
    import psycopg

    name = f"radnode_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def redis_prefix() -> Iterator[str]:
    """A Redis key prefix of this run's own; its keys are deleted afterwards."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    client.ping()
    prefix = f"radnode-bench-{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


# --------------------------------------------------------------------------- CPU accounting


def _proc_table() -> dict[int, tuple[int, str, int]]:
    """``pid: (ppid, comm, CPU ticks)`` of every process; ticks are utime+stime+cutime+cstime.

    The children's fields hold the time of children that exited and were
    waited for, so a process tree's sum keeps what its short-lived members used.
    """
    table: dict[int, tuple[int, str, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2:].split()
        table[int(entry.name)] = (int(fields[1]), comm, sum(int(v) for v in fields[11:15]))
    return table


def _tree(table: dict[int, tuple[int, str, int]], roots: Iterable[int]) -> set[int]:
    """``roots`` and all their descendants that are alive in ``table``."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [pid for pid in roots if pid in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already in user
    return total - idle, total


@dataclass
class CpuSnapshot:
    """CPU ticks of each group of processes, and of the machine, at one moment."""

    groups: dict[str, int]
    busy: int
    total: int
    at: float


@dataclass
class CpuGroups:
    """Which processes make up each group (read again at each snapshot)."""

    node_pid: int
    worker_pids: list[int]  # separate `radnode worker` processes (PostgreSQL cases)
    pacs_pid: int
    embedded: bool

    def snapshot(self) -> CpuSnapshot:
        """Read /proc now."""
        table = _proc_table()
        if self.embedded:  # the node process alone; its children are the worker
            node = {self.node_pid}
            workers = _tree(table, [self.node_pid]) - node
        else:
            node = _tree(table, [self.node_pid])
            workers = _tree(table, self.worker_pids)
        servers = _tree(table, [pid for pid, (_, comm, _) in table.items()
                                if comm in ("postgres", "redis-server")])
        # storescu: our own children, reaped when they exit (os.times counts them).
        own = os.times()
        senders = round((own.children_user + own.children_system) * CLK_TCK)
        bench = round((own.user + own.system) * CLK_TCK)
        busy, total = _machine_ticks()
        return CpuSnapshot(
            groups={"node": sum(table[p][2] for p in node),
                    "workers": sum(table[p][2] for p in workers),
                    "servers": sum(table[p][2] for p in servers),
                    "dcmtk": senders + sum(table[p][2] for p in _tree(table, [self.pacs_pid])),
                    "bench": bench},
            busy=busy, total=total, at=time.monotonic())


def cpu_figures(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """CPU seconds of each group between two snapshots, the rest of the machine, cores busy."""
    out = {f"cpu_{k}_s": (after.groups[k] - before.groups[k]) / CLK_TCK for k in before.groups}
    machine = (after.busy - before.busy) / CLK_TCK
    out["cpu_machine_s"] = machine
    out["cpu_other_s"] = machine - sum(out[f"cpu_{k}_s"] for k in before.groups)
    out["cpu_window_s"] = after.at - before.at
    out["cores_busy"] = machine / out["cpu_window_s"]
    return out


def wait_for_quiet_machine(max_wait_s: float, threshold: float = 0.3) -> float:
    """Wait until the machine keeps fewer than ``threshold`` cores busy for a second.

    Gives up after ``max_wait_s``; returns the cores busy in the last second
    (other users' tests share this machine).
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        busy0, total0 = _machine_ticks()
        time.sleep(1.0)
        busy1, total1 = _machine_ticks()
        cores = (busy1 - busy0) / CLK_TCK
        if cores < threshold or time.monotonic() >= deadline:
            return cores


# --------------------------------------------------------------------------- one run


@dataclass
class Run:
    """The processes and files of one run of one case."""

    case: Case
    folder: Path
    db_url: str
    logs: list[Path] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)


def _seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return (as_utc(later) - as_utc(earlier)).total_seconds()


def _mean(values: Iterable[float | None]) -> float:
    numbers = [v for v in values if v is not None]
    return statistics.fmean(numbers) if numbers else float("nan")


def _counts(engine: Engine) -> tuple[int, int, int, int, int]:
    """(succeeded jobs, failed jobs, deliveries, sent, failed deliveries)."""
    with engine.connect() as conn:
        jobs = dict(conn.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        deliveries = dict(conn.execute(select(Delivery.state, func.count())
                                       .group_by(Delivery.state)).all())
    return (jobs.get("succeeded", 0), jobs.get("failed", 0), sum(deliveries.values()),
            deliveries.get("sent", 0), deliveries.get("failed", 0))


def _wait(condition: Callable[[], bool], timeout_s: float, what: str, run: Run,
          interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        for process, log in zip(run.processes, run.logs, strict=False):
            if process.poll() is not None:
                raise BenchmarkError(f"{log.name}: exited with {process.returncode} while "
                                     f"waiting for {what}\n{_tail(log)}")
        time.sleep(interval_s)
    raise BenchmarkError(f"timed out after {timeout_s:.0f} s waiting for {what}\n"
                         + "\n".join(_tail(log) for log in run.logs))


def _config(case: Case, folder: Path, *, port: int, pacs_port: int, quiet_period: float,
            db_url: str, prefix: str) -> Path:
    config: dict[str, Any] = {
        "data_dir": str(folder / "data"),
        "log_level": "INFO",
        "dicom": {"ae_title": "RADNODE", "host": "127.0.0.1", "port": port},
        "http": {"host": "127.0.0.1", "port": _free_port()},
        "completion": {"quiet_period_s": quiet_period},
        # queued_ahead: as many as there are worker processes (README, Configuration).
        "worker": {"concurrency": case.workers, "queued_ahead": case.workers,
                   "warm_up": True},
        "destinations": [f"PACS@127.0.0.1:{pacs_port}"],
    }
    if case.backend == "postgres":
        config["database"] = {"url": db_url, "auto_upgrade": False}
        config["broker"] = {"url": REDIS_URL, "key_prefix": prefix, "embedded_worker": False}
        config["worker"]["concurrency"] = 1  # one process per `radnode worker`
    path = folder / "radnode.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_case(case: Case, series: list[list[Path]], *, folder: Path, quiet_period: float,
             senders: int, idle_wait_s: float = 0.0) -> dict[str, float]:
    """Run ``case`` once in ``folder``; return its figures.

    Raises
    ------
    BenchmarkError
        If a process exits, a job or delivery fails, or a wait times out.
    """
    if case.backend == "postgres":
        with postgres_database() as db_url, redis_prefix() as prefix:
            return _run(case, series, folder=folder, quiet_period=quiet_period,
                        senders=senders, db_url=db_url, prefix=prefix, idle_wait_s=idle_wait_s)
    db_url = f"sqlite:///{folder / 'data' / 'radnode.db'}"
    return _run(case, series, folder=folder, quiet_period=quiet_period, senders=senders,
                db_url=db_url, prefix="", idle_wait_s=idle_wait_s)


def _run(case: Case, series: list[list[Path]], *, folder: Path, quiet_period: float,
         senders: int, db_url: str, prefix: str, idle_wait_s: float) -> dict[str, float]:
    port, pacs_port = _free_port(), _free_port()
    config = _config(case, folder, port=port, pacs_port=pacs_port, quiet_period=quiet_period,
                     db_url=db_url, prefix=prefix)
    run = Run(case, folder, db_url)
    pacs_dir = folder / "pacs"
    pacs_dir.mkdir()
    nodelay = _clean_env(TCP_NODELAY="1")  # dcmtk leaves Nagle on otherwise (README)
    pacs_log = folder / "storescp.log"
    pacs = _spawn(pacs_log, [_tool("storescp"), "-aet", "PACS", "-od", str(pacs_dir), "+uf",
                             "+xa", str(pacs_port)], nodelay)
    run.processes.append(pacs)
    run.logs.append(pacs_log)
    engine: Engine | None = None
    try:
        if case.backend == "postgres":  # the schema is its own step in production
            upgrade = subprocess.run([sys.executable, "-m", "service.cli", "db", "upgrade",
                                      "--config", str(config)], capture_output=True, text=True,
                                     env=_clean_env(), timeout=120, check=False)
            if upgrade.returncode != 0:
                raise BenchmarkError(f"radnode db upgrade failed:\n{upgrade.stderr[-2000:]}")
        node_log = folder / "node.log"
        node = _radnode(node_log, "serve", "--config", str(config))
        run.processes.append(node)
        run.logs.append(node_log)
        _wait_port(port, node, node_log)
        _wait_port(pacs_port, pacs, pacs_log)
        worker_pids: list[int] = []
        if case.backend == "postgres":
            for k in range(case.workers):
                log = folder / f"worker-{k + 1}.log"
                worker = _radnode(log, "worker", "--config", str(config), "--queues", "gpu")
                run.processes.append(worker)
                run.logs.append(log)
                worker_pids.append(worker.pid)
        engine = make_engine(db_url)
        ready_engine = engine

        def ready() -> bool:
            try:
                with ready_engine.connect() as conn:
                    return int(conn.execute(select(func.count()).select_from(WorkerStatus))
                               .scalar_one()) >= case.workers
            except Exception:  # the node may still be creating the SQLite schema
                return False

        _wait(ready, 300, f"{case.workers} worker process(es) reporting ready", run, 0.5)
        groups = CpuGroups(node.pid, worker_pids, pacs.pid, case.backend == "embedded")
        idle = wait_for_quiet_machine(idle_wait_s) if idle_wait_s > 0 else float("nan")
        figures = _measure(run, engine, series, groups, port=port, senders=senders,
                           pacs_dir=pacs_dir)
        figures["cores_busy_before"] = idle
        return figures
    finally:
        for process in reversed(run.processes):
            _stop(process)
        if engine is not None:
            engine.dispose()


def _measure(run: Run, engine: Engine, series: list[list[Path]], groups: CpuGroups, *,
             port: int, senders: int, pacs_dir: Path) -> dict[str, float]:
    n = len(series)
    batches = [[f for k in range(i, n, senders) for f in series[k]] for i in range(senders)]
    before = groups.snapshot()
    send_start = time.monotonic()
    scanners = [subprocess.Popen(
        [_tool("storescu"), "-aet", f"SCANNER{i + 1}", "-aec", "RADNODE", "127.0.0.1",
         str(port), *map(str, batch)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_clean_env(TCP_NODELAY="1"),
        start_new_session=True) for i, batch in enumerate(batches) if batch]
    for scanner in scanners:
        _, err = scanner.communicate(timeout=600)
        if scanner.returncode != 0:
            raise BenchmarkError(f"storescu exited with {scanner.returncode}: "
                                 f"{err.decode(errors='replace')[-2000:]}")
    send_s = time.monotonic() - send_start

    def done() -> bool:
        succeeded, failed, deliveries, sent, failed_deliveries = _counts(engine)
        if failed or failed_deliveries:
            raise BenchmarkError(f"{failed} job(s) and {failed_deliveries} delivery(ies) "
                                 "failed\n" + "\n".join(_tail(log) for log in run.logs))
        return succeeded == n and deliveries > 0 and sent == deliveries

    _wait(done, 120 + 120 * n, "every SEG and SR acknowledged by the PACS", run, 0.1)
    after = groups.snapshot()
    figures = _figures(engine, n)
    figures["send_s"] = send_s
    figures.update(cpu_figures(before, after))
    received = sum(1 for p in pacs_dir.iterdir() if p.is_file())
    if received != figures["deliveries"]:
        raise BenchmarkError(f"the PACS holds {received} files, the database says "
                             f"{figures['deliveries']:.0f} deliveries were sent")
    return figures


def _figures(engine: Engine, n: int) -> dict[str, float]:
    """Throughput and per-series hops from the node's database."""
    with engine.connect() as conn:
        series = {row.id: row for row in conn.execute(select(
            Series.id, Series.instance_count, Series.first_received_at,
            Series.last_received_at, Series.completed_at))}
        jobs = list(conn.execute(select(Job.id, Job.series_id, Job.worker, Job.timings,
                                        Job.created_at, Job.queued_at, Job.started_at,
                                        Job.finished_at)))
        sent = list(conn.execute(
            select(Result.job_id, Result.created_at, Delivery.sent_at)
            .join(Delivery, Delivery.result_id == Result.id)))
    if len(series) != n or len(jobs) != n:
        raise BenchmarkError(f"{len(series)} series and {len(jobs)} jobs in the database, "
                             f"expected {n} of each")
    delivered: dict[int, datetime] = {}
    written: dict[int, datetime] = {}
    for job_id, created, sent_at in sent:
        if sent_at is None:
            raise BenchmarkError(f"a delivery of job {job_id} has no sent_at")
        delivered[job_id] = max(delivered.get(job_id, sent_at), sent_at, key=as_utc)
        written[job_id] = created
    first = min((s.first_received_at for s in series.values()), key=as_utc)
    last_sent = max(delivered.values(), key=as_utc)
    started = min((j.started_at for j in jobs), key=as_utc)
    finished = max((j.finished_at for j in jobs), key=as_utc)
    wall = _seconds(last_sent, first) or float("nan")
    span = _seconds(finished, started) or float("nan")
    analyse = [_seconds(j.finished_at, j.started_at) for j in jobs]
    out: dict[str, float] = {
        "series": float(n),
        "instances": float(sum(s.instance_count for s in series.values())),
        "deliveries": float(len(sent)),
        "wall_s": wall,
        "series_per_min": n / wall * 60,
        "receive_s": _seconds(max((s.last_received_at for s in series.values()), key=as_utc),
                              first) or float("nan"),
        "analysis_span_s": span,
        "analysis_series_per_min": n / span * 60,
        "worker_processes_used": float(len({j.worker for j in jobs})),
        "busy_fraction": sum(a for a in analyse if a is not None) / span,
        # per series (means)
        "complete_wait_s": _mean(_seconds(s.completed_at, s.last_received_at)
                                 for s in series.values()),
        "pending_s": _mean(_seconds(j.queued_at, j.created_at) for j in jobs),
        "queued_s": _mean(_seconds(j.started_at, j.queued_at) for j in jobs),
        "analyse_s": _mean(analyse),
        "deliver_s": _mean(_seconds(delivered[j.id], written[j.id]) for j in jobs),
        "series_e2e_s": _mean(_seconds(delivered[j.id], series[j.series_id].last_received_at)
                              for j in jobs),
    }
    for key in STEP_KEYS:
        out[key] = _mean(float(j.timings[key]) if j.timings and key in j.timings else None
                         for j in jobs)
    out["analyse_other_s"] = out["analyse_s"] - sum(out[key] for key in STEP_KEYS)
    return out


# --------------------------------------------------------------------------- report

#: (key, label, format) of the "where the time goes" table: means per series.
HOPS = [
    ("complete_wait_s", "completion wait (last instance → series complete)", "{:.2f}"),
    ("pending_s", "waiting in the database for a free worker (job created → published)",
     "{:.2f}"),
    ("queued_s", "in the broker (published → started)", "{:.2f}"),
    ("analyse_s", "analyse (job started → SEG + SR written)", "{:.2f}"),
    ("model_load_s", "↳ get the model (loaded at start: ~0)", "{:.2f}"),
    ("load_s", "↳ load volume", "{:.2f}"),
    ("inference_s", "↳ model inference (CPU)", "{:.2f}"),
    ("encode_s", "↳ encode SEG + SR", "{:.2f}"),
    ("write_s", "↳ write files", "{:.2f}"),
    ("analyse_other_s", "↳ rest (claim, database, store results)", "{:.2f}"),
    ("deliver_s", "deliver (results written → both acknowledged)", "{:.2f}"),
    ("series_e2e_s", "**per series: last instance → SEG + SR acknowledged**", "{:.2f}"),
]
CPU_ROWS = [
    ("cpu_node_s", "`radnode serve` (SCP, scheduler, delivery)"),
    ("cpu_workers_s", "worker processes (models, encoding)"),
    ("cpu_servers_s", "PostgreSQL + Redis servers (all of the machine's)"),
    ("cpu_dcmtk_s", "storescu + storescp"),
    ("cpu_bench_s", "this script (polls the database)"),
    ("cpu_other_s", "rest of the machine (other users)"),
    ("cpu_machine_s", "**machine, all processes**"),
]


def median_figures(runs: list[dict[str, float]]) -> dict[str, float]:
    """The median of each figure over the repeats."""
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def _table(header: list[str], rows: list[list[str]], markdown: bool,
           right: set[int] | None = None) -> str:
    if markdown:
        align = ["---:" if i in (right or set()) else "---" for i in range(len(header))]
        return "\n".join("| " + " | ".join(r) + " |" for r in [header, align, *rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])


def report(results: dict[str, list[dict[str, float]]], *, markdown: bool) -> str:
    """The three tables: throughput, where the time goes, CPU seconds."""
    keys = list(results)
    med = {k: median_figures(results[k]) for k in keys}
    plain: Callable[[str], str] = (lambda s: s) if markdown else (
        lambda s: s.replace("**", "").replace("`", ""))
    out: list[str] = []
    rows = []
    for k in keys:
        m = med[k]
        runs = " / ".join(f"{r['wall_s']:.1f}" for r in results[k])
        rows.append([plain(CASES[k].label), f"{m['series']:.0f}", f"{m['instances']:.0f}",
                     f"{m['send_s']:.1f}", runs, f"{m['wall_s']:.1f}",
                     f"**{m['series_per_min']:.1f}**" if markdown else
                     f"{m['series_per_min']:.1f}",
                     f"{m['analysis_span_s']:.1f}", f"{m['analysis_series_per_min']:.1f}",
                     f"{m['busy_fraction']:.2f}"])
    out.append(_table(["case", "series", "instances", "send s", "runs s", "wall s",
                       "series/min", "analysis span s", "analysed/min", "analyses at once"],
                      rows, markdown, right=set(range(1, 10))))
    out.append("")
    header = ["mean per series, seconds", *keys]
    out.append(_table(header, [[plain(label), *(fmt.format(med[k][key]) for k in keys)]
                               for key, label, fmt in HOPS], markdown, right=set(range(1, 5))))
    out.append("")
    rows = [[plain(label), *(f"{med[k][key]:.1f}" for k in keys)] for key, label in CPU_ROWS]
    rows.append(["worker CPU s per series", *(f"{med[k]['cpu_workers_s'] / med[k]['series']:.1f}"
                                               for k in keys)])
    rows.append(["cores busy (machine, mean over the run)",
                 *(f"{med[k]['cores_busy']:.2f}" for k in keys)])
    rows.append(["cores busy in the second before sending",
                 *(f"{med[k]['cores_busy_before']:.2f}" for k in keys)])
    out.append(_table(["CPU seconds during the run", *keys], rows, markdown,
                      right=set(range(1, 5))))
    return "\n".join(out)


def machine() -> str:
    """nproc, CPU model, memory: one line for the report."""
    model = "?"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with suppress(OSError, IndexError, ValueError):
        kib = int(re.findall(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[0])
        mem = f"{kib / 2**20:.0f} GiB"
    return f"{os.cpu_count()} CPU cores ({model}), {mem} RAM, Python {platform.python_version()}"


def main() -> None:
    """Parse the options, write the input, run each case ``--repeats`` times, print tables."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=6, help="distinct series sent [6]")
    parser.add_argument("--repeats", type=int, default=1, help="runs per case; median [1]")
    parser.add_argument("--cases", default="pg1,pg2,emb1,emb2",
                        help="comma-separated, of pg1,pg2,emb1,emb2 [all]")
    parser.add_argument("--phantom", action="store_true",
                        help="synthetic CT series (60 x 192 x 192) instead of the real CT")
    parser.add_argument("--senders", type=int, default=1,
                        help="concurrent storescu associations; series split among them [1]")
    parser.add_argument("--quiet-period", type=float, default=2.0,
                        help="completion.quiet_period_s [2]")
    parser.add_argument("--idle-wait", type=float, default=60.0,
                        help="before sending, wait up to this many seconds for the machine "
                             "to be idle (< 0.3 cores busy) [60]; 0: do not wait")
    parser.add_argument("--torch-threads", type=int,
                        help="OMP_NUM_THREADS for the node and its workers (torch's "
                             "intra-op threads); default: torch's own (one per core)")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary folder (logs, data) and print where it is")
    args = parser.parse_args()
    keys = [k.strip() for k in args.cases.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CASES]
    if unknown or not keys:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.series < 1 or args.repeats < 1 or not 1 <= args.senders <= args.series:
        parser.error("--series and --repeats must be >= 1, --senders 1..--series")

    if args.torch_threads:
        TORCH_THREADS["OMP_NUM_THREADS"] = str(args.torch_threads)
    tmp = Path(tempfile.mkdtemp(prefix="radnode-scale-out-"))
    try:
        t0 = time.monotonic()
        series = write_input(tmp / "input", args.series, phantom=args.phantom)
        what = "phantom CT" if args.phantom else "real CT (ct_abdomen_pancreas_tcia)"
        print(f"input: {args.series} series of {what}, {sum(map(len, series))} instances, "
              f"written in {time.monotonic() - t0:.1f} s", flush=True)
        results: dict[str, list[dict[str, float]]] = {k: [] for k in keys}
        for repeat in range(args.repeats):
            for key in keys:  # interleaved, so that drift in the machine's load spreads out
                folder = tmp / f"{key}-{repeat + 1}"
                folder.mkdir()
                t0 = time.monotonic()
                figures = run_case(CASES[key], series, folder=folder,
                                   quiet_period=args.quiet_period, senders=args.senders,
                                   idle_wait_s=args.idle_wait)
                results[key].append(figures)
                print(f"{key} run {repeat + 1}: {figures['series_per_min']:.1f} series/min "
                      f"(wall {figures['wall_s']:.1f} s; analysis span "
                      f"{figures['analysis_span_s']:.1f} s; inference "
                      f"{figures['inference_s']:.2f} s/series; cores busy "
                      f"{figures['cores_busy']:.2f}, of which others "
                      f"{figures['cpu_other_s'] / figures['cpu_window_s']:.2f}; before: "
                      f"{figures['cores_busy_before']:.2f}); case took "
                      f"{time.monotonic() - t0:.0f} s",
                      flush=True)
                if not args.keep:
                    shutil.rmtree(folder / "data", ignore_errors=True)
        threads = f", OMP_NUM_THREADS={args.torch_threads}" if args.torch_threads else ""
        title = (f"scale-out: {args.series} series of {what}, {args.senders} storescu "
                 f"association(s), quiet period {args.quiet_period:g} s{threads}, median of "
                 f"{args.repeats} run(s); {machine()}")
        print("\n" + title + "\n")
        print(report(results, markdown=False))
        if args.markdown:
            args.markdown.write_text(f"{title}\n\n{report(results, markdown=True)}\n")
            print(f"\nMarkdown written to {args.markdown}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
