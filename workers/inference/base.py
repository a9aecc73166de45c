"""Types shared by every model, the volume loader and the result encoders.

Axis order everywhere in radnode's workers is ``(slice, row, column)``, written
``(z, y, x)`` in shapes: ``slice`` runs along the normal of the image plane in
the order of increasing position along that normal (DICOM PS3.3 C.7.6.2.1.1),
``row`` and ``column`` are the image's own rows and columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset


@dataclass(frozen=True)
class Code:
    """A coded concept: (code value, coding scheme designator, code meaning).

    Parameters
    ----------
    value : str
        Code Value (0008,0100), e.g. ``"39607008"``.
    scheme : str
        Coding Scheme Designator (0008,0102), e.g. ``"SCT"`` for SNOMED CT.
    meaning : str
        Code Meaning (0008,0104), e.g. ``"Lung"``.
    """

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class SegmentSpec:
    """What one output channel of a segmentation model means.

    Parameters
    ----------
    label : str
        Segment Label (0062,0005), short and human readable.
    category : Code
        Segmented Property Category Code (0062,0003), e.g. SCT 91723000
        "Anatomical Structure" (DICOM PS3.16 CID 7150).
    type : Code
        Segmented Property Type Code (0062,000F), e.g. SCT 39607008 "Lung"
        (DICOM PS3.16 CID 7151).
    rgb : tuple[int, int, int]
        Recommended display colour, 0-255 per channel.
    """

    label: str
    category: Code
    type: Code
    rgb: tuple[int, int, int] = (255, 0, 0)


@dataclass(frozen=True)
class Volume:
    """A series assembled into a 3-D volume in patient space.

    Parameters
    ----------
    array : numpy.ndarray
        Shape ``(slices, rows, columns)``, float32. For CT the values are in
        HU (Rescale Slope and Intercept applied, DICOM PS3.3 C.11.1.1.2).
    spacing : tuple[float, float, float]
        Voxel size in mm, ``(slice, row, column)``: slice spacing measured
        between Image Position (Patient) of neighbouring slices, then the
        Pixel Spacing (0028,0030) row and column values.
    affine : numpy.ndarray
        Shape ``(4, 4)``, float64: maps a voxel index ``(slice, row, column, 1)``
        to a point in the patient coordinate system (LPS, mm), DICOM PS3.3
        C.7.6.2.1.1.
    datasets : list[pydicom.dataset.Dataset]
        The source instances, one per slice, in the same order as ``array``.
    modality : str
        Modality (0008,0060) of the series, e.g. ``"CT"``.
    frames : list[tuple[int, int]]
        For each slice of ``array``: ``(index into datasets, 1-based frame
        number)``. Single-frame series give ``[(i, 1), ...]``; a slice of an
        enhanced multi-frame instance names its frame (DICOM PS3.3 C.7.6.16).
        Empty means ``[(i, 1) for i in range(slices)]``.
    key : str
        Which part of a series this volume is, when one series holds several
        (``"echo2-phase"``, ``"volume3"``); ``""`` for a whole series.
    """

    array: npt.NDArray[np.float32]
    spacing: tuple[float, float, float]
    affine: npt.NDArray[np.float64]
    datasets: list[Dataset] = field(repr=False)
    modality: str
    frames: list[tuple[int, int]] = field(default_factory=list, repr=False)
    key: str = ""

    @property
    def slice_frames(self) -> list[tuple[int, int]]:
        """``frames``, or one ``(i, 1)`` per single-frame dataset when it is empty."""
        return self.frames or [(i, 1) for i in range(self.array.shape[0])]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (1 mL = 1000 mm³)."""
        return float(np.prod(self.spacing)) / 1000.0


@dataclass(frozen=True)
class SegmentMeasurement:
    """Measurements of one segment, as reported in the TID 1500 SR.

    Parameters
    ----------
    segment_number : int
        1-based Segment Number (0062,0004) in the SEG.
    label : str
        Segment Label.
    voxel_count : int
        Number of voxels in the mask.
    volume_ml : float
        ``voxel_count`` times the voxel volume, in mL.
    mean : float
        Mean of the source image values inside the mask (HU for CT);
        NaN for an empty segment.
    """

    segment_number: int
    label: str
    voxel_count: int
    volume_ml: float
    mean: float


@dataclass(frozen=True)
class ClassSpec:
    """One output class of a classification model.

    Parameters
    ----------
    label : str
        Human-readable class name.
    code : Code
        Coded value written as the SR's qualitative evaluation when this
        class is the most probable.
    """

    label: str
    code: Code


class SegmentationModel(Protocol):
    """The interface every segmentation model implements, built-in or trained.

    Attributes
    ----------
    name : str
        Algorithm Name, written into the SEG and SR.
    version : str
        Algorithm Version.
    segments : tuple[SegmentSpec, ...]
        One entry per output channel, in channel order.
    """

    name: str
    version: str
    segments: tuple[SegmentSpec, ...]

    def predict(self, volume: Volume, device: str = "cpu") -> npt.NDArray[np.bool_]:
        """Segment a volume.

        Parameters
        ----------
        volume : Volume
            The input series.
        device : str
            torch device string, ``"cpu"`` or ``"cuda"``/``"cuda:N"``.

        Returns
        -------
        numpy.ndarray
            Boolean masks of shape ``(segments, slices, rows, columns)``, on
            the grid of ``volume.array``; channel ``i`` is ``segments[i]``.
        """
        ...


class ClassificationModel(Protocol):
    """The interface of a classification model.

    Attributes
    ----------
    name, version : str
        Algorithm Name and Version.
    concept : Code
        Concept name of the qualitative evaluation in the SR (e.g. DCM 121071
        "Finding").
    classes : tuple[ClassSpec, ...]
        One entry per output probability, in output order.
    """

    name: str
    version: str
    concept: Code
    classes: tuple[ClassSpec, ...]

    def classify(self, volume: Volume, device: str = "cpu") -> npt.NDArray[np.float32]:
        """Class probabilities of a volume.

        Returns
        -------
        numpy.ndarray
            Shape ``(classes,)``, float32, each in ``[0, 1]``; entry ``i`` is
            ``classes[i]``.
        """
        ...
