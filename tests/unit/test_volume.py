from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from workers.inference.base import Volume
from workers.inference.volume import VolumeError, load_series

ROWS, COLUMNS = 4, 6  # deliberately not square: a transposed array would show
PIXEL_SPACING = (0.8, 0.6)  # (row spacing, column spacing), deliberately unequal
SERIES_UID = generate_uid(entropy_srcs=["radnode-test-volume-series"])
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # normal +z
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # normal = row x col = +y
OBLIQUE = (1.0, 0.0, 0.0, 0.0, 0.8, -0.6)  # normal (0, 0.6, 0.8)


def _slice(
    index: int,
    ipp: Sequence[float] | np.ndarray,
    *,
    iop: Sequence[float] = AXIAL,
    instance_number: int = 1,
    slope: float = 2.0,
    intercept: float = -1000.0,
    rows: int = ROWS,
    series_uid: str = SERIES_UID,
) -> Dataset:
    """A minimal CT slice whose stored values are ``index * 100 + pixel number``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = "SECRET^PATIENT"
    ds.PatientID = "SECRET-ID"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance_number
    ds.ImageOrientationPatient = [f"{v:g}" for v in iop]
    ds.ImagePositionPatient = [f"{v:g}" for v in ipp]
    ds.PixelSpacing = [f"{v:g}" for v in PIXEL_SPACING]
    ds.SliceThickness = "2"
    ds.Rows, ds.Columns = rows, COLUMNS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    stored = (index * 100 + np.arange(rows * COLUMNS)).astype(np.uint16).reshape(rows, COLUMNS)
    ds.PixelData = stored.tobytes()
    return ds


def _write(tmp_path: Path, datasets: Sequence[Dataset]) -> list[Path]:
    """Write with names unrelated to position; return the paths in a shuffled order."""
    paths = []
    for ds in datasets:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    order = np.random.default_rng(7).permutation(len(paths))
    return [paths[i] for i in order]


def _stack(
    tmp_path: Path, iop: Sequence[float], positions_mm: Sequence[float], **kwargs: Any
) -> list[Path]:
    """Slices at ``positions_mm`` along the normal of ``iop``; slice ``k`` stores k*100+...

    Instance Numbers run in REVERSE position order, so neither Instance Number
    nor file name nor list order give the right order.
    """
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([-10.0, 20.0, 30.0])
    n = len(positions_mm)
    datasets = [
        _slice(k, origin + p * normal, iop=iop, instance_number=n - k, **kwargs)
        for k, p in enumerate(positions_mm)
    ]
    return _write(tmp_path, datasets)


def _expected_hu(index: int, slope: float = 2.0, intercept: float = -1000.0) -> np.ndarray:
    stored = index * 100 + np.arange(ROWS * COLUMNS).reshape(ROWS, COLUMNS)
    return (stored * slope + intercept).astype(np.float32)


@pytest.mark.parametrize("iop", [AXIAL, CORONAL, OBLIQUE], ids=["axial", "coronal", "oblique"])
def test_slices_sorted_by_position_along_normal(tmp_path: Path, iop: Sequence[float]) -> None:
    positions = [0.0, 2.5, 5.0, 7.5, 10.0]
    volume = load_series(_stack(tmp_path, iop, positions))

    assert volume.array.shape == (5, ROWS, COLUMNS)
    assert volume.array.dtype == np.float32
    for k in range(5):
        np.testing.assert_array_equal(volume.array[k], _expected_hu(k))
    assert [int(ds.InstanceNumber) for ds in volume.datasets] == [5, 4, 3, 2, 1]
    assert volume.modality == "CT"


def test_rescale_applied_per_slice(tmp_path: Path) -> None:
    iop = AXIAL
    datasets = [
        _slice(0, (0, 0, 0), iop=iop, slope=2.0, intercept=-1000.0),
        _slice(1, (0, 0, 3), iop=iop, slope=1.0, intercept=-1024.0),
        _slice(2, (0, 0, 6), iop=iop, slope=0.5, intercept=10.0),
    ]
    volume = load_series(_write(tmp_path, datasets))
    np.testing.assert_array_equal(volume.array[0], _expected_hu(0, 2.0, -1000.0))
    np.testing.assert_array_equal(volume.array[1], _expected_hu(1, 1.0, -1024.0))
    np.testing.assert_array_equal(volume.array[2], _expected_hu(2, 0.5, 10.0))
    assert volume.array[0, 0, 0] == -1000.0  # stored 0 * 2 - 1000


@pytest.mark.parametrize("iop", [AXIAL, CORONAL, OBLIQUE], ids=["axial", "coronal", "oblique"])
def test_spacing_and_affine(tmp_path: Path, iop: Sequence[float]) -> None:
    volume = load_series(_stack(tmp_path, iop, [0.0, 2.5, 5.0, 7.5]))
    assert volume.spacing == pytest.approx((2.5, 0.8, 0.6))
    assert volume.voxel_volume_ml == pytest.approx(2.5 * 0.8 * 0.6 / 1000)

    row_cos, col_cos = np.array(iop[:3]), np.array(iop[3:])
    for k, ds in enumerate(volume.datasets):
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose(volume.affine @ [k, 0, 0, 1], [*ipp, 1.0], atol=1e-6)
        # row index r moves along the column direction by the row spacing,
        # column index c along the row direction by the column spacing (PS3.3 C.7.6.2.1.1)
        expected = ipp + 3 * col_cos * 0.8 + 5 * row_cos * 0.6
        np.testing.assert_allclose(volume.affine @ [k, 3, 5, 1], [*expected, 1.0], atol=1e-6)
    np.testing.assert_array_equal(volume.affine[3], [0, 0, 0, 1])


def test_tilted_stack_affine_follows_slice_origins(tmp_path: Path) -> None:
    # Gantry tilt: slice origins step along z while the image plane is tilted,
    # so the step between origins is not parallel to the normal.
    iop = OBLIQUE
    ipps = [(0.0, 0.0, 5.0 * k) for k in range(4)]
    datasets = [_slice(k, ipp, iop=iop) for k, ipp in enumerate(ipps)]
    volume = load_series(_write(tmp_path, datasets))
    assert volume.spacing[0] == pytest.approx(5.0 * 0.8)  # distance along normal (0, .6, .8)
    for k in range(4):
        np.testing.assert_allclose(volume.affine @ [k, 0, 0, 1], [*ipps[k], 1.0], atol=1e-6)


def test_non_uniform_gaps_warn_with_series_uid_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="workers.inference.volume"):
        volume = load_series(_stack(tmp_path, AXIAL, [0.0, 2.0, 4.0, 9.0, 11.0]))
    assert volume.spacing[0] == pytest.approx(2.0)  # median of 2, 2, 5, 2
    assert volume.array.shape[0] == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert SERIES_UID in warnings[0]
    assert "SECRET" not in warnings[0]


def test_uniform_gaps_do_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="workers.inference.volume"):
        load_series(_stack(tmp_path, AXIAL, [0.0, 2.0, 4.0, 6.0]))
    assert not caplog.records


def test_single_slice_uses_slice_thickness(tmp_path: Path) -> None:
    volume = load_series(_write(tmp_path, [_slice(0, (0, 0, 0))]))
    assert volume.array.shape == (1, ROWS, COLUMNS)
    assert volume.spacing == pytest.approx((2.0, 0.8, 0.6))


def test_no_files() -> None:
    with pytest.raises(VolumeError, match="no files"):
        load_series([])
    assert issubclass(VolumeError, ValueError)


def test_mixed_orientation(tmp_path: Path) -> None:
    datasets = [_slice(0, (0, 0, 0)), _slice(1, (0, 0, 2), iop=OBLIQUE)]
    with pytest.raises(VolumeError, match="Orientation"):
        load_series(_write(tmp_path, datasets))


def test_mismatched_rows(tmp_path: Path) -> None:
    datasets = [_slice(0, (0, 0, 0)), _slice(1, (0, 0, 2), rows=ROWS + 1)]
    with pytest.raises(VolumeError, match="matrix sizes"):
        load_series(_write(tmp_path, datasets))


def test_duplicate_positions(tmp_path: Path) -> None:
    datasets = [_slice(0, (0, 0, 0)), _slice(1, (0, 0, 2)), _slice(2, (0, 0, 2))]
    with pytest.raises(VolumeError, match="same position"):
        load_series(_write(tmp_path, datasets))


@pytest.mark.parametrize(
    "keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"]
)
def test_missing_geometry(tmp_path: Path, keyword: str) -> None:
    datasets = [_slice(0, (0, 0, 0)), _slice(1, (0, 0, 2))]
    delattr(datasets[1], keyword)
    with pytest.raises(VolumeError, match=keyword):
        load_series(_write(tmp_path, datasets))


def test_multiple_series(tmp_path: Path) -> None:
    other = generate_uid()
    datasets = [_slice(0, (0, 0, 0)), _slice(1, (0, 0, 2), series_uid=other)]
    with pytest.raises(VolumeError, match="one Series Instance UID, found 2"):
        load_series(_write(tmp_path, datasets))


def test_multiframe_rejected(tmp_path: Path) -> None:
    ds = _slice(0, (0, 0, 0))
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    with pytest.raises(VolumeError, match="multi-frame"):
        load_series(_write(tmp_path, [ds]))


def test_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"not a DICOM file")
    with pytest.raises(VolumeError, match="junk.dcm"):
        load_series([path])


# --- real data -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pancreas_ct(ct_series_dir: Path) -> Volume:
    return load_series(sorted(ct_series_dir.glob("*.dcm")))


def test_real_ct_geometry(pancreas_ct: Volume) -> None:
    volume = pancreas_ct
    assert volume.array.shape == (134, 512, 512)
    assert volume.modality == "CT"
    assert volume.spacing == pytest.approx((3.0, 1.07421875, 1.07421875))
    # Instance 1 is the most superior slice (z = 484.91): sorted by position the
    # first slice is instance 134 at z = 85.91, and z rises 3 mm per slice.
    assert int(volume.datasets[0].InstanceNumber) == 134
    assert int(volume.datasets[-1].InstanceNumber) == 1
    np.testing.assert_allclose(volume.affine[:3, 3], [-275.0, -178.1, 85.91])
    np.testing.assert_allclose(volume.affine @ [133, 0, 0, 1], [-275.0, -178.1, 484.91, 1.0])


def test_real_ct_hu_range(pancreas_ct: Volume) -> None:
    hu = pancreas_ct.array
    assert hu.dtype == np.float32
    # Stored 0..4095 with intercept -1000: air sits at about -1000 HU, nothing below.
    assert -1024.0 <= float(hu.min()) <= -900.0
    assert 1000.0 <= float(hu.max()) <= 3100.0  # dense cortical bone / contrast
    # Most of the 50 cm field is air around the patient and the table.
    air_fraction = float((hu < -900).mean())
    assert 0.3 < air_fraction < 0.8
    # Soft tissue at the image centre of a mid-abdominal slice (no air, no metal).
    centre = hu[60, 226:286, 226:286]
    assert -200.0 < float(np.median(centre)) < 400.0


def test_real_gantry_tilt_loads_with_warning(
    test_data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = test_data_dir / "ct_head_ge_gantry_tilt"
    paths = sorted(folder.glob("*.dcm"))
    with caplog.at_level(logging.WARNING, logger="workers.inference.volume"):
        volume = load_series(paths)
    series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    assert volume.array.shape == (28, 512, 512)
    # Gaps along the normal: 13 x 4.0 mm, 1 x 1.08 mm, 13 x 7.0 mm -> median 4.0 mm.
    assert volume.spacing[0] == pytest.approx(4.0, abs=0.01)
    assert any(series_uid in r.getMessage() for r in caplog.records)
    # The affine follows the tilted stack: slice 12 (still 4 mm gaps) lands on its IPP.
    ipp = [float(v) for v in volume.datasets[12].ImagePositionPatient]
    np.testing.assert_allclose(volume.affine @ [12, 0, 0, 1], [*ipp, 1.0], atol=1e-3)
