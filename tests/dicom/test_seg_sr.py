"""SEG and TID 1500 SR encoders on the real 134-slice pancreas CT and enhanced MR."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ExplicitVRLittleEndian

from tests.unit.dicom_factory import split_multiframe
from workers.inference.base import SegmentMeasurement, SegmentSpec, Volume
from workers.inference.volume import load_series, load_volumes
from workers.results.measure import measure_segments
from workers.results.seg import build_seg
from workers.results.sr import build_sr
from workers.results.uids import device_observer_uid, result_uid, segment_tracking_uid

Masker = Callable[[Volume], np.ndarray]
Dciodvfy = Callable[[Path], tuple[list[str], list[str]]]

MODEL = "radnode-threshold"
VERSION = "1.0.0"


def _uids(volume: Volume, kind: str, version: str = VERSION) -> tuple[str, str]:
    series = str(volume.datasets[0].SeriesInstanceUID)
    return (
        result_uid(series, MODEL, version, kind, "series"),
        result_uid(series, MODEL, version, kind, "instance"),
    )


def _build_seg(
    volume: Volume, masks: np.ndarray, segments: tuple[SegmentSpec, ...], **kwargs: object
) -> hd.seg.Segmentation:
    series_uid, instance_uid = _uids(volume, "seg")
    return build_seg(
        volume,
        masks,
        segments,
        algorithm_name=MODEL,
        algorithm_version=VERSION,
        series_instance_uid=series_uid,
        sop_instance_uid=instance_uid,
        **kwargs,  # type: ignore[arg-type]
    )


def _build_sr(
    seg: hd.seg.Segmentation,
    volume: Volume,
    measurements: list[SegmentMeasurement],
    segments: tuple[SegmentSpec, ...],
) -> hd.sr.Comprehensive3DSR:
    series_uid, instance_uid = _uids(volume, "sr")
    return build_sr(
        seg,
        volume,
        measurements,
        segments,
        algorithm_name=MODEL,
        algorithm_version=VERSION,
        series_instance_uid=series_uid,
        sop_instance_uid=instance_uid,
    )


@pytest.fixture(scope="module")
def full_masks(pancreas_volume: Volume, threshold_masks: Masker) -> np.ndarray:
    return threshold_masks(pancreas_volume)


@pytest.fixture(scope="module")
def full_seg_path(
    pancreas_volume: Volume,
    full_masks: np.ndarray,
    segments: tuple[SegmentSpec, ...],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    start = time.perf_counter()
    seg = _build_seg(pancreas_volume, full_masks, segments)
    elapsed = time.perf_counter() - start
    print(f"build_seg on {full_masks.shape}: {elapsed:.2f} s, {seg.NumberOfFrames} frames")
    path = tmp_path_factory.mktemp("seg") / "seg.dcm"
    seg.save_as(path)
    return path


@pytest.fixture(scope="module")
def full_sr_path(
    pancreas_volume: Volume,
    full_masks: np.ndarray,
    full_seg_path: Path,
    segments: tuple[SegmentSpec, ...],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    seg = hd.seg.segread(full_seg_path)
    measurements = measure_segments(pancreas_volume, full_masks, segments)
    start = time.perf_counter()
    sr = _build_sr(seg, pancreas_volume, measurements, segments)
    print(f"build_sr: {time.perf_counter() - start:.3f} s")
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    sr.save_as(path)
    return path


# --------------------------------------------------------------------- volume


def test_test_volume_is_sorted_and_complete(pancreas_volume: Volume) -> None:
    assert pancreas_volume.array.shape == (134, 512, 512)
    z = [float(ds.ImagePositionPatient[2]) for ds in pancreas_volume.datasets]
    assert z == sorted(z)
    assert pancreas_volume.spacing[0] == pytest.approx(3.0, abs=1e-3)


# -------------------------------------------------------------------- measure


def test_measure_segments(
    small_volume: Volume, segments: tuple[SegmentSpec, ...], threshold_masks: Masker
) -> None:
    masks = threshold_masks(small_volume)
    result = measure_segments(small_volume, masks, segments)
    assert [m.segment_number for m in result] == [1, 2, 3]
    assert [m.label for m in result] == [s.label for s in segments]
    for m, mask in zip(result, masks, strict=True):
        count = int(mask.sum())
        assert m.voxel_count == count
        assert m.volume_ml == pytest.approx(count * small_volume.voxel_volume_ml, rel=1e-12)
        if count:
            assert m.mean == pytest.approx(
                float(small_volume.array[mask].astype(np.float64).mean())
            )
    assert result[0].voxel_count > 0 and result[1].voxel_count > 0
    assert result[2].voxel_count == 0 and result[2].volume_ml == 0.0
    assert math.isnan(result[2].mean)
    # voxel volume: 3 mm x 1.074 mm x 1.074 mm
    assert small_volume.voxel_volume_ml == pytest.approx(3.0 * 1.07421875**2 / 1000.0, rel=1e-6)


def test_measure_segments_rejects_bad_masks(
    small_volume: Volume, segments: tuple[SegmentSpec, ...], threshold_masks: Masker
) -> None:
    masks = threshold_masks(small_volume)
    with pytest.raises(ValueError):
        measure_segments(small_volume, masks[:2], segments)
    with pytest.raises(ValueError):
        measure_segments(small_volume, masks[:, :-1], segments)
    with pytest.raises(ValueError):
        measure_segments(small_volume, masks.astype(np.uint8), segments)


# ----------------------------------------------------------------------- uids


def test_result_uids_are_deterministic() -> None:
    series = "1.2.840.99999.1"
    a = result_uid(series, MODEL, VERSION, "seg", "series")
    assert a == result_uid(series, MODEL, VERSION, "seg", "series")
    others = {
        result_uid(series, MODEL, "1.0.1", "seg", "series"),
        result_uid(series, MODEL, VERSION, "seg", "instance"),
        result_uid(series, MODEL, VERSION, "sr", "series"),
        result_uid("1.2.840.99999.2", MODEL, VERSION, "seg", "series"),
        result_uid(series, "other-model", VERSION, "seg", "series"),
    }
    assert a not in others and len(others) == 5
    # generate_uid joins its entropy sources without a separator; ours must not
    assert result_uid(series, "ab", "c", "seg", "series") != result_uid(
        series, "a", "bc", "seg", "series"
    )
    for uid in (a, *others):
        assert UID(uid).is_valid and len(uid) <= 64
        assert uid.startswith("1.2.826.0.1.3680043.8.498.")
    assert segment_tracking_uid(series, MODEL, VERSION, 1) != segment_tracking_uid(
        series, MODEL, VERSION, 2
    )
    assert device_observer_uid(MODEL, VERSION) == device_observer_uid(MODEL, VERSION)
    with pytest.raises(ValueError):
        result_uid("", MODEL, VERSION, "seg", "series")


def test_same_inputs_give_same_seg_uids(
    small_volume: Volume, segments: tuple[SegmentSpec, ...], threshold_masks: Masker
) -> None:
    masks = threshold_masks(small_volume)
    first = _build_seg(small_volume, masks, segments)
    second = _build_seg(small_volume, masks, segments)
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.SOPInstanceUID == second.SOPInstanceUID
    new_series, new_instance = _uids(small_volume, "seg", version="2.0.0")
    assert new_series != first.SeriesInstanceUID
    assert new_instance != first.SOPInstanceUID
    assert [s.TrackingUID for s in first.SegmentSequence] == [
        s.TrackingUID for s in second.SegmentSequence
    ]


# ------------------------------------------------------------------------ SEG


def test_seg_passes_dciodvfy(dciodvfy: Dciodvfy, full_seg_path: Path) -> None:
    errors, warnings = dciodvfy(full_seg_path)
    print("dciodvfy SEG warnings:", *warnings, sep="\n  ")
    assert errors == []


def test_seg_header(
    full_seg_path: Path, pancreas_volume: Volume, segments: tuple[SegmentSpec, ...]
) -> None:
    seg = hd.seg.segread(full_seg_path)
    source = pancreas_volume.datasets[0]
    series_uid, instance_uid = _uids(pancreas_volume, "seg")
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.PatientID == source.PatientID
    assert seg.SeriesInstanceUID == series_uid
    assert seg.SOPInstanceUID == instance_uid
    assert seg.SeriesNumber == 9101
    assert seg.SeriesDescription == "radnode AI segmentation"
    assert seg.Manufacturer == "radnode"
    purposes = [
        item.PurposeOfReferenceCodeSequence[0].CodeValue
        for item in seg.ContributingEquipmentSequence
    ]
    assert codes.DCM.ProcessingEquipment.value in purposes
    assert any(
        getattr(item, "ManufacturerModelName", None) == MODEL
        for item in seg.ContributingEquipmentSequence
    )

    assert seg.number_of_segments == len(segments)
    for number, spec in enumerate(segments, start=1):
        desc = seg.get_segment_description(number)
        assert desc.segment_label == spec.label
        assert desc.segmented_property_type.value == spec.type.value
        assert desc.segmented_property_type.scheme_designator == spec.type.scheme
        assert desc.segmented_property_category.value == spec.category.value
        assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algo = desc.algorithm_identification
        assert algo is not None
        assert algo[0].AlgorithmName == MODEL
        assert algo[0].AlgorithmVersion == VERSION
        assert algo[0].AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert MODEL in desc.SegmentDescription and VERSION in desc.SegmentDescription
        assert tuple(desc.RecommendedDisplayCIELabValue) == (
            hd.color.CIELabColor.from_rgb(*spec.rgb).value
        )
        assert desc.tracking_id == spec.label
        assert desc.tracking_uid == segment_tracking_uid(
            str(source.SeriesInstanceUID), MODEL, VERSION, number
        )


def test_seg_references_every_source_image(full_seg_path: Path, pancreas_volume: Volume) -> None:
    seg = hd.seg.segread(full_seg_path)
    source_uids = [str(ds.SOPInstanceUID) for ds in pancreas_volume.datasets]
    (ref_series,) = seg.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == pancreas_volume.datasets[0].SeriesInstanceUID
    referenced = [
        str(item.ReferencedSOPInstanceUID) for item in ref_series.ReferencedInstanceSequence
    ]
    assert sorted(referenced) == sorted(source_uids)
    # Body and bone are present on every slice, the third segment nowhere:
    # with omit_empty_frames (default) each non-empty segment has one frame
    # per source image and the empty one none.
    per_segment: dict[int, list[str]] = {}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        (derivation,) = frame.DerivationImageSequence
        (src,) = derivation.SourceImageSequence
        per_segment.setdefault(number, []).append(str(src.ReferencedSOPInstanceUID))
    assert sorted(per_segment) == [1, 2]
    for uids in per_segment.values():
        assert sorted(uids) == sorted(source_uids)
    assert seg.NumberOfFrames == 2 * len(source_uids)


def test_seg_geometry_matches_source(full_seg_path: Path, pancreas_volume: Volume) -> None:
    seg = hd.seg.segread(full_seg_path)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in pancreas_volume.datasets}
    source = pancreas_volume.datasets[0]
    shared = seg.SharedFunctionalGroupsSequence[0]
    measures = shared.PixelMeasuresSequence[0]
    np.testing.assert_allclose(
        [float(v) for v in measures.PixelSpacing], [float(v) for v in source.PixelSpacing]
    )
    np.testing.assert_allclose(float(measures.SliceThickness), float(source.SliceThickness))
    np.testing.assert_allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in source.ImageOrientationPatient],
    )
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        src_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in by_uid[str(src_uid)].ImagePositionPatient],
        )


def test_seg_pixels_round_trip(
    full_seg_path: Path, pancreas_volume: Volume, full_masks: np.ndarray
) -> None:
    seg = hd.seg.segread(full_seg_path)
    source_uids = [str(ds.SOPInstanceUID) for ds in pancreas_volume.datasets]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=source_uids,
        segment_numbers=[1, 2, 3],
        assert_missing_frames_are_empty=True,
    )
    assert pixels.shape == (134, 512, 512, 3)
    for index in range(3):
        np.testing.assert_array_equal(pixels[..., index].astype(bool), full_masks[index])


def test_seg_volume_round_trip(
    full_seg_path: Path, pancreas_volume: Volume, full_masks: np.ndarray
) -> None:
    seg = hd.seg.segread(full_seg_path)
    volume = seg.get_volume(segment_numbers=[1, 2, 3])
    assert volume.array.shape == (134, 512, 512, 3)
    np.testing.assert_allclose(volume.spacing, pancreas_volume.spacing, atol=1e-4)
    if np.allclose(volume.affine, pancreas_volume.affine, atol=1e-3):
        array = volume.array
    else:  # highdicom may order slices the other way along the normal
        flipped = volume.flip_spatial(axes=0)
        assert np.allclose(flipped.affine, pancreas_volume.affine, atol=1e-3)
        array = flipped.array
    for index in range(3):
        np.testing.assert_array_equal(array[..., index].astype(bool), full_masks[index])


def test_seg_without_omitting_empty_frames(
    small_volume: Volume, segments: tuple[SegmentSpec, ...], tmp_path: Path, threshold_masks: Masker
) -> None:
    masks = threshold_masks(small_volume)
    seg = _build_seg(small_volume, masks, segments, omit_empty_frames=False)
    assert seg.NumberOfFrames == 3 * small_volume.array.shape[0]
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    back = hd.seg.segread(path)
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in small_volume.datasets],
        segment_numbers=[1, 2, 3],
    )
    np.testing.assert_array_equal(np.moveaxis(pixels.astype(bool), -1, 0), masks)


def test_seg_with_all_segments_empty(
    small_volume: Volume, segments: tuple[SegmentSpec, ...], tmp_path: Path
) -> None:
    masks = np.zeros((3, *small_volume.array.shape), dtype=bool)
    seg = _build_seg(small_volume, masks, segments)
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    back = hd.seg.segread(path)
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in small_volume.datasets],
        assert_missing_frames_are_empty=True,
    )
    assert not pixels.any()


def test_seg_rejects_mismatched_inputs(
    small_volume: Volume, segments: tuple[SegmentSpec, ...], threshold_masks: Masker
) -> None:
    masks = threshold_masks(small_volume)
    with pytest.raises(ValueError):
        _build_seg(small_volume, masks[:2], segments)
    with pytest.raises(ValueError):
        _build_seg(small_volume, masks[:, 1:], segments)
    short = Volume(
        array=small_volume.array,
        spacing=small_volume.spacing,
        affine=small_volume.affine,
        datasets=small_volume.datasets[:-1],
        modality="CT",
    )
    with pytest.raises(ValueError):
        _build_seg(short, masks, segments)


def test_seg_slice_order_follows_volume(
    small_volume: Volume, segments: tuple[SegmentSpec, ...]
) -> None:
    """A mask on one slice lands on the frame derived from that slice's image."""
    masks = np.zeros((3, *small_volume.array.shape), dtype=bool)
    masks[0, 2, 10:20, 30:40] = True
    masks[1, 7, 100:101, 5:6] = True
    seg = _build_seg(small_volume, masks, segments)
    assert seg.NumberOfFrames == 2
    for frame, (slice_index, number) in zip(
        seg.PerFrameFunctionalGroupsSequence, [(2, 1), (7, 2)], strict=True
    ):
        src = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert src.ReferencedSOPInstanceUID == small_volume.datasets[slice_index].SOPInstanceUID
        assert frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber == number


# ------------------------------------------------------------------------- SR


def test_sr_passes_dciodvfy(dciodvfy: Dciodvfy, full_sr_path: Path) -> None:
    errors, warnings = dciodvfy(full_sr_path)
    print("dciodvfy SR warnings:", *warnings, sep="\n  ")
    assert errors == []


def test_sr_content(
    full_sr_path: Path,
    full_seg_path: Path,
    pancreas_volume: Volume,
    full_masks: np.ndarray,
    segments: tuple[SegmentSpec, ...],
) -> None:
    sr = hd.sr.srread(full_sr_path)
    seg = hd.seg.segread(full_seg_path)
    source = pancreas_volume.datasets[0]
    series_uid, instance_uid = _uids(pancreas_volume, "sr")
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID == series_uid and sr.SOPInstanceUID == instance_uid
    assert sr.SeriesInstanceUID not in (source.SeriesInstanceUID, seg.SeriesInstanceUID)
    assert sr.SeriesNumber == 9102
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"

    evidence = {
        str(item.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert str(seg.SOPInstanceUID) in evidence
    assert {str(ds.SOPInstanceUID) for ds in pancreas_volume.datasets} <= evidence

    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    (observer,) = report.get_observer_contexts(observer_type=codes.DCM.Device)
    device = observer.observer_identifying_attributes
    assert isinstance(device, hd.sr.DeviceObserverIdentifyingAttributes)
    assert device.name == MODEL
    assert device.uid == device_observer_uid(MODEL, VERSION)

    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == 3
    voxel_ml = pancreas_volume.voxel_volume_ml
    for number, (group, spec, mask) in enumerate(
        zip(groups, segments, full_masks, strict=True), start=1
    ):
        assert group.tracking_identifier == spec.label
        assert group.tracking_uid == segment_tracking_uid(
            str(source.SeriesInstanceUID), MODEL, VERSION, number
        )
        assert group.tracking_uid == seg.get_segment_description(number).tracking_uid
        assert group.finding_type is not None and group.finding_type.value == spec.type.value
        assert group.finding_category is not None
        assert group.finding_category.value == spec.category.value
        ref = group.referenced_segment
        assert ref is not None
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [number]
        series_ref = ref.source_series_for_segmentation
        assert series_ref is not None and series_ref.value == source.SeriesInstanceUID

        (volume_m,) = group.get_measurements(name=codes.SCT.Volume)
        count = int(mask.sum())
        assert volume_m.value == pytest.approx(count * voxel_ml, rel=1e-12)
        assert volume_m.unit.value == "ml" and volume_m.unit.scheme_designator == "UCUM"
        means = group.get_measurements(name=codes.DCM.AttenuationCoefficient)
        if count == 0:
            assert volume_m.value == 0.0
            assert means == []
            continue
        (mean_m,) = means
        expected = float(pancreas_volume.array[mask].astype(np.float64).mean())
        assert mean_m.value == pytest.approx(expected, rel=1e-9)
        assert mean_m.unit == codes.UCUM.HounsfieldUnit
        assert mean_m.derivation == codes.SCT.Mean
        algo_names = [
            item.TextValue
            for item in mean_m[0].ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue == "111001"
        ]
        assert algo_names == [MODEL]


def test_sr_rejects_mismatched_measurements(
    small_volume: Volume, segments: tuple[SegmentSpec, ...], threshold_masks: Masker
) -> None:
    masks = threshold_masks(small_volume)
    seg = _build_seg(small_volume, masks, segments)
    measurements = measure_segments(small_volume, masks, segments)
    bad_label = [
        SegmentMeasurement(m.segment_number, "wrong", m.voxel_count, m.volume_ml, m.mean)
        for m in measurements
    ]
    with pytest.raises(ValueError):
        _build_sr(seg, small_volume, bad_label, segments)
    with pytest.raises(ValueError):
        _build_sr(seg, small_volume, [], segments)


def test_sr_same_inputs_same_uids(
    small_volume: Volume, segments: tuple[SegmentSpec, ...], threshold_masks: Masker
) -> None:
    masks = threshold_masks(small_volume)
    seg = _build_seg(small_volume, masks, segments)
    measurements = measure_segments(small_volume, masks, segments)
    a = _build_sr(seg, small_volume, measurements, segments)
    b = _build_sr(seg, small_volume, measurements, segments)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    assert a.SeriesInstanceUID != seg.SeriesInstanceUID


def test_subset_helper_sorts_shuffled_input(
    small_volume: Volume, volume_from_datasets: Callable[[list[Dataset]], Volume]
) -> None:
    shuffled = list(reversed(small_volume.datasets))
    rebuilt = volume_from_datasets(shuffled)
    assert [ds.SOPInstanceUID for ds in rebuilt.datasets] == [
        ds.SOPInstanceUID for ds in small_volume.datasets
    ]
    np.testing.assert_array_equal(rebuilt.array, small_volume.array)


# ------------------------------------------------ enhanced multi-frame sources


def _mr_masks(volume: Volume) -> np.ndarray:
    """(3, slices, rows, columns): two MR signal thresholds and an empty segment."""
    array = volume.array
    return np.stack([array > 200.0, array > 600.0, np.zeros(array.shape, dtype=bool)])


def _frame_ipp(ds: Dataset, number: int) -> list[float]:
    item = ds.PerFrameFunctionalGroupsSequence[number - 1]
    return [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]


def _check_frame_references(seg: hd.seg.Segmentation, volume: Volume, masks: np.ndarray) -> None:
    """Every SEG frame names exactly the source frame of its slice, and holds its mask."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in volume.datasets}
    slice_of = {
        (str(volume.datasets[index].SOPInstanceUID), number): k
        for k, (index, number) in enumerate(volume.slice_frames)
    }
    pixels = seg.pixel_array  # (frames, rows, columns), frames in SEG order
    for item, frame_pixels in zip(seg.PerFrameFunctionalGroupsSequence, pixels, strict=True):
        (derivation,) = item.DerivationImageSequence
        (source,) = derivation.SourceImageSequence
        uid, number = str(source.ReferencedSOPInstanceUID), int(source.ReferencedFrameNumber)
        assert source.SpatialLocationsPreserved == "YES"
        np.testing.assert_allclose(
            [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
            _frame_ipp(by_uid[uid], number),
            atol=1e-3,
        )
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_array_equal(
            frame_pixels.astype(bool), masks[segment - 1, slice_of[(uid, number)]]
        )
    referenced = {
        str(ref.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for ref in series.ReferencedInstanceSequence
    }
    assert referenced == set(by_uid)


def _evidence(sr: Dataset) -> list[str]:
    return [
        str(item.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    ]


def _seg_and_sr_files(
    volume: Volume, segments: tuple[SegmentSpec, ...], folder: Path
) -> tuple[np.ndarray, Path, Path]:
    masks = _mr_masks(volume)
    seg = _build_seg(volume, masks, segments)
    seg_path = folder / "seg.dcm"
    seg.save_as(seg_path)
    measurements = measure_segments(volume, masks, segments)
    sr = _build_sr(hd.seg.segread(seg_path), volume, measurements, segments)
    sr_path = folder / "sr.dcm"
    sr.save_as(sr_path)
    return masks, seg_path, sr_path


@pytest.fixture(scope="module")
def xa30_path(test_data_dir: Path) -> Path:
    (path,) = sorted((test_data_dir / "enhanced_multiframe" / "siemens_xa30_t1").glob("*.dcm"))
    return path


def test_enhanced_mr_seg_and_sr(
    xa30_path: Path, segments: tuple[SegmentSpec, ...], dciodvfy: Dciodvfy, tmp_path: Path
) -> None:
    """96-frame Enhanced MR, frames in reverse spatial order, per-frame geometry only."""
    (volume,) = load_volumes([xa30_path])
    assert volume.frames[0] == (0, 96)  # the volume's slice order is not the frame order
    masks, seg_path, sr_path = _seg_and_sr_files(volume, segments, tmp_path)
    for path in (seg_path, sr_path):
        errors, warnings = dciodvfy(path)
        print(f"dciodvfy {path.name} warnings:", *warnings, sep="\n  ")
        assert errors == []
    seg = hd.seg.segread(seg_path)
    _check_frame_references(seg, volume, masks)
    (source,) = volume.datasets
    pixels = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=str(source.SOPInstanceUID),
        source_frame_numbers=[number for _, number in volume.frames],
        segment_numbers=[1, 2, 3],
    )
    np.testing.assert_array_equal(np.moveaxis(pixels.astype(bool), -1, 0), masks)
    sr = hd.sr.srread(sr_path)
    assert sorted(_evidence(sr)) == sorted([str(source.SOPInstanceUID), str(seg.SOPInstanceUID)])
    groups = sr.content.get_volumetric_roi_measurement_groups()
    (volume_m,) = groups[0].get_measurements(name=codes.SCT.Volume)
    assert volume_m.value == pytest.approx(int(masks[0].sum()) * volume.voxel_volume_ml)
    (mean_m,) = groups[0].get_measurements(name=codes.DCM.MRSignalIntensity)
    assert mean_m.value == pytest.approx(float(volume.array[masks[0]].mean(dtype=np.float64)))


def test_seg_on_some_frames_of_an_instance(
    test_data_dir: Path, segments: tuple[SegmentSpec, ...], dciodvfy: Dciodvfy, tmp_path: Path
) -> None:
    """Philips field map: the B0 volume is frames 33-64 of an instance whose frames
    1-32 (magnitude) lie at the same positions; the SEG must name frames 33-64 only."""
    path = test_data_dir / "enhanced_multiframe" / "philips_fieldmap" / "IM_0027_fMAP.dcm"
    magnitude, field = load_volumes([path])
    assert field.key == "real"
    masks = np.stack([field.array > 0.0, field.array > 100.0, np.zeros(field.array.shape, bool)])
    seg = _build_seg(field, masks, segments)
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path)
    errors, _ = dciodvfy(seg_path)
    assert errors == []
    back = hd.seg.segread(seg_path)
    _check_frame_references(back, field, masks)
    numbers = {
        int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for item in back.PerFrameFunctionalGroupsSequence
    }
    assert numbers <= set(range(33, 65))
    measurements = measure_segments(field, masks, segments)
    sr = _build_sr(back, field, measurements, segments)
    sr_path = tmp_path / "sr.dcm"
    sr.save_as(sr_path)
    errors, _ = dciodvfy(sr_path)
    assert errors == []
    assert len(_evidence(sr)) == 2  # the one source instance, once, and the SEG


def test_seg_on_a_stack_spread_over_two_instances(
    xa30_path: Path, segments: tuple[SegmentSpec, ...], dciodvfy: Dciodvfy, tmp_path: Path
) -> None:
    (volume,) = load_volumes(split_multiframe(xa30_path, tmp_path))
    assert len(volume.datasets) == 2
    masks, seg_path, sr_path = _seg_and_sr_files(volume, segments, tmp_path)
    for path in (seg_path, sr_path):
        errors, _ = dciodvfy(path)
        assert errors == []
    _check_frame_references(hd.seg.segread(seg_path), volume, masks)
    evidence = _evidence(hd.sr.srread(sr_path))
    assert len(evidence) == 3 and len(set(evidence)) == 3  # two sources and the SEG


def test_seg_rejects_bad_frame_references(
    xa30_path: Path, segments: tuple[SegmentSpec, ...]
) -> None:
    (volume,) = load_volumes([xa30_path])
    masks = _mr_masks(volume)
    for frames in (
        volume.frames[:-1],  # one slice without a source
        [(0, 97), *volume.frames[1:]],  # no frame 97
        [(1, 1), *volume.frames[1:]],  # no dataset 1
        [volume.frames[1], *volume.frames[1:]],  # one frame used twice
    ):
        bad = dataclasses.replace(volume, frames=frames)
        with pytest.raises(ValueError):
            _build_seg(bad, masks, segments)


def test_source_with_empty_specific_character_set(
    test_data_dir: Path, tmp_path: Path, threshold_masks: Masker, segments: tuple[SegmentSpec, ...],
    dciodvfy: Dciodvfy,
) -> None:
    """dcmqi's three real CT slices carry an empty Specific Character Set (default repertoire)."""
    folder = test_data_dir / "seg_sr" / "dcmqi_ct_liver_seg" / "ct_3slice"
    volume = load_series(sorted(folder.glob("*.dcm")))
    assert volume.datasets[0].SpecificCharacterSet == ""
    masks = threshold_masks(volume)
    seg = _build_seg(volume, masks, segments)
    sr = _build_sr(seg, volume, measure_segments(volume, masks, segments), segments)
    for name, ds in (("seg", seg), ("sr", sr)):
        assert "SpecificCharacterSet" not in ds  # left out: default repertoire
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path)
        errors, _ = dciodvfy(path)
        assert errors == []
