"""``radnode rules test``: rules tried on real files, nothing sent, no patient data shown."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from pydicom import dcmread

from service.cli_rules import rules

CONFIG: dict[str, Any] = {
    "destinations": [
        "PACS@10.0.0.5:104",
        {"ae_title": "CT_SCANNER_1", "host": "10.0.0.9", "port": 104, "name": "scanner",
         "sender_ae_titles": ["CT_GATEWAY"]},
    ],
    "rules": [
        {"name": "no-derived", "when": {"attribute": "Modality", "in": ["SEG", "SR"]},
         "models": [], "final": True},
        {"name": "thin-ct",
         "when": {"all": [{"attribute": "Modality", "equals": "CT"},
                          {"attribute": "SliceThickness", "range": {"min": 0.5, "max": 3}}]},
         "models": ["radnode-builtin-ct"], "destinations": ["PACS", "sender"],
         "priority": "stat"},
        {"name": "brain-mr",
         "when": {"all": [{"attribute": "Modality", "equals": "MR"},
                          {"attribute": "BodyPartExamined", "in": ["BRAIN", "HEAD"]}]},
         "models": ["radnode-builtin-mr"], "completion": "study", "quiet_period_s": 30},
    ],
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("RADNODE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "radnode.yaml"
    path.write_text(yaml.safe_dump(CONFIG | {"data_dir": str(tmp_path / "data")}),
                    encoding="utf-8")
    return path


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(rules, ["test", *args], catch_exceptions=False)
    return result.exit_code, result.output


def _block(output: str, series_uid: str) -> str:
    """The lines printed for one series."""
    start = output.index(f"Series {series_uid}")
    end = output.find("\nSeries ", start + 1)
    return output[start:] if end < 0 else output[start:end]


def test_rules_on_real_folders(test_data_dir: Path, config_file: Path) -> None:
    ct_dir = test_data_dir / "ct_head_ge_gantry_tilt"            # CT, 4.0 mm
    thin_ct = test_data_dir / "seg_sr" / "dcmqi_ct_liver_seg"     # CT 1.25 mm + 2 SEG
    mr_dir = test_data_dir / "mr_head_siemens_t1_sag"             # MR, BRAIN
    code, output = _run(str(ct_dir), str(thin_ct), str(mr_dir), "--config", str(config_file),
                        "--calling-ae", "CT_GATEWAY")
    assert code == 0, output

    ct_uid = str(dcmread(sorted(ct_dir.glob("*.dcm"))[0]).SeriesInstanceUID)
    block = _block(output, ct_uid)
    assert "(28 files" in block
    assert "Modality CT" in block
    assert "thin-ct" in block and "SliceThickness 4.0 not in [0.5, 3]" in block
    assert "=> fallback: store only" in block

    thin_uid = str(dcmread(thin_ct / "ct_3slice" / "01.dcm").SeriesInstanceUID)
    block = _block(output, thin_uid)
    assert "MATCH" in block
    assert "Modality is 'CT' and SliceThickness 1.25 in [0.5, 3]" in block
    assert "=> radnode-builtin-ct -> PACS, sender (scanner), stat (rules: thin-ct)" in block

    seg_uid = str(dcmread(thin_ct / "liver.dcm").SeriesInstanceUID)
    block = _block(output, seg_uid)
    assert "SeriesDescription 'Liver Segmentation'" in block
    assert "Modality is 'SEG', in [SEG, SR]" in block
    assert "not evaluated" in block and "final rule 'no-derived' matched" in block
    assert "=> store only (matched: no-derived)" in block

    mr_first = sorted(mr_dir.glob("*.dcm"))[0]
    block = _block(output, str(dcmread(mr_first).SeriesInstanceUID))
    assert "SeriesDescription 't1_fl2d_sag'" in block
    assert "Modality is 'MR', not equal to 'CT'" in block       # thin-ct fails here
    assert "=> radnode-builtin-mr -> all destinations (PACS, scanner), routine" in block
    assert "scope: study, quiet period: 30 s" in block

    # never patient data
    for path in (mr_first, thin_ct / "liver.dcm", sorted(ct_dir.glob("*.dcm"))[0]):
        header = dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
            value = str(header.get(keyword, "") or "").strip()
            if len(value) > 2:
                assert value not in output, keyword


def test_default_rules_and_association_options(test_data_dir: Path, tmp_path: Path) -> None:
    code, output = _run(str(test_data_dir / "transfer_syntaxes" / "dclunie" / "image_dfl.dcm"),
                        str(test_data_dir / "ct_abdomen_pancreas_tcia" / "1-001.dcm"),
                        "--peer-address", "10.1.2.3", "--called-ae", "OTHER")
    assert code == 0, output
    assert "Modality is 'OT', not equal to 'CT'" in output
    assert "=> fallback: store only" in output
    assert "(1 file, header from 1-001.dcm)" in output
    assert "=> radnode-builtin-ct -> all destinations (none configured), routine " \
           "(rules: ct)" in output
    assert "quiet period: 5 s (completion.quiet_period_s)" in output


def test_sender_without_calling_ae(test_data_dir: Path, config_file: Path) -> None:
    code, output = _run(str(test_data_dir / "seg_sr" / "dcmqi_ct_liver_seg" / "ct_3slice"),
                        "--config", str(config_file))
    assert code == 0, output
    assert "sender (give --calling-ae to see which)" in output


def test_invalid_config_is_a_click_error(tmp_path: Path, test_data_dir: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"rules": [{"name": "x", "models": [],
                                              "when": {"attribute": "Modalty",
                                                       "equals": "CT"}}]}),
                   encoding="utf-8")
    result = CliRunner().invoke(rules, ["test", str(test_data_dir / "ct_head_ge_gantry_tilt"),
                                        "--config", str(bad)])
    assert result.exit_code == 1
    assert "Modalty is not a DICOM keyword (did you mean Modality?)" in result.output


def test_folder_without_dicom_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not DICOM", encoding="utf-8")
    result = CliRunner().invoke(rules, ["test", str(tmp_path)])
    assert result.exit_code == 1
    assert "no DICOM files" in result.output
