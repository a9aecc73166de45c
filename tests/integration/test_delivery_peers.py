"""C-STORE delivery against real dcmtk storescp peers on loopback.

* a peer whose association negotiation profile (``storescp -xf``) accepts
  only CT Image Storage: the SEG fails permanently, naming its SOP class;
* a peer that accepts only uncompressed little endian: RLE, JPEG-LS, JPEG
  2000, big endian and deflated files arrive as Explicit VR Little Endian
  with the same decoded pixels; one that accepts JPEG 2000 gets it as stored;
* TLS with a CA and server certificate made by the openssl CLI;
* closed ports and refused associations are "unreachable".
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from service.config import Destination, TlsSettings
from service.dicom.scu import StoreOutcome, echo, store_files
from tests.conftest import dcmtk_tool, missing
from tests.integration.conftest import free_port, received_files, stop, wait_for_port
from tests.pki import Pki, make_pki

pytestmark = pytest.mark.integration

#: dcmtk association negotiation profiles (format of /etc/dcmtk/storescp.cfg). An SCP
#: profile may list each SOP class once; the order of a syntax list is storescp's preference.
PROFILES = r"""
[[TransferSyntaxes]]
[LittleEndian]
TransferSyntax1 = LittleEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[JPEG2000OrLittleEndian]
TransferSyntax1 = JPEG2000LosslessOnly
TransferSyntax2 = LittleEndianExplicit
TransferSyntax3 = LittleEndianImplicit

[[PresentationContexts]]
[CTOnly]
PresentationContext1 = VerificationSOPClass\LittleEndian
PresentationContext2 = CTImageStorage\LittleEndian

[LittleEndianOnly]
PresentationContext1 = VerificationSOPClass\LittleEndian
PresentationContext2 = CTImageStorage\LittleEndian
PresentationContext3 = MRImageStorage\LittleEndian
PresentationContext4 = SecondaryCaptureImageStorage\LittleEndian
PresentationContext5 = SegmentationStorage\LittleEndian

[JPEG2000]
PresentationContext1 = VerificationSOPClass\LittleEndian
PresentationContext2 = MRImageStorage\JPEG2000OrLittleEndian

[[Profiles]]
[CTOnly]
PresentationContexts = CTOnly

[LittleEndianOnly]
PresentationContexts = LittleEndianOnly

[JPEG2000]
PresentationContexts = JPEG2000
"""

SEG_UID = "1.2.840.10008.5.1.4.1.1.66.4"


def _dcmtk_storescp() -> str:
    """dcmtk's storescp; the venv also has pynetdicom's app of the same name."""
    exe = dcmtk_tool("storescp")
    if exe is None:
        missing("dcmtk storescp is not installed (apt-get install dcmtk)")
    assert exe is not None
    return exe


@dataclass
class Storescp:
    destination: Destination
    folder: Path
    log: Path

    def received(self) -> list[Path]:
        return received_files(self.folder)

    def file_for(self, sop_instance_uid: str) -> Path:
        (path,) = [p for p in self.received() if p.name.endswith("." + sop_instance_uid)]
        return path


StartPeer = Callable[..., Storescp]


@pytest.fixture
def start_storescp(tmp_path: Path) -> Iterator[StartPeer]:
    """Start dcmtk storescp processes with extra options; all stopped at the end."""
    exe = _dcmtk_storescp()
    config = tmp_path / "profiles.cfg"
    config.write_text(PROFILES)
    processes: list[subprocess.Popen[bytes]] = []

    def start(*options: str, profile: str | None = None, tls: TlsSettings | None = None,
              name: str = "peer") -> Storescp:
        folder = tmp_path / name
        folder.mkdir()
        log = tmp_path / f"{name}.log"
        port = free_port()
        args = [exe, "-d", "-aet", "STORESCP", "-od", str(folder), *options]
        if profile is not None:
            args += ["-xf", str(config), profile]
        with log.open("wb") as out:
            process = subprocess.Popen([*args, str(port)], stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, "TCP_NODELAY": "1"})
        processes.append(process)
        wait_for_port(port, process, timeout_s=30)
        return Storescp(Destination(ae_title="STORESCP", host="127.0.0.1", port=port, tls=tls),
                        folder, log)

    try:
        yield start
    finally:
        for process in processes:
            stop(process)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(dcmread(path).pixel_array)


def _store(destination: Destination, paths: list[Path]) -> list[StoreOutcome]:
    return store_files(destination, paths, response_timeout_s=20.0, connect_timeout_s=5.0)


# -- (a) a peer that accepts only CT Image Storage ----------------------------------------


def test_sop_class_the_peer_does_not_accept_fails_permanently(
    start_storescp: StartPeer, test_data_dir: Path
) -> None:
    peer = start_storescp(profile="CTOnly")
    ct = test_data_dir / "seg_sr" / "dcmqi_ct_liver_seg" / "ct_3slice" / "01.dcm"
    seg = test_data_dir / "seg_sr" / "dcmqi_ct_liver_seg" / "liver.dcm"

    ct_outcome, seg_outcome = _store(peer.destination, [ct, seg])

    assert ct_outcome.ok and ct_outcome.status == 0x0000 and ct_outcome.error is None
    assert not seg_outcome.ok and seg_outcome.status is None
    assert seg_outcome.permanent and not seg_outcome.unreachable
    assert seg_outcome.error == (
        f"destination accepted no presentation context for SOP class Segmentation Storage "
        f"({SEG_UID})"
    )
    assert [p.name for p in peer.received()] == [f"CT.{ct_outcome.sop_instance_uid}"]
    assert peer.file_for(ct_outcome.sop_instance_uid).stat().st_size > 0


def test_only_unaccepted_sop_classes_fail_permanently_not_as_unreachable(
    start_storescp: StartPeer, test_data_dir: Path
) -> None:
    # Every proposed context is rejected: pynetdicom aborts the association itself.
    peer = start_storescp(profile="CTOnly")
    segs = [test_data_dir / "seg_sr" / "dcmqi_ct_liver_seg" / "liver.dcm",
            test_data_dir / "seg_sr" / "dcmqi_sr_tid1500" / "seg.dcm"]
    outcomes = _store(peer.destination, segs)
    assert [(o.ok, o.permanent, o.unreachable) for o in outcomes] == [(False, True, False)] * 2
    assert all(SEG_UID in (o.error or "") for o in outcomes)
    assert peer.received() == []


# -- (b) transcoding for a peer that accepts only uncompressed little endian ---------------


def test_compressed_files_are_transcoded_to_explicit_little_endian(
    start_storescp: StartPeer, test_data_dir: Path
) -> None:
    peer = start_storescp(profile="LittleEndianOnly")
    ts = test_data_dir / "transfer_syntaxes"
    seg = test_data_dir / "seg_sr" / "pydicom_liver_seg_variants"
    paths = [
        ts / "dcm_qa_ts" / "4.dcm",            # RLE Lossless, MR
        ts / "dcm_qa_ts" / "5.dcm",            # JPEG Lossless SV1, MR
        ts / "dcm_qa_ts" / "7.dcm",            # JPEG-LS Lossless, MR
        ts / "dcm_qa_ts" / "9.dcm",            # JPEG 2000 Lossless, MR
        ts / "nema_wg04" / "NM1_J2KR.dcm",     # JPEG 2000 Lossless, signed 16-bit
        ts / "dcm_qa_ts" / "3.dcm",            # Explicit VR Big Endian, OW pixel data
        ts / "dclunie" / "image_dfl.dcm",      # Deflated Explicit VR Little Endian
        seg / "liver_j2k.dcm",                 # JPEG 2000, 1 bit allocated (SEG)
        seg / "liver_nonbyte_aligned_j2k.dcm",  # same, frames not byte-aligned
        ts / "dcm_qa_ts" / "1.dcm",            # Explicit VR Little Endian: as stored
    ]
    stored_syntaxes = [dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID
                       for p in paths]
    assert len(set(stored_syntaxes)) == 7

    outcomes = _store(peer.destination, paths)

    assert [(o.ok, o.status, o.error) for o in outcomes] == [(True, 0, None)] * len(paths)
    assert len(peer.received()) == len(paths)
    for path, outcome in zip(paths, outcomes, strict=True):
        received = peer.file_for(outcome.sop_instance_uid)  # the UID was kept
        ds = dcmread(received)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, path.name
        assert ds.SOPInstanceUID == dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert np.array_equal(ds.pixel_array, _pixels(path)), path.name
    plain = dcmread(paths[-1])
    assert dcmread(peer.file_for(outcomes[-1].sop_instance_uid)).PixelData == plain.PixelData


def test_file_that_cannot_be_decoded_fails_permanently_with_the_reason(
    start_storescp: StartPeer, test_data_dir: Path
) -> None:
    # The data README: 1-bit RLE SEGs do not decode with pydicom 3.0.2 + pylibjpeg-rle.
    peer = start_storescp(profile="LittleEndianOnly")
    rle = test_data_dir / "seg_sr" / "pydicom_liver_seg_variants" / "liver_rle.dcm"
    good = test_data_dir / "transfer_syntaxes" / "dcm_qa_ts" / "4.dcm"
    bad_outcome, good_outcome = _store(peer.destination, [rle, good])
    assert good_outcome.ok
    assert bad_outcome.permanent and not bad_outcome.unreachable and not bad_outcome.ok
    assert bad_outcome.error is not None
    assert bad_outcome.error.startswith(
        "cannot transcode from RLE Lossless to Explicit VR Little Endian: ")
    assert "1 bits allocated" in bad_outcome.error
    assert len(peer.received()) == 1


def test_stored_syntax_is_kept_when_the_peer_accepts_it(
    start_storescp: StartPeer, test_data_dir: Path
) -> None:
    # storescp prefers JPEG 2000 here; the fallback context is accepted too but unused.
    peer = start_storescp(profile="JPEG2000")
    j2k = test_data_dir / "transfer_syntaxes" / "dcm_qa_ts" / "9.dcm"
    rle = test_data_dir / "transfer_syntaxes" / "dcm_qa_ts" / "4.dcm"
    j2k_outcome, rle_outcome = _store(peer.destination, [j2k, rle])
    assert j2k_outcome.ok and rle_outcome.ok
    sent_as_is = dcmread(peer.file_for(j2k_outcome.sop_instance_uid))
    assert sent_as_is.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert sent_as_is.PixelData == dcmread(j2k).PixelData
    converted = dcmread(peer.file_for(rle_outcome.sop_instance_uid))
    assert converted.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(converted.pixel_array, _pixels(rle))


# -- (c) TLS -------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A CA, a server certificate it signs for IP 127.0.0.1, and an unrelated CA."""
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_peer(start_storescp: StartPeer, pki: Pki) -> Storescp:
    # -ic: radnode presents no client certificate (storescp requires one by default).
    return start_storescp("+tls", str(pki.server_key), str(pki.server_cert), "-ic", "+xa",
                          tls=TlsSettings(ca_file=pki.ca, check_hostname=True))


def test_store_and_echo_over_tls(tls_peer: Storescp, test_data_dir: Path) -> None:
    ct = test_data_dir / "seg_sr" / "dcmqi_ct_liver_seg" / "ct_3slice" / "02.dcm"
    assert echo(tls_peer.destination, timeout_s=5.0) == 0x0000
    (outcome,) = _store(tls_peer.destination, [ct])
    assert outcome.ok and outcome.status == 0x0000
    received = tls_peer.file_for(outcome.sop_instance_uid)
    assert np.array_equal(_pixels(received), _pixels(ct))


def test_tls_without_the_right_ca_is_unreachable(
    tls_peer: Storescp, pki: Pki, test_data_dir: Path
) -> None:
    ct = test_data_dir / "seg_sr" / "dcmqi_ct_liver_seg" / "ct_3slice" / "02.dcm"
    wrong_ca = tls_peer.destination.model_copy(
        update={"tls": TlsSettings(ca_file=pki.other_ca, check_hostname=False)})
    (outcome,) = _store(wrong_ca, [ct])
    assert outcome.unreachable and not outcome.permanent and outcome.status is None
    assert outcome.error is not None
    assert str(tls_peer.destination) in outcome.error
    assert "TLS certificate verification failed" in outcome.error
    assert echo(wrong_ca, timeout_s=5.0) is None
    assert tls_peer.received() == []


def test_tls_host_name_must_match_the_certificate(
    tls_peer: Storescp, test_data_dir: Path
) -> None:
    ct = test_data_dir / "seg_sr" / "dcmqi_ct_liver_seg" / "ct_3slice" / "02.dcm"
    by_name = tls_peer.destination.model_copy(update={"host": "localhost"})
    (outcome,) = _store(by_name, [ct])
    assert outcome.unreachable
    assert "certificate is not valid for 'localhost'" in (outcome.error or "")


def test_plain_association_to_a_tls_port_is_unreachable(
    tls_peer: Storescp, test_data_dir: Path
) -> None:
    ct = test_data_dir / "seg_sr" / "dcmqi_ct_liver_seg" / "ct_3slice" / "02.dcm"
    plain = tls_peer.destination.model_copy(update={"tls": None})
    (outcome,) = _store(plain, [ct])
    assert outcome.unreachable and outcome.error
    assert "closed the connection" in outcome.error


def test_unreadable_ca_file_is_unreachable_not_a_crash(tmp_path: Path, test_data_dir: Path) -> None:
    ct = test_data_dir / "seg_sr" / "dcmqi_ct_liver_seg" / "ct_3slice" / "02.dcm"
    destination = Destination(ae_title="STORESCP", host="127.0.0.1", port=free_port(),
                              tls=TlsSettings(ca_file=tmp_path / "no-such-ca.pem"))
    (outcome,) = _store(destination, [ct])
    assert outcome.unreachable and outcome.error
    assert outcome.error.startswith(f"cannot set up TLS for {destination}")
    assert echo(destination, timeout_s=2.0) is None


# -- (d) peers that cannot be reached ------------------------------------------------------


def test_closed_port_is_unreachable(test_data_dir: Path) -> None:
    paths = sorted((test_data_dir / "seg_sr" / "dcmqi_ct_liver_seg" / "ct_3slice").glob("*.dcm"))
    destination = Destination(ae_title="NOBODY", host="127.0.0.1", port=free_port())
    outcomes = _store(destination, paths)
    assert len(outcomes) == 3
    for outcome in outcomes:
        assert outcome.unreachable and not outcome.permanent and outcome.status is None
        assert outcome.error == (f"association with {destination} was rejected or could not "
                                 "be opened: Connection refused")
    assert echo(destination, timeout_s=2.0) is None


def test_refused_association_is_unreachable_with_the_reason(
    start_storescp: StartPeer, test_data_dir: Path
) -> None:
    peer = start_storescp("--refuse")
    ct = test_data_dir / "seg_sr" / "dcmqi_ct_liver_seg" / "ct_3slice" / "01.dcm"
    (outcome,) = _store(peer.destination, [ct])
    assert outcome.unreachable and not outcome.permanent
    assert outcome.error and "the peer rejected it" in outcome.error
    assert peer.received() == []
