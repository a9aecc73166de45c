"""Classification result as a TID 1500 SR, on real CT slices and a real multi-frame MR."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from tests.conftest import missing
from workers.inference.base import ClassSpec, Code, Volume
from workers.results.classification_sr import (
    build_classification_sr,
    classification_tracking_uid,
)
from workers.results.uids import device_observer_uid, result_uid

Dciodvfy = Callable[[Path], tuple[list[str], list[str]]]

MODEL = "radnode-test-classifier"
VERSION = "2.1.0"
FINDING = Code("121071", "DCM", "Finding")
CLASSES = (
    ClassSpec("normal", Code("17621005", "SCT", "Normal")),
    ClassSpec("abnormal", Code("263654008", "SCT", "Abnormal")),
    ClassSpec("pneumonia", Code("233604007", "SCT", "Pneumonia")),
)
PROBABILITIES = np.array([0.15, 0.25, 0.6], dtype=np.float32)


def _uids(volume: Volume) -> tuple[str, str]:
    series = str(volume.datasets[0].SeriesInstanceUID)
    return (
        result_uid(series, MODEL, VERSION, "classification-sr", "series"),
        result_uid(series, MODEL, VERSION, "classification-sr", "instance"),
    )


def _build(
    volume: Volume,
    probabilities: object = PROBABILITIES,
    classes: tuple[ClassSpec, ...] = CLASSES,
    concept: Code = FINDING,
) -> hd.sr.Comprehensive3DSR:
    series_uid, instance_uid = _uids(volume)
    return build_classification_sr(
        volume,
        probabilities,  # type: ignore[arg-type]
        classes,
        concept=concept,
        algorithm_name=MODEL,
        algorithm_version=VERSION,
        series_instance_uid=series_uid,
        sop_instance_uid=instance_uid,
    )


def _reread(sr: hd.sr.Comprehensive3DSR) -> hd.sr.Comprehensive3DSR:
    """Write to bytes and read back with highdicom, which types the content tree."""
    buffer = io.BytesIO()
    sr.save_as(buffer)
    buffer.seek(0)
    result = hd.sr.srread(buffer)
    assert isinstance(result, hd.sr.Comprehensive3DSR)
    return result


def _groups(sr: Dataset) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """The TID 1501 groups of an SR read back by highdicom."""
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    return report.get_image_measurement_groups()


def _safe(lines: list[str]) -> list[str]:
    """dciodvfy lines without person names (they quote Patient's Name values)."""
    return [line for line in lines if " PN " not in line]


def _code_key(item: Dataset) -> tuple[str, str]:
    return (str(item.CodeValue), str(item.CodingSchemeDesignator))


def _children(item: Dataset) -> list[Dataset]:
    return list(item.get("ContentSequence", []))


@pytest.fixture(scope="module")
def bold_volume(test_data_dir: Path) -> Volume:
    """One volume (6 frames, 64x64) of the Siemens XA10 enhanced MR BOLD series."""
    path = test_data_dir / "enhanced_multiframe" / "siemens_xa10_bold" / "6_1.dcm"
    if not path.exists():
        missing(f"{path} not found")
    ds = pydicom.dcmread(path)
    frames = ds.PerFrameFunctionalGroupsSequence
    positions = np.array(
        [f.PlanePositionSequence[0].ImagePositionPatient for f in frames], dtype=np.float64
    )
    first = frames[0]
    orientation = np.array(
        first.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=np.float64
    )
    row_spacing, col_spacing = (float(v) for v in first.PixelMeasuresSequence[0].PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = (positions[-1] - positions[0]) / (len(frames) - 1)
    affine[:3, 1] = orientation[3:] * row_spacing
    affine[:3, 2] = orientation[:3] * col_spacing
    affine[:3, 3] = positions[0]
    return Volume(
        array=ds.pixel_array.astype(np.float32),
        spacing=(float(np.linalg.norm(affine[:3, 0])), row_spacing, col_spacing),
        affine=affine,
        datasets=[ds],
        modality="MR",
        frames=[(0, k) for k in range(1, len(frames) + 1)],
    )


@pytest.fixture(scope="module")
def ct_sr_path(small_volume: Volume, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("classification") / "ct_sr.dcm"
    _build(small_volume).save_as(path)
    return path


def test_header(ct_sr_path: Path, small_volume: Volume) -> None:
    sr = hd.sr.srread(ct_sr_path)
    source = small_volume.datasets[0]
    series_uid, instance_uid = _uids(small_volume)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID == series_uid != source.SeriesInstanceUID
    assert sr.SOPInstanceUID == instance_uid
    assert sr.PatientID == source.PatientID
    assert sr.PatientName == source.PatientName
    assert sr.Modality == "SR"
    assert sr.SeriesNumber == 9103
    assert sr.SeriesDescription == "radnode AI classification"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    (equipment,) = [
        item
        for item in sr.ContributingEquipmentSequence
        if item.get("ManufacturerModelName") == MODEL
    ]
    assert _code_key(equipment.PurposeOfReferenceCodeSequence[0]) == ("109102", "DCM")
    assert equipment.SoftwareVersions == VERSION
    # Evidence: the source series with all its instances.
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in series.ReferencedSOPSequence} == {
        ds.SOPInstanceUID for ds in small_volume.datasets
    }


def test_content_tree(ct_sr_path: Path, small_volume: Volume) -> None:
    sr = hd.sr.srread(ct_sr_path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    assert report[0].ContentTemplateSequence[0].TemplateIdentifier == "1500"
    (observer,) = report.get_observer_contexts(observer_type=codes.DCM.Device)
    device = observer.observer_identifying_attributes
    assert isinstance(device, hd.sr.DeviceObserverIdentifyingAttributes)
    assert device.uid == device_observer_uid(MODEL, VERSION)
    assert device.name == MODEL

    (group,) = report.get_image_measurement_groups()
    assert group[0].ContentTemplateSequence[0].TemplateIdentifier == "1501"
    assert group.tracking_identifier == f"{MODEL} classification"
    source_series = str(small_volume.datasets[0].SeriesInstanceUID)
    assert group.tracking_uid == classification_tracking_uid(source_series, MODEL, VERSION)

    # Qualitative evaluation: Finding = the most probable class (pneumonia).
    # (highdicom reads a "Finding" item as the group's finding type.)
    assert group.finding_type is not None
    assert (group.finding_type.value, group.finding_type.scheme_designator) == (
        "233604007",
        "SCT",
    )

    # Algorithm identification of the group.
    algorithm = {
        str(item.ConceptNameCodeSequence[0].CodeValue): item
        for item in _children(group[0])
        if item.ValueType in ("TEXT", "CODE")
    }
    assert algorithm["111001"].TextValue == MODEL
    assert algorithm["111003"].TextValue == VERSION
    assert _code_key(algorithm["111000"].ConceptCodeSequence[0]) == ("123110", "DCM")

    # One probability per class, in class order, each tied to its class.
    measurements = group.get_measurements()
    assert len(measurements) == len(CLASSES)
    for measurement, spec, p in zip(measurements, CLASSES, PROBABILITIES, strict=True):
        assert measurement.name == hd.sr.CodedConcept("122157", "DCM", "Probability")
        assert (measurement.unit.value, measurement.unit.scheme_designator) == ("1", "UCUM")
        assert measurement.value == pytest.approx(float(p), abs=1e-6)
        mods = {
            str(item.ConceptNameCodeSequence[0].CodeValue): item
            for item in _children(measurement[0])
            if item.RelationshipType == "HAS CONCEPT MOD"
        }
        assert _code_key(mods[FINDING.value].ConceptCodeSequence[0]) == (
            spec.code.value,
            spec.code.scheme,
        )
        assert mods["121050"].TextValue == f"Probability of {spec.label}"
        assert mods["111001"].TextValue == MODEL

    # Source of Measurement: every source instance, in slice order, no frames.
    images = group.source_images
    assert [image.referenced_sop_instance_uid for image in images] == [
        ds.SOPInstanceUID for ds in small_volume.datasets
    ]
    assert all(image.referenced_frame_numbers is None for image in images)


def test_other_concept_and_ties(small_volume: Volume) -> None:
    concept = Code("246188002", "SCT", "Finding")
    sr = _build(small_volume, probabilities=[0.4, 0.4, 0.2], concept=concept)
    (group,) = _groups(_reread(sr))
    (evaluation,) = group.get_qualitative_evaluations(
        name=hd.sr.CodedConcept(concept.value, concept.scheme, concept.meaning)
    )
    # A tie goes to the first class in model order.
    assert evaluation[0].ConceptCodeSequence[0].CodeValue == "17621005"
    assert group.finding_type is None


def test_same_inputs_same_uids(small_volume: Volume) -> None:
    a, b = _build(small_volume), _build(small_volume)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    (ga,) = _groups(_reread(a))
    (gb,) = _groups(_reread(b))
    assert ga.tracking_uid == gb.tracking_uid


@pytest.mark.parametrize(
    ("probabilities", "classes"),
    [
        ([0.5, 0.5], CLASSES),  # too few values
        ([[0.1, 0.2, 0.7]], CLASSES),  # wrong shape
        ([0.1, float("nan"), 0.7], CLASSES),
        ([0.1, 1.2, 0.7], CLASSES),
        ([-0.1, 0.2, 0.7], CLASSES),
        ([], ()),
        ([0.3, 0.7], (CLASSES[0], ClassSpec("same code", CLASSES[0].code))),
    ],
    ids=["count", "shape", "nan", "above-one", "negative", "no-classes", "duplicate-code"],
)
def test_rejects_bad_input(
    small_volume: Volume, probabilities: list[float], classes: tuple[ClassSpec, ...]
) -> None:
    with pytest.raises(ValueError):
        _build(small_volume, probabilities=probabilities, classes=classes)


def test_rejects_mixed_series(small_volume: Volume, bold_volume: Volume) -> None:
    mixed = Volume(
        array=small_volume.array,
        spacing=small_volume.spacing,
        affine=small_volume.affine,
        datasets=[*small_volume.datasets[:-1], bold_volume.datasets[0]],
        modality="CT",
    )
    with pytest.raises(ValueError):
        _build(mixed)


def test_ct_passes_dciodvfy(dciodvfy: Dciodvfy, ct_sr_path: Path) -> None:
    errors, warnings = dciodvfy(ct_sr_path)
    print("dciodvfy classification SR (CT) warnings:", *_safe(warnings), sep="\n  ")
    assert errors == []


def test_multiframe_source(dciodvfy: Dciodvfy, bold_volume: Volume, tmp_path: Path) -> None:
    sr = _build(bold_volume)
    path = tmp_path / "mr_sr.dcm"
    sr.save_as(path)
    errors, warnings = dciodvfy(path)
    print("dciodvfy classification SR (enhanced MR) warnings:", *_safe(warnings), sep="\n  ")
    assert errors == []
    (group,) = _groups(_reread(sr))
    assert _groups(hd.sr.srread(path))[0].tracking_uid == group.tracking_uid
    (image,) = group.source_images
    assert image.referenced_sop_instance_uid == bold_volume.datasets[0].SOPInstanceUID
    assert image.referenced_frame_numbers == [1, 2, 3, 4, 5, 6]
    # MR: "MRI unspecified body region" as the procedure reported.
    assert any(
        item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ProcedureReported.value
        and item.ConceptCodeSequence[0].CodeValue == "25056-3"
        for item in sr.ContentSequence
    )
