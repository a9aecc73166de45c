"""Site models through the real pipeline: dcmtk storescu → radnode serve → worker → storescp.

One node runs with a config that declares a tiny TorchScript segmenter, a
tiny TorchScript classifier and a trusted MONAI bundle (all made in the test)
for CT, plus the built-in MR model, and a PACS destination that also wants
burned-in Secondary Capture images. Real series go in: three CT slices (with an
empty Specific Character Set), a sagittal MR head, a Philips MR series that mixes
two echoes with magnitude and phase, and a Siemens enhanced multi-frame MR.
Every SEG, SR and SC that reaches the PACS must pass dciodvfy, reference its
source, and carry what the model's declaration says.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset

from tests.integration.conftest import (
    Peer,
    free_port,
    received_files,
    require_tool,
    start_node,
    stop,
    wait_for_port,
)
from tests.integration.test_end_to_end import dciodvfy_errors
from tests.tiny_models import (
    classification_spec,
    make_bundle,
    save_classifier,
    save_threshold_segmenter,
    segmentation_spec,
)

pytestmark = pytest.mark.integration

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
SC = "1.2.840.10008.5.1.4.1.1.7"
#: HU thresholds of the tiny segmenter: label 1 above -500 HU, label 2 above 300 HU.
THRESHOLDS = (-500.0, 300.0)

SERIES = {  # folder under the test data → what it is
    "ct3": "seg_sr/dcmqi_ct_liver_seg/ct_3slice",
    "mr_sag": "mr_head_siemens_t1_sag",
    "mr_dual": "mr_phantom_philips_dualecho",
    "mr_enhanced": "enhanced_multiframe/siemens_xa30_t1",
}


@dataclass
class Run:
    node: Peer
    pacs: Peer
    received: dict[str, list[Dataset]]  # SOP Class UID → datasets at the PACS
    files: dict[str, Path]  # SOP Instance UID → file at the PACS
    sources: dict[str, set[str]]  # key of SERIES → Series Instance UIDs sent
    db: sqlite3.Connection


def _send(storescu: str, port: int, path: Path) -> None:
    args = [storescu, "-aet", "SCANNER", "-aec", "RADNODE"]
    if path.is_dir():
        args += ["+sd", "+sp", "*.dcm", "127.0.0.1", str(port), str(path)]
    else:
        args += ["127.0.0.1", str(port), str(path)]
    sent = subprocess.run(args, capture_output=True, text=True, check=False, timeout=300)
    assert sent.returncode == 0, sent.stdout + sent.stderr


def _series_uids(path: Path) -> set[str]:
    files = [path] if path.is_file() else sorted(path.glob("*.dcm"))
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in files}


def _wait_until_done(db: sqlite3.Connection, node: Peer, jobs: int,
                     timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = dict(db.execute("select state, count(*) from jobs group by state").fetchall())
        finished = states.get("succeeded", 0) + states.get("failed", 0)
        pending = db.execute(
            "select count(*) from deliveries where state != 'sent'").fetchone()[0]
        if finished >= jobs and pending == 0 and not set(states) - {"succeeded", "failed"}:
            return
        assert node.process.poll() is None, node.log.read_text()
        time.sleep(1)
    raise AssertionError(f"jobs not done in {timeout_s} s: {states}; log:\n"
                         f"{node.log.read_text()[-5000:]}")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, test_data_dir: Path) -> Iterator[Run]:
    storescu = require_tool("storescu")
    storescp = require_tool("storescp")
    tmp = tmp_path_factory.mktemp("models")
    models = tmp / "models"
    pacs_dir = tmp / "pacs"
    pacs_dir.mkdir()
    pacs_port = free_port()
    pacs_log = tmp / "storescp.log"
    with pacs_log.open("wb") as out:
        pacs_process = subprocess.Popen(
            [storescp, "-aet", "PACS", "-od", str(pacs_dir), "+xa", str(pacs_port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_port(pacs_port, pacs_process)
    pacs = Peer("PACS", pacs_port, pacs_dir, pacs_process, pacs_log)

    segmenter = save_threshold_segmenter(models, THRESHOLDS)
    classifier = save_classifier(models, (-3000.0, 3000.0))  # any CT mean → class 1
    bundle = make_bundle(models / "bundle", thresholds=THRESHOLDS, with_ts=False)
    config: dict[str, Any] = {
        "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port,
                          "secondary_capture": True}],
        "models": [
            segmentation_spec(segmenter, (1, 2), name="tiny-seg", orientation="RAS"),
            classification_spec(classifier, name="tiny-cls", roi_size=[8, 8, 8]),
            segmentation_spec(bundle, (1, 2), name="tiny-bundle", source="monai_bundle",
                              trusted=True, spacing_mm=[2.0, 2.0, 2.0]),
        ],
        # One rule without conditions: each model's own accepts decide.
        "rules": [{"name": "all-models", "models": [
            "tiny-seg", "tiny-cls", "tiny-bundle", "radnode-builtin-mr"]}],
        "completion": {"release_quiet_s": 1.0},
    }
    config_file = tmp / "radnode.yaml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    node = start_node(tmp, "--config", str(config_file))
    db = sqlite3.connect(node.folder / "radnode.db")
    try:
        sources: dict[str, set[str]] = {}
        for key, relative in SERIES.items():
            path = test_data_dir / relative
            sources[key] = _series_uids(path)
            _send(storescu, node.port, path)
        # The CT series: 3 models; each MR series: the built-in MR model.
        _wait_until_done(db, node, jobs=3 + 3)
        received: dict[str, list[Dataset]] = defaultdict(list)
        files: dict[str, Path] = {}
        for path in received_files(pacs_dir):
            ds = pydicom.dcmread(path)
            received[str(ds.SOPClassUID)].append(ds)
            files[str(ds.SOPInstanceUID)] = path
        yield Run(node, pacs, received, files, sources, db)
    finally:
        db.close()
        stop(node.process)
        stop(pacs_process)


def _about(ds: Dataset) -> str:
    """Source Series Instance UID a result object refers to."""
    if "ReferencedSeriesSequence" in ds:
        return str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    if "CurrentRequestedProcedureEvidenceSequence" in ds:
        return str(ds.CurrentRequestedProcedureEvidenceSequence[0]
                   .ReferencedSeriesSequence[0].SeriesInstanceUID)
    source = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
    raise AssertionError(f"cannot tell the source series of {source}")


def _content_items(ds: Dataset) -> Iterator[Dataset]:
    """Every content item of an SR document, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def _sr_algorithm(ds: Dataset) -> str:
    for item in ds.ContentSequence:
        for inner in item.get("ContentSequence", []):
            for leaf in inner.get("ContentSequence", []):
                name = leaf.ConceptNameCodeSequence[0].CodeMeaning
                if name == "Algorithm Name":
                    return str(leaf.TextValue)
    return ""


def test_every_job_succeeded_and_every_result_was_delivered(run: Run) -> None:
    jobs = run.db.execute(
        "select j.model_name, s.series_instance_uid, j.state, j.error from jobs j "
        "join series s on s.id = j.series_id").fetchall()
    failed = [j for j in jobs if j[2] != "succeeded"]
    assert failed == []
    by_model = Counter(j[0] for j in jobs)
    assert by_model == {"tiny-seg": 1, "tiny-cls": 1, "tiny-bundle": 1, "radnode-builtin-mr": 3}
    results = run.db.execute("select sop_instance_uid from results").fetchall()
    assert {r[0] for r in results} == set(run.files)  # each result at the PACS, once
    states = run.db.execute("select state, count(*) from deliveries group by state").fetchall()
    assert [s[0] for s in states] == ["sent"]


def test_every_seg_and_sr_passes_dciodvfy(run: Run) -> None:
    for sop_class in (SEG, SR):
        for ds in run.received[sop_class]:
            assert dciodvfy_errors(run.files[str(ds.SOPInstanceUID)]) == [], ds.SOPInstanceUID
    # one Secondary Capture image of each SC series
    firsts = {str(ds.SeriesInstanceUID): ds for ds in run.received[SC]}
    for ds in firsts.values():
        assert dciodvfy_errors(run.files[str(ds.SOPInstanceUID)]) == []


def test_torchscript_segmenter_maps_labels_onto_the_source_slices(
    run: Run, test_data_dir: Path,
) -> None:
    (ct_uid,) = run.sources["ct3"]
    by_model = {str(ds.SegmentSequence[0].SegmentAlgorithmName): ds
                for ds in run.received[SEG] if _about(ds) == ct_uid}
    assert sorted(by_model) == ["tiny-bundle", "tiny-seg"]
    segs = [by_model["tiny-seg"]]
    seg = hd.seg.Segmentation.from_dataset(segs[0])
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["liver", "spleen"]
    sources = {str(ds.SOPInstanceUID): ds for ds in
               (pydicom.dcmread(p) for p in sorted(
                   (test_data_dir / SERIES["ct3"]).glob("*.dcm")))}
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(sources), assert_missing_frames_are_empty=True)
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                   for ds in sources.values()])
    label = np.digitize(hu, THRESHOLDS)  # 0, 1 above -500 HU, 2 above 300 HU
    for index in (0, 1):  # orientation RAS only: an exact permutation, no resampling
        agreement = np.mean(pixels[..., index].astype(bool) == (label == index + 1))
        assert agreement > 0.999


def test_classifier_gives_a_coded_finding_with_probabilities(run: Run) -> None:
    (ct_uid,) = run.sources["ct3"]
    srs = [hd.sr.srread(run.files[str(ds.SOPInstanceUID)]) for ds in run.received[SR]
           if _about(ds) == ct_uid and _sr_algorithm(ds) == "tiny-cls"]
    assert len(srs) == 1
    text = str(srs[0])
    assert "263654008" in text  # class 1 "abnormal": the most probable
    values = [float(item.MeasuredValueSequence[0].NumericValue)
              for item in _content_items(srs[0]) if item.ValueType == "NUM"]
    assert len(values) == 3
    assert sum(values) == pytest.approx(1.0, abs=1e-3)
    assert max(values) == pytest.approx(values[1])


def test_mixed_echo_mr_series_gives_one_result_set_per_volume(run: Run) -> None:
    (uid,) = run.sources["mr_dual"]
    segs = [ds for ds in run.received[SEG] if _about(ds) == uid]
    srs = [ds for ds in run.received[SR] if _about(ds) == uid]
    assert len(segs) == 4 and len(srs) == 4
    assert len({str(ds.SeriesInstanceUID) for ds in segs}) == 4
    for ds in segs:
        referenced = {str(i.ReferencedSOPInstanceUID)
                      for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert len(referenced) == 30  # one echo, magnitude or phase: 30 slices
    summaries = [row[0] for row in run.db.execute(
        "select r.summary from results r join jobs j on j.id = r.job_id "
        "join series s on s.id = j.series_id where r.kind = 'SEG' "
        "and s.series_instance_uid = ?", (uid,))]
    volumes = sorted(json.loads(s)["volume"] for s in summaries)
    assert volumes == ["echo1-magnitude", "echo1-phase", "echo2-magnitude", "echo2-phase"]


def test_builtin_mr_on_sagittal_and_enhanced_mr(run: Run) -> None:
    for key, slices in (("mr_sag", 35), ("mr_enhanced", 96)):
        (uid,) = run.sources[key]
        (seg,) = [ds for ds in run.received[SEG] if _about(ds) == uid]
        assert seg.SegmentSequence[0].SegmentAlgorithmName == "radnode-builtin-mr"
        assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == \
            "38266002"
        assert 0 < len(seg.PerFrameFunctionalGroupsSequence) <= slices
        sc = [ds for ds in run.received[SC]
              if ds.SourceImageSequence[0].ReferencedSOPInstanceUID in
              {str(i.ReferencedSOPInstanceUID)
               for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}]
        assert len(sc) == slices  # one burned-in image per source slice
        assert all(ds.BurnedInAnnotation == "YES" for ds in sc)
        assert all("NOT FOR PRIMARY DIAGNOSIS" in ds.SeriesDescription for ds in sc)


def test_no_patient_identifiers_in_the_log(run: Run, test_data_dir: Path) -> None:
    identifiers: set[str] = set()
    for relative in SERIES.values():
        path = test_data_dir / relative
        first = path if path.is_file() else sorted(path.glob("*.dcm"))[0]
        ds = pydicom.dcmread(first, stop_before_pixels=True)
        identifiers |= {str(ds.get("PatientName", "")), str(ds.get("PatientID", ""))}
    identifiers = {i for i in identifiers if len(i) > 3}
    log_text = run.node.log.read_text(errors="replace")
    for identifier in identifiers:  # whole tokens: "99000" inside a duration is no leak
        assert not re.search(rf"(?<![0-9A-Za-z]){re.escape(identifier)}(?![0-9A-Za-z])",
                             log_text), identifier
