"""Encode model masks as a DICOM Segmentation (SEG) instance.

Sources
-------
* DICOM PS3.3 A.51 "Segmentation IOD" and C.8.20 "Segmentation Modules"
  (C.8.20.2 Segmentation Image Module, C.8.20.4 Segment Description Macro).
* DICOM PS3.3 C.12.1 SOP Common Module (Contributing Equipment Sequence).
* DICOM PS3.16 CID 7150/7151 (segmented property category/type) and CID 7162
  (algorithm family; DCM 123110 "Artificial Intelligence").
* highdicom 0.28 :class:`highdicom.seg.Segmentation`, which builds the
  multi-frame functional groups, Derivation Image Sequence and Referenced
  Series Sequence from the source images.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from workers.inference.base import Code, SegmentSpec, Volume
from workers.results.measure import check_masks
from workers.results.uids import segment_tracking_uid

__all__ = [
    "RADNODE_SOFTWARE_VERSION",
    "algorithm_identification",
    "build_seg",
    "coded_concept",
    "segment_descriptions",
]


def _radnode_version() -> str:
    try:
        return importlib.metadata.version("radnode")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


RADNODE_SOFTWARE_VERSION = _radnode_version()
"""Version of the installed ``radnode`` distribution ("unknown" when run from a
source tree that is not installed); the default Software Versions (0018,1020)."""


def coded_concept(code: Code) -> hd.sr.CodedConcept:
    """Convert radnode's :class:`~workers.inference.base.Code` to highdicom's.

    Parameters
    ----------
    code : Code
        Code value, coding scheme designator and code meaning.

    Returns
    -------
    highdicom.sr.CodedConcept
        The same concept, usable in any highdicom code argument.
    """
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def algorithm_identification(
    algorithm_name: str, algorithm_version: str, algorithm_source: str | None = None
) -> hd.AlgorithmIdentificationSequence:
    """Build the Segmentation Algorithm Identification Sequence (0062,0007).

    Parameters
    ----------
    algorithm_name : str
        Algorithm Name (0066,0036).
    algorithm_version : str
        Algorithm Version (0066,0031).
    algorithm_source : str or None, optional
        Algorithm Source (0024,0202), e.g. who trained the model.

    Returns
    -------
    highdicom.AlgorithmIdentificationSequence
        One item, Algorithm Family Code Sequence = DCM 123110 "Artificial
        Intelligence" (PS3.16 CID 7162).
    """
    return hd.AlgorithmIdentificationSequence(
        name=algorithm_name,
        family=codes.DCM.ArtificialIntelligence,
        version=algorithm_version,
        source=algorithm_source,
    )


def segment_descriptions(
    volume: Volume,
    segments: Sequence[SegmentSpec],
    *,
    algorithm_name: str,
    algorithm_version: str,
    algorithm_source: str | None = None,
) -> list[hd.seg.SegmentDescription]:
    """Build one Segment Sequence item per segment (PS3.3 C.8.20.4).

    Parameters
    ----------
    volume : Volume
        The source series; its Series Instance UID seeds the tracking UIDs.
    segments : Sequence[SegmentSpec]
        One entry per mask channel; channel ``i`` becomes Segment Number
        ``i + 1``.
    algorithm_name : str
        Algorithm Name.
    algorithm_version : str
        Algorithm Version.
    algorithm_source : str or None, optional
        Algorithm Source.

    Returns
    -------
    list[highdicom.seg.SegmentDescription]
        AUTOMATIC segments with the SegmentSpec's category and type codes,
        Segment Description (0062,0006) "<label> (<algorithm> <version>)",
        Tracking ID (the label) and a deterministic Tracking UID (the same
        one the SR uses, :func:`workers.results.uids.segment_tracking_uid`),
        and Recommended Display CIELab Value converted from
        ``SegmentSpec.rgb`` (sRGB, D65) by
        :meth:`highdicom.color.CIELabColor.from_rgb`.

    Raises
    ------
    ValueError
        If an ``rgb`` component is outside 0-255.
    """
    series_uid = str(volume.datasets[0].SeriesInstanceUID)
    algorithm = algorithm_identification(algorithm_name, algorithm_version, algorithm_source)
    descriptions: list[hd.seg.SegmentDescription] = []
    for number, spec in enumerate(segments, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.label,
            segmented_property_category=coded_concept(spec.category),
            segmented_property_type=coded_concept(spec.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=spec.label,
            tracking_uid=segment_tracking_uid(
                series_uid, algorithm_name, algorithm_version, number
            ),
            display_color=hd.color.CIELabColor.from_rgb(*spec.rgb),
        )
        description.SegmentDescription = f"{spec.label} ({algorithm_name} {algorithm_version})"
        descriptions.append(description)
    return descriptions


def build_seg(
    volume: Volume,
    masks: npt.NDArray[np.bool_],
    segments: Sequence[SegmentSpec],
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9101,
    series_description: str = "radnode AI segmentation",
    manufacturer: str = "radnode",
    manufacturer_model_name: str = "radnode",
    software_versions: str = RADNODE_SOFTWARE_VERSION,
    device_serial_number: str = "0",
    algorithm_source: str | None = None,
    content_creator_name: str | None = None,
    omit_empty_frames: bool = True,
) -> hd.seg.Segmentation:
    """Encode boolean masks as a BINARY DICOM Segmentation.

    Parameters
    ----------
    volume : Volume
        The source series. ``volume.datasets[i]`` is the source image of slice
        ``i`` of ``volume.array`` (shape ``(slices, rows, columns)``); only
        their metadata is used. They must be single-frame images of one series
        with a Frame of Reference UID.
    masks : numpy.ndarray
        Boolean, shape ``(segments, slices, rows, columns)`` on the grid of
        ``volume.array``; channel ``i`` is ``segments[i]`` and becomes Segment
        Number ``i + 1``. Segments may overlap.
    segments : Sequence[SegmentSpec]
        Label, category, type and colour of each channel.
    algorithm_name : str
        Algorithm Name of the model, written to every segment and to the
        Contributing Equipment Sequence.
    algorithm_version : str
        Algorithm Version of the model.
    series_instance_uid : str
        Series Instance UID of the new SEG series (see
        :func:`workers.results.uids.result_uid`).
    sop_instance_uid : str
        SOP Instance UID of the SEG.
    series_number : int, optional
        Series Number (0020,0011), fixed so that results sort predictably.
    series_description : str, optional
        Series Description (0008,103E).
    manufacturer : str, optional
        Manufacturer (0008,0070) of the equipment that writes the SEG.
    manufacturer_model_name : str, optional
        Manufacturer's Model Name (0008,1090).
    software_versions : str, optional
        Software Versions (0018,1020); defaults to the installed radnode
        version.
    device_serial_number : str, optional
        Device Serial Number (0018,1000), Type 1 in the Enhanced General
        Equipment Module; radnode has no physical device, pass a worker ID if
        one is wanted.
    algorithm_source : str or None, optional
        Algorithm Source (0024,0202) of the model.
    content_creator_name : str or None, optional
        Content Creator's Name (0070,0084), a person name (Type 2, left empty
        by default because no person created the content).
    omit_empty_frames : bool, optional
        If True (default), frames in which a segment has no pixel are not
        stored (PS3.3 C.8.20.2 allows this; a segment that is empty
        everywhere then has no frames). Reading back with highdicom by
        source instance or as a volume fills them with zeros. If False, every
        segment has one frame per source image.

    Returns
    -------
    highdicom.seg.Segmentation
        SEG (Segmentation Storage 1.2.840.10008.5.1.4.1.1.66.4), Segmentation
        Type BINARY, Explicit VR Little Endian, in the source study and
        Frame of Reference, referencing every source image (Referenced Series
        Sequence and per-frame Derivation Image Sequence), with pixel
        measures, plane orientation and plane positions copied from the
        source images.

    Raises
    ------
    ValueError
        If ``masks`` does not match ``volume`` or ``segments``, the number of
        datasets differs from the number of slices, or highdicom rejects the
        source images (e.g. mixed series, no Frame of Reference).
    """
    check_masks(volume, masks, segments)
    if len(volume.datasets) != volume.array.shape[0]:
        raise ValueError(
            f"volume has {volume.array.shape[0]} slices but {len(volume.datasets)} datasets"
        )
    descriptions = segment_descriptions(
        volume,
        segments,
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
        algorithm_source=algorithm_source,
    )
    processing = hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        contribution_description=(
            f"Automatic segmentation by {algorithm_name} {algorithm_version}"
        )[:1024],
    )
    # highdicom wants the segments on the last axis: (frames, rows, columns,
    # segments), frame i aligned with source_images[i]. A view, no copy.
    pixel_array = np.moveaxis(masks, 0, -1)
    seg = hd.seg.Segmentation(
        source_images=volume.datasets,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions,
        device_serial_number=device_serial_number,
        content_description=f"{algorithm_name} {algorithm_version}"[:64],
        content_creator_name=content_creator_name,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=omit_empty_frames,
        contributing_equipment=[processing],
        series_description=series_description,
    )
    return seg
