"""The SCP's association policy, listeners and TLS context.

Configuration validation and :class:`AssociationPolicy` decisions are tested
directly; the rest runs the node's SCP in this process (``start_scp``) with
real pynetdicom requestors on loopback: what A-ASSOCIATE-RJ a refused peer
receives, the per-peer cap, that rejected associations leave no thread
behind, and that a policy error refuses rather than admits.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service import metrics as metrics_module
from service.config import DicomSettings, ScpTlsSettings, Settings
from service.db.models import AuditEvent
from service.dicom.tls import server_context
from service.errors import ConfigError
from service.metrics import NodeMetrics
from service.scp import policy as policy_module
from service.scp.associations import AssociationRecorder
from service.scp.handlers import StoreContext
from service.scp.policy import AssociationPolicy, reason_of
from service.scp.server import Scp, start_scp
from tests.pki import Pki, make_pki

TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dicom(**values: Any) -> DicomSettings:
    return DicomSettings.model_validate(values)


AES = [
    {"ae_title": "RADNODE", "calling_ae_titles": ["CT1", "MR2"]},
    {"ae_title": "RESEARCH", "peer_addresses": ["10.0.0.0/8", "192.168.1.20"]},
    {"ae_title": "LAB", "calling_ae_titles": ["lab_pc"], "peer_addresses": ["fd00::/8"]},
]


# -- configuration ----------------------------------------------------------------------


def test_defaults_are_open_and_plain() -> None:
    settings = DicomSettings()
    assert settings.port == 11112 and settings.tls is None and settings.aes == []
    assert settings.max_associations_per_peer is None
    assert AssociationPolicy(settings).is_open


@pytest.mark.parametrize(("values", "message"), [
    ({"port": None}, "would not listen at all"),
    ({"aes": [{"ae_title": "OTHER"}]}, "dicom.ae_title RADNODE is not in dicom.aes"),
    ({"aes": [{"ae_title": "RADNODE"}, {"ae_title": "radnode "}]},
     "lists radnode more than once"),
    ({"aes": [{"ae_title": "RADNODE", "peer_addresses": ["10.0.0.5/8"]}]},
     "has host bits set: did you mean 10.0.0.0/8"),
    ({"aes": [{"ae_title": "RADNODE", "peer_addresses": ["ct.example.org"]}]},
     "is not an IP address or network"),
    ({"aes": [{"ae_title": "RADNODE", "calling_ae_titles": ["BAD\\AE"]}]}, "AE title"),
    ({"tls": {"cert_file": "c.pem", "key_file": "k.pem", "require_client_cert": True}},
     "require_client_cert needs dicom.tls.ca_file"),
    ({"tls": {"port": 11112, "cert_file": "c.pem", "key_file": "k.pem"}},
     "dicom.tls.port and dicom.port are both 11112"),
    ({"max_associations_per_peer": 0}, "greater than or equal to 1"),
])
def test_invalid_dicom_sections_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        dicom(**values)


def test_tls_only_and_normalised_networks() -> None:
    settings = dicom(port=None, tls={"cert_file": "c.pem", "key_file": "k.pem"},
                     aes=[{"ae_title": "RADNODE", "peer_addresses": ["10.1.2.3", "fd00::/8"]}])
    assert settings.port is None and settings.tls is not None and settings.tls.port == 2762
    assert settings.aes[0].peer_addresses == ["10.1.2.3/32", "fd00::/8"]


def test_yaml_file_with_aes_and_tls(tmp_path: Path) -> None:
    from service.config import load_settings

    config = tmp_path / "radnode.yaml"
    config.write_text(
        "dicom:\n  ae_title: RADNODE\n  port: null\n"
        "  tls: {port: 2763, cert_file: /etc/radnode/node.pem, key_file: /etc/radnode/node.key}\n"
        "  aes:\n    - {ae_title: RADNODE, calling_ae_titles: [CT1]}\n"
        "    - {ae_title: RESEARCH, peer_addresses: [10.0.0.0/8]}\n"
        "  max_associations_per_peer: 4\n")
    settings: Settings = load_settings(config, data_dir=tmp_path)
    assert settings.dicom.port is None and settings.dicom.tls is not None
    assert settings.dicom.tls.port == 2763
    assert [a.ae_title for a in settings.dicom.aes] == ["RADNODE", "RESEARCH"]
    assert settings.dicom.max_associations_per_peer == 4


# -- policy decisions ---------------------------------------------------------------------


def test_open_policy_accepts_anything() -> None:
    policy = AssociationPolicy(DicomSettings())
    assert policy.check("ANYTHING", "ANYONE", "203.0.113.9") is None


@pytest.mark.parametrize(("called", "calling", "address", "reason"), [
    ("RADNODE", "CT1", "203.0.113.9", None),
    ("radnode  ", " ct1", "203.0.113.9", None),  # spaces never count; case by default neither
    ("RADNODE", "CT2", "203.0.113.9", "calling-ae-title-not-recognized"),
    ("NOPE", "CT1", "203.0.113.9", "called-ae-title-not-recognized"),
    ("RESEARCH", "ANYONE", "10.200.0.1", None),
    ("RESEARCH", "ANYONE", "192.168.1.20", None),
    ("RESEARCH", "ANYONE", "192.168.1.21", "peer-address-not-allowed"),
    ("RESEARCH", "ANYONE", "::ffff:10.0.0.7", None),  # IPv4-mapped, as a dual-stack socket says
    ("RESEARCH", "ANYONE", "not-an-address", "peer-address-not-allowed"),
    ("LAB", "LAB_PC", "fd00::1", None),
    ("LAB", "LAB_PC", "fe80::1", "peer-address-not-allowed"),
    ("LAB", "OTHER", "fd00::1", "calling-ae-title-not-recognized"),  # AE checked first
])
def test_policy_decisions(called: str, calling: str, address: str, reason: str | None) -> None:
    policy = AssociationPolicy(dicom(aes=AES))
    refusal = policy.check(called, calling, address)
    assert (refusal.reason if refusal else None) == reason
    if refusal is not None:  # the detail names AE titles and addresses only
        assert "(" not in refusal.detail


def test_rj_fields_follow_ps3_8_table_9_21() -> None:
    policy = AssociationPolicy(dicom(aes=AES))
    called = policy.check("NOPE", "CT1", "10.0.0.1")
    calling = policy.check("RADNODE", "CT9", "10.0.0.1")
    address = policy.check("RESEARCH", "CT1", "172.16.0.1")
    assert called is not None and calling is not None and address is not None
    assert (called.result, called.source, called.diagnostic) == (1, 1, 7)
    assert (calling.result, calling.source, calling.diagnostic) == (1, 1, 3)
    assert (address.result, address.source, address.diagnostic) == (1, 1, 1)


def test_case_sensitive_ae_titles() -> None:
    policy = AssociationPolicy(dicom(aes=AES, ae_title_case_sensitive=True))
    assert policy.check("RADNODE", "CT1", "10.0.0.1") is None
    refusal = policy.check("radnode", "CT1", "10.0.0.1")
    assert refusal is not None and refusal.reason == "called-ae-title-not-recognized"
    refusal = policy.check("LAB", "LAB_PC", "fd00::1")
    assert refusal is not None and refusal.reason == "calling-ae-title-not-recognized"


def test_reason_of_pynetdicom_rejections() -> None:
    assert reason_of(2, 3, 2) == "association-limit"
    assert reason_of(1, 1, 7) == "called-ae-title-not-recognized"
    assert reason_of(1, 1, 3) == "calling-ae-title-not-recognized"
    assert reason_of(2, 2, 1) == "other"
    assert reason_of(None, None, None) == "other"


def test_metrics_know_every_reason(settings: Settings,
                                   session_factory: sessionmaker[Session]) -> None:
    assert metrics_module.REJECTION_REASONS == policy_module.REJECTION_REASONS
    metrics = NodeMetrics(lambda: settings, session_factory)
    metrics.rejected("peer-address-not-allowed")
    metrics.rejected("peer-address-not-allowed")
    metrics.rejected("made-up")  # bounded label set
    text = metrics.render()[0].decode()
    assert 'radnode_associations_rejected_total{reason="peer-address-not-allowed"} 2.0' in text
    assert 'radnode_associations_rejected_total{reason="other"} 1.0' in text
    assert 'radnode_associations_rejected_total{reason="tls-handshake-failed"} 0.0' in text


# -- TLS context --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_server_context_settings(pki: Pki) -> None:
    plain = server_context(ScpTlsSettings(cert_file=pki.server_cert, key_file=pki.server_key))
    assert plain.minimum_version == ssl.TLSVersion.TLSv1_2
    assert plain.verify_mode == ssl.CERT_NONE
    optional = server_context(ScpTlsSettings(cert_file=pki.server_cert,
                                             key_file=pki.server_key, ca_file=pki.ca))
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    required = server_context(ScpTlsSettings(cert_file=pki.server_cert, key_file=pki.server_key,
                                             ca_file=pki.ca, require_client_cert=True))
    assert required.verify_mode == ssl.CERT_REQUIRED


def test_server_context_errors_name_the_key(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match=r"dicom.tls.cert_file .*missing.pem: No such file"):
        server_context(ScpTlsSettings(cert_file=missing, key_file=pki.server_key))
    with pytest.raises(ConfigError, match=r"dicom.tls.key_file"):
        server_context(ScpTlsSettings(cert_file=pki.server_cert, key_file=missing))
    with pytest.raises(ConfigError, match=r"not a PEM certificate and its unencrypted private"):
        server_context(ScpTlsSettings(cert_file=pki.server_cert, key_file=pki.client_key))
    with pytest.raises(ConfigError, match=r"dicom.tls.ca_file .*not a PEM bundle"):
        server_context(ScpTlsSettings(cert_file=pki.server_cert, key_file=pki.server_key,
                                      ca_file=pki.server_key))


# -- the SCP in this process ----------------------------------------------------------------


@dataclass
class Running:
    scp: Scp
    port: int
    metrics: NodeMetrics
    session_factory: sessionmaker[Session]

    def counter(self, reason: str) -> float:
        prefix = f'radnode_associations_rejected_total{{reason="{reason}"}} '
        for line in self.metrics.render()[0].decode().splitlines():
            if line.startswith(prefix):
                return float(line[len(prefix):])
        raise AssertionError(f"no sample for {reason}")

    def audited_reasons(self) -> list[str]:
        with self.session_factory() as session:
            events = session.scalars(select(AuditEvent).where(
                AuditEvent.action == "association").order_by(AuditEvent.id))
            return [e.detail.get("reason", "") for e in events
                    if e.detail.get("outcome") == "rejected"]


@pytest.fixture
def start(tmp_path: Path, settings: Settings, session_factory: sessionmaker[Session],
          ) -> Iterator[Callable[..., Running]]:
    started: list[Scp] = []

    def _start(**values: Any) -> Running:
        port = free_port()
        dicom_settings = dicom(**{"host": "127.0.0.1", "port": port, "acse_timeout_s": TIMEOUT_S,
                                  "dimse_timeout_s": TIMEOUT_S, "network_timeout_s": TIMEOUT_S,
                                  **values})
        metrics = NodeMetrics(lambda: settings, session_factory)
        context = StoreContext(tmp_path / "spool", session_factory,
                               associations=AssociationRecorder(session_factory, metrics))
        scp = start_scp(dicom_settings, context)
        started.append(scp)
        return Running(scp, port, metrics, session_factory)

    yield _start
    for scp in started:
        scp.shutdown()
        for assoc in scp.active_associations:
            assoc.abort()


def requestor(calling_ae: str = "CT1") -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    ae.add_requested_context(Verification)
    return ae


def associate(port: int, called: str = "RADNODE", calling: str = "CT1",
              bind: str = "127.0.0.1") -> Association:
    return requestor(calling).associate("127.0.0.1", port, ae_title=called,
                                        bind_address=(bind, 0))


def rj_fields(assoc: Association) -> tuple[int, int, int]:
    assert assoc.is_rejected, "expected an A-ASSOCIATE-RJ"
    answer: Any = assoc.acceptor.primitive
    return answer.result, answer.result_source, answer.diagnostic


def test_rejections_reach_the_peer_and_are_counted(start: Callable[..., Running]) -> None:
    node = start(aes=[{"ae_title": "RADNODE", "calling_ae_titles": ["CT1"]},
                      {"ae_title": "RESEARCH", "peer_addresses": ["10.0.0.0/8"]},
                      {"ae_title": "LOOPBACK", "peer_addresses": ["127.0.0.0/8"]}])
    assert rj_fields(associate(node.port, called="NOPE")) == (1, 1, 7)
    assert rj_fields(associate(node.port, calling="CT2")) == (1, 1, 3)
    assert rj_fields(associate(node.port, called="RESEARCH")) == (1, 1, 1)
    for called, calling in (("RADNODE", "CT1"), ("LOOPBACK", "ANYONE"), ("radnode", "ct1")):
        assoc = associate(node.port, called=called, calling=calling)
        assert assoc.is_established, (called, calling)
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    assert node.counter("called-ae-title-not-recognized") == 1
    assert node.counter("calling-ae-title-not-recognized") == 1
    assert node.counter("peer-address-not-allowed") == 1
    # Sorted: each rejected association's thread writes its row after the A-ASSOCIATE-RJ,
    # so the next association's row may come first.
    assert sorted(node.audited_reasons()) == ["called-ae-title-not-recognized",
                                              "calling-ae-title-not-recognized",
                                              "peer-address-not-allowed"]


def _dicom_threads() -> int:
    return sum(1 for t in threading.enumerate()
               if "AcceptorThread" in t.name or type(t).__name__ == "DULServiceProvider")


def _settle(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_rejected_associations_leave_no_thread(start: Callable[..., Running]) -> None:
    node = start(aes=[{"ae_title": "RADNODE", "calling_ae_titles": ["CT1"]}])
    assert _settle(lambda: _dicom_threads() == 0)
    for _ in range(20):
        assert associate(node.port, calling="INTRUDER").is_rejected
    # Each rejection stops its association and DUL threads (pynetdicom's own path does too).
    assert _settle(lambda: _dicom_threads() == 0), [t.name for t in threading.enumerate()]
    assert node.counter("calling-ae-title-not-recognized") == 20


def test_per_peer_cap(start: Callable[..., Running]) -> None:
    node = start(max_associations_per_peer=2)
    held = [associate(node.port), associate(node.port)]
    assert all(a.is_established for a in held)
    assert rj_fields(associate(node.port)) == (2, 3, 2)  # rejected-transient, local limit
    other = associate(node.port, bind="127.0.0.2")  # another peer is not affected
    assert other.is_established
    other.release()
    held[0].release()
    assert _settle(lambda: not held[0].is_alive())
    again = associate(node.port)  # a released association frees its slot
    assert again.is_established
    again.release()
    held[1].release()
    assert node.counter("peer-association-limit") == 1
    assert node.audited_reasons() == ["peer-association-limit"]


def test_node_limit_is_pynetdicoms_and_counted(start: Callable[..., Running]) -> None:
    node = start(max_associations=1)
    first = associate(node.port)
    assert first.is_established
    assert rj_fields(associate(node.port, bind="127.0.0.2")) == (2, 3, 2)
    first.release()
    assert node.counter("association-limit") == 1


def test_policy_error_rejects(start: Callable[..., Running],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    node = start()

    def broken(_assoc: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(node.scp.policy, "admit", broken)
    assert rj_fields(associate(node.port)) == (1, 1, 1)
    assert node.counter("policy-error") == 1


def test_idle_connection_is_closed_by_artim(start: Callable[..., Running]) -> None:
    node = start(acse_timeout_s=1.0)
    with socket.create_connection(("127.0.0.1", node.port), timeout=15) as idle:
        began = time.monotonic()
        assoc = associate(node.port)  # served meanwhile
        assert assoc.is_established
        assoc.release()
        assert idle.recv(64) == b""  # closed by the node, nothing sent
        assert 0.8 <= time.monotonic() - began <= 6.0


def test_stalled_pdu_is_aborted_after_the_network_timeout(
        start: Callable[..., Running]) -> None:
    node = start(acse_timeout_s=6.0, network_timeout_s=1.0)
    with socket.create_connection(("127.0.0.1", node.port), timeout=15) as stalled:
        stalled.sendall(b"\x01\x00\x00")  # the first bytes of an A-ASSOCIATE-RQ, then nothing
        began = time.monotonic()
        while stalled.recv(64):
            pass
        assert time.monotonic() - began <= 4.0  # the network timeout, not the 6 s ARTIM timer
    # Its association thread ends when it stops waiting for the request (ARTIM).
    assert _settle(lambda: not node.scp.active_associations, timeout_s=10.0)


def test_peer_connection_cap_before_a_request(start: Callable[..., Running]) -> None:
    node = start(max_associations_per_peer=2)
    idle = [socket.create_connection(("127.0.0.1", node.port), timeout=15,
                                     source_address=("127.0.0.2", 0)) for _ in range(2)]
    try:
        assert _settle(lambda: len(node.scp.active_associations) == 2)
        with socket.create_connection(("127.0.0.1", node.port), timeout=5,
                                      source_address=("127.0.0.2", 0)) as third:
            began = time.monotonic()
            assert third.recv(64) == b""
            assert time.monotonic() - began < 2.0  # closed at once, not by the timer
        assoc = associate(node.port)  # 127.0.0.1 is another peer
        assert assoc.is_established
        assoc.release()
        assert node.counter("peer-connection-limit") == 1
    finally:
        for sock in idle:
            sock.close()
