"""C-STORE SCU against real peers on 127.0.0.1: a pynetdicom SCP and dcmtk's storescp."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.uid import AllTransferSyntaxes, CTImageStorage
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from service.config import Destination
from service.dicom.scu import (
    MAX_CONTEXTS,
    StoreOutcome,
    TranscodeError,
    _batches,
    _contexts,
    _FileInfo,
    echo,
    find_dicom_files,
    is_permanent,
    store_files,
    to_explicit_little_endian,
)
from tests.conftest import dcmtk_tool
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
    #: The status every C-STORE request gets.
    status: int = 0x0000
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
        return self.status

    def on_conn_open(self, _event: evt.Event) -> None:
        with self.lock:
            self.connections += 1


def _start_peer(peer: PeerSCP, *, ae_title: str = "PEERSCP", require_called_aet: bool = False,
                syntaxes: list[str] | None = None) -> tuple[Any, int]:
    ae = AE(ae_title=ae_title)
    ae.require_called_aet = require_called_aet
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_supported_context(CTImageStorage, syntaxes or [str(ts) for ts in AllTransferSyntaxes])
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
        assert outcome.unreachable and not outcome.permanent
        assert outcome.error and str(destination) in outcome.error
        assert outcome.error.endswith("Connection refused")
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
    assert all(o.unreachable and not o.permanent for o in outcomes)
    assert "the peer rejected it (Rejected Permanent, source: Service User, reason: Called AE " \
        "title not recognised)" in (outcomes[0].error or "")
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
    return dcmtk_tool("storescp")


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


# -- failure statuses ---------------------------------------------------------------------


@pytest.mark.parametrize(("status", "permanent"), [
    (0x0000, False),  # Success
    (0x0001, False),  # Warning
    (0xB000, False),  # Warning: coercion of data elements
    (0xB007, False),  # Warning: data set does not match SOP class
    (0x0122, True),   # SOP class not supported (PS3.7 C.5.4)
    (0x0124, True),   # Not authorised (PS3.7 C.5.5)
    (0xA900, True),   # Data set does not match SOP class (PS3.4 B.2.3)
    (0xA9FF, True),
    (0xC000, True),   # Cannot understand (PS3.4 B.2.3)
    (0xC123, True),
    (0xCFFF, True),
    (0xA700, False),  # Out of resources: may succeed later
    (0xA7FF, False),
    (0x0110, False),  # Processing failure
    (0x0117, False),  # Invalid SOP instance
    (0x0211, False),  # Unrecognised operation
    (0xA800, False),
    (0xD000, False),
    (0xFE00, False),  # Cancel
])
def test_is_permanent(status: int, permanent: bool) -> None:
    assert is_permanent(status) is permanent


@pytest.mark.parametrize(("status", "ok", "permanent"), [
    (0xA700, False, False),
    (0xA900, False, True),
    (0xC001, False, True),
    (0x0122, False, True),
    (0xB000, True, False),
])
def test_failure_status_is_classified(tmp_path: Path, status: int, ok: bool,
                                      permanent: bool) -> None:
    scp = PeerSCP(status=status)
    server, port = _start_peer(scp)
    try:
        (path,) = _files(tmp_path, 1)
        (outcome,) = store_files(Destination(ae_title="PEERSCP", host="127.0.0.1", port=port),
                                 [path], response_timeout_s=5.0)
    finally:
        server.shutdown()
    assert (outcome.status, outcome.ok, outcome.permanent, outcome.unreachable) == (
        status, ok, permanent, False)
    if ok:
        assert outcome.error is None
    else:
        assert outcome.error == f"C-STORE failed with status 0x{status:04X}"


# -- presentation contexts ----------------------------------------------------------------

CT, SEG = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.66.4"
EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
J2K, RLE, BIG = "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.2"


def _info(sop_class: str, syntax: str, n: int = 0) -> _FileInfo:
    return _FileInfo(Path(f"{n}.dcm"), sop_class, f"1.2.3.{n}", syntax)


def test_contexts_offer_the_stored_syntax_and_little_endian_separately() -> None:
    infos = [_info(CT, J2K, 1), _info(CT, IMPLICIT, 2), _info(CT, J2K, 3), _info(SEG, RLE, 4),
             _info(SEG, BIG, 5), _info(CT, EXPLICIT, 6)]
    assert _contexts(infos) == [
        (CT, [J2K]),
        (CT, [EXPLICIT, IMPLICIT]),
        (SEG, [RLE]),
        (SEG, [EXPLICIT, IMPLICIT]),
        (SEG, [BIG]),
    ]


def test_batches_never_need_more_than_128_contexts() -> None:
    # 100 SOP classes, each with a compressed file: 2 contexts each.
    infos = [_info(f"1.2.3.{n}", J2K, n) for n in range(100)]
    batches = _batches(infos)
    assert [len(b) for b in batches] == [64, 36]
    assert all(len(_contexts(b)) <= MAX_CONTEXTS for b in batches)
    assert [i for b in batches for i in b] == infos
    # Many files of one class and syntax share the same two contexts.
    assert len(_batches([_info(CT, J2K, n) for n in range(500)])) == 1


# -- transcoding --------------------------------------------------------------------------


def _transfer_syntaxes(test_data_dir: Path) -> Path:
    return test_data_dir / "transfer_syntaxes"


@pytest.mark.parametrize("name", [
    "dcm_qa_ts/3.dcm", "dcm_qa_ts/4.dcm", "dcm_qa_ts/7.dcm", "dcm_qa_ts/9.dcm",
    "pydicom_small/MR_small_bigendian.dcm", "nema_wg04/US1_J2KI.dcm",
    "gdcm/Philips_US_3EAF5680_8b_YBR_jpeg.dcm", "dclunie/image_dfl.dcm",
])
def test_to_explicit_little_endian_keeps_pixels_and_uid(test_data_dir: Path, name: str) -> None:
    path = _transfer_syntaxes(test_data_dir) / name
    source = dcmread(path)
    before = source.file_meta.TransferSyntaxUID
    result = to_explicit_little_endian(source)
    assert source.file_meta.TransferSyntaxUID == before  # the input is left alone
    assert result.file_meta.TransferSyntaxUID == EXPLICIT
    assert result.SOPInstanceUID == source.SOPInstanceUID
    assert np.array_equal(result.pixel_array, dcmread(path).pixel_array)


def test_one_bit_segmentation_is_packed_again(test_data_dir: Path) -> None:
    # pydicom 3.0.2's decompress() leaves one byte per pixel for Bits Allocated 1.
    variants = test_data_dir / "seg_sr" / "pydicom_liver_seg_variants"
    reference = dcmread(test_data_dir / "seg_sr" / "dcmqi_ct_liver_seg" / "liver.dcm")
    result = to_explicit_little_endian(dcmread(variants / "liver_j2k.dcm"))
    assert result.BitsAllocated == 1
    assert len(result.PixelData) == len(reference.PixelData)  # 3 x 512 x 512 bits
    assert np.array_equal(result.pixel_array, reference.pixel_array)


def test_pixels_that_change_in_the_conversion_are_refused(
    test_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.dicom.scu as scu

    monkeypatch.setattr(scu, "pack_bits", lambda arr: bytes(len(arr.ravel()) // 8))
    path = test_data_dir / "seg_sr" / "pydicom_liver_seg_variants" / "liver_j2k.dcm"
    with pytest.raises(TranscodeError, match="the decoded pixels differ after the conversion"):
        to_explicit_little_endian(dcmread(path))


def test_big_endian_with_un_element_is_refused(test_data_dir: Path, tmp_path: Path) -> None:
    ds = dcmread(_transfer_syntaxes(test_data_dir) / "pydicom_small" / "MR_small_bigendian.dcm")
    ds.add_new(0x00091010, "UN", b"\x01\x02\x03\x04")
    crafted = tmp_path / "un.dcm"
    dcmwrite(crafted, ds, enforce_file_format=True)
    with pytest.raises(TranscodeError, match=r"\(0009,1010\) has VR UN"):
        to_explicit_little_endian(dcmread(crafted))


def test_sop_class_accepted_only_in_another_files_syntax_is_refused(tmp_path: Path) -> None:
    # The peer takes CT only as RLE: the RLE file goes as stored, the plain one cannot go.
    plain = write_ct_file(tmp_path / "plain.dcm", seed=1)
    ds = dcmread(write_ct_file(tmp_path / "rle.dcm", seed=2))
    ds.compress(RLE)
    rle = tmp_path / "rle.dcm"
    ds.save_as(rle)
    scp = PeerSCP()
    server, port = _start_peer(scp, syntaxes=[RLE])
    try:
        plain_outcome, rle_outcome = store_files(
            Destination(ae_title="PEERSCP", host="127.0.0.1", port=port), [plain, rle],
            response_timeout_s=5.0)
    finally:
        server.shutdown()
    assert rle_outcome.ok and rle_outcome.status == 0
    assert plain_outcome.permanent and not plain_outcome.unreachable and not plain_outcome.ok
    assert plain_outcome.error == (
        f"destination accepted SOP class CT Image Storage ({CT}) only as RLE Lossless, "
        "not as Explicit VR Little Endian")
    assert [uid for uid, _ in scp.received] == [rle_outcome.sop_instance_uid]
