"""DICOM network security of ``radnode serve`` against dcmtk peers (echoscu, storescu).

The node runs as its own process with a config file; the peers are dcmtk's
programs (Debian's are built with OpenSSL) and the openssl CLI; certificates
are made by :mod:`tests.pki`. Covered: association policy (Called and Calling
AE Titles, peer addresses) with the A-ASSOCIATE-RJ reasons dcmtk reports, the
per-peer cap, idle and stalled connections, the TLS listener beside the plain
one, client certificates, TLS 1.1 refused, the rejection counter in
``/metrics`` and the audit trail, and a rule routing by Called AE Title.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.integration.conftest import (
    Peer,
    free_port,
    require_tool,
    start_node,
    stop,
    wait_for_port,
)
from tests.pki import Pki, make_pki

pytestmark = pytest.mark.integration

POLICY = [
    {"ae_title": "RADNODE", "calling_ae_titles": ["CT1", "MR2"]},
    {"ae_title": "RESEARCH", "peer_addresses": ["10.0.0.0/8"]},  # excludes 127.0.0.1
    {"ae_title": "LOOPBACK", "peer_addresses": ["127.0.0.0/8", "::1"]},  # includes it
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=[1, 2], ids=["1-process", "2-processes"])
def processes(request: pytest.FixtureRequest) -> int:
    """``dicom.processes``: associations in the node's process, or in two SCP processes."""
    return int(request.param)


@pytest.fixture
def nodes() -> Any:
    started: list[Peer] = []
    yield started
    for node in started:
        stop(node.process)


def _serve(tmp_path: Path, started: list[Peer], dicom: dict[str, Any],
           extra: dict[str, Any] | None = None) -> Peer:
    """``radnode serve`` (no worker) with ``dicom`` merged into its config file."""
    config = {"dicom": {"acse_timeout_s": 5, "network_timeout_s": 5, **dicom},
              "http": {"metrics_auth": False}, **(extra or {})}
    path = tmp_path / "radnode.yaml"
    path.write_text(yaml.safe_dump(config))
    node = start_node(tmp_path, "--config", str(path), "--no-worker")
    started.append(node)
    tls = dicom.get("tls")
    if tls:
        wait_for_port(tls["port"], node.process)
    return node


def _tls(pki: Pki, port: int, **more: Any) -> dict[str, Any]:
    return {"port": port, "cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
            **more}


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, check=False)


def echoscu(port: int, calling: str, called: str, *tls: str) -> subprocess.CompletedProcess[str]:
    return _run(require_tool("echoscu"), *tls, "-aet", calling, "-aec", called, "127.0.0.1",
                str(port))


def storescu(port: int, calling: str, called: str, files: list[Path],
             *tls: str) -> subprocess.CompletedProcess[str]:
    return _run(require_tool("storescu"), *tls, "-aet", calling, "-aec", called, "127.0.0.1",
                str(port), *map(str, files))


def _client_tls(pki: Pki, who: str = "client") -> tuple[str, ...]:
    """dcmtk's options for TLS with a client certificate, verifying the node's."""
    if who == "anonymous":
        return ("+tla", "+cf", str(pki.ca))
    cert, key = ((pki.client_cert, pki.client_key) if who == "client"
                 else (pki.stranger_cert, pki.stranger_key))
    return ("+tls", str(key), str(cert), "+cf", str(pki.ca))


def rejected_counts(node: Peer) -> dict[str, float]:
    """``radnode_associations_rejected_total`` by reason, from the node's ``/metrics``."""
    deadline = time.monotonic() + 30  # the HTTP server starts after the DICOM listeners
    while True:
        try:
            with urllib.request.urlopen(f"{node.api}/metrics", timeout=10) as response:
                text = response.read().decode()
            break
        except urllib.error.URLError as exc:
            if isinstance(exc, urllib.error.HTTPError) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    counts = {}
    for line in text.splitlines():
        if line.startswith("radnode_associations_rejected_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('reason="')[1].split('"')[0]] = float(value)
    return counts


def audited(node: Peer) -> list[dict[str, Any]]:
    """The ``association`` audit events, oldest first."""
    with sqlite3.connect(node.folder / "radnode.db") as db:
        rows = db.execute("SELECT actor, detail FROM audit_events WHERE action = 'association' "
                          "ORDER BY id").fetchall()
    return [{"actor": actor, **json.loads(detail)} for actor, detail in rows]


def _wait(condition: Callable[[], bool], timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; node log:\n{log.read_text()[-6000:]}")


def _ct(test_data_dir: Path) -> list[Path]:
    return sorted((test_data_dir / "seg_sr" / "dcmqi_ct_liver_seg" / "ct_3slice").glob("*.dcm"))


def _stored(node: Peer) -> list[tuple[str, str]]:
    with sqlite3.connect(node.folder / "radnode.db") as db:
        return db.execute("SELECT s.calling_ae_title, s.called_ae_title FROM instances i "
                          "JOIN series s ON s.id = i.series_id ORDER BY i.id").fetchall()


# -- association policy ----------------------------------------------------------------------


def test_rejected_ae_titles_and_addresses_with_dcmtk(
        tmp_path: Path, nodes: list[Peer], processes: int, test_data_dir: Path) -> None:
    node = _serve(tmp_path, nodes, {"aes": POLICY, "processes": processes})
    cases = [  # (calling, called, dcmtk's words for the A-ASSOCIATE-RJ)
        ("CT1", "NOPE", "Reason: Called AE Title Not Recognized"),
        ("CT9", "RADNODE", "Reason: Calling AE Title Not Recognized"),
        ("CT1", "RESEARCH", "Reason: No Reason"),  # 127.0.0.1 is not in 10.0.0.0/8
    ]
    for calling, called, words in cases:
        answer = echoscu(node.port, calling, called)
        assert answer.returncode != 0, (calling, called)
        assert "Result: Rejected Permanent, Source: Service User" in answer.stderr
        assert words in answer.stderr, answer.stderr
    refused_store = storescu(node.port, "CT9", "RADNODE", _ct(test_data_dir))
    assert refused_store.returncode != 0
    assert "Calling AE Title Not Recognized" in refused_store.stderr + refused_store.stdout
    assert _stored(node) == []  # nothing of a refused peer reaches the spool

    for calling, called in (("CT1", "RADNODE"), ("mr2 ", "radnode"), ("ANYONE", "LOOPBACK")):
        answer = echoscu(node.port, calling, called)
        assert answer.returncode == 0, (calling, called, answer.stderr)
    sent = storescu(node.port, "CT1", "RADNODE", _ct(test_data_dir))
    assert sent.returncode == 0, sent.stderr
    assert _stored(node) == [("CT1", "RADNODE")] * 3

    counts = rejected_counts(node)
    assert counts["called-ae-title-not-recognized"] == 1
    assert counts["calling-ae-title-not-recognized"] == 2
    assert counts["peer-address-not-allowed"] == 1
    rejected = [e for e in audited(node) if e["outcome"] == "rejected"]
    # Sorted: with two SCP processes each writes its own rows, in no set order.
    assert sorted((e["actor"], e["called_ae"], e["reason"], e["peer_address"])
                  for e in rejected) == sorted([
        ("ae:CT1", "NOPE", "called-ae-title-not-recognized", "127.0.0.1"),
        ("ae:CT9", "RADNODE", "calling-ae-title-not-recognized", "127.0.0.1"),
        ("ae:CT1", "RESEARCH", "peer-address-not-allowed", "127.0.0.1"),
        ("ae:CT9", "RADNODE", "calling-ae-title-not-recognized", "127.0.0.1"),
    ])
    log = node.log.read_text()
    assert ("association rejected: calling AE CT1, called AE RESEARCH, from 127.0.0.1: "
            "address 127.0.0.1 may not call RESEARCH") in log


def test_open_node_warns_once_and_accepts_anyone(tmp_path: Path, nodes: list[Peer],
                                                 processes: int) -> None:
    node = _serve(tmp_path, nodes, {"processes": processes})
    assert echoscu(node.port, "ANYONE", "WHATEVER").returncode == 0
    assert node.log.read_text().count("dicom.aes is not set: any peer may associate") == 1


def _hold(port: int, count: int) -> list[Any]:
    ae = AE(ae_title="CT1")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", port, ae_title="RADNODE") for _ in range(count)]
    assert all(a.is_established for a in held)
    return held


def test_per_peer_cap_with_dcmtk(tmp_path: Path, nodes: list[Peer], processes: int) -> None:
    node = _serve(tmp_path, nodes, {"max_associations_per_peer": 2, "processes": processes})
    held = _hold(node.port, 2)
    answer = echoscu(node.port, "CT1", "RADNODE")
    assert answer.returncode != 0
    assert ("Result: Rejected Transient, Source: Service Provider (Presentation Related)"
            in answer.stderr)
    assert "Reason: Local Limit Exceeded" in answer.stderr
    held[0].release()
    _wait(lambda: echoscu(node.port, "CT1", "RADNODE").returncode == 0, 10,
          "a released association to free its slot", node.log)
    held[1].release()
    assert rejected_counts(node)["peer-association-limit"] == 1


def _closed_after(sock: socket.socket) -> float:
    began = time.monotonic()
    while sock.recv(256):
        pass
    return time.monotonic() - began


def test_idle_and_stalled_sockets_are_closed_while_others_are_served(
        tmp_path: Path, nodes: list[Peer], processes: int, pki: Pki) -> None:
    tls_port = free_port()
    node = _serve(tmp_path, nodes, {"acse_timeout_s": 3, "network_timeout_s": 2,
                                    "tls": _tls(pki, tls_port),
                                    "processes": processes})

    def connect(port: int) -> socket.socket:  # another peer: 127.0.0.2
        return socket.create_connection(("127.0.0.1", port), timeout=30,
                                        source_address=("127.0.0.2", 0))

    idle_plain, idle_tls, stalled = connect(node.port), connect(tls_port), connect(node.port)
    stalled.sendall(b"\x01\x00\x00\x00")  # part of an A-ASSOCIATE-RQ header, then nothing
    with idle_plain, idle_tls, stalled:
        # Meanwhile both listeners serve 127.0.0.1, TLS included (no handshake blocks them).
        assert echoscu(node.port, "CT1", "RADNODE").returncode == 0
        answer = echoscu(tls_port, "CT1", "RADNODE", *_client_tls(pki, "anonymous"))
        assert answer.returncode == 0, answer.stderr
        waited = [_closed_after(s) for s in (idle_plain, idle_tls, stalled)]
    # Each is closed by the node within its timeout (plus slack), not left open.
    assert all(w < 8 for w in waited), waited
    log = node.log.read_text()
    assert "TLS connection from 127.0.0.2 closed during the handshake: TimeoutError" in log


def test_connections_without_a_request_are_capped_per_peer(
        tmp_path: Path, nodes: list[Peer], processes: int) -> None:
    node = _serve(tmp_path, nodes, {"acse_timeout_s": 20, "max_associations_per_peer": 2,
                                    "processes": processes})
    idle = [socket.create_connection(("127.0.0.1", node.port), timeout=30,
                                     source_address=("127.0.0.2", 0)) for _ in range(2)]
    try:
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", node.port), timeout=30,
                                      source_address=("127.0.0.2", 0)) as third:
            assert _closed_after(third) < 3  # closed at once, not after 20 s
        assert echoscu(node.port, "CT1", "RADNODE").returncode == 0  # others still served
    finally:
        for sock in idle:
            sock.close()
    assert rejected_counts(node)["peer-connection-limit"] == 1


# -- TLS ---------------------------------------------------------------------------------------


def test_tls_echo_and_store_beside_the_plain_listener(
        tmp_path: Path, nodes: list[Peer], processes: int, pki: Pki, test_data_dir: Path) -> None:
    tls_port = free_port()
    node = _serve(tmp_path, nodes, {"tls": _tls(pki, tls_port), "aes": POLICY,
                                    "processes": processes})
    anonymous = _client_tls(pki, "anonymous")
    answer = echoscu(tls_port, "CT1", "RADNODE", *anonymous)
    assert answer.returncode == 0, answer.stderr
    sent = storescu(tls_port, "MR2", "RADNODE", _ct(test_data_dir), *anonymous)
    assert sent.returncode == 0, sent.stderr
    assert echoscu(node.port, "CT1", "RADNODE").returncode == 0  # plain, at the same time
    # The policy holds on the TLS listener too.
    refused = echoscu(tls_port, "CT9", "RADNODE", *anonymous)
    assert "Reason: Calling AE Title Not Recognized" in refused.stderr
    assert _stored(node) == [("MR2", "RADNODE")] * 3
    # A plain association to the TLS port does not get through.
    assert echoscu(tls_port, "CT1", "RADNODE").returncode != 0
    ready = f"radnode ready: AE RADNODE on plain 127.0.0.1:{node.port}, TLS 127.0.0.1:{tls_port}"
    # The node logs it once HTTP is up too, which may be after the listeners served all this.
    _wait(lambda: ready in node.log.read_text(), 30, "the node's ready line", node.log)


def test_tls_client_certificate_required(tmp_path: Path, nodes: list[Peer], processes: int,
                                         pki: Pki) -> None:
    tls_port = free_port()
    node = _serve(tmp_path, nodes, {"tls": _tls(pki, tls_port, ca_file=str(pki.ca),
                                                require_client_cert=True),
                                    "processes": processes})
    good = echoscu(tls_port, "CT1", "RADNODE", *_client_tls(pki, "client"))
    assert good.returncode == 0, good.stderr
    for who in ("anonymous", "stranger"):  # no certificate; one from an unrelated CA
        answer = echoscu(tls_port, "CT1", "RADNODE", *_client_tls(pki, who))
        assert answer.returncode != 0, who
        assert "Association Request Failed" in answer.stderr, answer.stderr
    assert rejected_counts(node)["tls-handshake-failed"] == 2
    log = node.log.read_text()
    assert "TLS handshake with 127.0.0.1 failed: PEER_DID_NOT_RETURN_A_CERTIFICATE" in log
    assert "TLS handshake with 127.0.0.1 failed: CERTIFICATE_VERIFY_FAILED" in log


def test_tls_only_node_and_tls_1_1_refused(tmp_path: Path, nodes: list[Peer], pki: Pki) -> None:
    tls_port = free_port()
    node = _serve(tmp_path, nodes, {"tls": _tls(pki, tls_port)})
    openssl = require_tool("openssl")

    def s_client(*version: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [openssl, "s_client", "-connect", f"127.0.0.1:{tls_port}", "-CAfile", str(pki.ca),
             *version], input="", capture_output=True, text=True, timeout=30, check=False)

    # OpenSSL 3 offers TLS 1.1 only at security level 0: the node must still refuse it.
    old = s_client("-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert old.returncode != 0
    assert "Cipher is (NONE)" in old.stdout  # no session
    assert "TLS handshake with 127.0.0.1 failed: UNSUPPORTED_PROTOCOL" in node.log.read_text()
    for version, name in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
        new = s_client(version)
        assert new.returncode == 0, new.stderr
        assert f"Protocol  : {name}" in new.stdout or f"New, {name}" in new.stdout
        assert "Verify return code: 0 (ok)" in new.stdout


def test_tls_only_configuration(tmp_path: Path, nodes: list[Peer], pki: Pki) -> None:
    tls_port = free_port()
    config = {"dicom": {"ae_title": "RADNODE", "host": "127.0.0.1", "port": None,
                        "tls": _tls(pki, tls_port)},
              "http": {"metrics_auth": False}, "broker": {"embedded_worker": False}}
    path = tmp_path / "radnode.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "tls-only.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*_serve_cmd(), "--config", str(path), "--data-dir", str(tmp_path / "node"),
             "--http-port", str(free_port())],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(tls_port, process)
        assert echoscu(tls_port, "CT1", "RADNODE", *_client_tls(pki, "anonymous")).returncode == 0
        assert "SCP AE RADNODE (and any other) listening: TLS 127.0.0.1:" in log.read_text()
    finally:
        stop(process)


def _serve_cmd() -> list[str]:
    import sys

    return [sys.executable, "-m", "service.cli", "serve"]


def test_config_check_and_serve_fail_clearly_on_missing_certificates(
        tmp_path: Path, pki: Pki) -> None:
    config = {"dicom": {"tls": {"port": free_port(), "cert_file": str(tmp_path / "none.pem"),
                                "key_file": str(pki.server_key)}}}
    path = tmp_path / "radnode.yaml"
    path.write_text(yaml.safe_dump(config))
    checked = _run(*_serve_cmd()[:-1], "config", "check", "--config", str(path))
    assert checked.returncode != 0
    assert f"dicom.tls.cert_file {tmp_path / 'none.pem'}: No such file or directory" in (
        checked.stderr)
    served = _run(*_serve_cmd(), "--config", str(path), "--data-dir", str(tmp_path / "node"),
                  "--no-http", "--no-worker", "--port", str(free_port()))
    assert served.returncode != 0
    assert "cannot start: dicom.tls.cert_file" in served.stderr


# -- routing by Called AE Title ---------------------------------------------------------------


def test_rule_routes_by_called_ae_title(tmp_path: Path, nodes: list[Peer],
                                        test_data_dir: Path) -> None:
    rules = [
        {"name": "research", "when": {"association": "called_ae", "equals": "RESEARCH"},
         "models": ["radnode-builtin-ct"]},
        {"name": "clinical", "when": {"association": "called_ae", "equals": "RADNODE"},
         "models": ["radnode-builtin-ct"]},
    ]
    node = _serve(tmp_path, nodes,
                  {"aes": [{"ae_title": "RADNODE", "calling_ae_titles": ["CT1"]},
                           {"ae_title": "RESEARCH", "calling_ae_titles": ["CT1"],
                            "peer_addresses": ["127.0.0.1"]}]},
                  {"rules": rules, "completion": {"release_quiet_s": 0.5}})
    research = _ct(test_data_dir)
    clinical = sorted((test_data_dir / "ct_head_ge_gantry_tilt").glob("*.dcm"))[:3]
    assert storescu(node.port, "CT1", "RESEARCH", research).returncode == 0
    assert storescu(node.port, "CT1", "RADNODE", clinical).returncode == 0

    def jobs() -> dict[str, str]:
        with sqlite3.connect(node.folder / "radnode.db") as db:
            rows = db.execute("SELECT s.called_ae_title, j.rule_names FROM jobs j "
                              "JOIN series s ON s.id = j.series_id").fetchall()
        return dict(rows)

    _wait(lambda: len(jobs()) == 2, 60, "a job for each series", node.log)
    assert jobs() == {"RESEARCH": "research", "RADNODE": "clinical"}
