"""Rules and verified delivery through the whole node: scanner → radnode serve → Orthanc.

A real dcmtk storescu sends real series to ``radnode serve`` (its own process,
with its embedded Celery worker); rules route by attribute and calling AE
title; results go to Orthanc with Storage Commitment (the node's SCP receives
the reports) and to a folder; a changed config file is applied without a
restart, and an invalid one is refused while the node keeps running.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import free_port, require_tool, start_node, stop
from tests.peers import orthanc

pytestmark = pytest.mark.integration


def _query(node_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(node_dir / "radnode.db") as db:
        return list(db.execute(sql))


def _wait(condition: Callable[[], bool], timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; node log:\n{log.read_text()[-6000:]}")


def _send(port: int, folder: Path, calling_ae: str) -> None:
    sent = subprocess.run(
        [require_tool("storescu"), "-aet", calling_ae, "-aec", "RADNODE", "+sd", "+sp", "*.dcm",
         "127.0.0.1", str(port), str(folder)],
        capture_output=True, text=True, check=False, timeout=120)
    assert sent.returncode == 0, sent.stdout + sent.stderr


def _config(orthanc_port: int, out: Path, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "destinations": [
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_port,
             "storage_commitment": True},
            {"kind": "folder", "name": "scripts", "path": str(out)},
        ],
        "rules": rules,
        "completion": {"release_quiet_s": 1.0},
        "delivery": {"retry_backoff_s": 1.0},
    }


CT_FROM_SCANNER = {
    "name": "ct-scanner",
    "when": {"all": [{"attribute": "Modality", "equals": "ct"},
                     {"association": "calling_ae", "in": ["CT_SCANNER"]}]},
    "models": ["radnode-builtin-ct"], "destinations": ["pacs"], "priority": "stat",
}
MR_TO_SCRIPTS = {
    "name": "mr-scripts", "when": {"attribute": "Modality", "equals": "MR"},
    "models": ["radnode-builtin-mr"], "destinations": ["scripts"],
}


def test_rules_route_commit_and_reload(tmp_path: Path, test_data_dir: Path) -> None:
    ct = test_data_dir / "seg_sr" / "dcmqi_ct_liver_seg" / "ct_3slice"
    mr = test_data_dir / "mr_head_siemens_t1_sag"
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    with orthanc(tmp_path, modalities={"radnode": ("RADNODE", "127.0.0.1", port)}) as pacs:
        config_file = tmp_path / "radnode.yaml"
        config_file.write_text(yaml.safe_dump(_config(pacs.dicom_port, out, [CT_FROM_SCANNER])))
        node = start_node(tmp_path, "--config", str(config_file), port=port)
        try:
            # 1. CT from the scanner's AE: rule ct-scanner, STAT, results committed by Orthanc.
            _send(port, ct, "CT_SCANNER")
            _wait(lambda: _query(node.folder, "SELECT count(*) FROM deliveries "
                                 "WHERE state = 'committed'")[0][0] == 2,
                  240, "SEG and SR committed by Orthanc", node.log)
            ((rules, priority, version_1),) = _query(
                node.folder, "SELECT rule_names, priority, config_version FROM jobs")
            assert (rules, priority) == ("ct-scanner", "stat")
            committed = _query(node.folder, "SELECT r.sop_instance_uid FROM deliveries d "
                               "JOIN results r ON r.id = d.result_id")
            assert all(pacs.has_instance(uid) for (uid,) in committed)

            # 2. MR matches no rule: stored, not analysed (the default fallback).
            _send(port, mr, "MR_SCANNER")
            _wait(lambda: _query(node.folder, "SELECT count(*) FROM series "
                                 "WHERE modality = 'MR' AND routed_at IS NOT NULL")[0][0] == 1,
                  60, "the MR series to be routed", node.log)
            assert _query(node.folder, "SELECT count(*) FROM jobs")[0][0] == 1

            # 3. An invalid file is refused; the node keeps its rules and keeps running.
            config_file.write_text("rules: [{name: broken, models: [no-such-model]}]\n")
            _wait(lambda: "configuration not reloaded" in node.log.read_text(), 30,
                  "the invalid configuration to be refused", node.log)
            assert node.process.poll() is None

            # 4. A valid change applies without a restart: MR now goes to the folder.
            time.sleep(1.1)  # a new modification time
            config_file.write_text(yaml.safe_dump(
                _config(pacs.dicom_port, out, [CT_FROM_SCANNER, MR_TO_SCRIPTS])))
            _wait(lambda: "configuration reloaded" in node.log.read_text(), 30,
                  "the reload", node.log)
            mr_second = tmp_path / "mr-again"
            _copy_as_new_series(mr, mr_second)
            _send(port, mr_second, "MR_SCANNER")
            _wait(lambda: len(list(out.rglob("*.dcm"))) >= 2, 240,
                  "MR results in the folder", node.log)
            rows = _query(node.folder, "SELECT rule_names, config_version FROM jobs "
                          "ORDER BY id")
            assert rows[-1][0] == "mr-scripts"
            assert rows[-1][1] != version_1  # each job records the configuration that routed it

            # 5. SIGHUP reloads too (same file: same version), without stopping the node.
            os.kill(node.process.pid, signal.SIGHUP)
            _wait(lambda: node.log.read_text().count("configuration reloaded") == 2, 30,
                  "the reload on SIGHUP", node.log)
            assert node.process.poll() is None
        finally:
            stop(node.process)


def _copy_as_new_series(source: Path, target: Path) -> None:
    """The same images under new Series and SOP Instance UIDs (a second acquisition)."""
    import pydicom
    from pydicom.uid import generate_uid

    target.mkdir()
    series_uid = generate_uid()
    for path in sorted(source.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(target / path.name)
