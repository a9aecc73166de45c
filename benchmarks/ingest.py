"""Ingest throughput: instances/s and MB/s into radnode, against dcmtk storescp.

One run sends the same series with dcmtk ``storescu`` to

* ``radnode serve --no-worker`` (a subprocess; SQLite, fsync'd spool),
* dcmtk ``storescp -od DIR +xa PORT`` (writes every file; no fsync, no database),
* Orthanc, when ``Orthanc`` is on PATH (skipped with a note otherwise),

and prints, per receiver and series, the median over ``--repeats`` runs of the
seconds from storescu's start to its exit (it exits once its association is
released), instances/s, MB/s (1 MB = 10^6 bytes of the sent files) and the
ratio of that throughput to storescp's. Every repeat starts a fresh receiver
with a new, empty data folder, and afterwards checks that the receiver holds
every instance (radnode: rows in ``<data_dir>/radnode.db``; storescp: files;
Orthanc: ``/statistics``); a shortfall stops the benchmark.

Series: the real CT in ``../shared/data/ct_abdomen_pancreas_tcia`` (or
``--input DIR``) and a many-small-instances series of ``--small-count``
synthetic 64×64 CT instances written with pydicom into a temporary folder.

Main table: ``TCP_NODELAY=1`` in the environment of storescu and storescp
(Debian's dcmtk leaves Nagle's algorithm on unless told; with it on, a small
DIMSE message can wait ~40 ms for the peer's delayed ACK). Second table:
a stock storescu (no ``TCP_NODELAY``) against radnode and against storescp,
the latter both with ``TCP_NODELAY=1`` (same receiver as the main table) and
stock; its small case is the first ``--stock-small-count`` (200) instances,
since with Nagle on each instance costs tens of milliseconds whatever the
receiver.

    .venv/bin/python benchmarks/ingest.py [--repeats 3] [--input DIR]
        [--small-count 1000] [--stock-small-count 200] [--no-stock]
        [--markdown [FILE]] [--profile FILE] [--store-times]
        [--compare COMMIT [--pairs N]]

``--profile FILE`` adds, per series, one untimed send to radnode with py-spy
attached to it (``pip install py-spy``), writes py-spy's raw (collapsed)
stacks to FILE (the first series; ``FILE-1``... for the others) and prints the
top frames. py-spy counts a thread in ``time.sleep`` as active: pynetdicom's
polling loops (``dul.py`` ``run_reactor``, ``association.py``
``_run_reactor``) show up although they wait.

``--compare COMMIT`` (with ``--pairs N``, default 10) measures a change instead: radnode
at COMMIT and at this checkout, each from a temporary git worktree, in N pairs that alternate
which goes first, with storescp in every round; it prints the median of the pairwise ratios
of seconds and of the node's CPU seconds during the send. Every run ends with ``sync``, so
that no run is slowed by the writeback of an earlier one's unflushed files.

``--store-times`` runs radnode with its HTTP API on loopback (``/metrics`` open),
waits for it before each send, and after each radnode run prints that run's
``radnode_cstore_store_seconds``: p50, p99 and how many stores took over 10 ms,
so that a slow run can be told from a stalling disk.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
REAL_CT = REPO.parent / "shared" / "data" / "ct_abdomen_pancreas_tcia"
STORESCU = shutil.which("storescu", path="/usr/bin") or shutil.which("storescu")
STORESCP = shutil.which("storescp", path="/usr/bin") or shutil.which("storescp")
ECHOSCU = shutil.which("echoscu", path="/usr/bin") or shutil.which("echoscu")
CALLING_AE = "BENCH"


class BenchmarkError(RuntimeError):
    """A receiver did not start or did not get every instance."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk_env(nodelay: bool) -> dict[str, str]:
    """The environment for a dcmtk tool: ``TCP_NODELAY=1`` or no TCP_NODELAY at all."""
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- series

@dataclass
class Series:
    name: str
    folder: Path
    count: int
    size_bytes: int


def describe_series(name: str, folder: Path) -> Series:
    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise SystemExit(f"no *.dcm files in {folder}")
    # Read every file once so that the first timed run does not pay for a cold page cache.
    size = 0
    for path in files:
        size += len(path.read_bytes())
    return Series(name, folder, len(files), size)


def write_small_series(folder: Path, count: int, size: int = 64) -> None:
    """``count`` synthetic ``size``×``size`` CT instances of one series (explicit VR LE)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.4 * size) ** 2
    for i in range(count):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = "Bench^Ingest"
        ds.PatientID = "BENCH-INGEST"
        ds.StudyDate = ds.SeriesDate = "20260101"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.AccessionNumber = "BENCH1"
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 1.0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        pixels = np.where(body, 1064, 24) + rng.integers(-20, 20, (size, size))
        ds.PixelData = pixels.astype("<i2").tobytes()
        ds.save_as(folder / f"IMG{i + 1:05d}.dcm", enforce_file_format=True)


# --------------------------------------------------------------------------- receivers

@dataclass
class Receiver:
    """A receiving AE started fresh, in its own folder, for every repeat."""

    label: str
    aet: str
    nodelay: bool = True  # TCP_NODELAY=1 in a dcmtk receiver's environment
    port: int = 0
    folder: Path = Path()
    proc: subprocess.Popen[bytes] | None = None
    log: Path = Path()
    extra: dict[str, int] = field(default_factory=dict)
    #: The checkout a radnode receiver runs from (``--compare`` runs another commit's).
    repo: Path = REPO

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def start(self, folder: Path, ready_timeout_s: float = 60.0) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        self.port = free_port()
        self.log = folder.parent / f"{folder.name}.log"
        cmd, env = self.command()
        assert ECHOSCU is not None
        with self.log.open("wb") as log_file:
            self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                         env=env, cwd=self.repo, start_new_session=True)
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise BenchmarkError(f"{self.label} exited with {self.proc.returncode} at start:"
                                     f"\n{log_tail(self.log)}")
            echo = subprocess.run([ECHOSCU, "-to", "2", "-aet", CALLING_AE, "-aec", self.aet,
                                   "127.0.0.1", str(self.port)],
                                  capture_output=True, env=dcmtk_env(True))
            if echo.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise BenchmarkError(f"{self.label} does not answer C-ECHO on port {self.port}:"
                                     f"\n{log_tail(self.log)}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def wait_for(self, expected: int, timeout_s: float = 10.0) -> int:
        """The receiver's count once it reaches ``expected`` (or after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.count()
            if got >= expected or time.monotonic() > deadline:
                return got
            time.sleep(0.05)


#: ``--store-times``: radnode serves ``/metrics`` (open, on loopback) and each run prints
#: the store-time histogram (``radnode_cstore_store_seconds``).
STORE_TIMES = False


class Radnode(Receiver):
    http_port = 0

    def command(self) -> tuple[list[str], dict[str, str]]:
        venv_python = REPO / ".venv" / "bin" / "python"
        python = str(venv_python) if venv_python.exists() else sys.executable
        env = dict(os.environ)
        http = ["--no-http"]
        if STORE_TIMES:
            self.http_port = free_port()
            http = ["--http-host", "127.0.0.1", "--http-port", str(self.http_port)]
            env["RADNODE_HTTP__METRICS_AUTH"] = "false"
        return ([python, "-m", "service.cli", "serve", "--no-worker", *http,
                 "--ae-title", self.aet, "--host", "127.0.0.1", "--port", str(self.port),
                 "--data-dir", str(self.folder), "--quiet-period", "3600"], env)

    def start(self, folder: Path, ready_timeout_s: float = 60.0) -> None:
        super().start(folder, ready_timeout_s)
        if not STORE_TIMES:
            return
        # The SCP answers before the HTTP API is up; its start (imports, a password hash)
        # must not overlap the timed send.
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz",
                                            timeout=2):
                    break
            except OSError:  # urllib's URLError included
                if time.monotonic() > deadline:
                    raise BenchmarkError(f"{self.label}: no HTTP API on port {self.http_port}"
                                         f"\n{log_tail(self.log)}") from None
                time.sleep(0.1)
        time.sleep(0.5)

    def store_times(self) -> str:
        """The node's store-time histogram, in words (``--store-times``)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics",
                                    timeout=10) as response:
            text = response.read().decode()
        buckets: list[tuple[float, float]] = []
        for family in text_string_to_metric_families(text):
            if family.name == "radnode_cstore_store_seconds":
                buckets = sorted((float(x.labels["le"]), x.value) for x in family.samples
                                 if x.name.endswith("_bucket"))
        if not buckets or buckets[-1][1] == 0:
            return "no store times"
        count = buckets[-1][1]

        def at_most(q: float) -> str:
            bound = next(b for b, n in buckets if n >= q * count)
            return f"≤ {bound * 1e3:g} ms" if bound != float("inf") else "> 5 s"

        over = count - next(n for b, n in buckets if b == 0.01)
        return (f"store time p50 {at_most(0.5)}, p99 {at_most(0.99)}; "
                f"{over:.0f} of {count:.0f} over 10 ms")

    def count(self) -> int:
        db = self.folder / "radnode.db"
        if not db.exists():
            return 0
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0])


class RadnodeProcesses(Radnode):
    """radnode with ``dicom.processes`` SCP child processes (:mod:`service.scp.pool`)."""

    processes = 2

    def command(self) -> tuple[list[str], dict[str, str]]:
        cmd, env = super().command()
        return cmd, {**env, "RADNODE_DICOM__PROCESSES": str(self.processes)}


EATMYDATA = shutil.which("eatmydata")


class RadnodeNoFsync(Radnode):
    """radnode under eatmydata (fsync turned into a no-op): what durability costs."""

    def command(self) -> tuple[list[str], dict[str, str]]:
        assert EATMYDATA is not None
        cmd, env = super().command()
        return [EATMYDATA, *cmd], env


class RadnodePostgres(RadnodeProcesses):
    """radnode with SCP processes on PostgreSQL (the production database), a new database each run.

    ``server_url`` (``--postgres``) names a maintenance database on the server;
    each start creates ``radnode_bench_<hex>`` there and each stop drops it.
    """

    server_url = ""

    def _admin(self) -> Any:
        import psycopg

        return psycopg.connect(self.server_url, autocommit=True)

    def command(self) -> tuple[list[str], dict[str, str]]:
        from sqlalchemy.engine import make_url

        self.database = f"radnode_bench_{os.urandom(4).hex()}"
        with self._admin() as admin:
            admin.execute(f'CREATE DATABASE "{self.database}"')
        url = make_url(self.server_url).set(database=self.database)
        cmd, env = super().command()
        return cmd, {**env, "RADNODE_DATABASE__URL": url.render_as_string(hide_password=False)}

    def count(self) -> int:
        import psycopg
        from sqlalchemy.engine import make_url

        url = make_url(self.server_url).set(database=self.database)
        try:
            with psycopg.connect(url.render_as_string(hide_password=False)) as conn:
                row = conn.execute("SELECT COUNT(*) FROM instances").fetchone()
        except psycopg.Error:
            return 0  # not migrated yet
        return int(row[0]) if row else 0

    def stop(self) -> None:
        super().stop()
        with self._admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


class RadnodeProcessesNoFsync(RadnodeProcesses):
    """radnode with SCP processes under eatmydata (fsync turned into a no-op)."""

    def command(self) -> tuple[list[str], dict[str, str]]:
        assert EATMYDATA is not None
        cmd, env = super().command()
        return [EATMYDATA, *cmd], env


class Storescp(Receiver):
    def command(self) -> tuple[list[str], dict[str, str]]:
        assert STORESCP is not None
        return ([STORESCP, "-aet", self.aet, "-od", str(self.folder), "+xa", str(self.port)],
                dcmtk_env(self.nodelay))

    def count(self) -> int:
        return sum(1 for p in self.folder.iterdir() if p.is_file())


class Orthanc(Receiver):
    def command(self) -> tuple[list[str], dict[str, str]]:
        self.extra["http_port"] = free_port()
        config = {
            "Name": "radnode-bench", "DicomAet": self.aet, "DicomPort": self.port,
            "HttpPort": self.extra["http_port"], "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"), "StorageCompression": False,
            "Plugins": [], "HttpDescribeErrors": True,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        orthanc = shutil.which("Orthanc")
        assert orthanc is not None
        return [orthanc, str(path)], dict(os.environ)

    def count(self) -> int:
        url = f"http://127.0.0.1:{self.extra['http_port']}/statistics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(json.load(response)["CountInstances"])


# --------------------------------------------------------------------------- sending

def send(receiver: Receiver, series: Series, sender_nodelay: bool) -> float:
    """Send ``series`` with storescu; return seconds from its start to its exit."""
    assert STORESCU is not None
    cmd = [STORESCU, "-aet", CALLING_AE, "-aec", receiver.aet, "+sd", "+sp", "*.dcm",
           "127.0.0.1", str(receiver.port), str(series.folder)]
    env = dcmtk_env(sender_nodelay)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchmarkError(f"storescu → {receiver.label} exited with {done.returncode}:\n"
                             + done.stderr.decode(errors="replace")[-3000:])
    got = receiver.wait_for(series.count)
    if got != series.count:
        raise BenchmarkError(f"{receiver.label} holds {got} of {series.count} instances of "
                             f"{series.name} after storescu exited (see {receiver.log}):\n"
                             + done.stderr.decode(errors="replace")[-3000:])
    return seconds


@dataclass
class Case:
    table: str  # "main" or "stock"
    receiver: type[Receiver]
    label: str
    aet: str
    sender_nodelay: bool
    receiver_nodelay: bool = True
    baseline: bool = False  # the storescp row the ratio is taken against
    seconds: dict[str, list[float]] = field(default_factory=dict)


def build_cases(with_orthanc: bool) -> list[Case]:
    cases = [
        Case("main", Radnode, "radnode", "RADNODE", True),
        Case("main", Storescp, "storescp", "STORESCP", True, baseline=True),
    ]
    if EATMYDATA is not None:
        cases.append(Case("main", RadnodeNoFsync, "radnode, fsync off (eatmydata)", "RADNODE",
                          True))
    else:
        print("note: eatmydata not installed; no row for radnode with fsync off "
              "(apt-get install eatmydata)")
    if with_orthanc:
        cases.append(Case("main", Orthanc, "Orthanc", "ORTHANC", True))
    cases += [
        Case("stock", Radnode, "radnode", "RADNODE", False),
        Case("stock", Storescp, "storescp (TCP_NODELAY=1)", "STORESCP", False, baseline=True),
        Case("stock", Storescp, "storescp (stock)", "STORESCP", False, receiver_nodelay=False),
    ]
    return cases


def run_case(case: Case, series: Series, work: Path, tag: str) -> float:
    receiver = case.receiver(case.label, case.aet, nodelay=case.receiver_nodelay)
    try:
        receiver.start(work / tag)
        seconds = send(receiver, series, case.sender_nodelay)
        if STORE_TIMES and isinstance(receiver, Radnode):
            print(f"    {case.label}, {series.name}: {seconds:.2f} s; {receiver.store_times()}",
                  flush=True)
        return seconds
    finally:
        finish(receiver, work / tag)


def finish(receiver: Receiver, folder: Path) -> None:
    """Stop a receiver, delete its folder, and write out what the system still holds dirty.

    The next run then starts with no writeback of this one's files pending:
    storescp and eatmydata leave their files unflushed, and the kernel
    writes dirty pages back about 30 s later, during whatever runs then.
    """
    receiver.stop()
    shutil.rmtree(folder, ignore_errors=True)
    os.sync()


# --------------------------------------------------------------------------- profile

def profile_radnode(series: Series, work: Path, out: Path, rate: int) -> None:
    """One untimed send to radnode with py-spy attached; print the top frames."""
    py_spy = shutil.which("py-spy", path=str(REPO / ".venv" / "bin")) or shutil.which("py-spy")
    if py_spy is None:
        print("\nprofile: py-spy not found (.venv/bin/pip install py-spy); skipped")
        return
    receiver = Radnode("radnode", "RADNODE")
    try:
        receiver.start(work / "profile")
        assert receiver.proc is not None
        spy = subprocess.Popen([py_spy, "record", "--format", "raw", "--rate", str(rate),
                                "--nonblocking", "-o", str(out), "-p", str(receiver.proc.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # let py-spy attach
        seconds = send(receiver, series, sender_nodelay=True)
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=60)
        if not out.exists():
            print(f"\nprofile: py-spy wrote nothing:\n{err.decode(errors='replace')[-2000:]}")
            return
    finally:
        receiver.stop()
        shutil.rmtree(work / "profile", ignore_errors=True)
    print(f"\nprofile: {series.name} → radnode under py-spy ({rate} Hz, "
          f"{seconds:.2f} s with the profiler attached), raw stacks in {out}")
    summarise_profile(out)


def _function(frame: str) -> str:
    """``name (file:line)`` → ``name (file)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def summarise_profile(path: Path, top: int = 12) -> None:
    """Print py-spy raw stacks by thread role, by function, and the C-STORE handler's callees."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    roles: collections.Counter[str] = collections.Counter()
    handler: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        count = int(number)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        names = [_function(f) for f in frames]
        bare = [f.partition(" (")[0] for f in frames]
        own[names[-1]] += count
        for name in set(names):
            if not name.startswith(("Thread.", "BaseServer.", "BaseRequestHandler.")):
                total[name] += count
        if "Association.run_reactor" in bare:
            roles["association thread (DIMSE + the C-STORE handler)"] += count
        elif "DULServiceProvider.run_reactor" in bare:
            roles["DUL thread (socket reads, PDU decoding)"] += count
        elif "RequestHandler.handle" in bare:
            roles["association set-up"] += count
        else:
            roles["other threads"] += count
        if "handle_store" in bare:
            k = bare.index("handle_store")
            callee = names[k + 1] if k + 1 < len(names) else "(own)"
            handler[f"{frames[k].rsplit(':', 1)[-1].rstrip(')')}: {callee}"] += count
    if not samples:
        print("profile: no samples")
        return

    def pct(n: int) -> str:
        return f"{100 * n / samples:5.1f}%"

    print(f"{samples} samples (py-spy counts time.sleep as active). By thread:")
    for role, n in roles.most_common():
        print(f"  {pct(n)}  {role}")
    in_handler = sum(handler.values())
    print(f"C-STORE handler (handle_store): {pct(in_handler)} of samples; by callee "
          "(handlers.py line: function):")
    for key, n in handler.most_common(top):
        print(f"  {pct(n)}  {key}")
    print("top functions by own time:")
    for function, n in own.most_common(top):
        print(f"  {pct(n)}  {function}")
    print("top functions by inclusive time:")
    for function, n in total.most_common(top + 8):
        print(f"  {pct(n)}  {function}")


# --------------------------------------------------------------------------- report

def rows(cases: list[Case], table: str, series: list[Series]) -> list[list[str]]:
    out: list[list[str]] = []
    for s in series:
        base = next(c for c in cases if c.table == table and c.baseline)
        base_s = statistics.median(base.seconds[s.name])
        for case in (c for c in cases if c.table == table):
            values = case.seconds[s.name]
            med = statistics.median(values)
            out.append([
                s.name, case.label, str(s.count), f"{s.size_bytes / 1e6:.1f}",
                " / ".join(f"{v:.2f}" for v in values), f"{med:.2f}",
                f"{s.count / med:.0f}", f"{s.size_bytes / 1e6 / med:.1f}",
                f"{base_s / med:.2f}×",
            ])
    return out


HEADER = ["series", "receiver", "instances", "MB", "runs (s)", "median (s)",
          "instances/s", "MB/s", "vs storescp"]
TITLES = {
    "main": "storescu and storescp with TCP_NODELAY=1",
    "stock": "stock storescu (no TCP_NODELAY); ratio against storescp with TCP_NODELAY=1",
}


def print_table(title: str, body: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [HEADER, *body]) for i in range(len(HEADER))]
    print(f"\n{title}")
    line = "  ".join(h.ljust(w) if i < 2 else h.rjust(w)
                     for i, (h, w) in enumerate(zip(HEADER, widths, strict=True)))
    print(line)
    print("-" * len(line))
    for r in body:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def markdown(tables: dict[str, list[list[str]]], notes: list[str]) -> str:
    parts: list[str] = []
    for table, body in tables.items():
        parts.append(f"{TITLES[table]}:\n")
        parts.append("| " + " | ".join(HEADER) + " |")
        parts.append("|" + "---|" * 2 + "---:|" * (len(HEADER) - 2))
        parts.extend("| " + " | ".join(r) + " |" for r in body)
        parts.append("")
    parts.extend(notes)
    return "\n".join(parts).rstrip() + "\n"


def copy_with_new_uids(source: Path, folder: Path, copies: int) -> list[Series]:
    """``copies`` copies of the series in ``source``, each with new Study/Series/SOP UIDs."""
    import pydicom
    from pydicom.uid import generate_uid

    out = []
    for k in range(copies):
        target = folder / f"copy-{k}"
        target.mkdir(parents=True)
        study, series_uid = generate_uid(), generate_uid()
        for path in sorted(source.glob("*.dcm")):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(target / path.name, enforce_file_format=True)
        out.append(describe_series(f"copy {k}", target))
    return out


def send_concurrent(receiver: Receiver, series: list[Series]) -> float:
    """Send each series with its own storescu (TCP_NODELAY=1), all at once; return seconds."""
    assert STORESCU is not None
    start = time.perf_counter()
    senders = [subprocess.Popen([STORESCU, "-aet", CALLING_AE, "-aec", receiver.aet, "+sd",
                                 "+sp", "*.dcm", "127.0.0.1", str(receiver.port), str(s.folder)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=dcmtk_env(True)) for s in series]
    codes = [p.wait() for p in senders]
    seconds = time.perf_counter() - start
    if any(codes):
        raise BenchmarkError(f"storescu → {receiver.label} exited with {codes}")
    total = sum(s.count for s in series)
    got = receiver.wait_for(total)
    if got != total:
        raise BenchmarkError(f"{receiver.label} holds {got} of {total} instances")
    return seconds


def concurrent_associations(source: Path, work: Path, senders: int, repeats: int,
                            with_orthanc: bool, processes: int = 0,
                            postgres: str = "") -> None:
    """Aggregate instances/s of ``senders`` storescu sending distinct copies at once.

    With ``processes`` > 1, radnode with that many SCP processes runs too
    (row ``radnode ×N``), and the same under eatmydata when it is installed
    (row ``×N fsync off``: what durability costs with concurrent senders); the
    plain ``radnode`` row is the default (one process). With ``postgres`` (a
    PostgreSQL URL), the SCP processes also run on PostgreSQL (row ``×N
    PostgreSQL``), the production database, with a new database each repeat.
    """
    copies = copy_with_new_uids(source, work / "concurrent", senders)
    total = sum(s.count for s in copies)
    size = sum(s.size_bytes for s in copies)
    receivers: list[tuple[type[Receiver], str, str]] = [
        (Radnode, "radnode", "RADNODE"), (Storescp, "storescp", "STORESCP")]
    if processes > 1:
        RadnodeProcesses.processes = processes
        receivers.insert(1, (RadnodeProcesses, f"radnode ×{processes}", "RADNODE"))
        if EATMYDATA is not None:  # what durability costs with several SCP processes
            receivers.insert(2, (RadnodeProcessesNoFsync, f"×{processes} fsync off", "RADNODE"))
        if postgres:
            RadnodePostgres.server_url = postgres
            receivers.insert(2, (RadnodePostgres, f"×{processes} PostgreSQL", "RADNODE"))
    if with_orthanc:
        receivers.append((Orthanc, "Orthanc", "ORTHANC"))
    seconds: dict[str, list[float]] = {label: [] for _, label, _ in receivers}
    for rep in range(repeats):
        for cls, label, aet in receivers:
            receiver = cls(label, aet)
            try:
                receiver.start(work / f"c{rep}-{aet}")
                seconds[label].append(send_concurrent(receiver, copies))
            finally:
                receiver.stop()
                shutil.rmtree(work / f"c{rep}-{aet}", ignore_errors=True)
            print(f"  repeat {rep + 1}: {label:<10} {seconds[label][-1]:6.2f} s", flush=True)
    base = total / statistics.median(seconds["storescp"])
    print(f"\n{senders} concurrent storescu (TCP_NODELAY=1), {total} instances, "
          f"{size / 1e6:.1f} MB, median of {repeats}")
    print(f"{'receiver':<12} {'runs (s)':>28} {'median':>8} {'inst/s':>8} {'MB/s':>7} "
          f"{'vs storescp':>12}")
    for label, runs in seconds.items():
        median = statistics.median(runs)
        print(f"{label:<12} {' / '.join(f'{r:.2f}' for r in runs):>28} {median:8.2f} "
              f"{total / median:8.0f} {size / 1e6 / median:7.1f} {total / median / base:11.2f}×")


def durability_pairs(series: list[Series], work: Path, pairs: int) -> None:
    """Paired runs, fsync on and off back to back, alternating the order; print the ratios.

    On a shared machine the speed drifts by more than what fsync costs; a
    ratio of two runs seconds apart cancels most of the drift, and the
    median of the ratios is the figure.
    """
    if EATMYDATA is None:
        raise SystemExit("eatmydata not found: apt-get install eatmydata")
    on = Case("main", Radnode, "radnode", "RADNODE", True)
    off = Case("main", RadnodeNoFsync, "radnode, fsync off (eatmydata)", "RADNODE", True)
    print(f"\ndurability cost: {pairs} pairs per series, TCP_NODELAY=1 on both sides")
    print(f"{'series':<12} {'fsync on (s)':>14} {'fsync off (s)':>14} {'on/off':>8}   runs on/off")
    for s in series:
        ratios: list[float] = []
        runs: list[str] = []
        seconds_on: list[float] = []
        seconds_off: list[float] = []
        for k in range(pairs):
            first, second = (on, off) if k % 2 == 0 else (off, on)
            a = run_case(first, s, work, f"d{k}a")
            b = run_case(second, s, work, f"d{k}b")
            t_on, t_off = (a, b) if first is on else (b, a)
            seconds_on.append(t_on)
            seconds_off.append(t_off)
            ratios.append(t_on / t_off)
            runs.append(f"{t_on:.2f}/{t_off:.2f}")
        cost = statistics.median(ratios)
        print(f"{s.name:<12} {statistics.median(seconds_on):14.2f} "
              f"{statistics.median(seconds_off):14.2f} {cost:8.3f}   {' '.join(runs)}")
    print("on/off: median of the pairwise ratios of seconds; 1.03 = durability costs 3 %")


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process so far (``/proc/PID/stat``, Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_radnode_run(repo: Path, series: Series, work: Path, tag: str) -> tuple[float, float]:
    """One send to radnode run from ``repo``: seconds, and the node's CPU seconds during it."""
    receiver = Radnode(f"radnode ({tag})", "RADNODE", repo=repo)
    try:
        receiver.start(work / tag)
        time.sleep(3.0)  # the start's own work (HTTP off: imports, recovery) is over
        assert receiver.proc is not None
        before = process_cpu_seconds(receiver.proc.pid)
        seconds = send(receiver, series, True)
        return seconds, process_cpu_seconds(receiver.proc.pid) - before
    finally:
        finish(receiver, work / tag)


def compare_commits(series: list[Series], work: Path, pairs: int, commit: str) -> None:
    """Paired runs of radnode at ``commit`` and at this checkout; print the ratios.

    Both sides run from temporary git worktrees side by side, with this
    checkout's virtual environment: ``base`` at ``commit``, ``new`` at this
    checkout's state (``git stash create``: its uncommitted changes to
    tracked files included). Run from two different folders, the same
    commit differed by up to 10 % between them here, so neither side runs
    from the repository itself. Each pair runs both, one after the other,
    in alternating order, then storescp; each run starts a fresh receiver
    and ends with ``sync``. Printed per series: the median of the pairwise
    ratios of seconds (new / base) and of the node's CPU seconds during the
    send (utime + stime), how many pairs ``new`` won, and both medians
    against storescp's in the same rounds.
    """
    parent = Path(tempfile.mkdtemp(prefix="radnode-compare-"))
    base, new = parent / "base", parent / "new"
    state = subprocess.run(["git", "-C", str(REPO), "stash", "create"], check=True,
                           capture_output=True, text=True).stdout.strip() or "HEAD"
    for folder, revision in ((base, commit), (new, state)):
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder),
                        revision], check=True, capture_output=True)
    scp = Case("main", Storescp, "storescp", "STORESCP", True, baseline=True)
    try:
        print(f"\n{pairs} pairs per series: radnode at {commit} (base) and at this checkout "
              f"({state[:12]}, new), one storescu association each, TCP_NODELAY=1")
        for s in series:
            ratios: list[float] = []
            cpu_ratios: list[float] = []
            seconds: dict[str, list[float]] = {"base": [], "new": [], "storescp": []}
            for k in range(pairs):
                order = ("base", "new") if k % 2 == 0 else ("new", "base")
                runs = {name: timed_radnode_run(base if name == "base" else new, s, work,
                                                f"c{k}{name}") for name in order}
                seconds["storescp"].append(run_case(scp, s, work, f"c{k}scp"))
                for name in ("base", "new"):
                    seconds[name].append(runs[name][0])
                ratios.append(runs["new"][0] / runs["base"][0])
                cpu_ratios.append(runs["new"][1] / max(runs["base"][1], 1e-3))
                print(f"  {s.name} pair {k + 1}: base {runs['base'][0]:.3f} s "
                      f"(CPU {runs['base'][1]:.2f} s), new {runs['new'][0]:.3f} s "
                      f"(CPU {runs['new'][1]:.2f} s), new/base {ratios[-1]:.3f}; storescp "
                      f"{seconds['storescp'][-1]:.3f} s", flush=True)
            median = {name: statistics.median(v) for name, v in seconds.items()}
            print(f"{s.name}: new/base {statistics.median(ratios):.3f} (new faster in "
                  f"{sum(r < 1 for r in ratios)} of {pairs}), CPU new/base "
                  f"{statistics.median(cpu_ratios):.3f}; medians base {median['base']:.3f} s, "
                  f"new {median['new']:.3f} s, storescp {median['storescp']:.3f} s: "
                  f"vs storescp base {median['storescp'] / median['base']:.2f}×, "
                  f"new {median['storescp'] / median['new']:.2f}×")
    finally:
        for folder in (base, new):
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(folder)], capture_output=True)
        shutil.rmtree(parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per receiver and series (0 with --profile: profile only)")
    parser.add_argument("--input", type=Path, default=None,
                        help=f"series to send as the large case [{REAL_CT}]")
    parser.add_argument("--small-count", type=int, default=1000,
                        help="synthetic 64×64 CT instances in the small case (0: none)")
    parser.add_argument("--stock-small-count", type=int, default=200,
                        help="instances of the small case sent by the stock storescu "
                        "(the first N; 0: all)")
    parser.add_argument("--no-stock", action="store_true",
                        help="skip the second table (stock storescu)")
    parser.add_argument("--markdown", nargs="?", const="-", default=None, metavar="FILE",
                        help="also write the tables as markdown to FILE (no FILE: stdout)")
    parser.add_argument("--profile", type=Path, default=None, metavar="FILE",
                        help="also profile radnode receiving each series with py-spy "
                        "(raw stacks: FILE for the first, FILE-1 etc. for the others)")
    parser.add_argument("--profile-rate", type=int, default=200)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where receivers write [a new temporary folder]")
    parser.add_argument("--concurrent", type=int, default=0, metavar="N",
                        help="only measure N storescu sending distinct copies of the large "
                        "series at once: aggregate instances/s against storescp's")
    parser.add_argument("--processes", type=int, default=0, metavar="N",
                        help="with --concurrent: also run radnode with dicom.processes N")
    parser.add_argument("--postgres", default="", metavar="URL",
                        help="with --concurrent and --processes: also run radnode's SCP "
                        "processes on this PostgreSQL server (e.g. "
                        "postgresql://postgres@127.0.0.1:5432/postgres); a database is "
                        "created and dropped per repeat")
    parser.add_argument("--durability", type=int, default=0, metavar="PAIRS",
                        help="only measure what durability costs: PAIRS back-to-back runs of "
                        "radnode with fsync and under eatmydata, per series, alternating "
                        "which goes first; prints the median of the pairwise ratios")
    parser.add_argument("--compare", default="", metavar="COMMIT",
                        help="only compare radnode at COMMIT (a git worktree) with this "
                        "checkout: --pairs pairs per series, alternating which goes first, "
                        "storescp in every round; prints the pairwise ratios of seconds and "
                        "of the node's CPU seconds")
    parser.add_argument("--pairs", type=int, default=10,
                        help="pairs per series with --compare")
    parser.add_argument("--store-times", action="store_true",
                        help="radnode also serves /metrics on loopback; after each of its runs "
                        "print its C-STORE store times (radnode_cstore_store_seconds): the "
                        "structure check, fsync and commit per instance, and how many took "
                        "over 10 ms (a stalling disk)")
    args = parser.parse_args()
    global STORE_TIMES
    STORE_TIMES = args.store_times

    for tool, name in ((STORESCU, "storescu"), (STORESCP, "storescp"), (ECHOSCU, "echoscu")):
        if tool is None:
            raise SystemExit(f"{name} not found: install dcmtk")
    with_orthanc = shutil.which("Orthanc") is not None
    if not with_orthanc:
        print("note: Orthanc is not on PATH; its row is skipped")

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="radnode-ingest-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        large_dir = args.input or REAL_CT
        if not large_dir.is_dir():
            raise SystemExit(f"{large_dir} not found; pass --input DIR")
        series = [describe_series(large_dir.name if args.input else "CT 512×512", large_dir)]
        if args.small_count > 0:
            write_small_series(work / "small", args.small_count)
            series.append(describe_series("CT 64×64", work / "small"))
        for s in series:
            print(f"series {s.name}: {s.count} instances, {s.size_bytes / 1e6:.1f} MB "
                  f"({s.folder})")

        # The stock table's small case is a prefix of the small series: with Nagle on, every
        # instance costs ~40-90 ms whatever the receiver, so more instances add only minutes.
        per_table = {"main": series, "stock": list(series)}
        if args.small_count > 0 and 0 < args.stock_small_count < args.small_count:
            subset = work / "small-stock"
            subset.mkdir()
            for path in sorted((work / "small").glob("*.dcm"))[:args.stock_small_count]:
                shutil.copy2(path, subset / path.name)
            per_table["stock"][1] = describe_series("CT 64×64", subset)

        if args.concurrent > 0:
            concurrent_associations(large_dir, work, args.concurrent, args.repeats,
                                    with_orthanc, args.processes, args.postgres)
            print(f"\nbenchmark took {time.monotonic() - started:.0f} s")
            return
        if args.durability > 0:
            durability_pairs(series, work, args.durability)
            print(f"\nbenchmark took {time.monotonic() - started:.0f} s")
            return
        if args.compare:
            compare_commits(series, work, args.pairs, args.compare)
            print(f"\nbenchmark took {time.monotonic() - started:.0f} s")
            return
        cases = [c for c in build_cases(with_orthanc) if not (args.no_stock and c.table == "stock")]
        for case in cases:
            case.seconds = {s.name: [] for s in per_table[case.table]}
        # Repeats outermost, so that a drift in the machine's speed hits every row alike.
        for rep in range(args.repeats):
            for n in range(len(series)):
                for i, case in enumerate(cases):
                    s = per_table[case.table][n]
                    seconds = run_case(case, s, work, f"r{rep}-c{i}")
                    case.seconds[s.name].append(seconds)
                    print(f"  repeat {rep + 1}: {s.name:<12} {s.count:5d} {case.table:<5} "
                          f"{case.label:<26} {seconds:6.2f} s", flush=True)

        # --repeats 0 with --profile: the profile alone, no table.
        tables = {t: rows(cases, t, per_table[t])
                  for t in dict.fromkeys(c.table for c in cases)} if args.repeats > 0 else {}
        for table, body in tables.items():
            print_table(TITLES[table], body)
        notes = [
            f"Seconds from storescu's start to its exit, median of {args.repeats}; "
            "MB = 10^6 bytes of the sent files; vs storescp = receiver's throughput / "
            "storescp's (same table).",
        ]
        if not with_orthanc:
            notes.append("Orthanc was not on PATH: no Orthanc row.")
        if tables:
            print()
            for note in notes:
                print(note)
        if args.markdown is not None and tables:
            text = markdown(tables, notes)
            if args.markdown == "-":
                print("\n" + text, end="")
            else:
                Path(args.markdown).write_text(text)
                print(f"markdown written to {args.markdown}")
        if args.profile is not None:
            for n, s in enumerate(series):
                out = args.profile if n == 0 else args.profile.with_name(
                    f"{args.profile.stem}-{n}{args.profile.suffix}")
                profile_radnode(s, work, out, args.profile_rate)
    print(f"\nbenchmark took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except BenchmarkError as exc:
        raise SystemExit(f"FAILED: {exc}") from None
