"""A real scanner (dcmtk storescu) → radnode serve → Celery worker → a real PACS (storescp).

Checks: the SEG and the TID 1500 SR arrive at the PACS; dciodvfy finds no
error in either; the SEG covers the source frames with the source geometry;
the SR's volumes equal the SEG's voxel counts times the voxel volume.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from tests.integration.conftest import Peer, received_files, require_tool, start_node, stop

pytestmark = pytest.mark.integration

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def node(tmp_path: Path, storescp_pacs: Peer) -> Iterator[Peer]:
    peer = start_node(tmp_path, destinations=(storescp_pacs.address,))
    try:
        yield peer
    finally:
        stop(peer.process)


def wait_for_results(folder: Path, node: Peer, timeout_s: float = 300) -> tuple[Path, Path]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found: dict[str, Path] = {}
        for path in received_files(folder):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            found[str(ds.SOPClassUID)] = path
        if SEG_CLASS in found and SR_CLASS in found:
            return found[SEG_CLASS], found[SR_CLASS]
        assert node.process.poll() is None, node.log.read_text()
        time.sleep(0.5)
    raise AssertionError(f"no SEG+SR within {timeout_s} s; node log:\n{node.log.read_text()}")


def dciodvfy_errors(path: Path) -> list[str]:
    exe = require_tool("dciodvfy")
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def test_scanner_to_pacs(ct_series_dir: Path, node: Peer, storescp_pacs: Peer) -> None:
    storescu = require_tool("storescu")
    sent = subprocess.run(
        [storescu, "-aet", "SCANNER", "-aec", "RADNODE", "+sd", "+sp", "*.dcm",
         "127.0.0.1", str(node.port), str(ct_series_dir)],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr

    seg_path, sr_path = wait_for_results(storescp_pacs.folder, node)

    assert dciodvfy_errors(seg_path) == []
    assert dciodvfy_errors(sr_path) == []

    sources = {}
    for path in sorted(ct_series_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sources[str(ds.SOPInstanceUID)] = ds
    assert len(sources) == 134
    first = next(iter(sources.values()))

    seg = hd.seg.segread(seg_path)
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == set(sources)
    labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    assert labels == ["body", "lungs", "bone"]
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "radnode-builtin-ct"

    # Geometry: every frame lies on a source slice with the source's spacing.
    shared = seg.SharedFunctionalGroupsSequence[0]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    assert spacing == pytest.approx([float(v) for v in first.PixelSpacing])
    orientation = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    assert orientation == pytest.approx([float(v) for v in first.ImageOrientationPatient])
    source_positions = {
        tuple(round(float(v), 3) for v in ds.ImagePositionPatient): uid
        for uid, ds in sources.items()
    }
    for frame in seg.PerFrameFunctionalGroupsSequence:
        position = tuple(round(float(v), 3)
                         for v in frame.PlanePositionSequence[0].ImagePositionPatient)
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        source_uid = source.ReferencedSOPInstanceUID
        assert source_positions[position] == source_uid
    assert (seg.Rows, seg.Columns) == (first.Rows, first.Columns)

    # Voxel counts per segment from the SEG as the PACS has it.
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(sources), assert_missing_frames_are_empty=True
    )  # (frames, rows, columns, segments)
    counts = pixels.reshape(-1, pixels.shape[-1]).astype(bool).sum(axis=0)
    positions = sorted(float(ds.ImagePositionPatient[2]) for ds in sources.values())
    slice_mm = float(np.median(np.diff(positions)))
    voxel_ml = spacing[0] * spacing[1] * slice_mm / 1000.0

    sr = hd.sr.srread(sr_path)
    assert sr.StudyInstanceUID == first.StudyInstanceUID
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 3
    for index, group in enumerate(groups):
        volume = next(m for m in group.get_measurements() if m.name == codes.SCT.Volume)
        assert float(volume.value) == pytest.approx(counts[index] * voxel_ml, rel=1e-4)
        assert group.referenced_segment is not None
        reference = group.referenced_segment[0].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert int(reference.ReferencedSegmentNumber) == index + 1

    # The node recorded each hop, and each result was delivered exactly once.
    db = sqlite3.connect(node.folder / "radnode.db")
    states = db.execute("select state, count(*) from deliveries group by state").fetchall()
    assert states == [("sent", 2)]
    jobs = db.execute("select state, attempts from jobs").fetchall()
    assert jobs == [("succeeded", 1)]
    series = db.execute("select instance_count, completion_reason from series").fetchall()
    # storescu releases its association after the last slice: that is the evidence.
    assert series == [(134, "association_released")]

    # No patient identifier of the real data reached the node's or worker's log.
    identifiers = {str(first.PatientName), str(first.PatientID)} - {""}
    assert identifiers, "the real CT carries a Patient's Name and Patient ID"
    log_text = node.log.read_text(errors="replace")
    assert "job 1 succeeded" in log_text
    for identifier in identifiers:
        assert identifier not in log_text
