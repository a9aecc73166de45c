"""Assemble single-frame DICOM instances of one series into a :class:`Volume`.

Slices are ordered by their position along the normal of the image plane
(DICOM PS3.3 C.7.6.2.1.1), never by file name or Instance Number, and the
modality rescale (Rescale Slope and Intercept, PS3.3 C.11.1.1.2) is applied to
each slice on its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from workers.inference.base import Volume

__all__ = ["VolumeError", "load_series"]

logger = logging.getLogger(__name__)

#: Largest difference allowed between the Image Orientation (Patient) values
#: of two slices of one volume (direction cosines, unitless).
ORIENTATION_TOLERANCE = 1e-4
#: Two slices closer than this along the normal (mm) are duplicates.
DUPLICATE_TOLERANCE_MM = 1e-3
#: A slice gap that differs from the median gap by more than this fraction of
#: it makes the series "non-uniform" (a warning, not an error).
GAP_TOLERANCE = 0.01

_GEOMETRY = ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")


class VolumeError(ValueError):
    """The instances given cannot be assembled into one regular volume."""


def _read(path: str | os.PathLike[str]) -> Dataset:
    try:
        return pydicom.dcmread(os.fspath(path))
    except (InvalidDicomError, OSError) as exc:
        raise VolumeError(f"cannot read {os.fspath(path)!r} as DICOM: {exc}") from exc


def _check_single_frame(ds: Dataset, path: str) -> None:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        raise VolumeError(
            f"{path!r} is a multi-frame (enhanced) instance with {frames} frames: "
            "multi-frame objects are not supported yet, only one slice per file"
        )


def _check_geometry(ds: Dataset, path: str) -> None:
    missing = [k for k in (*_GEOMETRY, "Rows", "Columns", "PixelData") if ds.get(k) is None]
    if missing:
        raise VolumeError(f"{path!r} lacks {', '.join(missing)}: cannot place it in a volume")
    if len(ds.ImageOrientationPatient) != 6 or len(ds.ImagePositionPatient) != 3:
        raise VolumeError(f"{path!r} has malformed Image Orientation/Position (Patient)")
    if len(ds.PixelSpacing) != 2:
        raise VolumeError(f"{path!r} has malformed Pixel Spacing")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise VolumeError(f"{path!r} is not a single-sample (greyscale) image")


def _slice_spacing_fallback(ds: Dataset) -> float:
    """Spacing of a one-slice volume, from the header since no gap can be measured."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = ds.get(keyword)
        if value is not None and float(value) > 0:
            return float(value)
    return 1.0


def load_series(paths: Sequence[str | os.PathLike[str]]) -> Volume:
    """Read the single-frame instances of one series into a 3-D volume.

    Parameters
    ----------
    paths : sequence of str or os.PathLike
        One file per slice, in any order. All must belong to one Series
        Instance UID and share Image Orientation (Patient), Rows, Columns and
        Pixel Spacing.

    Returns
    -------
    Volume
        ``array`` has shape ``(slices, rows, columns)``, float32, with each
        slice's Rescale Slope and Intercept applied (HU for CT). Slices are in
        the order of increasing position along the normal
        ``n = row_cosines x column_cosines``, position ``n . IPP``.
        ``spacing`` is ``(median gap between neighbouring slice positions,
        Pixel Spacing row spacing, Pixel Spacing column spacing)`` in mm.
        ``affine`` (4 x 4) maps ``(slice, row, column, 1)`` to LPS mm; its
        column 0 is the mean step between slice origins, scaled so that its
        component along ``n`` equals the median spacing, so that gantry-tilted
        (sheared) stacks are placed correctly; columns 1 and 2 are the column
        direction cosines times the row spacing and the row direction cosines
        times the column spacing; column 3 is the first slice's IPP.

    Raises
    ------
    VolumeError
        No files; unreadable files; multi-frame instances; missing or malformed
        geometry attributes; more than one Series Instance UID; mixed
        orientations, matrix sizes or pixel spacings; two slices at the same
        position.

    Notes
    -----
    Non-uniform slice gaps (e.g. gantry tilt series with gaps of 4 and 7 mm)
    still load: a warning naming the Series Instance UID is logged and the
    median gap is used as the spacing, so per-slice positions in the volume
    are then approximate.
    """
    if len(paths) == 0:
        raise VolumeError("no files given: a volume needs at least one slice")

    datasets: list[Dataset] = []
    for p in paths:
        ds = _read(p)
        name = os.fspath(p)
        _check_single_frame(ds, name)
        _check_geometry(ds, name)
        datasets.append(ds)

    first = datasets[0]
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) != 1 or "" in series_uids:
        raise VolumeError(
            f"expected one Series Instance UID, found {len(series_uids - {''})}"
            + (" and instances without one" if "" in series_uids else "")
        )
    series_uid = series_uids.pop()

    iop = np.asarray([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
    shape = (int(first.Rows), int(first.Columns))
    pixel_spacing = np.asarray([float(v) for v in first.PixelSpacing], dtype=np.float64)
    for ds in datasets[1:]:
        other = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        if not np.allclose(other, iop, rtol=0.0, atol=ORIENTATION_TOLERANCE):
            raise VolumeError(
                f"series {series_uid}: mixed Image Orientation (Patient) "
                f"{iop.tolist()} and {other.tolist()}"
            )
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise VolumeError(
                f"series {series_uid}: mixed matrix sizes {shape} and "
                f"{(int(ds.Rows), int(ds.Columns))} (rows, columns)"
            )
        other_ps = np.asarray([float(v) for v in ds.PixelSpacing], dtype=np.float64)
        if not np.allclose(other_ps, pixel_spacing, rtol=1e-4, atol=0.0):
            raise VolumeError(
                f"series {series_uid}: mixed Pixel Spacing {pixel_spacing.tolist()} "
                f"and {other_ps.tolist()}"
            )

    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    norm = float(np.linalg.norm(normal))
    if norm < 0.5:
        raise VolumeError(f"series {series_uid}: degenerate Image Orientation (Patient)")
    normal /= norm

    ipps = np.asarray(
        [[float(v) for v in ds.ImagePositionPatient] for ds in datasets], dtype=np.float64
    )
    positions = ipps @ normal
    order = np.argsort(positions, kind="stable")
    positions, ipps = positions[order], ipps[order]
    datasets = [datasets[i] for i in order]

    gaps = np.diff(positions)
    if gaps.size and float(gaps.min()) < DUPLICATE_TOLERANCE_MM:
        i = int(np.argmin(gaps))
        raise VolumeError(
            f"series {series_uid}: two slices at the same position {positions[i]:.3f} mm "
            "along the normal (duplicate instances, or several images per position)"
        )
    if gaps.size:
        slice_spacing = float(np.median(gaps))
        if float(np.max(np.abs(gaps - slice_spacing))) > GAP_TOLERANCE * slice_spacing:
            logger.warning(
                "series %s: non-uniform slice gaps (%.3f to %.3f mm); using the median "
                "%.3f mm as slice spacing",
                series_uid,
                float(gaps.min()),
                float(gaps.max()),
                slice_spacing,
            )
        # Step between slice origins: normal component = spacing, plus any
        # in-plane shear (gantry tilt) measured over the whole stack.
        step = (ipps[-1] - ipps[0]) * (slice_spacing / float(positions[-1] - positions[0]))
    else:
        slice_spacing = _slice_spacing_fallback(first)
        step = normal * slice_spacing

    array = np.empty((len(datasets), *shape), dtype=np.float32)
    for k, ds in enumerate(datasets):
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # decoder errors come in many types
            raise VolumeError(
                f"series {series_uid}: cannot decode pixel data of instance "
                f"{ds.get('SOPInstanceUID', '?')}: {exc}"
            ) from exc
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        np.multiply(pixels, np.float32(slope), out=array[k], casting="unsafe")
        array[k] += np.float32(intercept)

    row_spacing, col_spacing = float(pixel_spacing[0]), float(pixel_spacing[1])
    affine: npt.NDArray[np.float64] = np.eye(4, dtype=np.float64)
    affine[:3, 0] = step
    affine[:3, 1] = col_cos * row_spacing
    affine[:3, 2] = row_cos * col_spacing
    affine[:3, 3] = ipps[0]

    return Volume(
        array=array,
        spacing=(slice_spacing, row_spacing, col_spacing),
        affine=affine,
        datasets=datasets,
        modality=str(first.get("Modality", "")),
    )
