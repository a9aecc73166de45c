"""No patient data in any log line or metric, at any log level, on the whole path.

Real CT and MR series, with their patient attributes, go through a live node
running at DEBUG: reception, bad and duplicate instances, completion, rules
that look at patient and descriptive attributes, the worker's model and SEG/SR
encoding, delivery to a PACS, to a folder and to a destination that is down.
Then every line the node and its worker wrote, the Prometheus metrics and the
audit trail are scanned for the patient name (and its components), patient
ID, other patient IDs, birth date, accession number, institution, physicians,
addresses and the free-text descriptions and comments.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from tests.integration.conftest import (
    Peer,
    free_port,
    received_files,
    require_tool,
    start_node,
    stop,
)

pytestmark = pytest.mark.integration

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"

#: Patient attributes written into the CT series before it is sent. Each is
#: distinctive, so that finding it anywhere can only mean it leaked.
MARKERS: dict[str, str] = {
    "PatientName": "Quexworth^Zelinda^Marit",
    "PatientID": "PIDQX7731",
    "OtherPatientIDs": "OPIDQX9902",
    "PatientBirthDate": "19230417",
    "AccessionNumber": "ACCQX5521",
    "InstitutionName": "Quexford Memorial Infirmary",
    "InstitutionAddress": "12 Quexbridge Lane",
    "PatientAddress": "7 Zelindastrasse",
    "ReferringPhysicianName": "Vordtmann^Ilsabet",
    "PerformingPhysicianName": "Harrowgate^Oswin",
    "OperatorsName": "Tellweather^Brun",
    "StudyDescription": "Quexstudy thorax staging",
    "SeriesDescription": "Quexseries abdomen venous",
    "PatientComments": "allergic to quexamide",
    "ImageComments": "quexcomment slice",
    "RequestedProcedureDescription": "Quexprocedure request",
    "PerformedProcedureStepDescription": "Quexstep performed",
    "ProtocolName": "Quexprotocol 3mm",
}

#: Attribute values of the real data as they come (DICOM PS3.15 E.1-1 would
#: remove or replace them): checked too, at least 5 characters long.
REAL_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                   "InstitutionName", "StudyDescription", "SeriesDescription",
                   "ReferringPhysicianName", "OperatorsName")


def forbidden_strings(values: dict[str, str]) -> set[str]:
    """What must never be in a log line: each value, its name components, other date forms."""
    found: set[str] = set()
    for keyword, value in values.items():
        value = value.strip()
        if len(value) < 5:
            continue
        found.add(value)
        if "^" in value:
            found.update(part for part in value.split("^") if len(part) >= 5)
            found.add(" ".join(p for p in value.split("^") if p))
        if keyword.endswith("Date") and re.fullmatch(r"\d{8}", value):
            found.add(f"{value[:4]}-{value[4:6]}-{value[6:]}")
    return found


def leaks(text: str, forbidden: set[str]) -> list[str]:
    """The lines of ``text`` that contain a forbidden string (case-insensitive).

    Only whole tokens count: a patient ID of digits inside a longer number
    (a duration such as ``0.2444973990000107``) is no leak.
    """
    pattern = re.compile("|".join(rf"(?<![0-9A-Za-z]){re.escape(f)}(?![0-9A-Za-z])"
                                  for f in sorted(forbidden)), re.IGNORECASE)
    return [line for line in text.splitlines() if pattern.search(line)]


def test_the_scan_finds_a_leak() -> None:
    # The scan below must be able to fail.
    forbidden = forbidden_strings({"PatientName": "Quexworth^Zelinda", "PatientBirthDate":
                                   "19230417"})
    text = ("ok line\nseries 1.2.3 of quexworth\nborn 1923-04-17\nZelinda\nfine\n"
            "took 0.11923041712s")
    assert leaks(text, forbidden) == ["series 1.2.3 of quexworth", "born 1923-04-17", "Zelinda"]


def _marked_ct(source: Path, target: Path, count: int) -> list[Path]:
    """``count`` slices of the real CT with :data:`MARKERS` as their patient data."""
    target.mkdir()
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for path in sorted(source.glob("*.dcm"))[:count]:
        ds = pydicom.dcmread(path)
        for keyword, value in MARKERS.items():
            setattr(ds, keyword, value)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagesInAcquisition = count
        out = target / path.name
        ds.save_as(out, enforce_file_format=True)
        paths.append(out)
    return paths


@pytest.fixture
def mr_series_dir(test_data_dir: Path) -> Path:
    folder = test_data_dir / "mr_head_siemens_t1_sag"
    if not folder.is_dir():
        pytest.fail(f"{folder} is missing from the shared test data")
    return folder


def _config(tmp_path: Path, pacs: Peer) -> Path:
    down_port = free_port()  # nothing listens there
    (tmp_path / "folder-out").mkdir()
    (tmp_path / "research-out").mkdir()
    config = {
        "log_level": "DEBUG",
        "destinations": [
            {"name": "PACS", "ae_title": pacs.ae_title, "host": "127.0.0.1",
             "port": pacs.port},
            {"name": "DOWN", "ae_title": "DOWN", "host": "127.0.0.1", "port": down_port},
            {"kind": "folder", "name": "FOLDER", "path": str(tmp_path / "folder-out")},
            {"kind": "folder", "name": "RESEARCH", "path": str(tmp_path / "research-out"),
             "deidentify": {"retain_longitudinal": "modified"}},
        ],
        "delivery": {"retry_backoff_s": 1, "max_backoff_s": 2, "connect_timeout_s": 2},
        "rules": [
            {"name": "never", "when": {"any": [
                {"attribute": "PatientName", "regex": "^Nobody"},
                {"attribute": "StudyDescription", "equals": "no such study"},
                {"attribute": "AccessionNumber", "in": ["A1", "A2"]}]},
             "models": ["radnode-builtin-ct"], "final": True},
            {"name": "ct", "when": {"all": [
                {"attribute": "Modality", "equals": "CT"},
                {"attribute": "PatientID", "present": True},
                {"attribute": "SeriesDescription", "regex": "(?i)abdomen"},
                {"not": {"attribute": "InstitutionName", "equals": "elsewhere"}}]},
             "models": ["radnode-builtin-ct"]},
            {"name": "mr", "when": {"attribute": "Modality", "equals": "MR"},
             "models": ["radnode-builtin-mr"]},
        ],
    }
    path = tmp_path / "radnode.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture
def node(tmp_path: Path, storescp_pacs: Peer) -> Iterator[Peer]:
    peer = start_node(tmp_path, "--config", str(_config(tmp_path, storescp_pacs)))
    try:
        yield peer
    finally:
        stop(peer.process)


def _bad_and_duplicate_instances(node: Peer, marked: list[Path]) -> list[int]:
    """Send a duplicate, an instance without Series Instance UID, and a CT without pixels."""
    ae = AE(ae_title="BADSCANNER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    statuses = []
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RADNODE")
    assert assoc.is_established
    try:
        duplicate = pydicom.dcmread(marked[0])
        statuses.append(int(assoc.send_c_store(duplicate).Status))
        no_series = pydicom.dcmread(marked[1])
        no_series.SOPInstanceUID = generate_uid()
        del no_series.SeriesInstanceUID
        statuses.append(int(assoc.send_c_store(no_series).Status))
        not_ct = Dataset()
        for keyword, value in MARKERS.items():
            setattr(not_ct, keyword, value)
        not_ct.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        not_ct.SOPInstanceUID = generate_uid()
        not_ct.StudyInstanceUID = generate_uid()
        not_ct.SeriesInstanceUID = generate_uid()
        not_ct.file_meta = FileMetaDataset()
        not_ct.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        statuses.append(int(assoc.send_c_store(not_ct).Status))
    finally:
        assoc.release()
    return statuses


def _wait_for_deliveries(node: Peer, pacs: Peer, timeout_s: float = 400) -> None:
    """Until the PACS holds a SEG and an SR of both series, and both folders have them too."""
    deadline = time.monotonic() + timeout_s
    database = node.folder / "radnode.db"
    while time.monotonic() < deadline:
        assert node.process.poll() is None, node.log.read_text()
        classes = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID)
                   for p in received_files(pacs.folder)]
        if classes.count(SEG_CLASS) >= 2 and classes.count(SR_CLASS) >= 2 and database.exists():
            with sqlite3.connect(database) as db:
                states = dict(db.execute(
                    "SELECT state, count(*) FROM deliveries GROUP BY state").fetchall())
            if (states.get("sent", 0) >= 12
                    and "destination DOWN cannot be reached" in node.log.read_text()):
                return
        time.sleep(1.0)
    raise AssertionError(f"results not delivered within {timeout_s} s:\n{node.log.read_text()}")


def test_no_patient_data_in_logs_metrics_or_audit(
    tmp_path: Path, node: Peer, storescp_pacs: Peer, ct_series_dir: Path, mr_series_dir: Path
) -> None:
    storescu = require_tool("storescu")
    marked = _marked_ct(ct_series_dir, tmp_path / "marked", 40)
    forbidden = forbidden_strings(MARKERS)
    for path in (sorted(mr_series_dir.glob("*.dcm"))[0], sorted(ct_series_dir.glob("*.dcm"))[0]):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        forbidden |= forbidden_strings({k: str(header.get(k) or "") for k in REAL_ATTRIBUTES})
    assert "Quexworth" in forbidden and "crlab" in forbidden and "Pancreas-CT-CB_001" in forbidden

    for folder, aet in ((marked[0].parent, "SCANNER"), (mr_series_dir, "MRSCANNER")):
        sent = subprocess.run(
            [storescu, "-aet", aet, "-aec", "RADNODE", "+sd", "+sp", "*.dcm", "127.0.0.1",
             str(node.port), str(folder)],
            capture_output=True, text=True, check=False, timeout=300)
        assert sent.returncode == 0, sent.stdout + sent.stderr
    statuses = _bad_and_duplicate_instances(node, marked)
    assert statuses[0] == 0x0000  # the duplicate: kept once, answered Success
    assert statuses[1] != 0x0000, statuses  # no Series Instance UID: refused
    # A CT header without pixels is stored; its analysis fails (an error path to scan).

    _wait_for_deliveries(node, storescp_pacs)

    headers = {"Authorization": f"Bearer {node.token}"} if getattr(node, "token", None) else {}
    metrics = httpx.get(f"{node.api}/metrics", headers=headers, timeout=30)
    assert metrics.status_code == 200, metrics.text
    assert "radnode_instances_received_total" in metrics.text
    assert 'calling_ae="SCANNER"' in metrics.text

    audit = subprocess.run(
        [sys.executable, "-m", "service.cli", "audit", "export", "--data-dir",
         str(node.folder), "--format", "json"],
        capture_output=True, text=True, check=False, timeout=120)
    assert audit.returncode == 0, audit.stderr
    assert "association" in audit.stdout

    stop(node.process)  # the last lines (drain, worker shutdown) are in the log too
    log = node.log.read_text(encoding="utf-8", errors="replace")
    # The scan is meaningful: the log is at DEBUG, names the series by UID,
    # and covers the worker, the bad instances and the unreachable destination.
    assert " DEBUG " in log
    series_uid = str(pydicom.dcmread(marked[0], stop_before_pixels=True).SeriesInstanceUID)
    assert series_uid in log
    assert "succeeded" in log and "DOWN" in log

    assert leaks(log, forbidden) == []
    assert leaks(metrics.text, forbidden) == []
    assert leaks(audit.stdout, forbidden) == []
    # What went to the de-identifying destination carries none of it either.
    research = [p for p in (tmp_path / "research-out").rglob("*.dcm")]
    assert len(research) == 4
    for path in research:
        assert leaks(path.read_bytes().decode("latin-1"), forbidden) == [], path
