"""The weight-free MR foreground model on synthetic truth and on real MR series."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset
from scipy import ndimage

from tests.conftest import missing
from workers.inference.base import Volume
from workers.models.builtin_mr import BuiltinMRModel, otsu_log_threshold

HEAD_SLICES = 35
PHANTOM_FILES = 120


@pytest.fixture(scope="module")
def model() -> BuiltinMRModel:
    return BuiltinMRModel()


# ----------------------------------------------------------------- helpers


def _load(paths: list[Path]) -> Volume:
    """Test helper: single-frame slices sorted along the normal, rescaled, into a Volume.

    Written independently of workers/inference/volume.py on purpose.
    """
    datasets: list[Dataset] = [pydicom.dcmread(p) for p in paths]
    orientation = np.array(datasets[0].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    datasets.sort(key=lambda ds: float(normal @ np.array(ds.ImagePositionPatient, dtype=float)))
    positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=np.float64)
    array = np.stack(
        [
            ds.pixel_array.astype(np.float32) * np.float32(ds.get("RescaleSlope", 1.0))
            + np.float32(ds.get("RescaleIntercept", 0.0))
            for ds in datasets
        ]
    )
    row_spacing, col_spacing = (float(v) for v in datasets[0].PixelSpacing)
    step = (positions[-1] - positions[0]) / (len(datasets) - 1)
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 2] = row_dir * col_spacing
    affine[:3, 3] = positions[0]
    return Volume(
        array=array,
        spacing=(float(step @ normal), row_spacing, col_spacing),
        affine=affine,
        datasets=datasets,
        modality=str(datasets[0].Modality),
    )


def _is_one_solid_component(mask: np.ndarray) -> None:
    """Assert: one 6-connected component, no 3-D cavity, no in-plane hole in any slice."""
    _, count = ndimage.label(mask)
    assert count == 1
    assert not (ndimage.binary_fill_holes(mask) & ~mask).any()
    for k, plane in enumerate(mask):
        assert not (ndimage.binary_fill_holes(plane) & ~plane).any(), f"hole in slice {k}"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * (a & b).sum() / (a.sum() + b.sum()))


def _ellipsoid(
    *,
    shape: tuple[int, int, int] = (40, 128, 128),
    spacing: tuple[float, float, float] = (3.0, 1.5, 1.5),
    semi_axes_mm: tuple[float, float, float] = (45.0, 70.0, 55.0),
    bias: tuple[float, float] = (0.5, 1.5),
    noise: float = 20.0,
    scale: float = 1.0,
    blank_background: bool = False,
    seed: int = 0,
) -> tuple[Volume, np.ndarray, float]:
    """A head-like ellipsoid: returns (volume, voxel-centre truth, analytic volume in mL).

    Tissue is 1000 with a dark "skull" shell (30) between 82 % and 90 % of the
    radius, under a bright "scalp", and dark "ventricles" (250) inside 30 %.
    The edge has partial volume (occupancy from the signed distance to the
    surface), the whole image is multiplied by a bias field that ramps from
    ``bias[0]`` to ``bias[1]`` along the rows (times a slow modulation along
    the slices), and Rician noise of ``noise`` is added (or, with
    ``blank_background``, the background is exactly 0 as some scanners write
    it).
    """
    rng = np.random.default_rng(seed)
    index = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    mm = [(i - (n - 1) / 2.0) * s for i, n, s in zip(index, shape, spacing, strict=True)]
    r = np.sqrt(sum((x / a) ** 2 for x, a in zip(mm, semi_axes_mm, strict=True)))
    gradient = np.stack([x / a**2 for x, a in zip(mm, semi_axes_mm, strict=True)])
    gradient /= np.maximum(r, 1e-9)
    norm = np.maximum(np.sqrt((gradient**2).sum(axis=0)), 1e-9)
    distance = (r - 1.0) / norm  # mm outside the surface, first order
    width = np.sqrt(sum((gradient[i] / norm * spacing[i]) ** 2 for i in range(3)))
    occupancy = np.clip(0.5 - distance / width, 0.0, 1.0)
    tissue = np.full(shape, 1000.0)
    tissue[(r > 0.82) & (r <= 0.9)] = 30.0
    tissue[r <= 0.3] = 250.0
    ramp = (mm[1] - mm[1].min()) / np.ptp(mm[1])
    field = (bias[0] + (bias[1] - bias[0]) * ramp) * (1.0 + 0.2 * np.sin(mm[0] / 40.0))
    signal = tissue * occupancy * field
    if blank_background:
        image = np.where(occupancy > 0, np.abs(signal + rng.normal(0, noise, shape)), 0.0)
    else:
        image = np.hypot(signal + rng.normal(0, noise, shape), rng.normal(0, noise, shape))
    volume = Volume(
        array=(image * scale).astype(np.float32),
        spacing=spacing,
        affine=np.diag([*spacing, 1.0]),
        datasets=[],
        modality="MR",
    )
    analytic_ml = 4.0 / 3.0 * np.pi * float(np.prod(semi_axes_mm)) / 1000.0
    return volume, r <= 1.0, analytic_ml


# ---------------------------------------------------------------- metadata


def test_model_metadata(model: BuiltinMRModel) -> None:
    assert model.name == "radnode-builtin-mr"
    assert model.version == "1.0.0"
    (spec,) = model.segments
    assert spec.label == "body"
    assert (spec.category.value, spec.category.scheme) == ("91723000", "SCT")
    assert spec.category.meaning == "Anatomical Structure"
    assert (spec.type.value, spec.type.scheme, spec.type.meaning) == (
        "38266002",
        "SCT",
        "Entire body",
    )


# --------------------------------------------------------------- synthetic

ELLIPSOIDS: dict[str, dict[str, Any]] = {
    "default": {},
    "strong-bias": {"bias": (0.3, 1.7)},
    "noisy": {"noise": 50.0},
    "blank-background": {"blank_background": True},
    "coarse-anisotropic": {"shape": (30, 100, 100), "spacing": (5.0, 2.0, 2.0)},
    "tiny-scale": {"scale": 1e-4},
    "huge-scale": {"scale": 60.0},
}


@pytest.mark.parametrize("params", ELLIPSOIDS.values(), ids=ELLIPSOIDS.keys())
def test_ellipsoid_with_bias_field(model: BuiltinMRModel, params: dict[str, Any]) -> None:
    volume, truth, analytic_ml = _ellipsoid(**params)
    masks = model.predict(volume)
    assert masks.shape == (1, *volume.array.shape) and masks.dtype == np.bool_
    mask = masks[0]
    assert _dice(mask, truth) > 0.95
    found_ml = float(mask.sum()) * volume.voxel_volume_ml
    # The outline sits at the 50 % level of each edge: measured within about
    # 0.5 % of the analytic volume (726 mL); 2 % leaves room for noise.
    assert found_ml == pytest.approx(analytic_ml, rel=0.02)
    # The dark shell and the dark core are inside: filled, not holes.
    _is_one_solid_component(mask)


def test_threshold_scales_with_the_image() -> None:
    volume, _, _ = _ellipsoid(noise=5.0)
    image = torch.from_numpy(volume.array)
    t1 = otsu_log_threshold(image)
    t2 = otsu_log_threshold(image * 1000.0)
    assert t2 == pytest.approx(1000.0 * t1, rel=1e-4)
    # Above the noise (Rician mean ~6), below the darkest tissue edge of
    # the bright tissue (1000 x bias field 0.4 at the darkest corner).
    assert 10.0 < t1 < 300.0
    assert otsu_log_threshold(torch.zeros(4, 8, 8)) == float("inf")


def test_keeps_only_the_subject(model: BuiltinMRModel) -> None:
    volume, truth, _ = _ellipsoid()
    array = volume.array.copy()
    # A bright marker capsule (~0.6 mL) in the air beside the subject, and a
    # bright noise speckle: neither is the subject.
    array[18:21, 5:10, 5:10] = 1200.0
    array[30, 120, 60] = 5000.0
    volume = Volume(array, volume.spacing, volume.affine, datasets=[], modality="MR")
    mask = model.predict(volume)[0]
    assert not mask[18:21, 5:10, 5:10].any()
    assert not mask[30, 120, 60]
    assert _dice(mask, truth) > 0.95


def test_field_of_view_cut(model: BuiltinMRModel) -> None:
    # The subject runs out of the field of view (a neck at the edge): the mask
    # reaches the cut instead of being eroded away from it.
    volume, truth, _ = _ellipsoid()
    cut = np.s_[:, :100, :]
    cropped = Volume(
        array=np.ascontiguousarray(volume.array[cut]),
        spacing=volume.spacing,
        affine=volume.affine,
        datasets=[],
        modality="MR",
    )
    mask = model.predict(cropped)[0]
    assert _dice(mask, truth[cut]) > 0.95
    assert mask[:, -1, :].sum() == pytest.approx(truth[cut][:, -1, :].sum(), rel=0.05)
    _is_one_solid_component(mask)


def test_empty_and_invalid_input(model: BuiltinMRModel) -> None:
    blank = Volume(
        array=np.zeros((4, 16, 16), dtype=np.float32),
        spacing=(2.0, 1.0, 1.0),
        affine=np.eye(4),
        datasets=[],
        modality="MR",
    )
    masks = model.predict(blank)
    assert masks.shape == (1, 4, 16, 16) and not masks.any()
    with pytest.raises(ValueError):
        model.predict(Volume(np.zeros((16, 16), np.float32), (1.0, 1.0, 1.0), np.eye(4), [], "MR"))
    with pytest.raises(ValueError):
        model.predict(
            Volume(np.zeros((4, 16, 16), np.float32), (0.0, 1.0, 1.0), np.eye(4), [], "MR")
        )


# --------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def head(test_data_dir: Path) -> Volume:
    files = sorted((test_data_dir / "mr_head_siemens_t1_sag").glob("*.dcm"))
    if len(files) != HEAD_SLICES:
        missing(f"mr_head_siemens_t1_sag should hold {HEAD_SLICES} files, found {len(files)}")
    return _load(files)


@pytest.fixture(scope="module")
def phantom_echoes(test_data_dir: Path) -> dict[float, Volume]:
    """The Philips dual-echo phantom: magnitude images only, one volume per echo."""
    files = sorted((test_data_dir / "mr_phantom_philips_dualecho").glob("*.dcm"))
    if len(files) != PHANTOM_FILES:
        missing(f"mr_phantom_philips_dualecho should hold {PHANTOM_FILES} files")
    by_echo: dict[float, list[Path]] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.ImageType[3] == "M":  # Philips: M = magnitude, P = phase
            by_echo.setdefault(float(ds.EchoTime), []).append(path)
    assert sorted(by_echo) == [7.001, 10.0]
    return {te: _load(paths) for te, paths in by_echo.items()}


def test_real_head(model: BuiltinMRModel, head: Volume) -> None:
    start = time.perf_counter()
    masks = model.predict(head)
    seconds = time.perf_counter() - start
    mask = masks[0]
    ml = float(mask.sum()) * head.voxel_volume_ml
    print(f"\nhead: {ml:.0f} mL, predict {seconds:.2f} s for {head.array.shape}")
    assert masks.shape == (1, 35, 256, 256)
    # Sagittal T1 of an adult head, 35 x 4.8 mm from ear to ear, the FOV cut at
    # the neck: about 4 L (a head is 3.5-5 L).
    assert 3_000 < ml < 5_500
    _is_one_solid_component(mask)
    array = head.array
    # Everything bright (brain, scalp, fat, muscle), less a one-pixel fringe,
    # is inside the mask. In the five most lateral slices on each side the
    # skin runs nearly parallel to the 4.8 mm slice, so wide partial-volume
    # areas there hold under half the tissue of the next slice in and are
    # rightly left out by the 50 % outline rule; hence the looser bound overall.
    bright = ndimage.uniform_filter(array, (1, 3, 3)) > 0.25 * np.percentile(array, 99.5)
    core = ndimage.binary_erosion(bright, np.ones((1, 3, 3), dtype=bool))
    assert mask[core].mean() > 0.98
    assert mask[5:30][core[5:30]].mean() > 0.995
    # ... the air around the head is not: the image corners, and the noise
    # everywhere more than 10 mm outside the mask.
    assert not mask[:, :20, :20].any() and not mask[:, -20:, -20:].any()
    far = ~ndimage.binary_dilation(mask, np.ones((1, 21, 21), dtype=bool))
    assert np.percentile(array[far], 99) < 0.05 * np.percentile(array, 99.5)
    # Brain at the midline (slice 17, corpus callosum region) is inside; dark
    # CSF, skull and sinuses enclosed by tissue are filled.
    assert mask[17, 90:130, 110:170].all()
    # A mid-sagittal head section (about 20 x 22 cm with the neck) in a
    # 26 x 26 cm FOV: each mid slice is 40-60 % mask (measured 45-54 %).
    fractions = mask[10:25].mean(axis=(1, 2))
    assert ((fractions > 0.4) & (fractions < 0.6)).all()
    assert seconds < 30.0


def _row_diameter_mm(plane: np.ndarray, spacing: float) -> tuple[float, int, int]:
    """Half-maximum width of the bright disk along the row through its centroid."""
    plateau = float(np.percentile(plane, 90))
    cy, cx = np.argwhere(plane > 0.5 * plateau).mean(axis=0).round().astype(int)
    profile = plane[cy].astype(np.float64)
    level = 0.5 * float(np.median(plane[cy - 8 : cy + 8, cx - 8 : cx + 8]))
    above = np.flatnonzero(profile > level)
    i0, i1 = int(above[0]), int(above[-1])
    left = i0 - 1 + (level - profile[i0 - 1]) / (profile[i0] - profile[i0 - 1])
    right = i1 + (profile[i1] - level) / (profile[i1] - profile[i1 + 1])
    return (right - left) * spacing, cy, cx


def test_real_phantom_both_echoes(
    model: BuiltinMRModel, phantom_echoes: dict[float, Volume]
) -> None:
    volumes_ml = {}
    for te, volume in phantom_echoes.items():
        assert volume.array.shape == (30, 96, 96)
        mask = model.predict(volume)[0]
        _is_one_solid_component(mask)
        volumes_ml[te] = float(mask.sum()) * volume.voxel_volume_ml
        # A cylindrical bottle, axis along the slices. In the first six slices
        # (no air bubble yet) each cross-section is a disk whose diameter, the
        # half-maximum width measured straight from the pixels (~158 mm), gives
        # its area.
        pixel = volume.spacing[1]
        for k in range(6):
            diameter, cy, cx = _row_diameter_mm(volume.array[k], pixel)
            assert 150.0 < diameter < 166.0
            disk_mm2 = np.pi * (diameter / 2.0) ** 2
            assert mask[k].sum() * pixel**2 == pytest.approx(disk_mm2, rel=0.03), (te, k)
            # and the mask is that disk: inside it shrunk by 2 pixels, outside
            # it grown by 2 pixels.
            yy, xx = np.mgrid[:96, :96]
            rr = np.hypot(yy - cy, xx - cx) * pixel
            assert mask[k][rr < diameter / 2.0 - 2 * pixel].all()
            assert not mask[k][rr > diameter / 2.0 + 2 * pixel].any()
    print("\nphantom volumes (mL) by echo time:", volumes_ml)
    # About 30 x 4 mm of a 158 mm bottle: 2.3 L whatever the echo's contrast.
    assert 2_000 < volumes_ml[7.001] < 2_600
    assert volumes_ml[10.0] == pytest.approx(volumes_ml[7.001], rel=0.015)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(model: BuiltinMRModel) -> None:
    volume, _, _ = _ellipsoid()
    cpu = model.predict(volume, "cpu")
    cuda = model.predict(volume, "cuda")
    # Float reductions differ in the last bits between devices: allow a few
    # outline voxels.
    assert (cpu != cuda).sum() <= 1e-4 * cpu.size
