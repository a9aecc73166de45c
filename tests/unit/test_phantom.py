from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from service.dicom.phantom import PHANTOM_HU, phantom_truth, write_ct_phantom

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL: dict[str, Any] = {
    "slices": 24,
    "rows": 96,
    "columns": 96,
    "pixel_spacing_mm": 4.0,
    "slice_thickness_mm": 5.0,
}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_phantom(tmp_path_factory.mktemp("phantom"), seed=1, **SMALL)


def _dciodvfy() -> str:
    exe = shutil.which("dciodvfy")
    if exe is None:
        message = "dciodvfy (dicom3tools) is not installed"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return exe


def test_dciodvfy_reports_no_errors(phantom: list[Path]) -> None:
    exe = _dciodvfy()
    result = subprocess.run([exe, str(phantom[0])], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    # dciodvfy names the IOD ("CTImage") once it has recognised the object;
    # its exit status does not reflect errors, so read the messages. An error
    # line may follow the IOD name without a newline ("CTImageError - ...").
    assert "CTImage" in output, output
    errors = re.findall(r"^\w*Error\b.*$", output, flags=re.MULTILINE)
    assert errors == [], output


def test_dciodvfy_check_can_fail(phantom: list[Path], tmp_path: Path) -> None:
    # The same parse on a deliberately broken slice finds the errors.
    exe = _dciodvfy()
    ds = pydicom.dcmread(phantom[0])
    del ds.PatientPosition  # type 2C for CT Image Storage
    del ds.Rows
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    result = subprocess.run([exe, str(broken)], capture_output=True, text=True, timeout=60)
    errors = re.findall(r"^\w*Error\b.*$", result.stdout + result.stderr, flags=re.MULTILINE)
    assert len(errors) >= 2


def test_series_header(phantom: list[Path]) -> None:
    datasets = [pydicom.dcmread(p) for p in phantom]
    assert len(datasets) == SMALL["slices"]
    first = datasets[0]
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert first.SOPClassUID == CTImageStorage
    assert first.file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert str(first.PatientName) == "RADNODE^PHANTOM"
    assert first.PatientID == "PHANTOM-0001"
    assert first.Manufacturer == "radnode"
    assert (float(first.RescaleIntercept), float(first.RescaleSlope)) == (-1024.0, 1.0)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({str(ds[keyword].value) for ds in datasets}) == 1
        assert UID(first[keyword].value).is_valid
    sop_uids = {ds.SOPInstanceUID for ds in datasets}
    assert len(sop_uids) == len(datasets)
    assert all(UID(u).is_valid for u in sop_uids)
    for ds in datasets:
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_files_shuffled_instance_numbers_follow_position(phantom: list[Path]) -> None:
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in phantom]
    z_by_list = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    by_name = sorted(zip(phantom, datasets, strict=True), key=lambda item: item[0].name)
    z_by_name = [float(ds.ImagePositionPatient[2]) for _, ds in by_name]
    # Neither the returned order nor the file names follow position...
    assert z_by_list != sorted(z_by_list) and z_by_list != sorted(z_by_list, reverse=True)
    assert z_by_name != sorted(z_by_name) and z_by_name != sorted(z_by_name, reverse=True)
    # ...but Instance Number does, and slices are contiguous at the thickness.
    by_position = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert [int(ds.InstanceNumber) for ds in by_position] == list(range(1, SMALL["slices"] + 1))
    steps = np.diff([float(ds.ImagePositionPatient[2]) for ds in by_position])
    np.testing.assert_allclose(steps, SMALL["slice_thickness_mm"])


def test_deterministic_for_a_seed(tmp_path: Path, phantom: list[Path]) -> None:
    again = write_ct_phantom(tmp_path / "again", seed=1, **SMALL)
    assert [p.name for p in again] == [p.name for p in phantom]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(again, phantom, strict=True))
    other = write_ct_phantom(tmp_path / "other", seed=2, **SMALL)
    first = pydicom.dcmread(phantom[0])
    assert pydicom.dcmread(other[0]).SeriesInstanceUID != first.SeriesInstanceUID


def test_pixel_values_are_the_materials(phantom: list[Path]) -> None:
    datasets = sorted(
        (pydicom.dcmread(p) for p in phantom), key=lambda ds: float(ds.ImagePositionPatient[2])
    )
    top = datasets[-1]  # most superior slice: has lungs
    hu = top.pixel_array.astype(np.float64) * float(top.RescaleSlope) + float(top.RescaleIntercept)
    assert hu[0, 0] == pytest.approx(PHANTOM_HU["air"], abs=80)
    assert hu[48, 48] == pytest.approx(PHANTOM_HU["soft_tissue"], abs=80)  # centre
    # Spine centre: 0.30 of the half field posterior (+y) of the centre.
    assert hu[48 + int(0.30 * 48), 48] == pytest.approx(PHANTOM_HU["bone"], abs=80)
    # Lung centres: 0.34 of the half field left/right, slightly anterior.
    for col in (48 - int(0.34 * 48), 48 + int(0.34 * 48)):
        assert hu[48 - int(0.08 * 48), col] == pytest.approx(PHANTOM_HU["lung"], abs=80)
    bottom = datasets[0]  # most inferior slice: no lungs
    hu0 = bottom.pixel_array.astype(np.float64) - 1024.0
    assert not (np.abs(hu0 - PHANTOM_HU["lung"]) < 80).any()


def test_truth_is_consistent() -> None:
    truth = phantom_truth(**SMALL)
    assert set(truth) == {"body", "lungs", "bone"}
    assert truth["body"] > truth["lungs"] + truth["bone"] > 0
    # Scales with the voxel size: halving the pixel spacing with twice the
    # matrix keeps the (field-relative) anatomy and so the volumes, to within
    # the rasterisation error.
    fine = phantom_truth(**{**SMALL, "rows": 192, "columns": 192, "pixel_spacing_mm": 2.0})
    for label in truth:
        assert fine[label] == pytest.approx(truth[label], rel=0.05)


def test_phantom_module_does_not_import_torch() -> None:
    code = "import sys, service.dicom.phantom; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, "service.dicom.phantom imported torch"
