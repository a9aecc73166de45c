"""Encode model masks as a DICOM Segmentation (SEG) instance.

Sources
-------
* DICOM PS3.3 A.51 "Segmentation IOD" and C.8.20 "Segmentation Modules"
  (C.8.20.2 Segmentation Image Module, C.8.20.4 Segment Description Macro).
* DICOM PS3.3 C.12.1 SOP Common Module (Contributing Equipment Sequence).
* DICOM PS3.16 CID 7150/7151 (segmented property category/type) and CID 7162
  (algorithm family; DCM 123110 "Artificial Intelligence").
* DICOM PS3.3 C.7.6.16.2.6 (Derivation Image Functional Group) and C.7.6.1.1.3
  (Referenced Frame Number): each SEG frame references the source frame it
  was derived from, when the source is an enhanced multi-frame instance.
* highdicom 0.28 :class:`highdicom.seg.Segmentation`, which builds the
  multi-frame functional groups, Derivation Image Sequence and Referenced
  Series Sequence from the source images.
"""

from __future__ import annotations

import copy
import importlib.metadata
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from workers.inference.base import Code, SegmentSpec, Volume
from workers.results.measure import check_masks, check_sources, source_instances
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


def character_set(source: Dataset) -> str | list[str] | None:
    """Specific Character Set (0008,0005) a result copies from its source.

    ``None`` when the source has none or an empty one (both mean the default
    repertoire, DICOM PS3.5 6.1.2.1), so the attribute is left out instead of
    being written empty (highdicom refuses an empty value).
    """
    value = source.get("SpecificCharacterSet")
    if value is None or value == "" or (not isinstance(value, str) and not list(value)):
        return None
    return str(value) if isinstance(value, str) else [str(v) for v in value]
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


_POSITION_TOLERANCE_MM = 1e-2


def _is_multiframe(ds: Dataset) -> bool:
    """An enhanced (functional groups) or multi-frame instance (PS3.3 C.7.6.16)."""
    return "PerFrameFunctionalGroupsSequence" in ds or _number_of_frames(ds) > 1


def _number_of_frames(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames")
    try:
        return max(1, int(value)) if value not in (None, "") else 1
    except (TypeError, ValueError):
        return 1


def _frame_position(ds: Dataset, number: int) -> tuple[float, float, float]:
    """Image Position (Patient) of one frame, LPS mm (PS3.3 C.7.6.16.2.3)."""
    if _is_multiframe(ds):
        groups = [ds.PerFrameFunctionalGroupsSequence[number - 1]]
        if "SharedFunctionalGroupsSequence" in ds:
            groups.append(ds.SharedFunctionalGroupsSequence[0])
        for group in groups:
            if "PlanePositionSequence" in group:
                x, y, z = (float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient)
                return x, y, z
        raise ValueError(f"frame {number} of instance {ds.SOPInstanceUID} has no plane position")
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    return x, y, z


def _highdicom_source(ds: Dataset, number: int) -> Dataset:
    """``ds`` as highdicom's SEG constructor can take it as a source image.

    highdicom 0.28 reads Pixel Measures and Plane Orientation of a
    multi-frame source from its Shared Functional Groups only ("Source images
    must have a shared orientation"), while scanners such as Siemens XA put
    them in every per-frame item (both are allowed, PS3.3 C.7.6.16). For
    such an instance this returns a stand-in: a new dataset holding the same
    elements (not converted, nothing deferred is read) whose Shared Functional
    Groups also carry those two macros, copied from frame ``number`` (a slice
    of the volume, so they are the volume's own geometry). ``ds`` itself is
    not changed. Other datasets are returned as they are.
    """
    if not _is_multiframe(ds):
        return ds
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared: Dataset = shared_seq[0] if shared_seq else Dataset()
    missing = [
        keyword
        for keyword in ("PixelMeasuresSequence", "PlaneOrientationSequence")
        if keyword not in shared
    ]
    if not missing:
        return ds
    per_frame = ds.PerFrameFunctionalGroupsSequence[number - 1]
    item = Dataset({tag: shared.get_item(tag, keep_deferred=True) for tag in shared.keys()})
    for keyword in missing:
        if keyword in per_frame:
            setattr(item, keyword, copy.deepcopy(per_frame[keyword].value))
    proxy = Dataset({tag: ds.get_item(tag, keep_deferred=True) for tag in ds.keys()})
    proxy.SharedFunctionalGroupsSequence = [item]
    if hasattr(ds, "file_meta"):
        proxy.file_meta = ds.file_meta
    return proxy


def _reference_source_frames(
    seg: hd.seg.Segmentation,
    sources: Sequence[tuple[Dataset, int]],
    positions: npt.NDArray[np.float64],
) -> None:
    """Make each SEG frame's Derivation Image Sequence name its slice's source frame.

    Parameters
    ----------
    seg : highdicom.seg.Segmentation
        Built with ``plane_positions`` equal to ``positions``; changed in place.
    sources : Sequence[tuple[pydicom.dataset.Dataset, int]]
        Per slice: source instance and 1-based frame number.
    positions : numpy.ndarray
        Shape ``(slices, 3)``: Image Position (Patient) of each slice, LPS mm.

    Raises
    ------
    ValueError
        If a SEG frame lies at no slice position.
    """
    derivation_code = hd.sr.CodedConcept.from_code(codes.cid7203.SegmentationImageDerivation)
    purpose_code = hd.sr.CodedConcept.from_code(
        codes.cid7202.SourceImageForImageProcessingOperation
    )
    for item in seg.PerFrameFunctionalGroupsSequence:
        ipp = np.asarray(
            [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        )
        distances = np.linalg.norm(positions - ipp, axis=1)
        k = int(np.argmin(distances))
        if float(distances[k]) > _POSITION_TOLERANCE_MM:
            raise ValueError(f"SEG frame at {ipp.tolist()} matches no slice of the volume")
        ds, number = sources[k]
        source = Dataset()
        source.ReferencedSOPClassUID = ds.SOPClassUID
        source.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        if _is_multiframe(ds):
            source.ReferencedFrameNumber = number
        source.PurposeOfReferenceCodeSequence = [purpose_code]
        source.SpatialLocationsPreserved = "YES"
        derivation = Dataset()
        derivation.DerivationCodeSequence = [derivation_code]
        derivation.SourceImageSequence = [source]
        item.DerivationImageSequence = [derivation]


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
        The source series, ``volume.array`` of shape ``(slices, rows,
        columns)``; only the metadata of its source instances is used. Slice
        ``k`` was made from frame ``volume.slice_frames[k]`` (``(index into
        volume.datasets, 1-based frame number)``): single-frame images (one
        dataset per slice, the default when ``volume.frames`` is empty) or
        frames of enhanced multi-frame images (PS3.3 C.7.6.16), all of one
        series with a Frame of Reference UID.
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
        segment has one frame per slice.

    Returns
    -------
    highdicom.seg.Segmentation
        SEG (Segmentation Storage 1.2.840.10008.5.1.4.1.1.66.4), Segmentation
        Type BINARY, Explicit VR Little Endian, in the source study and
        Frame of Reference, referencing every source instance once
        (Referenced Series Sequence, Source Image Sequence), with pixel
        measures, plane orientation and plane positions copied from the
        source images. Each frame's Derivation Image Sequence names exactly
        the source of its slice: the single-frame image, or the instance and
        Referenced Frame Number (0008,1160) of a multi-frame source.

    Raises
    ------
    ValueError
        If ``masks`` does not match ``volume`` or ``segments``, the slices'
        frame references do not match ``volume.datasets`` (see
        :func:`workers.results.measure.check_sources`), or highdicom rejects
        the source images (e.g. mixed series, no Frame of Reference).

    Notes
    -----
    Single-frame sources (and a volume that holds every frame of one
    multi-frame instance) are handed to highdicom as they are, with the masks
    in source order, so it copies positions and references itself. Otherwise
    (a subset of an instance's frames, e.g. one echo of several, or frames of
    several multi-frame instances) highdicom is given the slices' plane
    positions and further source images, and each SEG frame's Derivation
    Image Sequence is then set to the one source frame of its slice, since
    highdicom matches by position and would also reference other frames at
    the same position.
    """
    check_masks(volume, masks, segments)
    sources = check_sources(volume)
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

    def make(
        source_images: Sequence[Dataset], array: npt.NDArray[np.bool_], **extra: Any
    ) -> hd.seg.Segmentation:
        extra.setdefault("specific_character_set", character_set(source_images[0]))
        return hd.seg.Segmentation(
            source_images=source_images,
            pixel_array=array,
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
            **extra,
        )

    if not any(_is_multiframe(ds) for ds, _ in sources):
        return make([ds for ds, _ in sources], pixel_array)

    first, first_number = sources[0]
    numbers = [number for _, number in sources]
    if all(ds is first for ds, _ in sources) and sorted(numbers) == list(
        range(1, _number_of_frames(first) + 1)
    ):
        # Every frame of one instance: masks in the source's frame order.
        slice_of_frame = np.empty(len(numbers), dtype=np.intp)
        slice_of_frame[np.asarray(numbers) - 1] = np.arange(len(numbers))
        return make([_highdicom_source(first, first_number)], pixel_array[slice_of_frame])

    first_frames = {id(ds): number for ds, number in reversed(sources)}
    instances = [_highdicom_source(ds, first_frames[id(ds)]) for ds in source_instances(volume)]
    positions = np.asarray([_frame_position(ds, number) for ds, number in sources])
    seg = make(
        [instances[0]],
        pixel_array,
        further_source_images=instances[1:],
        plane_positions=[
            hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, tuple(ipp))
            for ipp in positions
        ],
    )
    _reference_source_frames(seg, sources, positions)
    return seg
