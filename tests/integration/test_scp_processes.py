"""``dicom.processes: 2``: real SCP child processes behind the node's listener.

dcmtk's storescu sends the real CT over loopback to ``radnode serve``; the
node hands each connection to one of its two SCP processes. These tests
check what an admin relies on: both processes serve, nothing acknowledged
is lost when one dies or the node stops, the counters in ``/metrics`` add
up, and no SCP process outlives the node. (The association policy with two
processes is checked in ``test_network_security.py``, parametrized.)
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import Peer, require_tool, start_node, stop

pytestmark = pytest.mark.integration


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Peer]:
    config = {"dicom": {"processes": 2}, "http": {"metrics_auth": False}}
    path = tmp_path / "radnode.yaml"
    path.write_text(yaml.safe_dump(config))
    peer = start_node(tmp_path, "--config", str(path), "--no-worker", quiet_period=3600)
    yield peer
    stop(peer.process)


def _wait(condition: Callable[[], bool], timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; node log:\n{log.read_text()[-6000:]}")


def _children(node: Peer) -> dict[int, int]:
    """SCP process index -> pid of its latest start, from the node's log."""
    started = re.findall(r"SCP process (\d+) started \(pid (\d+)\)", node.log.read_text())
    return {int(index): int(pid) for index, pid in started}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _stored(node: Peer) -> int:
    with sqlite3.connect(node.folder / "radnode.db", timeout=30) as db:
        return int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])


def _storescu(node: Peer, calling: str, files: list[Path]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [require_tool("storescu"), "-aet", calling, "-aec", "RADNODE", "127.0.0.1",
         str(node.port), *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TCP_NODELAY": "1"})


def _metrics(node: Peer) -> str:
    """``/metrics``; empty while the HTTP server is not up yet (it starts after the SCP)."""
    try:
        with urllib.request.urlopen(f"{node.api}/metrics", timeout=10) as response:
            return str(response.read().decode())
    except urllib.error.URLError as exc:
        if isinstance(exc, urllib.error.HTTPError):
            raise
        return ""


def _metric(node: Peer, name: str) -> float:
    text = _metrics(node)
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_four_senders_are_spread_over_both_processes_and_all_is_counted(
        node: Peer, ct_series_dir: Path) -> None:
    files = sorted(ct_series_dir.glob("*.dcm"))
    senders = [_storescu(node, f"SCANNER{i}", files[i::4]) for i in range(4)]
    for sender in senders:
        out, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, out
    assert _stored(node) == len(files)
    spool = sorted(p.name for p in (node.folder / "spool").rglob("*.dcm"))
    assert len(spool) == len(files)
    children = set(_children(node).values())
    accepted = re.findall(r"\[(\d+)\] association accepted: calling AE SCANNER",
                          node.log.read_text())
    assert len(accepted) == 4
    assert {int(pid) for pid in accepted} == children  # both processes served
    # The node's /metrics adds up what both processes counted.
    _wait(lambda: _metric(node, "radnode_instances_received_total") == len(files), 10,
          "the counters of both processes in /metrics", node.log)
    with sqlite3.connect(node.folder / "radnode.db") as db:
        stored_bytes = db.execute("SELECT SUM(size_bytes) FROM instances").fetchone()[0]
    assert _metric(node, "radnode_received_bytes_total") == stored_bytes
    # Each process timed its stores: one observation per instance, each a positive time.
    _wait(lambda: _metric(node, "radnode_cstore_store_seconds_count") == len(files), 10,
          "the store times of both processes in /metrics", node.log)
    assert _metric(node, "radnode_cstore_store_seconds_sum") > 0
    _wait(lambda: _metric(node, "radnode_associations_total") == 8, 10,
          "4 accepted + 4 released associations in /metrics", node.log)
    with sqlite3.connect(node.folder / "radnode.db") as db:
        rows = db.execute("SELECT outcome, instances FROM associations").fetchall()
    assert sorted(rows) == sorted(("released", len(files[i::4])) for i in range(4))


def test_a_killed_scp_process_is_started_again_and_nothing_acknowledged_is_lost(
        node: Peer, ct_series_dir: Path) -> None:
    files = sorted(ct_series_dir.glob("*.dcm"))
    first = _storescu(node, "SCANNER", files[:40])
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    before = _children(node)
    os.kill(before[0], signal.SIGKILL)
    _wait(lambda: _children(node).get(0, before[0]) != before[0]
          and node.log.read_text().count("SCP process 0 ready") == 2, 30,
          "SCP process 0 to start again", node.log)
    assert "SCP process 0 exited (-9)" in node.log.read_text()
    assert _stored(node) == 40  # what was acknowledged before the kill is there
    # The node serves on with both processes (in turn: each gets one of these).
    for part in (files[40:80], files[80:]):
        sender = _storescu(node, "SCANNER", part)
        out, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, out
    assert _stored(node) == len(files)
    request = urllib.request.Request(f"{node.api}/readyz", headers=node.auth("viewer"))
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def test_sigterm_lets_the_transfer_finish_then_stops_every_scp_process(
        node: Peer, ct_series_dir: Path) -> None:
    files = sorted(ct_series_dir.glob("*.dcm"))
    children = _children(node)
    sender = _storescu(node, "SCANNER", files)
    _wait(lambda: _stored(node) > 5, 60, "the first instances", node.log)
    os.killpg(node.process.pid, signal.SIGTERM)
    out, _ = sender.communicate(timeout=120)
    assert sender.returncode == 0, out  # the association in flight was not cut off
    assert node.process.wait(timeout=60) == 0
    assert _stored(node) == len(files)
    assert not any(_alive(pid) for pid in children.values())
    assert "SCP process 0 stopped" in node.log.read_text()


def test_no_scp_process_outlives_a_killed_node(node: Peer) -> None:
    children = _children(node)
    assert len(children) == 2 and all(_alive(pid) for pid in children.values())
    os.killpg(node.process.pid, signal.SIGKILL)
    node.process.wait(timeout=30)
    _wait(lambda: not any(_alive(pid) for pid in children.values()), 30,
          "the SCP processes to exit after the node", node.log)
    # Each saw its channel to the node closed, aborted what it served and stopped.
    log = node.log.read_text()
    assert "SCP process 0: the node is gone; aborting its associations" in log
    assert "SCP process 1 stopped" in log


def test_a_port_in_use_stops_the_node_and_its_scp_processes(tmp_path: Path) -> None:
    config = tmp_path / "radnode.yaml"
    config.write_text(yaml.safe_dump({"dicom": {"processes": 2}}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        served = subprocess.run(
            [sys.executable, "-m", "service.cli", "serve", "--config", str(config),
             "--data-dir", str(tmp_path / "node"), "--host", "127.0.0.1", "--port", str(port),
             "--no-http", "--no-worker"],
            capture_output=True, text=True, timeout=120, check=False)
    assert served.returncode != 0
    assert "cannot start: [Errno 98] Address already in use" in served.stderr
    started = [int(pid) for pid in re.findall(r"SCP process \d+ started \(pid (\d+)\)",
                                               served.stderr)]
    assert len(started) == 2
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in started)


def test_max_associations_holds_for_the_node_not_for_each_process(tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    config = tmp_path / "radnode.yaml"
    config.write_text(yaml.safe_dump({"dicom": {"processes": 2, "max_associations": 2},
                                      "http": {"metrics_auth": False}}))
    node = start_node(tmp_path, "--config", str(config), "--no-worker")
    try:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(Verification)
        tries = [ae.associate("127.0.0.1", node.port, ae_title="RADNODE") for _ in range(4)]
        held = [a for a in tries if a.is_established]
        # Each process alone would take 2; the node takes 2 in all (1 if start_node's port
        # probe still held a slot, as pynetdicom counts a connection until it sees it closed).
        assert 1 <= len(held) <= 2, len(held)
        refused = len(tries) - len(held)
        line = f'radnode_associations_rejected_total{{reason="association-limit"}} {refused}.0'
        _wait(lambda: line in _metrics(node), 10, "the refusals in /metrics", node.log)
        for assoc in held:
            assoc.release()
        _wait(lambda: subprocess.run(
            [require_tool("echoscu"), "-aet", "LATER", "-aec", "RADNODE", "127.0.0.1",
             str(node.port)], capture_output=True, timeout=60, check=False).returncode == 0,
            10, "released associations to free their slots", node.log)
    finally:
        stop(node.process)
