"""Encode per-segment measurements as a TID 1500 Measurement Report SR.

Sources
-------
* DICOM PS3.16 TID 1500 "Measurement Report", TID 1411 "Volumetric ROI
  Measurements and Qualitative Evaluations", TID 300 "Measurement", TID 4019
  "Algorithm Identification", TID 4108 "Tracking Identifier", TID 1001/1002/
  1004 observation context with a device observer.
* DICOM PS3.3 A.35.13 "Comprehensive 3D SR IOD".
* Codes: SCT 118565006 "Volume" (CID 7469), DCM 112031 "Attenuation
  Coefficient" (CID 7469) with DCM 121401 "Derivation" = SCT 373098007
  "Mean" (CID 7464), UCUM ``ml`` and ``[hnsf'U]``; LN 25045-6 "CT unspecified
  body region" (CID 100) as the procedure reported.
* highdicom 0.28 :mod:`highdicom.sr`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode
from pydicom.uid import SegmentationStorage

from workers.inference.base import SegmentMeasurement, SegmentSpec, Volume
from workers.results.measure import source_instances
from workers.results.seg import RADNODE_SOFTWARE_VERSION, character_set, coded_concept
from workers.results.uids import device_observer_uid, segment_tracking_uid

__all__ = ["MILLILITER", "build_sr", "mean_concept", "procedure_reported"]

LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"

MILLILITER = PydicomCode("ml", "UCUM", "milliliter")
"""UCUM milliliter, as written by dcmqi's TID 1500 writer."""

_MEAN_CONCEPTS: dict[str, tuple[PydicomCode, PydicomCode]] = {
    "CT": (codes.DCM.AttenuationCoefficient, codes.UCUM.HounsfieldUnit),
    "MR": (codes.DCM.MRSignalIntensity, codes.UCUM.ArbitraryUnit),
}

_PROCEDURES: dict[str, PydicomCode] = {
    "CT": codes.cid100.CTUnspecifiedBodyRegion,
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,
}


def mean_concept(modality: str) -> tuple[PydicomCode, PydicomCode] | None:
    """Return the (concept name, unit) used to report a mean value.

    Parameters
    ----------
    modality : str
        Modality (0008,0060) of the source series.

    Returns
    -------
    tuple of pydicom.sr.coding.Code, or None
        CT: DCM 112031 "Attenuation Coefficient" in UCUM ``[hnsf'U]``;
        MR: DCM 110852 "MR signal intensity" in UCUM ``[arb'U]``;
        None for other modalities (the mean is then not reported).
    """
    return _MEAN_CONCEPTS.get(modality.upper())


def procedure_reported(modality: str) -> PydicomCode:
    """Return the TID 1500 "Procedure reported" code for a modality (CID 100).

    Parameters
    ----------
    modality : str
        Modality (0008,0060) of the source series.

    Returns
    -------
    pydicom.sr.coding.Code
        LN 25045-6 "CT unspecified body region", LN 25056-3 "MRI unspecified
        body region", or SCT 363679005 "Imaging procedure" otherwise.
    """
    default: PydicomCode = codes.cid100.ImagingProcedure
    return _PROCEDURES.get(modality.upper(), default)


def build_sr(
    seg: Dataset,
    volume: Volume,
    measurements: Sequence[SegmentMeasurement],
    segments: Sequence[SegmentSpec],
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9102,
    series_description: str = "radnode AI measurements",
    manufacturer: str = "radnode",
    manufacturer_model_name: str = "radnode",
    software_versions: str = RADNODE_SOFTWARE_VERSION,
    institution_name: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build a TID 1500 Measurement Report with one TID 1411 group per segment.

    Each group carries a Tracking Identifier (the segment label) and Tracking
    UID (the same UID as the SEG's segment,
    :func:`workers.results.uids.segment_tracking_uid`), a Referenced Segment
    (the SEG instance and segment number, with the source series as "Source
    series for segmentation"), Finding Type (the segment's property type),
    Finding Category (its property category), Algorithm Identification, and
    the measurements:

    * SCT 118565006 "Volume" in UCUM ``ml`` (``voxel_count`` times the voxel
      volume), always, 0 for an empty segment;
    * for CT, DCM 112031 "Attenuation Coefficient", Derivation SCT 373098007
      "Mean", in UCUM ``[hnsf'U]`` (for MR "MR signal intensity" in
      ``[arb'U]``, other modalities none); omitted when the mean is NaN
      (empty segment).

    Parameters
    ----------
    seg : pydicom.dataset.Dataset
        The SEG the measurements refer to (e.g. from
        :func:`workers.results.seg.build_seg`), same study as ``volume``.
    volume : Volume
        The source series; ``volume.datasets`` supply the patient and study
        information, and each distinct source instance (one per slice for
        single-frame images, each multi-frame instance once, see
        :func:`workers.results.measure.source_instances`) is listed, with
        ``seg``, in the Current Requested Procedure Evidence Sequence.
    measurements : Sequence[SegmentMeasurement]
        From :func:`workers.results.measure.measure_segments`; volumes in mL,
        means in the unit of ``volume.array`` (HU for CT).
    segments : Sequence[SegmentSpec]
        The segments, in SEG order (``segments[n - 1]`` is Segment Number
        ``n``).
    algorithm_name : str
        Algorithm Name; also the Device Observer Name.
    algorithm_version : str
        Algorithm Version.
    series_instance_uid : str
        Series Instance UID of the new SR series.
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
        Little Endian, in the source study, Completion Flag COMPLETE,
        Verification Flag UNVERIFIED, Preliminary Flag PRELIMINARY.

    Raises
    ------
    ValueError
        If ``seg`` is not a Segmentation, belongs to another study, or lacks a
        segment that a measurement refers to; if there are no measurements;
        if a measurement's segment number or label does not match
        ``segments``; or if the volume's frame references do not match its
        datasets (:func:`workers.results.measure.check_sources`).
    """
    if not measurements:
        raise ValueError("at least one measurement is required (TID 1500 row 6)")
    if seg.SOPClassUID not in (SegmentationStorage, LABEL_MAP_SEGMENTATION_STORAGE):
        raise ValueError(f"seg has SOP Class UID {seg.SOPClassUID}, not a Segmentation")
    evidence_images = source_instances(volume)
    source = evidence_images[0]
    if seg.StudyInstanceUID != source.StudyInstanceUID:
        raise ValueError("seg and volume belong to different studies")
    seg_numbers = {int(item.SegmentNumber) for item in seg.SegmentSequence}
    source_series_uid = str(source.SeriesInstanceUID)
    modality = str(getattr(source, "Modality", volume.modality) or volume.modality)
    mean_codes = mean_concept(modality)

    algorithm = algorithm_identification(algorithm_name, algorithm_version, manufacturer)
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations] = []
    for measurement in measurements:
        number = measurement.segment_number
        if not 1 <= number <= len(segments):
            raise ValueError(f"measurement refers to segment {number}, outside 1..{len(segments)}")
        spec = segments[number - 1]
        if measurement.label != spec.label:
            raise ValueError(
                f"measurement of segment {number} is labelled {measurement.label!r}, "
                f"segment is {spec.label!r}"
            )
        if number not in seg_numbers:
            raise ValueError(f"seg has no segment number {number}")
        items = [
            hd.sr.Measurement(
                name=codes.SCT.Volume,
                value=float(measurement.volume_ml),
                unit=MILLILITER,
                algorithm_id=algorithm,
            )
        ]
        if mean_codes is not None and math.isfinite(measurement.mean):
            name, unit = mean_codes
            items.append(
                hd.sr.Measurement(
                    name=name,
                    value=float(measurement.mean),
                    unit=unit,
                    derivation=codes.SCT.Mean,
                    algorithm_id=algorithm,
                )
            )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=segment_tracking_uid(
                        source_series_uid, algorithm_name, algorithm_version, number
                    ),
                    identifier=spec.label,
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=number,
                    source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
                ),
                finding_type=coded_concept(spec.type),
                finding_category=coded_concept(spec.category),
                algorithm_id=algorithm,
                measurements=items,
            )
        )

    return measurement_report(
        groups, evidence=[*evidence_images, seg], modality=modality,
        algorithm_name=algorithm_name, algorithm_version=algorithm_version,
        contribution=f"Automatic segmentation by {algorithm_name} {algorithm_version}",
        series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid,
        series_number=series_number, series_description=series_description,
        manufacturer=manufacturer, manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions, institution_name=institution_name,
    )


def algorithm_identification(name: str, version: str,
                             manufacturer: str) -> hd.sr.AlgorithmIdentification:
    """Algorithm Identification (TID 4019) of an AI model (family DCM "Artificial Intelligence")."""
    return hd.sr.AlgorithmIdentification(
        name=name, version=version, family=codes.DCM.ArtificialIntelligence,
        manufacturer=manufacturer,
    )


def measurement_report(
    groups: Sequence[hd.sr.MeasurementsAndQualitativeEvaluations
                     | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations],
    *,
    evidence: Sequence[Dataset],
    modality: str,
    algorithm_name: str,
    algorithm_version: str,
    contribution: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    series_description: str,
    manufacturer: str,
    manufacturer_model_name: str,
    software_versions: str,
    institution_name: str | None,
) -> hd.sr.Comprehensive3DSR:
    """Wrap measurement groups in a TID 1500 Measurement Report document.

    The model is the device observer (Device Observer UID from
    :func:`workers.results.uids.device_observer_uid`) and a Contributing
    Equipment item (DCM 109102 "Processing Equipment", described by
    ``contribution``); Procedure Reported follows ``modality``
    (:func:`procedure_reported`); the Specific Character Set is the first
    evidence instance's (:func:`workers.results.seg.character_set`).

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        Explicit VR Little Endian, in the evidence's study, Completion Flag
        COMPLETE, Verification Flag UNVERIFIED, Preliminary Flag PRELIMINARY.
    """
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(algorithm_name, algorithm_version),
            name=algorithm_name,
            manufacturer_name=manufacturer,
            model_name=f"{algorithm_name} {algorithm_version}",
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure_reported(modality),
        imaging_measurements=list(groups),
        title=codes.cid7021.ImagingMeasurementReport,
    )
    processing = hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        contribution_description=contribution[:1024],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=list(evidence),
        content=report[0],
        specific_character_set=character_set(evidence[0]),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        contributing_equipment=[processing],
        series_description=series_description,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions,
    )
