"""Volume loading: synthetic series made in code, then the real files in shared/data."""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.unit.dicom_factory import split_multiframe
from workers.inference.base import Volume
from workers.inference.volume import VolumeError, decode_frames, load_series, load_volumes

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
KEY_PATTERN = re.compile(r"^[a-z0-9_-]*$")

ROWS, COLUMNS = 4, 6  # deliberately not square: a transposed array would show
PIXEL_SPACING = (0.8, 0.6)  # (row spacing, column spacing), deliberately unequal
SERIES_UID = generate_uid(entropy_srcs=["radnode-test-volume-series"])
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # normal +z
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # normal = row x col = +y
OBLIQUE = (1.0, 0.0, 0.0, 0.0, 0.8, -0.6)  # normal (0, 0.6, 0.8)


def _slice(
    index: int,
    ipp: Sequence[float] | np.ndarray,
    *,
    iop: Sequence[float] = AXIAL,
    instance_number: int = 1,
    slope: float = 2.0,
    intercept: float = -1000.0,
    rows: int = ROWS,
    series_uid: str = SERIES_UID,
) -> Dataset:
    """A minimal CT slice whose stored values are ``index * 100 + pixel number``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = "SECRET^PATIENT"
    ds.PatientID = "SECRET-ID"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance_number
    ds.ImageOrientationPatient = [f"{v:g}" for v in iop]
    ds.ImagePositionPatient = [f"{v:g}" for v in ipp]
    ds.PixelSpacing = [f"{v:g}" for v in PIXEL_SPACING]
    ds.SliceThickness = "2"
    ds.Rows, ds.Columns = rows, COLUMNS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    stored = (index * 100 + np.arange(rows * COLUMNS)).astype(np.uint16).reshape(rows, COLUMNS)
    ds.PixelData = stored.tobytes()
    return ds


def _write(tmp_path: Path, datasets: Sequence[Dataset]) -> list[Path]:
    """Write with names unrelated to position; return the paths in a shuffled order."""
    paths = []
    for ds in datasets:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    order = np.random.default_rng(7).permutation(len(paths))
    return [paths[i] for i in order]


def _stack(
    tmp_path: Path, iop: Sequence[float], positions_mm: Sequence[float], **kwargs: Any
) -> list[Path]:
    """Slices at ``positions_mm`` along the normal of ``iop``; slice ``k`` stores k*100+...

    Instance Numbers run in REVERSE position order, so neither Instance Number
    nor file name nor list order give the right order.
    """
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([-10.0, 20.0, 30.0])
    n = len(positions_mm)
    datasets = [
        _slice(k, origin + p * normal, iop=iop, instance_number=n - k, **kwargs)
        for k, p in enumerate(positions_mm)
    ]
    return _write(tmp_path, datasets)


def _expected_hu(index: int, slope: float = 2.0, intercept: float = -1000.0) -> np.ndarray:
    stored = index * 100 + np.arange(ROWS * COLUMNS).reshape(ROWS, COLUMNS)
    return (stored * slope + intercept).astype(np.float32)


@pytest.mark.parametrize("iop", [AXIAL, CORONAL, OBLIQUE], ids=["axial", "coronal", "oblique"])
def test_slices_sorted_by_position_along_normal(tmp_path: Path, iop: Sequence[float]) -> None:
    positions = [0.0, 2.5, 5.0, 7.5, 10.0]
    volume = load_series(_stack(tmp_path, iop, positions))

    assert volume.array.shape == (5, ROWS, COLUMNS)
    assert volume.array.dtype == np.float32
    for k in range(5):
        np.testing.assert_array_equal(volume.array[k], _expected_hu(k))
    assert [int(ds.InstanceNumber) for ds in volume.datasets] == [5, 4, 3, 2, 1]
    assert volume.modality == "CT"


def test_rescale_applied_per_slice(tmp_path: Path) -> None:
    iop = AXIAL
    datasets = [
        _slice(0, (0, 0, 0), iop=iop, slope=2.0, intercept=-1000.0),
        _slice(1, (0, 0, 3), iop=iop, slope=1.0, intercept=-1024.0),
        _slice(2, (0, 0, 6), iop=iop, slope=0.5, intercept=10.0),
    ]
    volume = load_series(_write(tmp_path, datasets))
    np.testing.assert_array_equal(volume.array[0], _expected_hu(0, 2.0, -1000.0))
    np.testing.assert_array_equal(volume.array[1], _expected_hu(1, 1.0, -1024.0))
    np.testing.assert_array_equal(volume.array[2], _expected_hu(2, 0.5, 10.0))
    assert volume.array[0, 0, 0] == -1000.0  # stored 0 * 2 - 1000


@pytest.mark.parametrize("iop", [AXIAL, CORONAL, OBLIQUE], ids=["axial", "coronal", "oblique"])
def test_spacing_and_affine(tmp_path: Path, iop: Sequence[float]) -> None:
    volume = load_series(_stack(tmp_path, iop, [0.0, 2.5, 5.0, 7.5]))
    assert volume.spacing == pytest.approx((2.5, 0.8, 0.6))
    assert volume.voxel_volume_ml == pytest.approx(2.5 * 0.8 * 0.6 / 1000)

    row_cos, col_cos = np.array(iop[:3]), np.array(iop[3:])
    for k, ds in enumerate(volume.datasets):
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose(volume.affine @ [k, 0, 0, 1], [*ipp, 1.0], atol=1e-6)
        # row index r moves along the column direction by the row spacing,
        # column index c along the row direction by the column spacing (PS3.3 C.7.6.2.1.1)
        expected = ipp + 3 * col_cos * 0.8 + 5 * row_cos * 0.6
        np.testing.assert_allclose(volume.affine @ [k, 3, 5, 1], [*expected, 1.0], atol=1e-6)
    np.testing.assert_array_equal(volume.affine[3], [0, 0, 0, 1])


def test_tilted_stack_affine_follows_slice_origins(tmp_path: Path) -> None:
    # Gantry tilt: slice origins step along z while the image plane is tilted,
    # so the step between origins is not parallel to the normal.
    iop = OBLIQUE
    ipps = [(0.0, 0.0, 5.0 * k) for k in range(4)]
    datasets = [_slice(k, ipp, iop=iop) for k, ipp in enumerate(ipps)]
    volume = load_series(_write(tmp_path, datasets))
    assert volume.spacing[0] == pytest.approx(5.0 * 0.8)  # distance along normal (0, .6, .8)
    for k in range(4):
        np.testing.assert_allclose(volume.affine @ [k, 0, 0, 1], [*ipps[k], 1.0], atol=1e-6)


def test_non_uniform_gaps_warn_with_series_uid_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="workers.inference.volume"):
        volume = load_series(_stack(tmp_path, AXIAL, [0.0, 2.0, 4.0, 9.0, 11.0]))
    assert volume.spacing[0] == pytest.approx(2.0)  # median of 2, 2, 5, 2
    assert volume.array.shape[0] == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert SERIES_UID in warnings[0]
    assert "SECRET" not in warnings[0]


def test_uniform_gaps_do_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="workers.inference.volume"):
        load_series(_stack(tmp_path, AXIAL, [0.0, 2.0, 4.0, 6.0]))
    assert not caplog.records


def test_single_slice_uses_slice_thickness(tmp_path: Path) -> None:
    volume = load_series(_write(tmp_path, [_slice(0, (0, 0, 0))]))
    assert volume.array.shape == (1, ROWS, COLUMNS)
    assert volume.spacing == pytest.approx((2.0, 0.8, 0.6))


def test_no_files() -> None:
    with pytest.raises(VolumeError, match="no files"):
        load_series([])
    assert issubclass(VolumeError, ValueError)


def test_mixed_orientation(tmp_path: Path) -> None:
    datasets = [_slice(0, (0, 0, 0)), _slice(1, (0, 0, 2), iop=OBLIQUE)]
    with pytest.raises(VolumeError, match="Orientation"):
        load_series(_write(tmp_path, datasets))


def test_mismatched_rows(tmp_path: Path) -> None:
    datasets = [_slice(0, (0, 0, 0)), _slice(1, (0, 0, 2), rows=ROWS + 1)]
    with pytest.raises(VolumeError, match="matrix sizes"):
        load_series(_write(tmp_path, datasets))


def test_duplicate_positions(tmp_path: Path) -> None:
    datasets = [_slice(0, (0, 0, 0)), _slice(1, (0, 0, 2)), _slice(2, (0, 0, 2))]
    with pytest.raises(VolumeError, match="same position"):
        load_series(_write(tmp_path, datasets))


@pytest.mark.parametrize(
    "keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"]
)
def test_missing_geometry(tmp_path: Path, keyword: str) -> None:
    datasets = [_slice(0, (0, 0, 0)), _slice(1, (0, 0, 2))]
    delattr(datasets[1], keyword)
    with pytest.raises(VolumeError, match=keyword):
        load_series(_write(tmp_path, datasets))


def test_multiple_series(tmp_path: Path) -> None:
    other = generate_uid()
    datasets = [_slice(0, (0, 0, 0)), _slice(1, (0, 0, 2), series_uid=other)]
    with pytest.raises(VolumeError, match="one Series Instance UID, found 2"):
        load_series(_write(tmp_path, datasets))


def test_multiframe_without_functional_groups_rejected(tmp_path: Path) -> None:
    # Two frames but one Image Position (Patient): the frames cannot be placed.
    ds = _slice(0, (0, 0, 0))
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    with pytest.raises(VolumeError, match="multi-frame instance without a Per-frame"):
        load_series(_write(tmp_path, [ds]))


def test_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"not a DICOM file")
    with pytest.raises(VolumeError, match="junk.dcm"):
        load_series([path])


def test_datasets_accepted_instead_of_paths(tmp_path: Path) -> None:
    paths = _stack(tmp_path, OBLIQUE, [0.0, 2.0, 4.0])
    from_files = load_series(paths)
    from_datasets = load_series([pydicom.dcmread(p) for p in paths])
    np.testing.assert_array_equal(from_datasets.array, from_files.array)
    np.testing.assert_array_equal(from_datasets.affine, from_files.affine)
    assert from_files.frames == [(0, 1), (1, 1), (2, 1)]


def test_garbage_collector_state_restored(tmp_path: Path) -> None:
    paths = _stack(tmp_path, AXIAL, [0.0, 2.0])
    assert gc.isenabled()
    load_series(paths)
    assert gc.isenabled()
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not DICOM")
    with pytest.raises(VolumeError):
        load_series([*paths, junk])
    assert gc.isenabled()
    gc.disable()
    try:
        load_series(paths)
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()


def test_unused_high_bits_are_ignored(tmp_path: Path) -> None:
    # 12 bits stored in 16: some scanners put overlay bits in the top 4 (PS3.5 8.1.1).
    ds = _slice(0, (0, 0, 0), slope=1.0, intercept=0.0)
    ds.BitsStored, ds.HighBit = 12, 11
    stored = (np.arange(ROWS * COLUMNS) * 170).astype(np.uint16).reshape(ROWS, COLUMNS)
    dirty = stored.copy()
    dirty[1, :3] |= 0xF000
    ds.PixelData = dirty.tobytes()
    volume = load_series(_write(tmp_path, [ds]))
    np.testing.assert_array_equal(volume.array[0], stored.astype(np.float32))


@pytest.mark.parametrize("sign_extended", [True, False], ids=["sign-extended", "not-extended"])
def test_signed_12_bit_values(tmp_path: Path, sign_extended: bool) -> None:
    ds = _slice(0, (0, 0, 0), slope=1.0, intercept=0.0)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 1
    values = np.linspace(-2048, 2047, ROWS * COLUMNS).astype(np.int16).reshape(ROWS, COLUMNS)
    raw = values if sign_extended else (values.view(np.uint16) & 0x0FFF).view(np.int16)
    ds.PixelData = raw.tobytes()
    volume = load_series(_write(tmp_path, [ds]))
    np.testing.assert_array_equal(volume.array[0], values.astype(np.float32))


@pytest.mark.parametrize("dirty", [False, True], ids=["clean", "overlay-bits"])
def test_large_slices_read_from_disk(tmp_path: Path, dirty: bool) -> None:
    # Pixel Data over 64 KiB is left on disk by the reader and read into a
    # reused buffer: every slice must still get its own values.
    size = 200  # 200 x 200 x 2 bytes = 80 000 bytes
    datasets, expected = [], []
    for k in range(3):
        ds = _slice(k, (0.0, 0.0, 2.0 * k), slope=1.0, intercept=-1024.0)
        ds.Rows = ds.Columns = size
        ds.BitsStored, ds.HighBit = 12, 11
        stored = ((np.arange(size * size) * (k + 1)) % 4096).astype(np.uint16)
        stored = stored.reshape(size, size)
        written = stored | 0x8000 if dirty and k == 1 else stored
        ds.PixelData = written.tobytes()
        datasets.append(ds)
        expected.append(stored.astype(np.float32) - 1024.0)
    volume = load_series(_write(tmp_path, datasets))
    for k in range(3):
        np.testing.assert_array_equal(volume.array[k], expected[k])
        element = volume.datasets[k].get_item(0x7FE00010, keep_deferred=True)
        assert element.value is None or (dirty and k == 1)  # left on disk unless re-read


# --- series that hold several volumes (single-frame images) ----------------------------


def _mr_slice(index: int, z: float, **attributes: Any) -> Dataset:
    ds = _slice(index, (0.0, 0.0, z))
    ds.Modality = "MR"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_echoes_and_magnitude_phase_split(tmp_path: Path) -> None:
    datasets = []
    for z in (0.0, 3.0, 6.0):
        for echo in (1, 2):
            for component in ("M", "P"):
                index = len(datasets)
                image_type = ["ORIGINAL", "PRIMARY", component, "ND"]
                datasets.append(_mr_slice(index, z, EchoNumbers=echo, ImageType=image_type))
    volumes = load_volumes(_write(tmp_path, datasets))
    assert [v.key for v in volumes] == [
        "echo1-magnitude",
        "echo1-phase",
        "echo2-magnitude",
        "echo2-phase",
    ]
    for volume in volumes:
        echo, component = volume.key.split("-")
        assert volume.array.shape == (3, ROWS, COLUMNS)
        assert volume.spacing == pytest.approx((3.0, 0.8, 0.6))
        assert {f"echo{ds.EchoNumbers}" for ds in volume.datasets} == {echo}
        assert {ds.ImageType[2] for ds in volume.datasets} == {component[0].upper()}
        for k, ds in enumerate(volume.datasets):
            assert float(ds.ImagePositionPatient[2]) == 3.0 * k
            index = [d.SOPInstanceUID for d in datasets].index(ds.SOPInstanceUID)
            np.testing.assert_array_equal(volume.array[k], _expected_hu(index))
    with pytest.raises(VolumeError, match=r"4 volumes \(echo1-magnitude.*load_volumes"):
        load_series(_write(tmp_path, datasets))


@pytest.mark.parametrize(
    ("keyword", "values", "keys"),
    [
        ("TemporalPositionIdentifier", (1, 2), ["volume1", "volume2"]),
        ("AcquisitionNumber", (5, 7), ["acq5", "acq7"]),
        ("EchoTime", (30.0, 9.5), ["echo1", "echo2"]),  # ranked by echo time
    ],
)
def test_split_by_one_attribute(
    tmp_path: Path, keyword: str, values: tuple[Any, Any], keys: list[str]
) -> None:
    datasets = [
        _mr_slice(2 * k + j, 2.0 * k, **{keyword: value})
        for k in range(3)
        for j, value in enumerate(values)
    ]
    volumes = load_volumes(_write(tmp_path, datasets))
    assert [v.key for v in volumes] == keys
    ordered = sorted(values, key=float) if keyword == "EchoTime" else list(values)
    for volume, value in zip(volumes, ordered, strict=True):
        assert {float(ds.get(keyword)) for ds in volume.datasets} == {float(value)}
        assert volume.array.shape == (3, ROWS, COLUMNS)
        assert KEY_PATTERN.match(volume.key)


def test_no_split_when_positions_do_not_repeat(tmp_path: Path) -> None:
    # Per-slice Acquisition Numbers and mixed Image Types are common in one
    # stack (e.g. CT acquired in several rotations): still one volume.
    datasets = [_slice(k, (0.0, 0.0, 2.0 * k)) for k in range(4)]
    for k, ds in enumerate(datasets):
        ds.AcquisitionNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if k % 2 else ["DERIVED", "SECONDARY"]
        ds.EchoNumbers = k + 1
    (volume,) = load_volumes(_write(tmp_path, datasets))
    assert volume.key == ""
    assert volume.array.shape == (4, ROWS, COLUMNS)


# --- enhanced multi-frame (synthetic) --------------------------------------------------


def _item(**elements: Any) -> Dataset:
    item = Dataset()
    for keyword, value in elements.items():
        setattr(item, keyword, value)
    return item


def _enhanced(
    frames: Sequence[dict[str, Any]],
    *,
    shared_geometry: bool = True,
    series_uid: str = SERIES_UID,
    instance_number: int = 1,
) -> Dataset:
    """An Enhanced CT instance whose frame ``k`` stores ``value * 100 + pixel number``.

    Each frame: ``ipp`` and ``value``, optionally ``iop`` (AXIAL), ``slope`` (2),
    ``intercept`` (-1000), ``stack`` and ``temporal``. With ``shared_geometry``
    orientation, pixel measures and rescale go into the Shared Functional
    Groups (they must then be equal for all frames), else into every frame.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ENHANCED_CT
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID = "SECRET^PATIENT", "SECRET-ID"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance_number
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0

    def geometry(frame: dict[str, Any]) -> dict[str, Any]:
        return {
            "PlaneOrientationSequence": [
                _item(ImageOrientationPatient=list(frame.get("iop", AXIAL)))
            ],
            "PixelMeasuresSequence": [
                _item(PixelSpacing=list(PIXEL_SPACING), SliceThickness=2.0)
            ],
            "PixelValueTransformationSequence": [
                _item(
                    RescaleSlope=frame.get("slope", 2.0),
                    RescaleIntercept=frame.get("intercept", -1000.0),
                    RescaleType="HU",
                )
            ],
        }

    if shared_geometry:
        ds.SharedFunctionalGroupsSequence = [_item(**geometry(frames[0]))]
    per_frame = []
    pixels = []
    for number, frame in enumerate(frames, start=1):
        content = _item(FrameAcquisitionNumber=1, InStackPositionNumber=number)
        if "stack" in frame:
            content.StackID = frame["stack"]
        if "temporal" in frame:
            content.TemporalPositionIndex = frame["temporal"]
        item = _item(
            FrameContentSequence=[content],
            PlanePositionSequence=[_item(ImagePositionPatient=list(frame["ipp"]))],
            **({} if shared_geometry else geometry(frame)),
        )
        per_frame.append(item)
        stored = frame["value"] * 100 + np.arange(ROWS * COLUMNS)
        pixels.append(stored.astype(np.uint16).reshape(ROWS, COLUMNS))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.stack(pixels).tobytes()
    return ds


@pytest.mark.parametrize("shared", [True, False], ids=["shared-groups", "per-frame-groups"])
def test_enhanced_frames_sorted_and_rescaled(tmp_path: Path, shared: bool) -> None:
    positions = [5.0, 0.0, 10.0, 7.5, 2.5]  # frame order is not spatial order
    slopes = [2.0] * 5 if shared else [2.0, 1.0, 0.5, 1.0, 2.0]
    intercepts = [-1000.0] * 5 if shared else [-1000.0, -1024.0, 10.0, 0.0, -1000.0]
    origin = np.array([-10.0, 20.0, 30.0])
    frames = [
        {"ipp": origin + [0, 0, z], "value": k, "slope": slopes[k], "intercept": intercepts[k]}
        for k, z in enumerate(positions)
    ]
    (volume,) = load_volumes(_write(tmp_path, [_enhanced(frames, shared_geometry=shared)]))
    order = [int(i) for i in np.argsort(positions)]
    assert volume.key == ""
    assert len(volume.datasets) == 1
    assert volume.frames == [(0, i + 1) for i in order]
    assert volume.slice_frames == volume.frames
    assert volume.spacing == pytest.approx((2.5, 0.8, 0.6))
    for k, i in enumerate(order):
        np.testing.assert_array_equal(volume.array[k], _expected_hu(i, slopes[i], intercepts[i]))
        np.testing.assert_allclose(
            volume.affine @ [k, 2, 3, 1], [*(frames[i]["ipp"] + [3 * 0.6, 2 * 0.8, 0]), 1]
        )


def test_enhanced_stacks_split(tmp_path: Path) -> None:
    frames = [{"ipp": (0.0, 0.0, 2.0 * k), "value": k, "stack": "1"} for k in range(3)] + [
        {"ipp": (0.0, 2.0 * k, 0.0), "iop": CORONAL, "value": 10 + k, "stack": "2"}
        for k in range(3)
    ]
    volumes = load_volumes(_write(tmp_path, [_enhanced(frames, shared_geometry=False)]))
    assert [v.key for v in volumes] == ["stack1", "stack2"]
    axial, coronal = volumes
    assert axial.frames == [(0, 1), (0, 2), (0, 3)]
    assert coronal.frames == [(0, 4), (0, 5), (0, 6)]
    np.testing.assert_allclose(axial.affine[:3, 0], [0, 0, 2])
    np.testing.assert_allclose(coronal.affine[:3, 0], [0, 2, 0])  # normal of CORONAL is +y
    np.testing.assert_array_equal(coronal.array[1], _expected_hu(11))


def test_enhanced_series_split_across_files_by_time(tmp_path: Path) -> None:
    instances = [
        _enhanced(
            [{"ipp": (0.0, 0.0, 2.0 * k), "value": 10 * t + k, "temporal": t} for k in range(4)],
            instance_number=t,
        )
        for t in (1, 2, 3)
    ]
    volumes = load_volumes(_write(tmp_path, instances))
    assert [v.key for v in volumes] == ["volume1", "volume2", "volume3"]
    for t, volume in enumerate(volumes, start=1):
        assert [int(ds.InstanceNumber) for ds in volume.datasets] == [t]
        assert volume.frames == [(0, 1), (0, 2), (0, 3), (0, 4)]
        np.testing.assert_array_equal(volume.array[2], _expected_hu(10 * t + 2))
    with pytest.raises(VolumeError, match="3 volumes"):
        load_series(_write(tmp_path, instances))


def test_enhanced_stack_split_across_files(tmp_path: Path) -> None:
    # One stack whose frames are spread over two instances, interleaved in space.
    first = _enhanced([{"ipp": (0.0, 0.0, z), "value": int(z)} for z in (0.0, 4.0)])
    second = _enhanced([{"ipp": (0.0, 0.0, z), "value": int(z)} for z in (2.0, 6.0)])
    (volume,) = load_volumes(_write(tmp_path, [second, first]))
    assert [ds.SOPInstanceUID for ds in volume.datasets] == [
        first.SOPInstanceUID,
        second.SOPInstanceUID,
    ]
    assert volume.frames == [(0, 1), (1, 1), (0, 2), (1, 2)]
    assert volume.spacing[0] == pytest.approx(2.0)
    for k in range(4):
        np.testing.assert_array_equal(volume.array[k], _expected_hu(2 * k))


def test_enhanced_frame_without_position(tmp_path: Path) -> None:
    ds = _enhanced([{"ipp": (0.0, 0.0, 2.0 * k), "value": k} for k in range(3)])
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    with pytest.raises(VolumeError, match="frame 2 lacks PlanePositionSequence"):
        load_volumes(_write(tmp_path, [ds]))


# --- real data -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pancreas_ct(ct_series_dir: Path) -> Volume:
    return load_series(sorted(ct_series_dir.glob("*.dcm")))


def test_real_ct_geometry(pancreas_ct: Volume) -> None:
    volume = pancreas_ct
    assert volume.array.shape == (134, 512, 512)
    assert volume.modality == "CT"
    assert volume.spacing == pytest.approx((3.0, 1.07421875, 1.07421875))
    # Instance 1 is the most superior slice (z = 484.91): sorted by position the
    # first slice is instance 134 at z = 85.91, and z rises 3 mm per slice.
    assert int(volume.datasets[0].InstanceNumber) == 134
    assert int(volume.datasets[-1].InstanceNumber) == 1
    np.testing.assert_allclose(volume.affine[:3, 3], [-275.0, -178.1, 85.91])
    np.testing.assert_allclose(volume.affine @ [133, 0, 0, 1], [-275.0, -178.1, 484.91, 1.0])


def test_real_ct_hu_range(pancreas_ct: Volume) -> None:
    hu = pancreas_ct.array
    assert hu.dtype == np.float32
    # Stored 0..4095 with intercept -1000: air sits at about -1000 HU, nothing below.
    assert -1024.0 <= float(hu.min()) <= -900.0
    assert 1000.0 <= float(hu.max()) <= 3100.0  # dense cortical bone / contrast
    # Most of the 50 cm field is air around the patient and the table.
    air_fraction = float((hu < -900).mean())
    assert 0.3 < air_fraction < 0.8
    # Soft tissue at the image centre of a mid-abdominal slice (no air, no metal).
    centre = hu[60, 226:286, 226:286]
    assert -200.0 < float(np.median(centre)) < 400.0


def test_real_gantry_tilt_loads_with_warning(
    test_data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = test_data_dir / "ct_head_ge_gantry_tilt"
    paths = sorted(folder.glob("*.dcm"))
    with caplog.at_level(logging.WARNING, logger="workers.inference.volume"):
        volume = load_series(paths)
    series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    assert volume.array.shape == (28, 512, 512)
    # Gaps along the normal: 13 x 4.0 mm, 1 x 1.08 mm, 13 x 7.0 mm -> median 4.0 mm.
    assert volume.spacing[0] == pytest.approx(4.0, abs=0.01)
    assert any(series_uid in r.getMessage() for r in caplog.records)
    # The affine follows the tilted stack: slice 12 (still 4 mm gaps) lands on its IPP.
    ipp = [float(v) for v in volume.datasets[12].ImagePositionPatient]
    np.testing.assert_allclose(volume.affine @ [12, 0, 0, 1], [*ipp, 1.0], atol=1e-3)


def test_real_ct_slices_match_pydicom(pancreas_ct: Volume, ct_series_dir: Path) -> None:
    by_uid = {
        str(ds.SOPInstanceUID): path
        for path in sorted(ct_series_dir.glob("*.dcm"))
        for ds in [pydicom.dcmread(path, stop_before_pixels=True)]
    }
    for k in (0, 67, 133):
        ds = pydicom.dcmread(by_uid[str(pancreas_ct.datasets[k].SOPInstanceUID)])
        expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(pancreas_ct.array[k], expected.astype(np.float32))
    # Known points: air in the corner (stored 0, intercept -1000) and soft tissue
    # at the centre of slice 67 (instance 67).
    assert pancreas_ct.array[0, 0, 0] == -1000.0
    assert int(pancreas_ct.datasets[67].InstanceNumber) == 67
    assert pancreas_ct.array[67, 256, 256] == 82.0


def test_real_ct_datasets_leave_pixel_data_on_disk(pancreas_ct: Volume) -> None:
    ds = pancreas_ct.datasets[5]
    assert ds.get_item(0x7FE00010, keep_deferred=True).value is None  # not held in memory
    # ...but still readable on demand from the file
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(pancreas_ct.array[5], hu.astype(np.float32))


def test_real_gantry_tilt_affine_is_sheared(test_data_dir: Path) -> None:
    volume = load_series(sorted((test_data_dir / "ct_head_ge_gantry_tilt").glob("*.dcm")))
    iop = np.array([float(v) for v in volume.datasets[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    step = volume.affine[:3, 0]
    assert float(step @ normal) == pytest.approx(volume.spacing[0], rel=1e-6)
    # The origins step along the table (z) while the planes are tilted by the
    # gantry angle (Gantry/Detector Tilt +18.5 degrees).
    tilt = np.degrees(np.arccos(float(step @ normal) / float(np.linalg.norm(step))))
    assert tilt == pytest.approx(abs(float(volume.datasets[0].GantryDetectorTilt)), abs=0.1)
    np.testing.assert_allclose(step[:2], [0.0, 0.0], atol=1e-6)
    for k in range(14):  # the first 14 slices have the median 4.0 mm gap
        ipp = [float(v) for v in volume.datasets[k].ImagePositionPatient]
        np.testing.assert_allclose(volume.affine @ [k, 0, 0, 1], [*ipp, 1.0], atol=1e-3)


def test_real_sagittal_affine(test_data_dir: Path) -> None:
    volume = load_series(sorted((test_data_dir / "mr_head_siemens_t1_sag").glob("*.dcm")))
    assert volume.array.shape == (35, 256, 256)
    assert volume.spacing == pytest.approx((4.8, 1.015625, 1.015625))
    iop = np.array([float(v) for v in volume.datasets[0].ImageOrientationPatient])
    np.testing.assert_allclose(iop, [0, 1, 0, 0, 0, -1])
    # Slices step along the normal row x column = -x: patient left to right (L-R).
    np.testing.assert_allclose(volume.affine[:3, 0], [-4.8, 0.0, 0.0], atol=1e-4)
    # Rows go towards the feet (column cosines), columns posterior (row cosines).
    np.testing.assert_allclose(volume.affine[:3, 1], [0.0, 0.0, -1.015625])
    np.testing.assert_allclose(volume.affine[:3, 2], [0.0, 1.015625, 0.0])
    for k, ds in enumerate(volume.datasets):
        ipp = [float(v) for v in ds.ImagePositionPatient]
        np.testing.assert_allclose(volume.affine @ [k, 0, 0, 1], [*ipp, 1.0], atol=1e-3)


def test_real_dual_echo_split_into_four(test_data_dir: Path) -> None:
    paths = sorted((test_data_dir / "mr_phantom_philips_dualecho").glob("*.dcm"))
    volumes = load_volumes(paths)
    assert [v.key for v in volumes] == [
        "echo1-magnitude",
        "echo1-phase",
        "echo2-magnitude",
        "echo2-phase",
    ]
    for volume in volumes:
        echo, component = volume.key.split("-")
        assert KEY_PATTERN.match(volume.key)
        assert volume.array.shape == (30, 96, 96)
        assert volume.spacing == pytest.approx((4.0, 2.8125, 2.8125))
        assert len(volume.datasets) == 30
        assert {f"echo{ds.EchoNumbers}" for ds in volume.datasets} == {echo}
        assert {ds.ImageType[3] for ds in volume.datasets} == {component[0].upper()}
        z = [float(ds.ImagePositionPatient[2]) for ds in volume.datasets]
        assert z == sorted(z)
        np.testing.assert_allclose(volume.affine, volumes[0].affine)
        if component == "phase":  # Philips phase maps: about -pi..pi in milliradians
            assert -3142.0 <= float(volume.array.min()) < -3000.0
            assert 3000.0 < float(volume.array.max()) <= 3142.0
        else:
            assert float(volume.array.min()) >= 0.0
    # the two echoes of one position differ: the split put the right images together
    assert not np.array_equal(volumes[0].array, volumes[2].array)
    with pytest.raises(VolumeError, match="echo1-magnitude, echo1-phase"):
        load_series(paths)


@pytest.fixture(scope="module")
def enhanced_dir(test_data_dir: Path) -> Path:
    return test_data_dir / "enhanced_multiframe"


def test_real_enhanced_mr_xa30(enhanced_dir: Path) -> None:
    (path,) = sorted((enhanced_dir / "siemens_xa30_t1").glob("*.dcm"))
    (volume,) = load_volumes([path])
    assert volume.array.shape == (96, 128, 128)
    assert volume.spacing == pytest.approx((2.0, 2.0, 2.0), abs=1e-4)
    assert volume.modality == "MR" and volume.key == ""
    assert len(volume.datasets) == 1
    # Frames run along +x; the normal of IOP (0,1,0, 0,0,-1) is -x, so the
    # volume starts with the last frame.
    assert volume.frames == [(0, f) for f in range(96, 0, -1)]
    np.testing.assert_allclose(volume.affine[:3, 0], [-2.0, 0.0, 0.0], atol=1e-3)
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array
    for k in (0, 40, 95):
        number = volume.frames[k][1]
        np.testing.assert_array_equal(volume.array[k], frames[number - 1].astype(np.float32))
        item = ds.PerFrameFunctionalGroupsSequence[number - 1]
        ipp = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(volume.affine @ [k, 0, 0, 1], [*ipp, 1.0], atol=1e-3)
    # Independent check: highdicom's own volume of the same instance.
    reference = hd.imread(str(path)).get_volume(dtype=np.float32)
    if not np.allclose(reference.affine, volume.affine, atol=1e-3):
        reference = reference.flip_spatial(axes=0)
    np.testing.assert_allclose(reference.affine, volume.affine, atol=1e-3)
    np.testing.assert_array_equal(reference.array, volume.array)


def test_real_xa10_bold_split_by_time(enhanced_dir: Path) -> None:
    paths = sorted((enhanced_dir / "siemens_xa10_bold").glob("6_*.dcm"))
    assert len(paths) == 4
    volumes = load_volumes(list(reversed(paths)))
    assert [v.key for v in volumes] == ["volume1", "volume2", "volume3", "volume4"]
    for t, volume in enumerate(volumes, start=1):
        assert volume.array.shape == (6, 64, 64)
        assert volume.spacing == pytest.approx((2.4, 3.375, 3.375), abs=1e-4)
        (ds,) = volume.datasets
        content = ds.PerFrameFunctionalGroupsSequence[0].FrameContentSequence[0]
        assert int(content.TemporalPositionIndex) == t
        assert volume.frames == [(0, f) for f in range(1, 7)]
        np.testing.assert_array_equal(
            volume.array, pydicom.dcmread(ds.filename).pixel_array.astype(np.float32)
        )
        np.testing.assert_allclose(volume.affine, volumes[0].affine)
    assert not np.array_equal(volumes[0].array, volumes[1].array)  # BOLD signal changes
    with pytest.raises(VolumeError, match="4 volumes"):
        load_series(paths)


def test_real_philips_fieldmap_split(enhanced_dir: Path) -> None:
    (path,) = sorted((enhanced_dir / "philips_fieldmap").glob("*.dcm"))
    magnitude, field = load_volumes([path])
    assert (magnitude.key, field.key) == ("magnitude", "real")
    assert magnitude.frames == [(0, f) for f in range(1, 33)]
    assert field.frames == [(0, f) for f in range(33, 65)]
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array
    for volume in (magnitude, field):
        assert volume.array.shape == (32, 64, 64)
        assert volume.spacing == pytest.approx((4.0, 4.0, 4.0), abs=1e-3)
        np.testing.assert_allclose(volume.affine, magnitude.affine)
        for k in (0, 31):
            number = volume.frames[k][1]
            transform = ds.PerFrameFunctionalGroupsSequence[number - 1]
            pvt = transform.PixelValueTransformationSequence[0]
            expected = stored[number - 1].astype(np.float32) * np.float32(pvt.RescaleSlope)
            expected += np.float32(pvt.RescaleIntercept)
            np.testing.assert_allclose(volume.array[k], expected, rtol=1e-6)
    # B0 map in Hz (slope 0.2442, intercept -500): within +-500; magnitude >= 0
    assert -500.0 <= float(field.array.min()) < -400.0
    assert 400.0 < float(field.array.max()) <= 500.0
    assert float(magnitude.array.min()) >= 0.0


def test_real_enhanced_ct(enhanced_dir: Path) -> None:
    path = enhanced_dir / "pydicom_data" / "eCT_Supplemental.dcm"
    (volume,) = load_volumes([path])
    assert volume.modality == "CT"
    assert volume.array.shape == (2, 512, 512)
    assert volume.spacing == pytest.approx((10.0, 0.388672, 0.388672))
    # IOP (-1,0,0, 0,1,0): normal -z, so frame 2 (z = -149) comes first.
    assert volume.frames == [(0, 2), (0, 1)]
    np.testing.assert_allclose(volume.affine[:3, 0], [0.0, 0.0, -10.0])
    np.testing.assert_allclose(volume.affine[:3, 3], [99.5, -301.5, -149.0])
    # Shared Pixel Value Transformation: slope 1, intercept -1024 (HU).
    stored = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(volume.array[0], stored[1].astype(np.float32) - 1024.0)
    assert volume.array[0, 0, 0] == -1024.0  # outside the reconstruction circle


def test_real_emri_small_encodings_decode_identically(enhanced_dir: Path) -> None:
    folder = enhanced_dir / "pydicom_data"
    reference = decode_frames(pydicom.dcmread(folder / "emri_small.dcm"))
    assert reference.shape == (10, 64, 64)
    syntaxes = set()
    for name in (
        "emri_small_big_endian.dcm",
        "emri_small_RLE.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
    ):
        ds = pydicom.dcmread(folder / name)
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        np.testing.assert_array_equal(decode_frames(ds), reference, err_msg=name)
    assert len(syntaxes) == 4
    # emri_small has no functional groups: its frames cannot be placed.
    with pytest.raises(VolumeError, match="without a Per-frame Functional Groups"):
        load_volumes([folder / "emri_small.dcm"])


def test_real_dcm_qa_ts_same_slice_in_every_encoding(test_data_dir: Path) -> None:
    folder = test_data_dir / "transfer_syntaxes" / "dcm_qa_ts"
    paths = [folder / f"{i}.dcm" for i in range(1, 10)]
    syntaxes = {
        pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID for p in paths
    }
    assert len(syntaxes) == 7  # 5/6 and 7/8 share a syntax, from different encoders
    volumes = [load_series([p]) for p in paths]
    reference = pydicom.dcmread(paths[0]).pixel_array.astype(np.float32)
    for path, volume in zip(paths, volumes, strict=True):
        assert volume.array.shape == (1, 384, 384)
        np.testing.assert_array_equal(volume.array[0], reference, err_msg=path.name)
        np.testing.assert_allclose(volume.affine, volumes[0].affine)
        assert volume.spacing == pytest.approx(volumes[0].spacing)


def test_real_mr_small_encodings(test_data_dir: Path) -> None:
    paths = sorted((test_data_dir / "transfer_syntaxes" / "pydicom_small").glob("MR_small*.dcm"))
    assert len(paths) == 6
    volumes = [load_series([p]) for p in paths]
    for path, volume in zip(paths, volumes, strict=True):
        assert volume.array.shape == (1, 64, 64)
        np.testing.assert_array_equal(volume.array, volumes[0].array, err_msg=path.name)


def test_real_nm_lossless_encodings(test_data_dir: Path) -> None:
    folder = test_data_dir / "transfer_syntaxes" / "nema_wg04"
    names = ("NM1_JPLL.dcm", "NM1_J2KR.dcm", "NM1_JLSL.dcm", "NM1_RLE.dcm")
    arrays = [decode_frames(pydicom.dcmread(folder / name)) for name in names]
    for name, array in zip(names, arrays, strict=True):
        assert array.shape == (1, 1024, 256)
        np.testing.assert_array_equal(array, arrays[0], err_msg=name)
    # a planar NM image has no patient geometry: not a volume
    with pytest.raises(VolumeError, match="lacks ImageOrientationPatient"):
        load_series([folder / names[0]])


def test_real_xa30_split_into_two_instances(enhanced_dir: Path, tmp_path: Path) -> None:
    """One stack spread over two multi-frame files (made from XA30 in tmp_path)."""
    (path,) = sorted((enhanced_dir / "siemens_xa30_t1").glob("*.dcm"))
    paths = split_multiframe(path, tmp_path)
    (whole,) = load_volumes([path])
    (volume,) = load_volumes(paths)
    assert len(volume.datasets) == 2
    np.testing.assert_array_equal(volume.array, whole.array)
    np.testing.assert_allclose(volume.affine, whole.affine)
    assert {index for index, _ in volume.frames} == {0, 1}


def test_real_deflated_file(test_data_dir: Path) -> None:
    # Deflated Explicit VR LE: read whole (a deferred value cannot be re-read
    # from the compressed stream); a secondary capture has no patient geometry.
    path = test_data_dir / "transfer_syntaxes" / "dclunie" / "image_dfl.dcm"
    with pytest.raises(VolumeError, match="lacks ImageOrientationPatient"):
        load_series([path])
    ds = pydicom.dcmread(path)
    np.testing.assert_array_equal(decode_frames(ds)[0], ds.pixel_array.astype(np.float32))
