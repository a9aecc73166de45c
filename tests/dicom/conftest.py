"""Fixtures for the DICOM result-encoder tests (SEG, SR) on real CT data.

The data folder is ``$RADNODE_TEST_DATA`` or ``<repo>/../shared/data``. When
it (or dciodvfy) is missing the tests are skipped, unless ``CI`` is set, in
which case they fail.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from tests.conftest import missing
from workers.inference.base import Code, SegmentSpec, Volume

PANCREAS_SLICES = 134


def _volume_from_datasets(datasets: list[Dataset]) -> Volume:
    """Test helper: sort single-frame slices along the normal, build a Volume.

    Independent of workers/inference/volume.py on purpose, so the encoders are
    tested against a loader written separately.
    """
    first = datasets[0]
    orientation = np.array(first.ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    ordered = sorted(
        datasets,
        key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, dtype=np.float64))),
    )
    positions = np.array([ds.ImagePositionPatient for ds in ordered], dtype=np.float64)
    array = np.stack(
        [
            ds.pixel_array.astype(np.float32) * np.float32(ds.RescaleSlope)
            + np.float32(ds.RescaleIntercept)
            for ds in ordered
        ]
    ).astype(np.float32)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    if len(ordered) > 1:
        steps = np.diff(positions @ normal)
        slice_spacing = float(np.mean(steps))
        slice_vector = (positions[-1] - positions[0]) / (len(ordered) - 1)
    else:
        slice_spacing = float(first.SliceThickness)
        slice_vector = normal * slice_spacing
    affine = np.eye(4, dtype=np.float64)
    # index (slice, row, column): a row step moves along the column direction
    # cosine (PS3.3 C.7.6.2.1.1), a column step along the row direction cosine.
    affine[:3, 0] = slice_vector
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 2] = row_dir * col_spacing
    affine[:3, 3] = positions[0]
    return Volume(
        array=array,
        spacing=(slice_spacing, row_spacing, col_spacing),
        affine=affine,
        datasets=list(ordered),
        modality=str(first.Modality),
    )


@pytest.fixture(scope="session")
def pancreas_datasets(ct_series_dir: Path) -> list[Dataset]:
    folder = ct_series_dir
    files = sorted(folder.glob("*.dcm"))
    if len(files) != PANCREAS_SLICES:
        missing(f"{folder} should hold {PANCREAS_SLICES} CT files, found {len(files)}")
    return [pydicom.dcmread(f) for f in files]


@pytest.fixture(scope="session")
def pancreas_volume(pancreas_datasets: list[Dataset]) -> Volume:
    """The full 134-slice CT, read once per session."""
    return _volume_from_datasets(pancreas_datasets)


@pytest.fixture(scope="session")
def small_volume(pancreas_volume: Volume) -> Volume:
    """12 contiguous slices from the middle of the CT, for fast tests."""
    start = 60
    stop = start + 12
    return _volume_from_datasets(pancreas_volume.datasets[start:stop])


def _threshold_masks(volume: Volume) -> np.ndarray:
    """(3, slices, rows, columns): body > -500 HU, bone > 300 HU, empty."""
    array = volume.array
    return np.stack([array > -500.0, array > 300.0, np.zeros(array.shape, dtype=bool)])


SEGMENTS: tuple[SegmentSpec, ...] = (
    SegmentSpec(
        label="Body",
        category=Code("91723000", "SCT", "Anatomical Structure"),
        type=Code("38266002", "SCT", "Entire body"),
        rgb=(0, 200, 0),
    ),
    SegmentSpec(
        label="Bone",
        category=Code("85756007", "SCT", "Tissue"),
        type=Code("272673000", "SCT", "Bone"),
        rgb=(241, 214, 145),
    ),
    SegmentSpec(
        label="Liver",
        category=Code("91723000", "SCT", "Anatomical Structure"),
        type=Code("10200004", "SCT", "Liver"),
        rgb=(221, 130, 101),
    ),
)


@pytest.fixture(scope="session")
def segments() -> tuple[SegmentSpec, ...]:
    return SEGMENTS


@pytest.fixture(scope="session")
def volume_from_datasets() -> Callable[[list[Dataset]], Volume]:
    """The test's own slice sorter / Volume builder, as a function."""
    return _volume_from_datasets


@pytest.fixture(scope="session")
def threshold_masks() -> Callable[[Volume], np.ndarray]:
    """Function giving (3, slices, rows, columns) masks: body, bone, empty."""
    return _threshold_masks


@pytest.fixture(scope="session")
def dciodvfy_path() -> str:
    path = shutil.which("dciodvfy") or (
        "/usr/bin/dciodvfy" if Path("/usr/bin/dciodvfy").exists() else None
    )
    if path is None:
        missing("dciodvfy (dicom3tools) not installed")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def dciodvfy(dciodvfy_path: str) -> Callable[[Path], tuple[list[str], list[str]]]:
    """Function running dciodvfy on a file: (error lines, warning lines).

    dciodvfy exits 0 even when it finds errors, so its output is parsed.
    """

    def run(path: Path) -> tuple[list[str], list[str]]:
        proc = subprocess.run(
            [dciodvfy_path, str(path)], capture_output=True, text=True, timeout=300, check=False
        )
        lines = (proc.stdout + proc.stderr).splitlines()
        errors = [line for line in lines if line.startswith("Error")]
        warnings = [line for line in lines if line.startswith("Warning")]
        return errors, warnings

    return run
