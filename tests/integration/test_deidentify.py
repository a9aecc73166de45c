"""De-identifying destinations on a live node: real CT in, de-identified SEG and SR out.

``radnode serve`` runs as its own process with three destinations: a dcmtk
storescp "PACS" (identified), a folder "research" and a second storescp
"TRIAL", both with ``deidentify``. The real pancreas CT, given back
identifying attributes (it was de-identified by TCIA), is sent with dcmtk's
storescu. The test scans what the research folder and the trial peer got
for the original identifiers and UIDs, runs dciodvfy, exports the source
series with ``radnode deid export`` and checks that the SEG references it,
and re-identifies the delivered SEG with ``radnode deid reidentify``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.integration.conftest import (
    Peer,
    free_port,
    require_tool,
    start_node,
    stop,
    wait_for_port,
)
from tests.integration.test_recovery import query, storescu, wait_until

pytestmark = pytest.mark.integration

NAME = "Doe^Jane^Quinn"
BIRTH_DATE = "19610203"
ACCESSION = "ACC98765"
INSTITUTION = "Example General Hospital"


def radnode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True,
                          text=True, timeout=300, check=False,
                          env={**os.environ, "COLUMNS": "300"})


def dciodvfy_errors(path: Path) -> set[str]:
    exe = require_tool("dciodvfy")
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=300,
                         check=False)
    return {re.sub(r"<[^>]*>|\[[^\]]*\]", "<>", line)
            for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")}


@pytest.fixture
def identified_ct(ct_series_dir: Path, tmp_path: Path) -> Path:
    """The real CT series with identifying attributes put back."""
    folder = tmp_path / "ct"
    folder.mkdir()
    for path in sorted(ct_series_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.PatientName = NAME
        ds.PatientBirthDate = BIRTH_DATE
        ds.AccessionNumber = ACCESSION
        ds.InstitutionName = INSTITUTION
        ds.save_as(folder / path.name, enforce_file_format=True)
    return folder


def _storescp(tmp_path: Path, ae_title: str) -> Peer:
    exe = require_tool("storescp")
    folder = tmp_path / ae_title.lower()
    folder.mkdir()
    port = free_port()
    log = tmp_path / f"{ae_title.lower()}.log"
    with log.open("wb") as out:
        process = subprocess.Popen([exe, "-aet", ae_title, "-od", str(folder), "+xa", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_port(port, process)
    return Peer(ae_title, port, folder, process, log)


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[Peer, Peer]]:
    pacs = _storescp(tmp_path, "PACS")
    try:
        trial = _storescp(tmp_path, "TRIAL")
    except Exception:
        stop(pacs.process)
        raise
    try:
        yield pacs, trial
    finally:
        stop(trial.process)
        stop(pacs.process)


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]


def test_deidentifying_destinations_on_a_live_node(
    identified_ct: Path, peers: tuple[Peer, Peer], tmp_path: Path
) -> None:
    pacs, trial = peers
    research = tmp_path / "research"
    research.mkdir()
    config = tmp_path / "radnode.yaml"
    config.write_text(f"""
destinations:
  - name: pacs
    ae_title: PACS
    host: 127.0.0.1
    port: {pacs.port}
  - kind: folder
    name: research
    path: {research}
    deidentify: true
  - name: trial
    ae_title: TRIAL
    host: 127.0.0.1
    port: {trial.port}
    deidentify:
      retain_longitudinal: modified
      clean_descriptors: true
      patient_id_prefix: TRIAL-
""", encoding="utf-8")
    node = start_node(tmp_path, "--config", str(config))
    try:
        sender = storescu(node.port, identified_ct)
        assert sender.wait(timeout=300) == 0, sender.stdout.read() if sender.stdout else ""
        wait_until(lambda: query(node.folder, "select destination, state, count(*) from "
                                              "deliveries group by destination, state "
                                              "order by destination")
                   == [("pacs", "sent", 2), ("research", "sent", 2), ("trial", "sent", 2)],
                   400, "SEG and SR sent to the three destinations", node.log)
        results = query(node.folder, "select kind, sop_instance_uid, path from results")
        source = pydicom.dcmread(sorted(identified_ct.glob("*.dcm"))[0])
        original_uids = {str(source.StudyInstanceUID), str(source.SeriesInstanceUID),
                         str(source.FrameOfReferenceUID),
                         *(str(uid) for _, uid, _ in results)}
        original_uids |= {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                          for p in identified_ct.glob("*.dcm")}
        identifiers = [NAME, "Doe", "Quinn", BIRTH_DATE, ACCESSION, INSTITUTION,
                       str(source.PatientID)]

        # -- the PACS got the results as they are
        in_pacs = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in _files(pacs.folder)}
        assert set(in_pacs) == {str(uid) for _, uid, _ in results}

        # -- the research folder and the trial peer got de-identified objects
        delivered = {"research": _files(research), "trial": _files(trial.folder)}
        for name, files in delivered.items():
            assert len(files) == 2, (name, files)
            for path in files:
                data = path.read_bytes()
                for identifier in identifiers:
                    assert identifier.encode() not in data, (name, path, identifier)
                for uid in original_uids:
                    assert uid.encode() not in data, (name, path, uid)
                ds = pydicom.dcmread(path)
                original = next(p for u, p in in_pacs.items()
                                if pydicom.dcmread(p).Modality == ds.Modality)
                new_errors = dciodvfy_errors(path) - dciodvfy_errors(original)
                assert new_errors == set(), (name, path, sorted(new_errors))
                assert ds.PatientID.startswith("ANON-" if name == "research" else "TRIAL-")
        by_modality = {pydicom.dcmread(p).Modality: pydicom.dcmread(p)
                       for p in delivered["research"]}
        seg, sr = by_modality["SEG"], by_modality["SR"]
        assert sr.StudyInstanceUID == seg.StudyInstanceUID
        assert str(seg.SOPInstanceUID) in str(sr.ContentSequence)
        trial_seg = next(pydicom.dcmread(p) for p in delivered["trial"]
                         if pydicom.dcmread(p).Modality == "SEG")
        assert trial_seg.SOPInstanceUID != seg.SOPInstanceUID  # scopes differ
        assert trial_seg.StudyDate != "" and trial_seg.StudyDate != source.StudyDate

        # -- the source series exported in the research scope: the SEG's references resolve
        export = tmp_path / "export"
        run = radnode("deid", "export", "--config", str(config), "--data-dir",
                      str(node.folder), "--destination", "research", "-o", str(export),
                      *(str(p) for p in sorted(identified_ct.glob("*.dcm"))))
        assert run.returncode == 0, run.stderr
        exported = [pydicom.dcmread(p, stop_before_pixels=True) for p in _files(export)]
        assert len(exported) == len(list(identified_ct.glob("*.dcm")))
        exported_uids = {str(ds.SOPInstanceUID) for ds in exported}
        assert {str(ds.SeriesInstanceUID) for ds in exported} == \
            {str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)}
        assert {str(i.ReferencedSOPInstanceUID)
                for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} \
            <= exported_uids
        assert {str(ds.StudyInstanceUID) for ds in exported} == {str(seg.StudyInstanceUID)}
        for ds in exported[:3]:
            assert NAME not in str(ds.PatientName)

        # -- re-identification of the delivered SEG with the CLI
        seg_file = next(p for p in delivered["research"]
                        if pydicom.dcmread(p).Modality == "SEG")
        back = tmp_path / "back"
        run = radnode("deid", "reidentify", "--config", str(config), "--data-dir",
                      str(node.folder), str(seg_file), "-o", str(back))
        assert run.returncode == 0, run.stderr
        restored = pydicom.dcmread(_files(back)[0])
        assert restored.StudyInstanceUID == source.StudyInstanceUID
        assert restored.PatientID == source.PatientID
        assert str(restored.PatientName) == NAME
        assert restored.SOPInstanceUID in {str(uid) for kind, uid, _ in results
                                           if str(kind).lower() == "seg"}
        run = radnode("deid", "lookup", "--data-dir", str(node.folder), str(seg.StudyInstanceUID))
        assert run.returncode == 0 and source.StudyInstanceUID in run.stdout, run.stderr
        audited = query(node.folder, "select action from audit_events where action like 'deid.%'")
        assert {a for (a,) in audited} == {"deid.reidentify", "deid.lookup"}
    finally:
        stop(node.process)
