"""Faults with real processes: SIGKILL of the node and of a worker, a broker that lost its
messages, a full disk, SIGTERM while a scanner sends. Nothing acknowledged may be lost, and
every series is analysed and delivered exactly once.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from service.dicom.phantom import write_ct_phantom
from tests.integration.conftest import (
    Peer,
    free_port,
    received_files,
    require_tool,
    start_node,
    stop,
    wait_for_port,
)

pytestmark = pytest.mark.integration


def query(node_dir: Path, sql: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"file:{node_dir / 'radnode.db'}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str,
               log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except sqlite3.OperationalError:
            pass  # database not created yet
        time.sleep(0.1)
    detail = log.read_text(errors="replace")[-4000:] if log else ""
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{detail}")


def storescu(port: int, folder: Path, *extra: str) -> subprocess.Popen[str]:
    exe = require_tool("storescu")
    return subprocess.Popen(
        [exe, "-aet", "SCANNER", "-aec", "RADNODE", *extra, "+sd", "+sp", "*.dcm",
         "127.0.0.1", str(port), str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def pacs_results(folder: Path) -> dict[str, str]:
    """SOP Instance UID -> Modality of every object the PACS holds."""
    found = {}
    for path in received_files(folder):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found[str(ds.SOPInstanceUID)] = str(ds.Modality)
    return found


def spool_is_consistent(node_dir: Path) -> int:
    """Every recorded instance has its file, no file lacks a row, no partial file; count."""
    spool = node_dir / "spool"
    recorded = {path for (path,) in query(node_dir, "select path from instances")}
    on_disk = {str(p.relative_to(spool)) for p in spool.rglob("*.dcm")}
    assert recorded <= on_disk, "an acknowledged instance is missing from the spool"
    assert on_disk <= recorded, "a file in the spool has no row"
    assert not list(spool.rglob(".incoming-*")), "a partial file was left behind"
    return len(recorded)


def worker_pids(node_dir: Path) -> list[int]:
    config = str(node_dir / "run" / "worker-config.yaml")
    run = subprocess.run(["pgrep", "-f", config], capture_output=True, text=True, check=False)
    return [int(pid) for pid in run.stdout.split()]


def test_sigkill_node_mid_transfer_then_restart(
    tmp_path: Path, ct_series_dir: Path, storescp_pacs: Peer
) -> None:
    node = start_node(tmp_path, destinations=(storescp_pacs.address,))
    sender = storescu(node.port, ct_series_dir, "-v")  # logs each C-STORE response
    try:
        wait_until(lambda: query(node.folder, "select count(*) from instances")[0][0] >= 30,
                   60, "30 instances stored", node.log)
        os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait()
        output, _ = sender.communicate(timeout=60)
    finally:
        stop(node.process)
        if sender.poll() is None:
            sender.kill()
    acknowledged = output.count("Received Store Response (Success)")
    # Right after the kill: every recorded instance is on disk, and so is every
    # acknowledged one. The rows of the last batch were still queued (their files are
    # fsynced with their marks and keep their received names: service/scp/durability.py),
    # and the one instance in flight may have been fsynced with its mark without being
    # acknowledged; the restart records both kinds. Partial files were never acknowledged.
    spool = node.folder / "spool"
    recorded = {path for (path,) in query(node.folder, "select path from instances")}
    assert all((spool / path).is_file() for path in recorded)
    assert 30 <= len(recorded) <= acknowledged < 134
    names = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
             for p in (spool / ".incoming").glob("receiving-*")
             if "user.radnode.stored" in os.listxattr(p)}
    queued = len(names - {Path(path).stem for path in recorded})
    assert acknowledged <= len(recorded) + queued <= acknowledged + 1
    # The embedded worker followed its node (PR_SET_PDEATHSIG), no orphan left.
    wait_until(lambda: not worker_pids(node.folder), 20, "the orphaned worker to exit")

    restarted = start_node(tmp_path, destinations=(storescp_pacs.address,))
    try:
        assert not list((restarted.folder / "spool").rglob(".incoming-*"))  # cleaned at start
        resend = storescu(restarted.port, ct_series_dir)  # the scanner sends the series again
        assert resend.wait(timeout=300) == 0, resend.stdout.read() if resend.stdout else ""
        wait_until(lambda: len(pacs_results(storescp_pacs.folder)) == 2, 300,
                   "SEG and SR in the PACS", restarted.log)
        time.sleep(3)  # anything else the node would send arrives now
    finally:
        stop(restarted.process)
    assert sorted(pacs_results(storescp_pacs.folder).values()) == ["SEG", "SR"]
    assert spool_is_consistent(restarted.folder) == 134
    assert query(restarted.folder, "select sum(duplicates) from instances") == [
        (len(recorded) + queued,)]
    # Processed once: the interrupted series got a fresh quiet period at restart, so it
    # completes once, with all 134 instances.
    assert query(restarted.folder, "select state, count(*) from jobs group by state") == [
        ("succeeded", 1)]
    assert query(restarted.folder, "select instance_count, completion_reason from series") == [
        (134, "association_released")]
    assert query(restarted.folder, "select state, count(*) from deliveries group by state") == [
        ("sent", 2)]


def test_sigkill_worker_mid_job(tmp_path: Path, ct_series_dir: Path, storescp_pacs: Peer) -> None:
    lease = {"RADNODE_WORKER__HEARTBEAT_INTERVAL_S": "0.5",
             "RADNODE_WORKER__HEARTBEAT_TIMEOUT_S": "4"}
    node = start_node(tmp_path, destinations=(storescp_pacs.address,), env=lease)
    try:
        sender = storescu(node.port, ct_series_dir)
        assert sender.wait(timeout=300) == 0
        wait_until(lambda: query(node.folder, "select state from jobs") == [("running",)],
                   120, "the job to run", node.log)
        killed = worker_pids(node.folder)
        assert killed
        for pid in killed:  # the worker's main process and its pool child
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: len(pacs_results(storescp_pacs.folder)) == 2, 300,
                   "SEG and SR in the PACS after the worker was killed", node.log)
        time.sleep(3)
        jobs = query(node.folder, "select state, attempts from jobs")
        deliveries = query(node.folder, "select state, attempts from deliveries")
        results = query(node.folder, "select kind, sop_instance_uid from results order by kind")
    finally:
        stop(node.process)
    assert jobs == [("succeeded", 2)]  # run again once, by the restarted worker
    assert deliveries == [("sent", 1), ("sent", 1)]
    assert {uid for _, uid in results} == set(pacs_results(storescp_pacs.folder))
    assert "lost its worker" in node.log.read_text()


def _queued_message_lost(tmp_path: Path, pacs: Peer, env: dict[str, str],
                         lose: Callable[[Peer], None]) -> None:
    """Queue a job, lose its broker message with ``lose(node)``, then start a worker.

    The worker runs as its own ``radnode worker`` process, as on a separate
    machine; the sweeper must publish the job again, and it must run once.
    """
    phantom = tmp_path / "phantom"
    write_ct_phantom(phantom, slices=24, rows=96, columns=96)
    env = {"RADNODE_WORKER__REPUBLISH_AFTER_S": "3", **env}
    node = start_node(tmp_path, "--no-worker", quiet_period=1,
                      destinations=(pacs.address,), env=env)
    worker: subprocess.Popen[bytes] | None = None
    try:
        assert storescu(node.port, phantom).wait(timeout=120) == 0
        wait_until(lambda: query(node.folder, "select state from jobs") == [("queued",)],
                   60, "the job to be queued", node.log)
        lose(node)
        worker_env = {**os.environ, **env, "RADNODE_DATA_DIR": str(node.folder)}
        with (tmp_path / "worker.log").open("wb") as out:
            worker = subprocess.Popen([sys.executable, "-m", "service.cli", "worker"],
                                      env=worker_env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        wait_until(lambda: len(pacs_results(pacs.folder)) == 2, 180,
                   "SEG and SR in the PACS", node.log)
        jobs = query(node.folder, "select state, attempts from jobs")
    finally:
        if worker is not None:
            stop(worker)  # type: ignore[arg-type]
        stop(node.process)
    assert jobs == [("succeeded", 1)]
    assert "publishing it again" in node.log.read_text()


def test_broker_lost_its_messages(tmp_path: Path, storescp_pacs: Peer) -> None:
    """The embedded broker's queue is wiped while a job waits."""

    def wipe(node: Peer) -> None:
        messages = list((node.folder / "broker" / "messages").glob("*.msg"))
        assert len(messages) == 1
        messages[0].unlink()  # the broker restarted without persistence

    _queued_message_lost(tmp_path, storescp_pacs, {}, wipe)


def test_disk_reserve_refuses_with_a700(tmp_path: Path, ct_series_dir: Path) -> None:
    node = start_node(tmp_path, "--no-worker",
                      env={"RADNODE_STORAGE__MIN_FREE_MB": str(1 << 40)})
    try:
        first = sorted(ct_series_dir.glob("*.dcm"))[0]
        sent = subprocess.run(
            [require_tool("storescu"), "-v", "-aet", "SCANNER", "-aec", "RADNODE",
             "127.0.0.1", str(node.port), str(first)], capture_output=True, text=True, timeout=60,
            check=False)
        echo = subprocess.run(
            [require_tool("echoscu"), "-aec", "RADNODE", "127.0.0.1", str(node.port)],
            capture_output=True, text=True, timeout=60, check=False)
    finally:
        stop(node.process)
    assert sent.returncode != 0
    assert "Refused: OutOfResources" in sent.stdout + sent.stderr  # 0xA700
    assert echo.returncode == 0  # the node is still up
    assert query(node.folder, "select count(*) from instances") == [(0,)]
    assert not list((node.folder / "spool").rglob("*.dcm"))
    assert "below the reserve" in node.log.read_text()


def test_sigterm_drains_associations_in_flight(tmp_path: Path, ct_series_dir: Path) -> None:
    node = start_node(tmp_path, "--no-worker", quiet_period=60)
    sender = storescu(node.port, ct_series_dir)
    try:
        wait_until(lambda: query(node.folder, "select count(*) from instances")[0][0] >= 10,
                   60, "10 instances stored", node.log)
        # The SCP listens before the node's start ends (loops, HTTP API); a SIGTERM is acted
        # on once it has ended. On a loaded machine 10 instances can come before that.
        wait_until(lambda: "radnode ready" in node.log.read_text(), 60, "the node's start",
                   node.log)
        node.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        late = subprocess.run(
            [require_tool("echoscu"), "-aec", "RADNODE", "127.0.0.1", str(node.port)],
            capture_output=True, text=True, timeout=60, check=False)
        assert sender.wait(timeout=120) == 0, sender.stdout.read() if sender.stdout else ""
        assert node.process.wait(timeout=60) == 0
    finally:
        stop(node.process)
        if sender.poll() is None:
            sender.kill()
    assert late.returncode != 0  # no new association once draining
    assert spool_is_consistent(node.folder) == 134


def test_a_power_loss_that_undid_renames_loses_nothing(tmp_path: Path,
                                                      ct_series_dir: Path) -> None:
    """The state a power loss can leave: rows committed, files back under receiving-* names.

    The SCP fsyncs each file's data and commits its row before Success, but leaves the
    rename into the spool to the file system's journal (the file's own name in
    ``.incoming`` was on disk before the data set came). A real power loss cannot be
    caused here; its outcome is made by hand: the last files moved back, a cut-off file.
    """
    node = start_node(tmp_path, "--no-worker", quiet_period=3600)
    try:
        sender = storescu(node.port, ct_series_dir)
        assert sender.wait(timeout=120) == 0, sender.stdout.read() if sender.stdout else ""
    finally:
        stop(node.process)
    spool = node.folder / "spool"
    paths = sorted(path for (path,) in query(node.folder, "select path from instances"))
    assert len(paths) == 134
    originals = {path: (spool / path).read_bytes() for path in paths}
    undone = paths[-20:]  # the last instances received, whose renames were not committed
    for number, path in enumerate(undone):
        (spool / path).rename(spool / ".incoming" / f"receiving-lost{number:03d}")
    (spool / ".incoming" / "receiving-cutoff").write_bytes(originals[undone[0]][:5000])
    (spool / ".incoming" / "receiving-ready").write_bytes(b"")

    restarted = start_node(tmp_path, "--no-worker", quiet_period=3600)
    stop(restarted.process)
    assert spool_is_consistent(restarted.folder) == 134
    assert all((spool / path).read_bytes() == data for path, data in originals.items())
    assert list((spool / ".incoming").glob("receiving-lost*")) == []
    log = restarted.log.read_text()
    assert log.count("its rename was cut off by a crash") == 20
    assert "removed 1 received file(s) that were never acknowledged" in log


def test_a_power_cut_before_the_rows_were_flushed_loses_nothing(tmp_path: Path,
                                                                ct_series_dir: Path) -> None:
    """Rows committed without a flush, and spool names, lost; the marked files bring them back.

    With ``storage.batched_row_flush`` (the default) the SCP fsyncs each file with its
    mark, links it, queues its row and keeps the file's received name until a batch
    inserts and flushes the rows (service/scp/durability.py). Here the batch waits 10
    minutes, the node is killed after the whole series was acknowledged and before the
    A-RELEASE-RQ (which would run the batch), and what a power cut before the flush can
    take is taken by hand: the database goes back to a copy made before the send (the
    write-ahead log's unflushed frames are gone) and the spool names are removed (their
    directory entries never reached the disk).
    """
    env = {"RADNODE_STORAGE__ROW_FLUSH_INTERVAL_MS": "600000"}
    node = start_node(tmp_path, "--no-worker", quiet_period=3600, env=env)
    database = node.folder / "radnode.db"
    before = tmp_path / "before.db"
    try:
        live, copy = sqlite3.connect(database), sqlite3.connect(before)
        live.backup(copy)  # consistent, while the node runs
        live.close()
        copy.close()  # its last connection: the copy's own log is checkpointed into it
        assert not Path(f"{before}-wal").exists()
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(CTImageStorage, [ImplicitVRLittleEndian,
                                                  ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="RADNODE")
        assert assoc.is_established
        try:
            statuses = {int(assoc.send_c_store(path).Status)
                        for path in sorted(ct_series_dir.rglob("*.dcm"))}
            assert statuses == {0x0000}  # all 134 acknowledged
            assert query(node.folder, "select count(*) from instances") == [(0,)]  # queued
            os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait()
        finally:
            assoc.abort()
    finally:
        stop(node.process)
    spool = node.folder / "spool"
    marked = [p for p in (spool / ".incoming").glob("receiving-*")
              if "user.radnode.stored" in os.listxattr(p)]
    assert len(marked) == 134  # every file kept its received name: no flush came
    originals = {str(p.relative_to(spool)): p.read_bytes() for p in spool.rglob("*.dcm")}
    assert len(originals) == 134
    for name in ("radnode.db-wal", "radnode.db-shm"):
        (node.folder / name).unlink(missing_ok=True)
    shutil.copyfile(before, database)
    for path in spool.rglob("*.dcm"):
        path.unlink()
    db = sqlite3.connect(database)  # read-write: a WAL database wants its -shm file
    try:
        assert db.execute("select count(*) from instances").fetchall() == [(0,)]
    finally:
        db.close()

    restarted = start_node(tmp_path, "--no-worker", quiet_period=3600)
    stop(restarted.process)
    assert spool_is_consistent(restarted.folder) == 134
    assert all((spool / path).read_bytes() == data for path, data in originals.items())
    assert not list((spool / ".incoming").glob("receiving-*"))
    assert query(restarted.folder, "select instance_count, calling_ae_title, called_ae_title, "
                 "peer_address from series") == [(134, "SCANNER", "RADNODE", "127.0.0.1")]
    log = restarted.log.read_text()
    assert log.count("again from its file: a crash or a power cut lost its row") == 134


def test_the_batch_flush_lets_the_received_names_go(tmp_path: Path, ct_series_dir: Path) -> None:
    node = start_node(tmp_path, "--no-worker", quiet_period=3600)
    try:
        sender = storescu(node.port, ct_series_dir)
        assert sender.wait(timeout=120) == 0, sender.stdout.read() if sender.stdout else ""
        incoming = node.folder / "spool" / ".incoming"
        # Within its interval (50 ms) the flusher flushed the rows and removed the names;
        # the files made ahead for the next data sets (empty, unmarked) stay.
        wait_until(lambda: not [p for p in incoming.glob("receiving-*") if p.stat().st_size],
                   10, "the received names to go", node.log)
    finally:
        stop(node.process)
    assert spool_is_consistent(node.folder) == 134
    assert all(p.stat().st_nlink == 1 for p in (node.folder / "spool").rglob("*.dcm"))


def _redis_server(port: int, log: Path) -> subprocess.Popen[bytes]:
    """A private Redis without persistence (as the broker of a real deployment may run)."""
    exe = shutil.which("redis-server")
    assert exe is not None, "redis-server is not installed (apt-get install redis-server)"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_port(port, process)
    return process


def test_redis_broker_restarted_without_persistence(tmp_path: Path, storescp_pacs: Peer) -> None:
    """Redis restarts empty while a job waits; the node reconnects and publishes it again."""
    port = free_port()
    servers = [_redis_server(port, tmp_path / "redis.log")]

    def restart(_node: Peer) -> None:
        stop(servers[-1])  # the message is gone with it
        servers.append(_redis_server(port, tmp_path / "redis.log"))

    try:
        _queued_message_lost(tmp_path, storescp_pacs,
                             {"RADNODE_BROKER__URL": f"redis://127.0.0.1:{port}/0"}, restart)
    finally:
        for server in servers:
            stop(server)
