"""Burn segmentation contours into Secondary Capture images, for viewers without SEG.

Each source slice becomes one 8-bit RGB Secondary Capture image: the source
slice, windowed to grey, with the outline of every segment drawn in its
display colour. The series is a convenience view of the result, marked as
derived and NOT FOR PRIMARY DIAGNOSIS; the DICOM SEG remains the result of
record.

Why single-frame SC Image Storage (1.2.840.10008.5.1.4.1.1.7, highdicom
:class:`highdicom.sc.SCImage`) rather than one Multi-frame True Color SC
instance: the overlay exists for viewers and PACS that cannot display SEG,
and plain SC images are the one image type that practically every PACS and
viewer stores and shows; one image per source slice also pages through like
the source series, and an interrupted transfer loses single slices rather
than the whole result.

Sources
-------
* DICOM PS3.3 A.8.1 "Secondary Capture Image IOD"; C.8.6.1 SC Equipment
  Module (Conversion Type ``WSD``, workstation); C.8.6.2 SC Image Module
  (Pixel Spacing through the Basic Pixel Spacing Calibration Macro).
  The SC IOD has no Image Plane or Frame of Reference module, so Image
  Position/Orientation (Patient) are not written; Patient Orientation
  (C.7.6.1.1.1) gives the row and column directions instead.
* DICOM PS3.3 C.7.6.1 General Image Module: Image Type ``DERIVED``, ``SECONDARY``,
  Derivation Description, Derivation Code Sequence (PS3.16 CID 7203, DCM
  113076 "Segmentation"), Source Image Sequence with Purpose of Reference
  DCM 121322 "Source image for image processing operation" (CID 7202),
  Referenced Frame Number for multi-frame sources, Spatial Locations
  Preserved ``YES``; Burned In Annotation ``YES``.
* DICOM PS3.3 C.11.2.1.2.1: the linear VOI LUT function used for windowing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Final

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode
from pydicom.uid import ExplicitVRLittleEndian

from workers.inference.base import SegmentSpec, Volume
from workers.results.measure import check_masks
from workers.results.seg import RADNODE_SOFTWARE_VERSION, character_set

__all__ = [
    "CT_SOFT_TISSUE_WINDOW",
    "NOT_FOR_DIAGNOSIS",
    "build_overlay_sc",
    "contours",
    "default_window",
    "patient_orientation",
    "render_overlay",
    "window_to_uint8",
]

NOT_FOR_DIAGNOSIS: Final = "NOT FOR PRIMARY DIAGNOSIS"
"""Phrase carried by the Series Description, Derivation Description and Image
Comments of every overlay image."""

CT_SOFT_TISSUE_WINDOW: Final = (40.0, 400.0)
"""Default CT window ``(center, width)`` in HU: soft tissue."""

#: Percentiles of the volume's values that bound the default window of
#: non-CT images (MR signal has no absolute scale).
PERCENTILE_WINDOW: Final = (0.5, 99.5)
#: At most this many voxels (an evenly strided subset) estimate a percentile.
PERCENTILE_SAMPLE: Final = 1_000_000

#: Patient-direction letters of the LPS axes (PS3.3 C.7.6.1.1.1):
#: (letter for +axis, letter for -axis).
_LETTERS: Final = (("L", "R"), ("P", "A"), ("H", "F"))
#: Direction-cosine components below this magnitude add no letter.
_ORIENTATION_TOLERANCE: Final = 1e-2

_ATTRIBUTES_FROM_SOURCE: Final = (
    # Patient Module (C.7.1.1)
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "QualityControlSubject",
    # Clinical Trial Subject Module (C.7.1.3)
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    # General Study Module (C.7.2.1)
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    # Patient Study Module (C.7.2.2)
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    # Clinical Trial Study Module (C.7.2.3)
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
    # General Series Module (C.7.3.1), body-part attributes
    "BodyPartExamined",
    "Laterality",
)


#: Body Part Examined values of paired structures (DICOM PS3.16 Annex L).
_PAIRED_BODY_PARTS: Final = frozenset({
    "ANKLE", "ARM", "BREAST", "CLAVICLE", "EAR", "ELBOW", "EXTREMITY", "EYE", "FEMUR",
    "FINGER", "FOOT", "FOREARM", "HAND", "HIP", "HUMERUS", "KIDNEY", "KNEE", "LEG",
    "LOWER LIMB", "LUNG", "OVARY", "SCAPULA", "SHOULDER", "TESTIS", "THIGH", "TIBIA",
    "TOE", "UPPER LIMB", "WRIST",
})


def _laterality_required(source: Dataset) -> bool:
    """Whether Laterality (0020,0060), Type 2C, must be present (empty if unknown).

    PS3.3 C.7.3.1: required when the body part examined is a paired structure;
    when the source does not say which body part it shows, validators treat
    it as possibly paired, so an empty value is written.
    """
    part = str(source.get("BodyPartExamined", "") or "").strip().upper()
    return not part or part in _PAIRED_BODY_PARTS


def default_window(volume: Volume) -> tuple[float, float]:
    """The window ``(center, width)`` used when none is given.

    Parameters
    ----------
    volume : Volume
        The source series; ``array`` of shape ``(slices, rows, columns)``.

    Returns
    -------
    tuple[float, float]
        CT: :data:`CT_SOFT_TISSUE_WINDOW`, 40/400 HU. Other modalities (MR):
        from the 0.5th to the 99.5th percentile of the volume's values
        (estimated on at most 1e6 evenly strided voxels), width at least 1.
    """
    if volume.modality.upper() == "CT":
        return CT_SOFT_TISSUE_WINDOW
    flat = volume.array.reshape(-1)
    sample = flat[:: max(1, flat.size // PERCENTILE_SAMPLE)]
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return 0.5, 1.0
    low, high = (float(v) for v in np.percentile(finite, PERCENTILE_WINDOW))
    width = max(high - low, 1.0)
    return low + width / 2.0, width


def window_to_uint8(
    image: npt.NDArray[np.floating], center: float, width: float
) -> npt.NDArray[np.uint8]:
    """Map values to 0-255 with the DICOM linear VOI LUT function.

    Parameters
    ----------
    image : numpy.ndarray
        Values of any shape, e.g. a slice ``(rows, columns)`` in HU.
    center, width : float
        Window Center and Width (PS3.3 C.11.2.1.2.1); ``width >= 1``.

    Returns
    -------
    numpy.ndarray
        uint8, same shape: ``((x - (c - 0.5)) / (w - 1) + 0.5) * 255``,
        clipped to 0-255 and rounded; NaN maps to 0.

    Raises
    ------
    ValueError
        If ``width < 1`` or a parameter is not finite.
    """
    if not (math.isfinite(center) and math.isfinite(width)) or width < 1.0:
        raise ValueError(
            f"window center/width must be finite with width >= 1, got {center}/{width}"
        )
    scale = np.float32(255.0 / max(width - 1.0, 1e-6))
    offset = np.float32(center - 0.5)
    grey = (np.asarray(image, dtype=np.float32) - offset) * scale + np.float32(127.5)
    np.clip(grey, 0.0, 255.0, out=grey)
    np.nan_to_num(grey, copy=False, nan=0.0)
    result: npt.NDArray[np.uint8] = np.rint(grey).astype(np.uint8)
    return result


def contours(masks: npt.NDArray[np.bool_], width: int = 1) -> npt.NDArray[np.bool_]:
    """In-plane inner contours of masks: mask pixels within ``width`` of its edge.

    Parameters
    ----------
    masks : numpy.ndarray
        Boolean, shape ``(..., rows, columns)``, e.g. ``(segments, slices,
        rows, columns)``; every trailing 2-D plane is handled on its own.
    width : int, optional
        Contour thickness in pixels, at least 1.

    Returns
    -------
    numpy.ndarray
        Boolean, same shape: ``mask & ~erode(mask)``, the erosion repeated
        ``width`` times with the 4-neighbourhood, pixels beyond the image
        counting as background (a mask cut by the image border gets a
        contour along the border). The contour lies on the mask's own edge
        pixels; the interior is untouched.

    Raises
    ------
    ValueError
        If ``width < 1`` or ``masks`` has fewer than two dimensions.
    """
    if width < 1:
        raise ValueError(f"contour width must be at least 1 pixel, got {width}")
    if masks.ndim < 2:
        raise ValueError(f"masks must have at least two dimensions, got {masks.shape}")
    interior = np.asarray(masks, dtype=bool)
    for _ in range(width):
        eroded = interior.copy()
        eroded[..., 1:, :] &= interior[..., :-1, :]
        eroded[..., :-1, :] &= interior[..., 1:, :]
        eroded[..., :, 1:] &= interior[..., :, :-1]
        eroded[..., :, :-1] &= interior[..., :, 1:]
        eroded[..., 0, :] = False
        eroded[..., -1, :] = False
        eroded[..., :, 0] = False
        eroded[..., :, -1] = False
        interior = eroded
    result: npt.NDArray[np.bool_] = masks & ~interior
    return result


def render_overlay(
    image: npt.NDArray[np.floating],
    masks: npt.NDArray[np.bool_],
    colours: Sequence[tuple[int, int, int]],
    window: tuple[float, float],
    contour_width: int = 1,
) -> npt.NDArray[np.uint8]:
    """Windowed grey image with the contour of each mask burned in.

    Parameters
    ----------
    image : numpy.ndarray
        Shape ``(..., rows, columns)``: one slice ``(rows, columns)`` or a
        stack ``(slices, rows, columns)`` (HU for CT).
    masks : numpy.ndarray
        Boolean, shape ``(segments, ..., rows, columns)`` on the grid of
        ``image``.
    colours : Sequence[tuple[int, int, int]]
        RGB 0-255 per segment.
    window : tuple[float, float]
        ``(center, width)``, see :func:`window_to_uint8`.
    contour_width : int, optional
        Contour thickness in pixels.

    Returns
    -------
    numpy.ndarray
        uint8, shape ``(..., rows, columns, 3)``, RGB. Contours are drawn in
        segment order, so a later segment's contour covers an earlier one's
        where they meet.

    Raises
    ------
    ValueError
        If shapes or colours do not match, or the window or contour width is
        invalid.
    """
    if masks.shape[1:] != image.shape:
        raise ValueError(f"masks {masks.shape} do not match image {image.shape}")
    if len(colours) != masks.shape[0]:
        raise ValueError(f"{len(colours)} colours for {masks.shape[0]} masks")
    grey = window_to_uint8(image, *window)
    rgb = np.repeat(grey[..., np.newaxis], 3, axis=-1)
    edges = contours(masks, contour_width)
    for edge, colour in zip(edges, colours, strict=True):
        if not all(0 <= int(c) <= 255 for c in colour) or len(colour) != 3:
            raise ValueError(f"colour {colour} is not an RGB triple of 0-255")
        rgb[edge] = np.asarray(colour, dtype=np.uint8)
    return rgb


def _direction_letters(direction: npt.NDArray[np.float64]) -> str:
    """Patient Orientation string of a direction in LPS (PS3.3 C.7.6.1.1.1)."""
    norm = float(np.linalg.norm(direction))
    unit = direction / norm if norm > 0 else direction
    order = np.argsort(-np.abs(unit), kind="stable")
    letters = [
        _LETTERS[axis][0 if unit[axis] > 0 else 1]
        for axis in order
        if abs(unit[axis]) >= _ORIENTATION_TOLERANCE
    ]
    return "".join(letters)


def patient_orientation(volume: Volume) -> tuple[str, str]:
    """Patient Orientation (0020,0020) of the volume's slices.

    Parameters
    ----------
    volume : Volume
        Its ``affine`` maps ``(slice, row, column)`` to LPS mm.

    Returns
    -------
    tuple[str, str]
        Direction of the rows (increasing column index) and of the columns
        (increasing row index) as patient letters, the main one first, more
        letters for an oblique direction: e.g. ``("L", "P")`` for an axial
        slice, ``("P", "F")`` for a sagittal one.
    """
    affine = np.asarray(volume.affine, dtype=np.float64)
    return _direction_letters(affine[:3, 2]), _direction_letters(affine[:3, 1])


def _resolve_uids(sop_instance_uids: Sequence[str] | Callable[[int], str], count: int) -> list[str]:
    if callable(sop_instance_uids):
        uids = [str(sop_instance_uids(i)) for i in range(count)]
    else:
        uids = [str(uid) for uid in sop_instance_uids]
    if len(uids) != count:
        raise ValueError(f"{len(uids)} SOP Instance UIDs for {count} slices")
    if len(set(uids)) != count:
        raise ValueError("SOP Instance UIDs must be distinct")
    return uids


def _series_description(text: str) -> str:
    """The description with the not-for-diagnosis phrase, within LO's 64 characters."""
    if NOT_FOR_DIAGNOSIS in text.upper():
        if len(text) > 64:
            raise ValueError("series_description longer than 64 characters")
        return text
    suffix = f" - {NOT_FOR_DIAGNOSIS}"
    return text[: 64 - len(suffix)].rstrip() + suffix


def _equipment(
    source: Dataset, manufacturer: str, algorithm_name: str, algorithm_version: str
) -> list[hd.ContributingEquipment]:
    """Contributing Equipment: the source's acquisition equipment (when known), the model."""
    equipment: list[hd.ContributingEquipment] = []
    try:
        equipment.append(hd.ContributingEquipment.for_image_acquisition(source))
    except Exception:  # the source may lack the equipment attributes it needs
        pass
    equipment.append(
        hd.ContributingEquipment(
            manufacturer=manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=algorithm_name,
            software_versions=algorithm_version,
            contribution_description=(
                f"Automatic segmentation by {algorithm_name} {algorithm_version}, "
                "contours burned in"
            )[:1024],
        )
    )
    return equipment


def build_overlay_sc(
    volume: Volume,
    masks: npt.NDArray[np.bool_],
    segments: Sequence[SegmentSpec],
    *,
    series_instance_uid: str,
    sop_instance_uids: Sequence[str] | Callable[[int], str],
    algorithm_name: str,
    algorithm_version: str,
    window: tuple[float, float] | None = None,
    contour_width: int = 1,
    series_number: int = 9104,
    series_description: str = f"radnode AI contours - {NOT_FOR_DIAGNOSIS}",
    manufacturer: str = "radnode",
    manufacturer_model_name: str = "radnode",
    software_versions: str = RADNODE_SOFTWARE_VERSION,
) -> list[Dataset]:
    """Encode the source slices with burned-in segment contours as SC images.

    Parameters
    ----------
    volume : Volume
        The source series: ``array`` of shape ``(slices, rows, columns)``
        (HU for CT), ``datasets`` and ``slice_frames`` naming the source
        instance (and frame) of each slice, ``spacing`` in mm, ``affine`` to
        LPS.
    masks : numpy.ndarray
        Boolean, shape ``(segments, slices, rows, columns)`` on the grid of
        ``volume.array``; channel ``i`` is ``segments[i]``.
    segments : Sequence[SegmentSpec]
        One per channel; ``rgb`` is the contour colour and ``label`` is
        named in the Derivation Description.
    series_instance_uid : str
        Series Instance UID of the new SC series.
    sop_instance_uids : Sequence[str] or Callable[[int], str]
        One SOP Instance UID per slice, in slice order, or a function of the
        0-based slice index returning it (e.g. a deterministic
        :func:`workers.results.uids.result_uid` per slice).
    algorithm_name, algorithm_version : str
        The model, named in the Derivation Description and the Contributing
        Equipment Sequence.
    window : tuple[float, float] or None, optional
        ``(center, width)`` in the units of ``volume.array``; default
        :func:`default_window` (CT 40/400 HU soft tissue, MR percentiles).
    contour_width : int, optional
        Contour thickness in pixels.
    series_number : int, optional
        Series Number (0020,0011).
    series_description : str, optional
        Series Description (0008,103E), at most 64 characters; " - NOT FOR
        PRIMARY DIAGNOSIS" is appended (shortening the text) when missing.
    manufacturer, manufacturer_model_name, software_versions : str, optional
        Equipment attributes of the writer (General Equipment Module).

    Returns
    -------
    list[pydicom.dataset.Dataset]
        One :class:`highdicom.sc.SCImage` per slice, in slice order,
        Instance Number 1..n: SC Image Storage, Explicit VR Little Endian,
        RGB 8 bit, same Study Instance UID and patient/study attributes as
        the source (copied, including Specific Character Set), new series,
        Modality ``OT``, Image Type ``DERIVED``, ``SECONDARY``, Burned In
        Annotation ``YES``, Conversion Type ``WSD``, Pixel Spacing (the
        source's, the grid is unchanged), Patient Orientation from
        ``volume.affine``, Derivation Description and Image Comments that
        say it is derived and NOT FOR PRIMARY DIAGNOSIS, a Source Image
        Sequence item naming the source instance (and its Referenced Frame
        Number for a multi-frame source), and Contributing Equipment (the
        source's acquisition equipment when known, and the model as
        processing equipment).

    Raises
    ------
    ValueError
        If ``masks`` does not fit ``volume`` or ``segments``; the number of
        UIDs differs from the number of slices or they repeat; a slice names
        no source dataset; the window, colours or contour width are invalid;
        ``series_description`` is too long.
    """
    check_masks(volume, masks, segments)
    slices = volume.array.shape[0]
    frames = volume.slice_frames
    if len(frames) != slices or not volume.datasets:
        raise ValueError(f"volume has {slices} slices but {len(frames)} source frame references")
    if any(not 0 <= index < len(volume.datasets) for index, _ in frames):
        raise ValueError("volume.frames names a dataset index outside volume.datasets")
    uids = _resolve_uids(sop_instance_uids, slices)
    center, width = default_window(volume) if window is None else window
    description = _series_description(series_description)
    colours = [spec.rgb for spec in segments]
    # Validate window and colours once, before the loop.
    render_overlay(volume.array[:1, :1, :1], masks[:, :1, :1, :1], colours, (center, width))

    source = volume.datasets[0]
    rows_dir, cols_dir = patient_orientation(volume)
    labels = ", ".join(spec.label for spec in segments)
    derivation = (
        f"Derived image, {NOT_FOR_DIAGNOSIS}: outlines of {labels} segmented automatically "
        f"by {algorithm_name} {algorithm_version}, burned into the source image displayed "
        f"with window center {center:g} / width {width:g}."
    )[:1024]
    pixel_spacing = (float(volume.spacing[1]), float(volume.spacing[2]))

    images: list[Dataset] = []
    for k in range(slices):
        rgb = render_overlay(volume.array[k], masks[:, k], colours, (center, width), contour_width)
        index, frame = frames[k]
        ref = volume.datasets[index]
        image = hd.sc.SCImage(
            pixel_array=rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            study_instance_uid=str(source.StudyInstanceUID),
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=uids[k],
            instance_number=k + 1,
            manufacturer=manufacturer,
            pixel_spacing=pixel_spacing,
            patient_orientation=(rows_dir[0], cols_dir[0]),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=_equipment(ref, manufacturer, algorithm_name, algorithm_version),
            series_description=description,
            manufacturer_model_name=manufacturer_model_name,
            software_versions=software_versions,
        )
        # Patient and study attributes are copied rather than passed to
        # highdicom, whose name checks would quote the patient's name in a
        # warning.
        charset = character_set(source)
        if charset is not None:
            image.SpecificCharacterSet = charset
        for keyword in _ATTRIBUTES_FROM_SOURCE:
            if keyword in source:
                if keyword == "Laterality" and not source[keyword].value:
                    continue  # decided below
                image[keyword] = copy.deepcopy(source[keyword])
        if "Laterality" not in image and _laterality_required(source):
            image.Laterality = ""
        image.PatientOrientation = [rows_dir, cols_dir]
        image.ImageType = ["DERIVED", "SECONDARY"]
        image.ConversionType = "WSD"
        image.BurnedInAnnotation = "YES"
        # Once lossy compressed, always lossy (PS3.3 C.7.6.1.1.5): the
        # overlay inherits the flag of its source.
        image.LossyImageCompression = "01" if ref.get("LossyImageCompression") == "01" else "00"
        image.DerivationDescription = derivation
        image.ImageComments = f"{NOT_FOR_DIAGNOSIS}: AI contours ({algorithm_name})"[:10240]
        image.DerivationCodeSequence = DicomSequence(
            [_code_item(codes.DCM.SegmentationImageDerivation)]
        )
        item = Dataset()
        item.ReferencedSOPClassUID = ref.SOPClassUID
        item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
        if int(ref.get("NumberOfFrames", 1) or 1) > 1:
            item.ReferencedFrameNumber = int(frame)
        item.PurposeOfReferenceCodeSequence = DicomSequence(
            [_code_item(codes.DCM.SourceImageForImageProcessingOperation)]
        )
        item.SpatialLocationsPreserved = "YES"
        image.SourceImageSequence = DicomSequence([item])
        images.append(image)
    return images


def _code_item(code: PydicomCode) -> Dataset:
    """A Code Sequence item (PS3.3 Table 8.8-1) from a pydicom Code."""
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item
