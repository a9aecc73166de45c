"""Secondary Capture overlays with burned-in contours, on real CT and MR series."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from scipy import ndimage

from tests.conftest import missing
from workers.inference.base import Code, SegmentSpec, Volume
from workers.results.overlay_sc import (
    NOT_FOR_DIAGNOSIS,
    build_overlay_sc,
    contours,
    default_window,
    patient_orientation,
    window_to_uint8,
)
from workers.results.uids import result_uid

Dciodvfy = Callable[[Path], tuple[list[str], list[str]]]
Masker = Callable[[Volume], np.ndarray]

MODEL = "radnode-threshold"
VERSION = "1.0.0"
FOUR_NEIGHBOURS = ndimage.generate_binary_structure(2, 1)


def _uid_function(volume: Volume) -> Callable[[int], str]:
    series = str(volume.datasets[0].SeriesInstanceUID)
    return lambda k: result_uid(series, MODEL, VERSION, "overlay-sc", f"instance-{k + 1}")


def _series_uid(volume: Volume) -> str:
    series = str(volume.datasets[0].SeriesInstanceUID)
    return result_uid(series, MODEL, VERSION, "overlay-sc", "series")


def _build(
    volume: Volume, masks: np.ndarray, segments: tuple[SegmentSpec, ...], **kw: object
) -> list[Dataset]:
    options: dict[str, object] = {
        "series_instance_uid": _series_uid(volume),
        "sop_instance_uids": _uid_function(volume),
        "algorithm_name": MODEL,
        "algorithm_version": VERSION,
        **kw,
    }
    return build_overlay_sc(volume, masks, segments, **options)  # type: ignore[arg-type]


def _expected_grey(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 linear VOI function, written out case by case."""
    x = values.astype(np.float64)
    low = center - 0.5 - (width - 1) / 2
    high = center - 0.5 + (width - 1) / 2
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    y = np.where(x <= low, 0.0, np.where(x > high, 255.0, y))
    return np.rint(y).astype(np.uint8)


def _edge(mask: np.ndarray) -> np.ndarray:
    """Independent contour: mask minus its 4-neighbour erosion, outside = background."""
    eroded: np.ndarray = ndimage.binary_erosion(mask, FOUR_NEIGHBOURS, border_value=0)
    edge: np.ndarray = mask & ~eroded
    return edge


def _safe(lines: list[str]) -> list[str]:
    """dciodvfy lines without person names (they quote Patient's Name values)."""
    return [line for line in lines if " PN " not in line]


# ------------------------------------------------------------- full CT series


@pytest.fixture(scope="module")
def ct_overlay(
    pancreas_volume: Volume, threshold_masks: Masker, segments: tuple[SegmentSpec, ...]
) -> tuple[list[Dataset], np.ndarray, float]:
    masks = threshold_masks(pancreas_volume)
    start = time.perf_counter()
    images = _build(pancreas_volume, masks, segments)
    seconds = time.perf_counter() - start
    print(f"\nbuild_overlay_sc: {len(images)} slices of 512x512, {seconds:.2f} s")
    return images, masks, seconds


def test_ct_series_count_uids_and_speed(
    ct_overlay: tuple[list[Dataset], np.ndarray, float], pancreas_volume: Volume
) -> None:
    images, _, seconds = ct_overlay
    assert len(images) == 134
    source = pancreas_volume.datasets[0]
    uid_of = _uid_function(pancreas_volume)
    assert [ds.SOPInstanceUID for ds in images] == [uid_of(k) for k in range(134)]
    assert len({ds.SOPInstanceUID for ds in images}) == 134
    assert {ds.SeriesInstanceUID for ds in images} == {_series_uid(pancreas_volume)}
    assert _series_uid(pancreas_volume) != source.SeriesInstanceUID
    assert {ds.StudyInstanceUID for ds in images} == {source.StudyInstanceUID}
    assert [int(ds.InstanceNumber) for ds in images] == list(range(1, 135))
    # About 1.5 s on 2 busy cores; the bound only catches a pathological slowdown.
    assert seconds < 15.0


def test_ct_header(
    ct_overlay: tuple[list[Dataset], np.ndarray, float], pancreas_volume: Volume
) -> None:
    images, _, _ = ct_overlay
    for k in (0, 67, 133):
        ds = images[k]
        src = pancreas_volume.datasets[k]
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.Modality == "OT"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.BurnedInAnnotation == "YES"
        assert ds.ConversionType == "WSD"
        assert (ds.Rows, ds.Columns, ds.SamplesPerPixel) == (512, 512, 3)
        assert ds.PhotometricInterpretation == "RGB" and ds.BitsAllocated == 8
        assert NOT_FOR_DIAGNOSIS in ds.SeriesDescription and len(ds.SeriesDescription) <= 64
        assert NOT_FOR_DIAGNOSIS in ds.DerivationDescription
        assert "Derived" in ds.DerivationDescription and MODEL in ds.DerivationDescription
        assert ds.DerivationCodeSequence[0].CodeValue == "113076"
        # Patient and study are the source's.
        for keyword in ("PatientName", "PatientID", "PatientSex", "StudyDate", "StudyTime"):
            assert ds.get(keyword) == src.get(keyword), keyword
        assert ds.AccessionNumber == src.get("AccessionNumber", "")
        assert ds.SpecificCharacterSet == src.SpecificCharacterSet
        # Source Image Sequence names slice k's own source instance.
        (ref,) = ds.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == src.SOPClassUID
        assert "ReferencedFrameNumber" not in ref
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert ref.SpatialLocationsPreserved == "YES"
        # Geometry: pixel spacing kept, axial orientation; no Image Plane
        # Module or Frame of Reference in the SC IOD.
        assert [float(v) for v in ds.PixelSpacing] == [float(v) for v in src.PixelSpacing]
        assert list(ds.PatientOrientation) == ["L", "P"]
        for absent in ("ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID"):
            assert absent not in ds
        models = [item.get("ManufacturerModelName") for item in ds.ContributingEquipmentSequence]
        assert MODEL in models


def test_ct_contours_and_interior(
    ct_overlay: tuple[list[Dataset], np.ndarray, float],
    pancreas_volume: Volume,
    segments: tuple[SegmentSpec, ...],
) -> None:
    images, masks, _ = ct_overlay
    center, width = default_window(pancreas_volume)
    assert (center, width) == (40.0, 400.0)
    for k in (10, 60, 110):
        rgb = images[k].pixel_array
        assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
        grey = _expected_grey(pancreas_volume.array[k], center, width)
        edges = [_edge(masks[s, k]) for s in range(len(segments))]
        drawn = np.zeros((512, 512), dtype=bool)
        # Segments are drawn in order: the last one wins where contours meet.
        for s in reversed(range(len(segments))):
            own = edges[s] & ~drawn
            assert (rgb[own] == np.array(segments[s].rgb, dtype=np.uint8)).all()
            drawn |= edges[s]
        assert drawn.sum() > 1000  # body and bone outlines are there
        assert not edges[2].any()  # the empty segment draws nothing
        # Everything else, the masks' interiors included, is the windowed
        # source, unchanged and grey (R = G = B).
        rest = ~drawn
        assert (masks[0, k] & rest).sum() > 50_000  # body interior is checked
        for channel in range(3):
            np.testing.assert_array_equal(rgb[..., channel][rest], grey[rest])


def test_ct_passes_dciodvfy(
    ct_overlay: tuple[list[Dataset], np.ndarray, float], dciodvfy: Dciodvfy, tmp_path: Path
) -> None:
    images, _, _ = ct_overlay
    for k in (0, 67):
        path = tmp_path / f"sc_{k}.dcm"
        images[k].save_as(path)
        errors, warnings = dciodvfy(path)
        print(f"dciodvfy SC slice {k} warnings:", *_safe(warnings), sep="\n  ")
        assert errors == []
        back = pydicom.dcmread(path)
        np.testing.assert_array_equal(back.pixel_array, images[k].pixel_array)


# -------------------------------------------------------------------- options


def test_same_inputs_same_output(
    small_volume: Volume, threshold_masks: Masker, segments: tuple[SegmentSpec, ...]
) -> None:
    masks = threshold_masks(small_volume)
    a = _build(small_volume, masks, segments)
    b = _build(small_volume, masks, segments)
    assert [ds.SOPInstanceUID for ds in a] == [ds.SOPInstanceUID for ds in b]
    assert all(x.PixelData == y.PixelData for x, y in zip(a, b, strict=True))


def test_explicit_uids_window_and_width(
    small_volume: Volume, threshold_masks: Masker, segments: tuple[SegmentSpec, ...]
) -> None:
    masks = threshold_masks(small_volume)
    uids = [f"1.2.826.0.1.3680043.8.498.1.{k + 1}" for k in range(12)]
    images = build_overlay_sc(
        small_volume,
        masks,
        segments,
        series_instance_uid="1.2.826.0.1.3680043.8.498.1",
        sop_instance_uids=uids,
        algorithm_name=MODEL,
        algorithm_version=VERSION,
        window=(400.0, 1800.0),
        contour_width=2,
        series_description="Bone check",
    )
    assert [ds.SOPInstanceUID for ds in images] == uids
    assert images[0].SeriesDescription == f"Bone check - {NOT_FOR_DIAGNOSIS}"
    rgb = images[5].pixel_array
    body = masks[0, 5]
    two_wide = body & ~ndimage.binary_erosion(body, FOUR_NEIGHBOURS, iterations=2, border_value=0)
    bone_edge = contours(masks[1, 5], 2)
    only_body = two_wide & ~bone_edge
    assert (rgb[only_body] == np.array(segments[0].rgb, dtype=np.uint8)).all()
    inside = body & ~two_wide & ~bone_edge & ~masks[1, 5]
    grey = _expected_grey(small_volume.array[5], 400.0, 1800.0)
    np.testing.assert_array_equal(rgb[..., 1][inside], grey[inside])


def test_rejects_bad_input(
    small_volume: Volume, threshold_masks: Masker, segments: tuple[SegmentSpec, ...]
) -> None:
    masks = threshold_masks(small_volume)
    uids = [f"1.2.{k + 1}" for k in range(12)]
    with pytest.raises(ValueError):  # one UID short
        _build(small_volume, masks, segments, sop_instance_uids=uids[:-1])
    with pytest.raises(ValueError):  # repeated UIDs
        _build(small_volume, masks, segments, sop_instance_uids=lambda k: "1.2")
    with pytest.raises(ValueError):  # window width below 1
        _build(small_volume, masks, segments, window=(0.0, 0.5))
    with pytest.raises(ValueError):  # masks do not match the volume
        _build(small_volume, masks[:, :-1], segments)
    with pytest.raises(ValueError):  # no contour
        _build(small_volume, masks, segments, contour_width=0)


def test_contours_and_window_helpers() -> None:
    square = np.zeros((1, 8, 8), dtype=bool)
    square[0, 2:6, 2:6] = True
    ring = contours(square)
    assert ring.sum() == 12 and not ring[0, 3:5, 3:5].any()
    assert contours(square, 2).sum() == 16
    full = np.ones((5, 5), dtype=bool)  # cut by the image border: outline on the border
    assert contours(full).sum() == 16
    values = np.array([-1000.0, -160.0, -159.0, 40.0, 239.0, 240.0, 3000.0, np.nan])
    np.testing.assert_array_equal(
        window_to_uint8(values, 40.0, 400.0)[:-1], _expected_grey(values[:-1], 40.0, 400.0)
    )
    assert window_to_uint8(values, 40.0, 400.0)[-1] == 0
    with pytest.raises(ValueError):
        window_to_uint8(values, 40.0, 0.0)


# ------------------------------------------------------------------------ MR


def _load(paths: list[Path]) -> Volume:
    datasets: list[Dataset] = [pydicom.dcmread(p) for p in paths]
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda ds: float(normal @ np.array(ds.ImagePositionPatient, dtype=float)))
    positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=np.float64)
    rs, cs = (float(v) for v in datasets[0].PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = (positions[-1] - positions[0]) / (len(datasets) - 1)
    affine[:3, 1] = iop[3:] * rs
    affine[:3, 2] = iop[:3] * cs
    affine[:3, 3] = positions[0]
    return Volume(
        array=np.stack([ds.pixel_array for ds in datasets]).astype(np.float32),
        spacing=(float(affine[:3, 0] @ normal), rs, cs),
        affine=affine,
        datasets=datasets,
        modality="MR",
    )


MR_SEGMENT = (
    SegmentSpec(
        "bright",
        Code("91723000", "SCT", "Anatomical Structure"),
        Code("38266002", "SCT", "Entire body"),
        (255, 255, 0),
    ),
)


def test_mr_sagittal_head(test_data_dir: Path, dciodvfy: Dciodvfy, tmp_path: Path) -> None:
    files = sorted((test_data_dir / "mr_head_siemens_t1_sag").glob("*.dcm"))
    if len(files) != 35:
        missing("mr_head_siemens_t1_sag should hold 35 files")
    volume = _load(files)
    center, width = default_window(volume)
    # Percentile window: from the air (~0) to the brightest fat (~1500).
    assert -1.0 <= center - width / 2 < 50.0 and 1000.0 < center + width / 2 < 2000.0
    # Sagittal: rows run posterior, columns run to the feet.
    assert patient_orientation(volume) == ("P", "F")
    masks = (volume.array > 0.3 * (center + width / 2))[np.newaxis]
    images = _build(volume, masks, MR_SEGMENT)
    assert len(images) == 35 and list(images[0].PatientOrientation) == ["P", "F"]
    path = tmp_path / "mr_sc.dcm"
    images[17].save_as(path)
    errors, warnings = dciodvfy(path)
    print("dciodvfy SC (MR) warnings:", *_safe(warnings), sep="\n  ")
    assert errors == []
    rgb = images[17].pixel_array
    edge = _edge(masks[0, 17])
    assert edge.any() and (rgb[edge] == np.array([255, 255, 0], dtype=np.uint8)).all()


def test_multiframe_source(test_data_dir: Path, dciodvfy: Dciodvfy, tmp_path: Path) -> None:
    path = test_data_dir / "enhanced_multiframe" / "siemens_xa10_bold" / "6_2.dcm"
    if not path.exists():
        missing(f"{path} not found")
    ds = pydicom.dcmread(path)
    frames = ds.PerFrameFunctionalGroupsSequence
    first = frames[0]
    iop = np.array(first.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=np.float64)
    rs, cs = (float(v) for v in first.PixelMeasuresSequence[0].PixelSpacing)
    positions = np.array(
        [f.PlanePositionSequence[0].ImagePositionPatient for f in frames], dtype=np.float64
    )
    affine = np.eye(4)
    affine[:3, 0] = (positions[-1] - positions[0]) / (len(frames) - 1)
    affine[:3, 1] = iop[3:] * rs
    affine[:3, 2] = iop[:3] * cs
    affine[:3, 3] = positions[0]
    # Slices in reverse frame order, to check that frame numbers follow the slices.
    order = list(range(len(frames)))[::-1]
    volume = Volume(
        array=ds.pixel_array[order].astype(np.float32),
        spacing=(float(np.linalg.norm(affine[:3, 0])), rs, cs),
        affine=affine,
        datasets=[ds],
        modality="MR",
        frames=[(0, k + 1) for k in order],
    )
    masks = (volume.array > np.percentile(volume.array, 60))[np.newaxis]
    images = _build(volume, masks, MR_SEGMENT)
    assert len(images) == 6
    for image, k in zip(images, order, strict=True):
        (ref,) = image.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == ds.SOPInstanceUID
        assert int(ref.ReferencedFrameNumber) == k + 1
    out = tmp_path / "mf_sc.dcm"
    images[0].save_as(out)
    errors, warnings = dciodvfy(out)
    print("dciodvfy SC (multi-frame MR source) warnings:", *_safe(warnings), sep="\n  ")
    assert errors == []
