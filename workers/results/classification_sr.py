"""Encode a classification result as a TID 1500 Measurement Report SR.

The report holds one Measurement and Qualitative Evaluation Group (TID 1501)
about the whole source series: the most probable class as a qualitative
evaluation, and one probability measurement (TID 300) per class.

Sources
-------
* DICOM PS3.16 TID 1500 "Measurement Report", TID 1501 "Measurement and
  Qualitative Evaluation Group", TID 300 "Measurement", TID 4019 "Algorithm
  Identification", TID 4108 "Tracking Identifier", TID 1001/1002/1004
  observation context with a device observer, TID 1210 "Equivalent Meaning(s)
  of Concept Name".
* DICOM PS3.3 A.35.13 "Comprehensive 3D SR IOD", C.17.2 SR Document General
  Module (Current Requested Procedure Evidence Sequence), C.12.1 SOP Common
  (Contributing Equipment Sequence).
* Codes: DCM 122157 "Probability" (PS3.16 Annex D), UCUM ``1`` "no units"
  (CID 7181), DCM 121050 "Equivalent Meaning of Concept Name", DCM 121112
  "Source of Measurement" (CID 7551), DCM 123110 "Artificial Intelligence"
  (CID 7162).
* highdicom 0.28 :mod:`highdicom.sr`.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.sr.coding import Code as PydicomCode

from workers.inference.base import ClassSpec, Code, Volume
from workers.results.seg import RADNODE_SOFTWARE_VERSION, coded_concept
from workers.results.sr import algorithm_identification, measurement_report
from workers.results.uids import result_uid

__all__ = [
    "EQUIVALENT_MEANING",
    "NO_UNITS",
    "PROBABILITY",
    "build_classification_sr",
    "classification_tracking_uid",
]

PROBABILITY = PydicomCode("122157", "DCM", "Probability")
"""Concept name of each class's probability measurement (DCM 122157)."""

NO_UNITS = PydicomCode("1", "UCUM", "no units")
"""UCUM unity, the unit of a probability written as a fraction in [0, 1]."""

EQUIVALENT_MEANING = PydicomCode("121050", "DCM", "Equivalent Meaning of Concept Name")
"""TID 1210 concept of the text that spells out a post-coordinated concept name."""


def classification_tracking_uid(
    source_series_uid: str, algorithm_name: str, algorithm_version: str
) -> str:
    """Deterministic Tracking UID of the classification group of a series.

    Parameters
    ----------
    source_series_uid : str
        Series Instance UID of the classified series.
    algorithm_name, algorithm_version : str
        Algorithm Name and Version of the model.

    Returns
    -------
    str
        A valid DICOM UID (PS3.5 9.1), the same for the same arguments, so a
        retried job writes the same tracking UID.

    Raises
    ------
    ValueError
        If an argument is empty.
    """
    return result_uid(
        source_series_uid, algorithm_name, algorithm_version, "classification", "tracking"
    )


def _check_probabilities(
    probabilities: npt.ArrayLike, classes: Sequence[ClassSpec]
) -> npt.NDArray[np.float64]:
    given = np.asarray(probabilities)
    values = given.astype(np.float64)
    if given.dtype in (np.float16, np.float32):
        # Write the shortest decimal that reads back as the same float32, e.g.
        # 0.15 rather than 0.15000000596046 (its exact binary value).
        values = np.array(
            [float(np.format_float_positional(v, unique=True)) for v in given.ravel()]
        ).reshape(given.shape)
    if values.ndim != 1:
        raise ValueError(f"probabilities must have shape (classes,), got {values.shape}")
    if len(classes) == 0:
        raise ValueError("at least one class is required")
    if values.shape[0] != len(classes):
        raise ValueError(f"{values.shape[0]} probabilities for {len(classes)} classes")
    if not np.all(np.isfinite(values)) or values.min() < 0.0 or values.max() > 1.0:
        raise ValueError("probabilities must be finite and within [0, 1]")
    keys = {(c.code.value, c.code.scheme) for c in classes}
    if len(keys) != len(classes):
        raise ValueError("two classes share a code: the result would be ambiguous")
    return values


def _source_images(volume: Volume) -> list[hd.sr.SourceImageForMeasurementGroup]:
    """One Source of Measurement reference per source instance, with its frames.

    Frame numbers are listed for multi-frame instances only (those with
    Number of Frames > 1), in slice order, from ``volume.slice_frames``.
    """
    frames_by_dataset: dict[int, list[int]] = {}
    for index, frame in volume.slice_frames:
        frames_by_dataset.setdefault(index, []).append(int(frame))
    references: list[hd.sr.SourceImageForMeasurementGroup] = []
    for index, frames in frames_by_dataset.items():
        ds = volume.datasets[index]
        multi = int(ds.get("NumberOfFrames", 1) or 1) > 1
        references.append(
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=str(ds.SOPClassUID),
                referenced_sop_instance_uid=str(ds.SOPInstanceUID),
                referenced_frame_numbers=sorted(set(frames)) if multi else None,
            )
        )
    return references


def _probability_measurement(
    spec: ClassSpec,
    probability: float,
    concept: Code,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.Measurement:
    """TID 300: ``Probability = p`` (no units), post-coordinated with the class.

    Children of the NUM item: HAS CONCEPT MOD CODE ``concept`` = the class
    code (which class this probability is of), HAS CONCEPT MOD TEXT
    "Equivalent Meaning of Concept Name" = ``"Probability of <label>"``
    (TID 1210), and the Algorithm Identification (TID 4019).
    """
    measurement = hd.sr.Measurement(
        name=PROBABILITY,
        value=probability,
        unit=NO_UNITS,
        algorithm_id=algorithm,
    )
    item = measurement[0]
    modifiers = [
        hd.sr.CodeContentItem(
            name=coded_concept(concept),
            value=coded_concept(spec.code),
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        ),
        hd.sr.TextContentItem(
            name=EQUIVALENT_MEANING,
            value=f"Probability of {spec.label}"[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        ),
    ]
    # The modifiers go first, before the algorithm identification items.
    item.ContentSequence = hd.sr.ContentSequence([*modifiers, *item.ContentSequence])
    return measurement


def build_classification_sr(
    volume: Volume,
    probabilities: npt.ArrayLike,
    classes: Sequence[ClassSpec],
    *,
    concept: Code,
    algorithm_name: str,
    algorithm_version: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9103,
    series_description: str = "radnode AI classification",
    manufacturer: str = "radnode",
    manufacturer_model_name: str = "radnode",
    software_versions: str = RADNODE_SOFTWARE_VERSION,
    institution_name: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build a TID 1500 Measurement Report holding a classification result.

    Content tree (PS3.16 TID 1500), under the title DCM 126000 "Imaging
    Measurement Report": language, device observer context (the model:
    Device Observer UID from :func:`workers.results.uids.device_observer_uid`,
    name ``algorithm_name``), Procedure Reported (CID 100 by modality, as in
    :func:`workers.results.sr.procedure_reported`), and in "Imaging
    Measurements" one Measurement Group (TID 1501) with

    * Tracking Identifier ``"<algorithm_name> classification"`` and a
      deterministic Tracking UID (:func:`classification_tracking_uid`);
    * Algorithm Identification (TID 4019): name, version, family DCM 123110
      "Artificial Intelligence", manufacturer;
    * per class, in ``classes`` order, a measurement (TID 300) DCM 122157
      "Probability" with the class's probability in UCUM ``1`` "no units",
      modified by ``concept`` = the class code (HAS CONCEPT MOD CODE) and by
      "Equivalent Meaning of Concept Name" = ``"Probability of <label>"``
      (HAS CONCEPT MOD TEXT, TID 1210), with the Algorithm Identification;
    * the qualitative evaluation ``concept`` = the code of the most probable
      class (the first one on a tie);
    * one "Source of Measurement" IMAGE reference per source instance (with
      its frame numbers for a multi-frame instance). The source series and
      all its instances are also listed in the Current Requested Procedure
      Evidence Sequence.

    Why UCUM ``1`` rather than ``%``: models output fractions in [0, 1] and
    the :class:`~workers.inference.base.ClassificationModel` protocol speaks
    in fractions, so the value is written unchanged, with no scaling that a
    reader could miss; a probability is a dimensionless ratio, which UCUM
    writes as the unity ``1`` (CID 7181 "no units").

    Parameters
    ----------
    volume : Volume
        The classified series. ``volume.datasets`` (one series) supply the
        patient and study information and are the evidence; ``slice_frames``
        gives the frames of multi-frame instances.
    probabilities : array_like
        Shape ``(classes,)``, each in ``[0, 1]``; entry ``i`` is
        ``classes[i]``. They need not sum to 1 (multi-label models).
    classes : Sequence[ClassSpec]
        Label and code of each class, at least one, codes distinct.
    concept : Code
        Concept name of the qualitative evaluation, e.g. DCM 121071
        "Finding" (``ClassificationModel.concept``).
    algorithm_name : str
        Algorithm Name; also the Device Observer Name.
    algorithm_version : str
        Algorithm Version.
    series_instance_uid : str
        Series Instance UID of the new SR series (see
        :func:`workers.results.uids.result_uid`).
    sop_instance_uid : str
        SOP Instance UID of the SR.
    series_number : int, optional
        Series Number (0020,0011).
    series_description : str, optional
        Series Description (0008,103E).
    manufacturer : str, optional
        Manufacturer (0008,0070) of the equipment writing the SR.
    manufacturer_model_name : str, optional
        Manufacturer's Model Name (0008,1090).
    software_versions : str, optional
        Software Versions (0018,1020).
    institution_name : str or None, optional
        Institution Name (0008,0080).

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        Comprehensive 3D SR (1.2.840.10008.5.1.4.1.1.88.34), Explicit VR
        Little Endian, in the source study, with a Contributing Equipment
        item (DCM 109102 "Processing Equipment", the model), Completion Flag
        COMPLETE, Verification Flag UNVERIFIED, Preliminary Flag PRELIMINARY.

    Raises
    ------
    ValueError
        If there are no classes, ``probabilities`` does not have shape
        ``(len(classes),)``, a probability is not finite or outside
        ``[0, 1]``, two classes share a code, ``volume`` has no datasets,
        or its datasets belong to more than one series.
    """
    values = _check_probabilities(probabilities, classes)
    if not volume.datasets:
        raise ValueError("volume has no source datasets to reference")
    source = volume.datasets[0]
    if len({str(ds.SeriesInstanceUID) for ds in volume.datasets}) != 1:
        raise ValueError("volume.datasets must belong to one series")
    source_series_uid = str(source.SeriesInstanceUID)
    modality = str(getattr(source, "Modality", volume.modality) or volume.modality)

    algorithm = algorithm_identification(algorithm_name, algorithm_version, manufacturer)
    measurements = [
        _probability_measurement(spec, float(p), concept, algorithm)
        for spec, p in zip(classes, values, strict=True)
    ]
    best = classes[int(np.argmax(values))]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=classification_tracking_uid(source_series_uid, algorithm_name, algorithm_version),
            identifier=f"{algorithm_name} classification"[:64],
        ),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=coded_concept(concept), value=coded_concept(best.code))
        ],
        source_images=_source_images(volume),
    )
    return measurement_report(
        [group], evidence=volume.datasets, modality=modality,
        algorithm_name=algorithm_name, algorithm_version=algorithm_version,
        contribution=f"Automatic classification by {algorithm_name} {algorithm_version}",
        series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid,
        series_number=series_number, series_description=series_description,
        manufacturer=manufacturer, manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions, institution_name=institution_name,
    )
