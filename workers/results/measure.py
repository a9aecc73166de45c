"""Per-segment measurements reported in the TID 1500 SR.

Sources
-------
* DICOM PS3.16 TID 1411 "Volumetric ROI Measurements and Qualitative
  Evaluations": the measurement group that carries these values.
* DICOM PS3.3 C.11.1.1.2: CT values are Hounsfield units after Rescale Slope
  and Intercept, which :class:`~workers.inference.base.Volume` already applies.
* DICOM PS3.3 C.7.6.16 (Multi-frame Functional Groups) and C.7.6.1.1.3
  (Referenced Frame Number): a slice of a volume may be one frame of an
  enhanced multi-frame source instance, see ``Volume.frames``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from workers.inference.base import SegmentMeasurement, SegmentSpec, Volume

__all__ = ["check_masks", "check_sources", "measure_segments", "source_instances"]


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


def _number_of_frames(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames")
    try:
        return max(1, int(value)) if value not in (None, "") else 1
    except (TypeError, ValueError):
        return 1


def check_sources(volume: Volume) -> list[tuple[Dataset, int]]:
    """Check ``volume.frames`` against ``volume.datasets``; name each slice's source.

    Parameters
    ----------
    volume : Volume
        ``volume.array`` has shape ``(slices, rows, columns)``;
        ``volume.slice_frames[k]`` is ``(index into volume.datasets, 1-based
        frame number)`` of slice ``k`` (``(k, 1)`` for every slice when
        ``frames`` is empty: one single-frame dataset per slice).

    Returns
    -------
    list of (pydicom.dataset.Dataset, int)
        For each slice, in slice order: its source instance and frame number
        (1 for a single-frame instance).

    Raises
    ------
    ValueError
        If the number of frame references differs from the number of slices,
        a reference names a dataset that is not there or a frame number
        outside ``1..NumberOfFrames``, or two slices name the same frame of
        the same SOP Instance UID.
    """
    slices = volume.array.shape[0]
    frames = volume.slice_frames
    if len(frames) != slices:
        raise ValueError(f"volume has {slices} slices but {len(frames)} frame references")
    if not volume.frames and len(volume.datasets) != slices:
        raise ValueError(f"volume has {slices} slices but {len(volume.datasets)} datasets")
    sources: list[tuple[Dataset, int]] = []
    seen: set[tuple[str, int]] = set()
    for k, (index, number) in enumerate(frames):
        if not 0 <= index < len(volume.datasets):
            raise ValueError(
                f"slice {k} names dataset {index}, volume has {len(volume.datasets)} datasets"
            )
        ds = volume.datasets[index]
        count = _number_of_frames(ds)
        if not 1 <= number <= count:
            raise ValueError(f"slice {k} names frame {number} of an instance with {count} frames")
        key = (str(ds.get("SOPInstanceUID", "")), number)
        if key in seen:
            raise ValueError(f"slice {k} repeats frame {number} of instance {key[0]}")
        seen.add(key)
        sources.append((ds, number))
    return sources


def source_instances(volume: Volume) -> list[Dataset]:
    """The distinct source instances of a volume, in the order slices first use them.

    Parameters
    ----------
    volume : Volume
        A volume whose slices are single-frame instances or frames of
        multi-frame instances (see :func:`check_sources`).

    Returns
    -------
    list[pydicom.dataset.Dataset]
        One dataset per SOP Instance UID: the instances to list as evidence
        or references, each once, however many of its frames are slices.

    Raises
    ------
    ValueError
        As :func:`check_sources`.
    """
    unique: dict[str, Dataset] = {}
    for ds, _ in check_sources(volume):
        unique.setdefault(str(ds.get("SOPInstanceUID", "")), ds)
    return list(unique.values())


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
