"""C-STORE SCU against real peers on 127.0.0.1: a pynetdicom SCP and dcmtk's storescp."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import AllTransferSyntaxes, CTImageStorage
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from service.config import Destination
from service.dicom.scu import StoreOutcome, echo, find_dicom_files, store_files
from tests.unit.dicom_factory import write_ct_file


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PeerSCP:
    """An in-process C-STORE SCP that records what it received and on which association."""

    #: Which requests wait (longer than the SCU's response timeout): "none", "first", "all".
    stall: str = "none"
    #: (SOP Instance UID, association) per C-STORE request, in arrival order.
    received: list[tuple[str, Association]] = field(default_factory=list)
    connections: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_store(self, event: evt.Event) -> int:
        request: Any = event.request
        with self.lock:
            first = not self.received
            self.received.append((str(request.AffectedSOPInstanceUID), event.assoc))
        if self.stall == "all" or (first and self.stall == "first"):
            # Longer than the SCU's response timeout; released by the test once
            # store_files has returned, at the latest after 3 s.
            self.release.wait(timeout=3.0)
        return 0x0000

    def on_conn_open(self, _event: evt.Event) -> None:
        with self.lock:
            self.connections += 1


def _start_peer(peer: PeerSCP, *, ae_title: str = "PEERSCP", require_called_aet: bool = False
                ) -> tuple[Any, int]:
    ae = AE(ae_title=ae_title)
    ae.require_called_aet = require_called_aet
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_supported_context(CTImageStorage, [str(ts) for ts in AllTransferSyntaxes])
    ae.add_supported_context(Verification)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False,
        evt_handlers=[(evt.EVT_C_STORE, peer.on_store), (evt.EVT_CONN_OPEN, peer.on_conn_open)],
    )
    assert server is not None
    return server, int(server.server_address[1])


def _running_peer(scp: PeerSCP) -> Iterator[tuple[PeerSCP, Destination]]:
    server, port = _start_peer(scp)
    try:
        yield scp, Destination(ae_title="PEERSCP", host="127.0.0.1", port=port)
    finally:
        scp.release.set()
        server.shutdown()


@pytest.fixture
def peer() -> Iterator[tuple[PeerSCP, Destination]]:
    yield from _running_peer(PeerSCP())


@pytest.fixture
def stalling_peer() -> Iterator[tuple[PeerSCP, Destination]]:
    yield from _running_peer(PeerSCP(stall="first"))


def _files(folder: Path, count: int, **kwargs: Any) -> list[Path]:
    return [write_ct_file(folder / f"img{i:04d}.dcm", instance_number=i + 1, seed=i, **kwargs)
            for i in range(count)]


def test_lost_response_is_resent_on_a_new_association(
    stalling_peer: tuple[PeerSCP, Destination], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scp, destination = stalling_peer
    first, second = _files(tmp_path, 2)
    progress: list[StoreOutcome] = []
    outcomes = store_files(destination, [first, second], calling_ae="RADNODE",
                           response_timeout_s=1.0, connect_timeout_s=5.0,
                           on_progress=progress.append)
    scp.release.set()

    assert [o.path for o in outcomes] == [first, second]
    assert [(o.ok, o.status, o.error) for o in outcomes] == [(True, 0, None), (True, 0, None)]
    assert progress == outcomes
    uids = [uid for uid, _ in scp.received]
    assert uids == [outcomes[0].sop_instance_uid, outcomes[0].sop_instance_uid,
                    outcomes[1].sop_instance_uid]
    (_, stalled), (_, resent), (_, after) = scp.received
    assert stalled is not resent  # the resend went on a fresh association
    assert after is resent        # and the rest of the batch continued on it
    assert scp.connections == 2
    assert any("no C-STORE response" in r.getMessage() for r in caplog.records)


def test_resend_gives_up_after_resend_attempts(tmp_path: Path) -> None:
    scp = PeerSCP(stall="all")
    server, port = _start_peer(scp)
    try:
        (path,) = _files(tmp_path, 1)
        (outcome,) = store_files(Destination(ae_title="PEERSCP", host="127.0.0.1", port=port),
                                 [path], response_timeout_s=0.5, resend_attempts=1)
    finally:
        scp.release.set()
        server.shutdown()
    assert outcome.status is None
    assert not outcome.ok
    assert outcome.error and "no C-STORE response" in outcome.error
    assert len(scp.received) == 2  # first try + one resend
    assert scp.received[0][1] is not scp.received[1][1]


def test_many_files_one_association(peer: tuple[PeerSCP, Destination], tmp_path: Path) -> None:
    scp, destination = peer
    paths = _files(tmp_path, 5)
    outcomes = store_files(destination, paths, response_timeout_s=5.0)
    assert all(o.ok and o.status == 0 for o in outcomes)
    assert [o.path for o in outcomes] == paths
    assert len({id(a) for _, a in scp.received}) == 1
    assert scp.connections == 1
    assert sorted(uid for uid, _ in scp.received) == sorted(o.sop_instance_uid for o in outcomes)


def test_outcomes_follow_input_order_with_a_non_dicom_file(
    peer: tuple[PeerSCP, Destination], tmp_path: Path
) -> None:
    scp, destination = peer
    good1, good2 = _files(tmp_path, 2)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 20)
    outcomes = store_files(destination, [good1, junk, good2], response_timeout_s=5.0)
    by_path = {o.path: o for o in outcomes}
    assert len(outcomes) == 3
    assert by_path[good1].ok and by_path[good2].ok
    assert by_path[junk].status is None
    assert by_path[junk].error and "not a DICOM" in by_path[junk].error
    assert len(scp.received) == 2


def test_outcomes_are_in_input_order(peer: tuple[PeerSCP, Destination], tmp_path: Path) -> None:
    _, destination = peer
    good1, good2 = _files(tmp_path, 2)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 20)
    outcomes = store_files(destination, [good1, junk, good2], response_timeout_s=5.0)
    assert [o.path for o in outcomes] == [good1, junk, good2]


def test_nothing_listening_fails_every_file_once(tmp_path: Path) -> None:
    paths = _files(tmp_path, 4)
    destination = Destination(ae_title="NOBODY", host="127.0.0.1", port=free_port())
    progress: list[StoreOutcome] = []
    outcomes = store_files(destination, paths, response_timeout_s=1.0, connect_timeout_s=2.0,
                           on_progress=progress.append)
    assert len(outcomes) == len(paths)
    assert [o.path for o in outcomes] == paths
    assert progress == outcomes
    for outcome in outcomes:
        assert outcome.status is None
        assert not outcome.ok
        assert outcome.error and str(destination) in outcome.error
        assert outcome.sop_instance_uid  # read from the file meta


def test_rejecting_peer_is_tried_once_not_per_file(tmp_path: Path) -> None:
    scp = PeerSCP()
    # The peer rejects every association not addressed to its own AE title.
    server, port = _start_peer(scp, ae_title="REALNAME", require_called_aet=True)
    try:
        destination = Destination(ae_title="WRONGNAME", host="127.0.0.1", port=port)
        paths = _files(tmp_path, 6)
        outcomes = store_files(destination, paths, response_timeout_s=1.0, connect_timeout_s=5.0)
    finally:
        server.shutdown()
    assert len(outcomes) == 6
    assert all(o.status is None and "WRONGNAME@127.0.0.1" in (o.error or "") for o in outcomes)
    assert scp.connections == 1  # no retry storm: one association attempt for the batch
    assert scp.received == []


def test_echo_against_peer(peer: tuple[PeerSCP, Destination]) -> None:
    _, destination = peer
    assert echo(destination, timeout_s=5.0) == 0x0000
    nobody = Destination(ae_title="NOBODY", host="127.0.0.1", port=free_port())
    assert echo(nobody, timeout_s=2.0) is None


def test_find_dicom_files_recurses_and_skips_non_dicom(tmp_path: Path) -> None:
    top = write_ct_file(tmp_path / "series" / "a.dcm")
    deep = write_ct_file(tmp_path / "series" / "sub" / "deeper" / "b.dcm")
    no_ext = write_ct_file(tmp_path / "series" / "sub" / "IM0001")
    (tmp_path / "series" / "README.txt").write_text("About this series\n" * 20)
    (tmp_path / "series" / "sub" / "fake.dcm").write_bytes(b"\0" * 200)  # no DICM marker
    (tmp_path / "series" / "tiny").write_bytes(b"DICM")
    (tmp_path / "series" / "empty").mkdir()
    single = write_ct_file(tmp_path / "single.dcm")
    readme = tmp_path / "LICENSE.txt"
    readme.write_text("x" * 300)

    found = find_dicom_files([tmp_path / "series", single, readme])
    assert sorted(found) == sorted([top, deep, no_ext, single])
    assert find_dicom_files([tmp_path / "series" / "README.txt"]) == []


# -- load test against dcmtk's storescp --------------------------------------------------


def _dcmtk_storescp() -> str | None:
    """Return dcmtk's storescp (not pynetdicom's app of the same name), if installed."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which("storescp", path=folder) if folder else None
        if not candidate:
            continue
        try:
            version = subprocess.run([candidate, "--version"], capture_output=True, text=True,
                                     timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (version.stdout + version.stderr).lower():
            return candidate
    return None


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[Destination, Path]]:
    exe = _dcmtk_storescp()
    if exe is None:
        message = "dcmtk storescp not installed"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    # TCP_NODELAY=1: without it dcmtk's Nagle/delayed-ACK interplay costs ~45 ms per instance.
    proc = subprocess.Popen([exe, "-aet", "STORESCP", "-od", str(out), "+xa", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TCP_NODELAY": "1"})
    destination = Destination(ae_title="STORESCP", host="127.0.0.1", port=port)
    try:
        for _ in range(100):  # wait until it listens (C-ECHO answers)
            if proc.poll() is not None:
                pytest.fail(f"storescp exited with {proc.returncode}")
            if echo(destination, timeout_s=2.0) == 0x0000:
                break
            threading.Event().wait(0.1)
        else:
            pytest.fail("storescp did not answer C-ECHO")
        yield destination, out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_load_200_instances_to_dcmtk_storescp(
    storescp: tuple[Destination, Path], tmp_path: Path
) -> None:
    destination, out = storescp
    series = tmp_path / "series"
    paths = [write_ct_file(series / f"{i:04d}.dcm", rows=64, columns=64, instance_number=i + 1,
                           seed=i, study_uid="1.2.826.0.1.3680043.8.498.1",
                           series_uid="1.2.826.0.1.3680043.8.498.1.2")
             for i in range(200)]
    outcomes = store_files(destination, paths, response_timeout_s=10.0)
    assert len(outcomes) == 200
    bad = [o for o in outcomes if not o.ok]
    assert bad == []
    assert all(o.status == 0x0000 for o in outcomes)
    received = [p for p in out.iterdir() if p.is_file()]
    assert len(received) == 200
    names = "\n".join(p.name for p in received)
    assert all(o.sop_instance_uid in names for o in outcomes)
