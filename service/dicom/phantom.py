"""A synthetic CT phantom written as a real single-frame CT series.

The phantom gives tests and demos a series with a known answer: air outside,
an elliptical body of soft tissue, two lungs in the superior half, a spine, an
enhanced kidney, a pocket of bowel gas and a thin CT table below the body.
:func:`phantom_truth` returns the volumes of body, lungs and bone on exactly
the voxel grid that :func:`write_ct_phantom` writes.

This module must not import torch (``service/`` never does); it needs only
numpy and pydicom.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

__all__ = ["PHANTOM_HU", "phantom_truth", "write_ct_phantom"]

#: Mean value (HU) of each phantom material; Gaussian noise is added on top.
PHANTOM_HU: dict[str, float] = {
    "air": -1000.0,
    "soft_tissue": 40.0,
    "lung": -850.0,
    "vessel": 40.0,
    "bone": 700.0,
    "kidney": 250.0,
    "bowel_gas": -1000.0,
    "table": 100.0,
}
#: Standard deviation of the Gaussian noise (HU).
NOISE_HU = 15.0
_RESCALE_INTERCEPT = -1024.0

# Label values of the internal label map.
_AIR, _BODY, _LUNG, _BONE, _KIDNEY, _GAS, _TABLE, _VESSEL = range(8)
_LABEL_HU = {
    _AIR: PHANTOM_HU["air"],
    _BODY: PHANTOM_HU["soft_tissue"],
    _LUNG: PHANTOM_HU["lung"],
    _BONE: PHANTOM_HU["bone"],
    _KIDNEY: PHANTOM_HU["kidney"],
    _GAS: PHANTOM_HU["bowel_gas"],
    _TABLE: PHANTOM_HU["table"],
    _VESSEL: PHANTOM_HU["vessel"],
}


@dataclass(frozen=True)
class _Grid:
    slices: int
    rows: int
    columns: int
    pixel_spacing_mm: float
    slice_thickness_mm: float

    def __post_init__(self) -> None:
        if min(self.slices, self.rows, self.columns) < 1:
            raise ValueError("slices, rows and columns must be at least 1")
        if self.pixel_spacing_mm <= 0 or self.slice_thickness_mm <= 0:
            raise ValueError("pixel spacing and slice thickness must be positive")

    @property
    def origin(self) -> tuple[float, float, float]:
        """LPS (x, y, z) of the first voxel: the volume is centred on (0, 0, 0)."""
        return (
            -(self.columns - 1) / 2 * self.pixel_spacing_mm,
            -(self.rows - 1) / 2 * self.pixel_spacing_mm,
            -(self.slices - 1) / 2 * self.slice_thickness_mm,
        )

    @property
    def voxel_ml(self) -> float:
        return self.pixel_spacing_mm**2 * self.slice_thickness_mm / 1000.0


def _labels(grid: _Grid) -> npt.NDArray[np.uint8]:
    """Label map of shape ``(slices, rows, columns)``; later shapes overwrite earlier ones.

    In-plane sizes are fractions of the field of view (half widths ``hx``,
    ``hy`` in mm), z sizes fractions of the scan length, so the phantom keeps
    its shape for any matrix; with the defaults (384 mm field, 150 mm length)
    the body is 300 x 200 mm, each lung 84 x 115 mm, the spine 31 mm wide.
    """
    x0, y0, z0 = grid.origin
    ps, st = grid.pixel_spacing_mm, grid.slice_thickness_mm
    x = (x0 + ps * np.arange(grid.columns))[None, None, :]
    y = (y0 + ps * np.arange(grid.rows))[None, :, None]
    z = (z0 + st * np.arange(grid.slices))[:, None, None]
    hx, hy = grid.columns * ps / 2, grid.rows * ps / 2
    length = grid.slices * st
    z_rel = (np.arange(grid.slices) + 0.5) / grid.slices  # 0 inferior .. 1 superior
    shape = (grid.slices, grid.rows, grid.columns)
    labels = np.zeros(shape, dtype=np.uint8)
    everywhere = np.ones((grid.slices, 1, 1), dtype=bool)
    superior_half = (z_rel >= 0.5)[:, None, None]

    def ellipse(cx: float, cy: float, ax: float, ay: float) -> npt.NDArray[np.bool_]:
        result: npt.NDArray[np.bool_] = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0
        return result

    body_cy, body_ay = -0.05 * hy, 0.52 * hy
    body = ellipse(0.0, body_cy, 0.78 * hx, body_ay) & everywhere
    labels[body] = _BODY

    table_top = body_cy + body_ay + 12.0  # 12 mm of air between body and table
    table = (np.abs(x) <= 0.85 * hx) & (y >= table_top) & (y < table_top + 4.0) & everywhere
    labels[table] = _TABLE

    for side in (-1.0, 1.0):
        cx, cy = side * 0.34 * hx, -0.08 * hy
        labels[ellipse(cx, cy, 0.22 * hx, 0.30 * hy) & superior_half] = _LUNG
        for dx, dy in ((0.06, 0.05), (-0.05, -0.10)):  # vessels: 3 mm radius holes
            vessel = ellipse(cx + side * dx * hx, cy + dy * hy, 3.0, 3.0) & superior_half
            labels[vessel] = _VESSEL

    spine = ellipse(0.0, 0.30 * hy, 0.08 * min(hx, hy), 0.08 * min(hx, hy)) & everywhere
    labels[spine] = _BONE

    kz = z0 + 0.25 * (length - st)
    kidney = ((x - 0.35 * hx) / 30.0) ** 2 + ((y - 0.22 * hy) / 20.0) ** 2 + (
        (z - kz) / 40.0
    ) ** 2 <= 1.0
    labels[kidney & body] = _KIDNEY

    gz = z0 + 0.2 * (length - st)
    gas = (x + 0.30 * hx) ** 2 + (y + 0.20 * hy) ** 2 + (z - gz) ** 2 <= 20.0**2
    labels[gas & body] = _GAS
    return labels


def phantom_truth(
    *,
    slices: int = 60,
    rows: int = 192,
    columns: int = 192,
    pixel_spacing_mm: float = 2.0,
    slice_thickness_mm: float = 2.5,
) -> dict[str, float]:
    """Volumes (mL) of the phantom's body, lungs and bone on its voxel grid.

    Parameters
    ----------
    slices, rows, columns : int
        Matrix size, as given to :func:`write_ct_phantom`.
    pixel_spacing_mm, slice_thickness_mm : float
        Voxel size in mm, as given to :func:`write_ct_phantom`. The seed only
        changes noise, UIDs and file names, so it is not a parameter here.

    Returns
    -------
    dict[str, float]
        ``{"body": ..., "lungs": ..., "bone": ...}`` in mL (1 mL = 1000 mm³),
        counted voxel by voxel: ``body`` is everything inside the skin (lungs,
        spine, kidney and gas included, table excluded), ``lungs`` includes
        the vessels inside them, ``bone`` is the spine cylinder.
    """
    grid = _Grid(slices, rows, columns, pixel_spacing_mm, slice_thickness_mm)
    labels = _labels(grid)
    counts = np.bincount(labels.ravel(), minlength=8)
    inside = int(counts.sum() - counts[_AIR] - counts[_TABLE])
    return {
        "body": inside * grid.voxel_ml,
        "lungs": int(counts[_LUNG] + counts[_VESSEL]) * grid.voxel_ml,
        "bone": int(counts[_BONE]) * grid.voxel_ml,
    }


def _ds(value: float) -> str:
    """A Decimal String (at most 16 characters) for ``value``."""
    return str(format_number_as_ds(float(value)))


def _uid(seed: int, grid: _Grid, *parts: object) -> UID:
    """A UID that depends only on the seed, the grid and ``parts``."""
    sources = ["radnode-ct-phantom", str(seed), repr(grid), *map(str, parts)]
    return generate_uid(entropy_srcs=sources)


def write_ct_phantom(
    out_dir: Path,
    *,
    slices: int = 60,
    rows: int = 192,
    columns: int = 192,
    pixel_spacing_mm: float = 2.0,
    slice_thickness_mm: float = 2.5,
    seed: int = 0,
) -> list[Path]:
    r"""Write the phantom as a CT Image Storage series, one file per slice.

    Parameters
    ----------
    out_dir : pathlib.Path
        Folder to write into; created if missing.
    slices, rows, columns : int
        Matrix size ``(slices, rows, columns)``. The phantom scales with the
        field of view (``columns x pixel_spacing_mm``); below about 64 x 64
        pixels or 20 slices its structures get too small to be useful.
    pixel_spacing_mm : float
        Pixel Spacing, rows and columns alike, in mm.
    slice_thickness_mm : float
        Slice Thickness and distance between slices (contiguous), in mm.
    seed : int
        Seeds the noise, the file names, the write order and every UID; the
        same arguments give byte-identical files.

    Returns
    -------
    list[pathlib.Path]
        The files in the order they were written, which is shuffled: neither
        the file names nor the list order follow slice position. Instance
        Number does increase with position (inferior to superior).

    Notes
    -----
    Axial slices, Image Orientation (Patient) ``1\0\0\0\1\0``, patient
    head first supine; slice ``k`` lies at ``z = z0 + k * slice_thickness_mm``
    with the volume centred on the origin. Stored values are unsigned 16-bit
    (12 bits stored), Rescale Intercept -1024, Rescale Slope 1, HU.
    Materials and noise: :data:`PHANTOM_HU`, :data:`NOISE_HU`.
    """
    grid = _Grid(slices, rows, columns, pixel_spacing_mm, slice_thickness_mm)
    labels = _labels(grid)
    rng = np.random.default_rng(seed)
    lut = np.array([_LABEL_HU[i] for i in range(len(_LABEL_HU))], dtype=np.float64)
    hu = lut[labels] + rng.normal(0.0, NOISE_HU, size=labels.shape)
    stored = np.clip(np.rint(hu - _RESCALE_INTERCEPT), 0, 4095).astype(np.uint16)

    study_uid = _uid(seed, grid, "study")
    series_uid = _uid(seed, grid, "series")
    frame_uid = _uid(seed, grid, "frame-of-reference")
    when = _dt.datetime(2024, 1, 1, 12, 0, 0) + _dt.timedelta(days=seed % 3650)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    x0, y0, z0 = grid.origin

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{rng.integers(0, 2**63):016x}.dcm" for _ in range(slices)]
    written: list[Path] = []
    for k in rng.permutation(slices):
        k = int(k)
        sop_uid = _uid(seed, grid, "instance", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = time
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "radnode"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "radnode CT phantom"
        ds.SeriesDescription = "synthetic CT phantom"
        ds.PatientName = "RADNODE^PHANTOM"
        ds.PatientID = "PHANTOM-0001"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = _ds(slice_thickness_mm)
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        z = z0 + k * slice_thickness_mm
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(z)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.PixelSpacing = [_ds(pixel_spacing_mm), _ds(pixel_spacing_mm)]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = f"{_RESCALE_INTERCEPT:g}"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()

        path = out_dir / names[k]
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written
