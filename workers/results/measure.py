"""Per-segment measurements reported in the TID 1500 SR.

Sources
-------
* DICOM PS3.16 TID 1411 "Volumetric ROI Measurements and Qualitative
  Evaluations": the measurement group that carries these values.
* DICOM PS3.3 C.11.1.1.2: CT values are Hounsfield units after Rescale Slope
  and Intercept, which :class:`~workers.inference.base.Volume` already applies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from workers.inference.base import SegmentMeasurement, SegmentSpec, Volume

__all__ = ["check_masks", "measure_segments"]


def check_masks(
    volume: Volume, masks: npt.NDArray[np.bool_], segments: Sequence[SegmentSpec]
) -> None:
    """Check that ``masks`` fits ``volume`` and ``segments``.

    Parameters
    ----------
    volume : Volume
        The source series; ``volume.array`` has shape ``(slices, rows, columns)``.
    masks : numpy.ndarray
        Boolean, shape ``(segments, slices, rows, columns)``.
    segments : Sequence[SegmentSpec]
        One entry per mask channel.

    Raises
    ------
    ValueError
        If ``masks`` is not 4-D, its grid differs from ``volume.array``, its
        first axis differs from ``len(segments)``, there are no segments, or
        its dtype is not boolean.
    """
    if masks.ndim != 4:
        raise ValueError(
            f"masks must have shape (segments, slices, rows, columns), got {masks.shape}"
        )
    if masks.shape[1:] != volume.array.shape:
        raise ValueError(
            f"masks grid {masks.shape[1:]} differs from volume grid {volume.array.shape}"
        )
    if masks.shape[0] != len(segments) or len(segments) == 0:
        raise ValueError(
            f"masks has {masks.shape[0]} channels but {len(segments)} segments were given"
        )
    if masks.dtype != np.bool_:
        raise ValueError(f"masks must be boolean, got dtype {masks.dtype}")


def measure_segments(
    volume: Volume, masks: npt.NDArray[np.bool_], segments: Sequence[SegmentSpec]
) -> list[SegmentMeasurement]:
    """Measure voxel count, volume and mean value of every segment.

    Parameters
    ----------
    volume : Volume
        The source series. ``volume.array`` has shape
        ``(slices, rows, columns)`` (HU for CT) and ``volume.voxel_volume_ml``
        gives the volume of one voxel in mL.
    masks : numpy.ndarray
        Boolean, shape ``(segments, slices, rows, columns)``, on the grid of
        ``volume.array``; channel ``i`` is ``segments[i]``.
    segments : Sequence[SegmentSpec]
        Description of each channel.

    Returns
    -------
    list[SegmentMeasurement]
        One entry per segment, in channel order, with ``segment_number =
        i + 1`` (the Segment Number the SEG gives channel ``i``),
        ``voxel_count``, ``volume_ml = voxel_count * volume.voxel_volume_ml``
        (mL) and ``mean`` of ``volume.array`` inside the mask, computed in
        float64 (same unit as the array, HU for CT); ``mean`` is NaN for an
        empty mask.

    Raises
    ------
    ValueError
        If ``masks`` does not match ``volume`` or ``segments`` (see
        :func:`check_masks`).
    """
    check_masks(volume, masks, segments)
    voxel_ml = volume.voxel_volume_ml
    results: list[SegmentMeasurement] = []
    for index, spec in enumerate(segments):
        mask = masks[index]
        count = int(np.count_nonzero(mask))
        mean = float(volume.array[mask].mean(dtype=np.float64)) if count else math.nan
        results.append(
            SegmentMeasurement(
                segment_number=index + 1,
                label=spec.label,
                voxel_count=count,
                volume_ml=count * voxel_ml,
                mean=mean,
            )
        )
    return results
