"""The production path: PostgreSQL, Redis, the node and two workers as separate processes.

Nothing is faked: the machine's PostgreSQL and Redis (a database and a key
prefix of the test's own), ``radnode db upgrade`` as its own step,
``radnode serve`` without an embedded worker, two ``radnode worker``
processes (as on two GPU machines sharing the data directory), three dcmtk
``storescu`` scanners sending at once, and dcmtk ``storescp`` as the PACS with
unique file names, so that a result sent twice would show as two files.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
import yaml
from sqlalchemy import create_engine, text

from service.db.session import normalize_url
from service.dicom.phantom import write_ct_phantom
from tests.integration.conftest import (
    Peer,
    free_port,
    received_files,
    require_tool,
    running_storescp,
    stop,
    wait_for_port,
)

pytestmark = pytest.mark.integration

SENDERS = ("CT1", "CT2", "MR1")
SERIES_PER_SENDER = 2


def _radnode(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout, check=False)


def _spawn(log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "service.cli", *args], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _rows(url: str, sql: str) -> list[tuple[object, ...]]:
    engine = create_engine(normalize_url(url))
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql))]
    finally:
        engine.dispose()


def _wait(condition: object, timeout_s: float, what: str, *logs: Path) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
                      for log in logs if log.exists())
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{tails}")


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Peer]:
    """dcmtk storescp with unique file names: a duplicate delivery is a second file."""
    with running_storescp(tmp_path, "+uf") as peer:
        yield peer


def test_postgres_redis_two_workers_concurrent_senders(
        tmp_path: Path, postgres_url: str, redis_broker: tuple[str, str], pacs: Peer) -> None:
    """Several series from several senders: each analysed once, each result delivered once."""
    redis_url, key_prefix = redis_broker
    port, http_port = free_port(), free_port()
    data_dir = tmp_path / "shared-data"
    config = tmp_path / "radnode.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(data_dir),
        # Two SCP processes, as a hospital node on several cores runs (deploy/hospital.yaml).
        "dicom": {"ae_title": "RADNODE", "host": "127.0.0.1", "port": port, "processes": 2,
                  "aes": [{"ae_title": "RADNODE", "calling_ae_titles": list(SENDERS)}]},
        "http": {"port": http_port},
        "database": {"url": postgres_url, "auto_upgrade": False},
        "broker": {"url": redis_url, "key_prefix": key_prefix, "embedded_worker": False},
        "completion": {"quiet_period_s": 2, "release_quiet_s": 1},
        "worker": {"queued_ahead": 2, "warm_up": True},
        "destinations": [pacs.address],
    }))
    logs = [tmp_path / "node.log", tmp_path / "worker-1.log", tmp_path / "worker-2.log"]

    # The schema is its own step: before it, neither node nor worker starts.
    check = _radnode(config, "db", "check")
    assert check.returncode == 1 and "radnode db upgrade" in check.stderr, check
    refused = _radnode(config, "serve", timeout=60)
    assert refused.returncode != 0
    assert "run `radnode db upgrade` first" in refused.stderr, refused.stderr[-2000:]
    upgraded = _radnode(config, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr[-2000:]
    assert "(newest)" in upgraded.stdout
    assert _radnode(config, "db", "check").returncode == 0

    node = _spawn(logs[0], "serve", "--config", str(config))
    workers: list[subprocess.Popen[bytes]] = []
    senders: list[subprocess.Popen[bytes]] = []
    try:
        wait_for_port(port, node)
        workers = [_spawn(log, "worker", "--config", str(config), "--queues", "gpu")
                   for log in logs[1:]]
        # Both workers up, models warm (they report to the workers table) before the scanners send.
        _wait(lambda: len(_rows(postgres_url, "select name from workers")) == 2, 180,
              "two worker processes reporting ready", *logs)

        series_uids: set[str] = set()
        for index, sender in enumerate(SENDERS):
            folder = tmp_path / "scanner" / sender
            for k in range(SERIES_PER_SENDER):
                files = write_ct_phantom(folder / str(k), slices=24, rows=96, columns=96,
                                         seed=10 * index + k + 1)
                series_uids.add(str(pydicom.dcmread(files[0], stop_before_pixels=True)
                                    .SeriesInstanceUID))
            senders.append(subprocess.Popen(
                [require_tool("storescu"), "-aet", sender, "-aec", "RADNODE", "+sd", "+r",
                 "127.0.0.1", str(port), str(folder)],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True))
        assert len(series_uids) == len(SENDERS) * SERIES_PER_SENDER
        for sender_process in senders:
            assert sender_process.wait(timeout=180) == 0

        expected_results = 2 * len(series_uids)  # a SEG and an SR per series
        _wait(lambda: _rows(postgres_url, "select count(*) from deliveries "
                                          "where state = 'sent'")[0][0] == expected_results,
              300, "every SEG and SR delivered", *logs)
        time.sleep(2.0)  # a duplicate job or delivery would show up now

        # Operations on PostgreSQL: readiness, the metrics' duration SQL, the API's queries.
        assert _radnode(config, "users", "add", "ops", "--role", "admin",
                        "--no-password").returncode == 0
        token = _radnode(config, "tokens", "create", "ops").stdout.strip()
        auth = {"Authorization": f"Bearer {token}"}
        api = f"http://127.0.0.1:{http_port}"
        ready = httpx.get(f"{api}/readyz", headers=auth, timeout=30)
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["broker"]["ok"]
        metrics = httpx.get(f"{api}/metrics", headers=auth, timeout=30).text
        assert 'radnode_job_duration_seconds_count{model="radnode-builtin-ct"} 6.0' in metrics
        assert 'radnode_hop_seconds_count{hop="started_to_encoded"} 6.0' in metrics
        assert "radnode_scrape_errors_total 0.0" in metrics
        studies = httpx.get(f"{api}/api/v1/studies", headers=auth, timeout=30).json()
        assert studies["total"] == len(series_uids)  # the phantom gives each series a study

        jobs = _rows(postgres_url, "select s.series_instance_uid, j.state, j.attempts, j.worker "
                                   "from jobs j join series s on s.id = j.series_id")
        results = _rows(postgres_url, "select sop_instance_uid from results")
        deliveries = _rows(postgres_url, "select state, attempts from deliveries")
        instances = _rows(postgres_url, "select count(*) from instances")[0][0]
    finally:
        for process in [*senders, *workers, node]:
            stop(process)  # type: ignore[arg-type]

    assert instances == 24 * len(series_uids)
    # Every series analysed exactly once, by one of the two workers.
    assert sorted(uid for uid, *_ in jobs) == sorted(series_uids)
    assert {(state, attempts) for _, state, attempts, _ in jobs} == {("succeeded", 1)}
    assert len({worker for *_, worker in jobs}) == 2, jobs  # both workers took jobs
    # Every result delivered exactly once: one file per SOP Instance UID in the PACS.
    assert len(results) == expected_results
    assert deliveries == [("sent", 1)] * expected_results
    received = Counter(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                       for path in received_files(pacs.folder))
    assert set(received) == {uid for (uid,) in results}
    assert set(received.values()) == {1}
    # Each worker received as many Celery messages as it ran jobs: no duplicate delivery.
    received_messages = [len(re.findall(r"Task radnode\.analyse_series\[[-0-9a-f]+\] received",
                                        log.read_text())) for log in logs[1:]]
    assert sum(received_messages) == len(series_uids), received_messages
    assert "database postgresql+psycopg://postgres@" in logs[0].read_text()
    assert re.search(r"SCP AE RADNODE listening: plain 127\.0\.0\.1:\d+; 2 SCP processes",
                     logs[0].read_text())
    assert os.path.isfile(data_dir / ".radnode-data-dir")


def test_worker_refuses_without_the_shared_data_dir(tmp_path: Path, postgres_url: str,
                                                    redis_broker: tuple[str, str]) -> None:
    """A worker whose data_dir is not the node's (the NFS mount is missing) does not start."""
    redis_url, key_prefix = redis_broker
    config = tmp_path / "worker.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "not-mounted"),
        "database": {"url": postgres_url, "auto_upgrade": False},
        "broker": {"url": redis_url, "key_prefix": key_prefix},
    }))
    (tmp_path / "not-mounted").mkdir()
    run = _radnode(config, "worker", "--queues", "gpu")
    assert run.returncode == 1
    assert "is not the node's data directory" in run.stderr
    assert ".radnode-data-dir" in run.stderr


def _children(pid: int) -> dict[int, dict[str, str]]:
    """Child processes of ``pid`` and their environments (from /proc)."""
    found: dict[int, dict[str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent != pid:
                continue
            raw = (entry / "environ").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        found[int(entry.name)] = dict(item.decode(errors="replace").partition("=")[::2]
                                      for item in raw.split(b"\0") if item)
    return found


def test_one_worker_process_per_gpu_pinned_and_restarted(tmp_path: Path) -> None:
    """``radnode worker --gpus 0,1``: a process per GPU with CUDA_VISIBLE_DEVICES, supervised."""
    from service.db import migrate
    from service.node import mark_data_dir

    data = tmp_path / "data"
    data.mkdir()
    mark_data_dir(data)
    migrate.upgrade(f"sqlite:///{data / 'radnode.db'}")
    env = {**os.environ, "RADNODE_DATA_DIR": str(data), "RADNODE_WORKER__WARM_UP": "false"}
    log = tmp_path / "gpu-workers.log"
    with log.open("wb") as out:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--gpus", "0,1", "--queues", "gpu"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(lambda: len(_children(supervisor.pid)) == 2, 60, "two GPU worker processes", log)
        children = _children(supervisor.pid)
        assert sorted(e.get("CUDA_VISIBLE_DEVICES", "") for e in children.values()) == ["0", "1"]
        # Each is a Celery worker of its own: its pool process reports to the workers table.
        _wait(lambda: len(_rows(f"sqlite:///{data / 'radnode.db'}",
                                "select name from workers")) == 2, 120,
              "both GPU workers reporting", log)
        # One dies: the supervisor starts it again, on the same GPU.
        victim = next(pid for pid, e in children.items() if e["CUDA_VISIBLE_DEVICES"] == "1")
        os.kill(victim, 9)
        _wait(lambda: sorted(_children(supervisor.pid)) != sorted(children)
              and len(_children(supervisor.pid)) == 2, 60, "the GPU 1 worker restarted", log)
        again = _children(supervisor.pid)
        assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in again.values()) == ["0", "1"]
        supervisor.terminate()  # SIGTERM: warm shutdown of both
        assert supervisor.wait(timeout=150) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in again)
    finally:
        stop(supervisor)  # type: ignore[arg-type]
    text_log = log.read_text()
    assert "GPU 1 worker exited" in text_log and "radnode-gpu0-" in text_log
