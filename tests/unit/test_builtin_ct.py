from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from service.dicom.phantom import phantom_truth, write_ct_phantom
from workers.inference.base import Volume
from workers.inference.volume import load_series
from workers.models.builtin_ct import BuiltinCTModel

BODY, LUNGS, BONE = 0, 1, 2


@pytest.fixture(scope="module")
def model() -> BuiltinCTModel:
    return BuiltinCTModel()


@pytest.fixture(scope="module")
def pancreas_ct(ct_series_dir: Path) -> Volume:
    return load_series(sorted(ct_series_dir.glob("*.dcm")))


@pytest.fixture(scope="module")
def pancreas_masks(model: BuiltinCTModel, pancreas_ct: Volume) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    masks = model.predict(pancreas_ct, device="cpu")
    return masks, time.perf_counter() - start


def _report(volume: Volume, masks: np.ndarray) -> dict[str, tuple[float, float]]:
    labels = [s.label for s in BuiltinCTModel.segments]
    return {
        label: (float(m.sum()) * volume.voxel_volume_ml, float(volume.array[m].mean()))
        for label, m in zip(labels, masks, strict=True)
    }


def test_model_metadata(model: BuiltinCTModel) -> None:
    assert model.name == "radnode-builtin-ct"
    assert model.version == "1.0.0"
    assert [s.label for s in model.segments] == ["body", "lungs", "bone"]
    assert [s.type.value for s in model.segments] == ["38266002", "39607008", "272673000"]
    for spec in model.segments:
        assert spec.type.scheme == "SCT"
        assert (spec.category.value, spec.category.scheme) == ("91723000", "SCT")


def test_real_ct_masks_shape_and_time(
    pancreas_ct: Volume, pancreas_masks: tuple[np.ndarray, float]
) -> None:
    masks, seconds = pancreas_masks
    assert masks.shape == (3, 134, 512, 512)
    assert masks.dtype == np.bool_
    # Lungs and bone are found inside the body only.
    assert not (masks[LUNGS] & ~masks[BODY]).any()
    assert not (masks[BONE] & ~masks[BODY]).any()
    print(
        "\n"
        + "\n".join(
            f"{k}: {ml:.0f} mL, mean {hu:.0f} HU"
            for k, (ml, hu) in _report(pancreas_ct, masks).items()
        )
        + f"\npredict: {seconds:.2f} s"
    )
    # About 2-3 s on 2 CPU cores; the bound only catches a pathological slowdown.
    assert seconds < 30.0


def test_real_ct_body(pancreas_ct: Volume, pancreas_masks: tuple[np.ndarray, float]) -> None:
    masks, _ = pancreas_masks
    body_ml, body_hu = _report(pancreas_ct, masks)["body"]
    # Trunk from the pelvis to the upper chest: 134 x 3 mm = 40 cm long, about
    # 30 x 25 cm across, so roughly 25-40 L (measured: about 33 L).
    assert 20_000 < body_ml < 45_000
    # Fat, muscle, organs and some lung average a little below water.
    assert -250 < body_hu < 50
    # The table (a plate from row ~388 and a curved shell below it) is
    # tissue-dense (> -500 HU) but must not be body.
    hu = pancreas_ct.array
    assert (hu[:, 395:, :] > -500).sum() > 10_000
    assert not masks[BODY][:, 395:, :].any()
    # Body is one solid object per slice at mid-abdomen: its centre is inside.
    assert masks[BODY][60, 256, 256]


def test_real_ct_lungs(pancreas_ct: Volume, pancreas_masks: tuple[np.ndarray, float]) -> None:
    masks, _ = pancreas_masks
    lungs_ml, lungs_hu = _report(pancreas_ct, masks)["lungs"]
    # The scan reaches from the lung bases to about the carina (the top 53
    # slices, 16 cm, hold lung), i.e. the lower half to two thirds of both lungs
    # at breath hold: 1.5-3.5 L (measured: about 2.7 L, airways included).
    assert 1_500 < lungs_ml < 3_500
    # Aerated lung with vessels filled in: between -900 and -650 HU on average.
    assert -900 < lungs_hu < -650
    # Lungs are only in the superior part (slice index grows superiorly here);
    # bowel gas, present down to slice 0, must not be lung.
    slices = np.flatnonzero(masks[LUNGS].any(axis=(1, 2)))
    assert slices.min() >= 70
    assert slices.max() == 133
    gas_below = (pancreas_ct.array[:70] < -400) & masks[BODY][:70]
    assert gas_below.sum() > 1_000  # there is gas to be confused with lung


def test_real_ct_bone(pancreas_ct: Volume, pancreas_masks: tuple[np.ndarray, float]) -> None:
    masks, _ = pancreas_masks
    bone_ml, bone_hu = _report(pancreas_ct, masks)["bone"]
    # Pelvis, lumbar and thoracic spine, ribs, sternum and scapulae above
    # 200 HU: on the order of 1-2 L (measured: about 1.5 L).
    assert 800 < bone_ml < 2_500
    # Trabecular bone (~200-400 HU) plus cortex (> 700 HU).
    assert 300 < bone_hu < 700
    assert masks[BONE][60, 272, 258]  # a lumbar vertebral body
    # The contrast-filled heart reaches 200-310 HU but is not bone.
    heart = np.s_[110, 212:228, 282:298]
    assert (pancreas_ct.array[heart] > 200).sum() > 50
    assert not masks[BONE][heart].any()


PHANTOM_GRIDS: list[dict[str, Any]] = [
    {},  # defaults: 60 x 192 x 192, 2.5 x 2 x 2 mm
    {"slices": 30, "rows": 128, "columns": 128, "pixel_spacing_mm": 3.0, "slice_thickness_mm": 5.0},
]


@pytest.mark.parametrize("grid", PHANTOM_GRIDS, ids=["default", "coarse"])
def test_phantom_volumes_match_truth(
    tmp_path: Path, model: BuiltinCTModel, grid: dict[str, Any]
) -> None:
    volume = load_series(write_ct_phantom(tmp_path, seed=5, **grid))
    masks = model.predict(volume)
    truth = phantom_truth(**grid)
    found = _report(volume, masks)
    for label in ("body", "lungs", "bone"):
        # The phantom has no partial volume, so the masks should be nearly
        # exact; 3 % leaves room for the opening's effect on the body outline.
        assert found[label][0] == pytest.approx(truth[label], rel=0.03), label
    # Table (100 HU, below the body), bowel gas (-1000 HU, 33 mL, inferior) and
    # the enhanced kidney (250 HU) are in the phantom; matching the truth means
    # none of them leaked into body, lungs or bone respectively.
    assert found["lungs"][1] == pytest.approx(-850, abs=30)
    assert found["bone"][1] == pytest.approx(700, abs=10)


def _synthetic(
    shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Air volume with a box-shaped body of 40 HU; returns (hu, voxel centres in mm).

    The body spans rows/columns 5..94 (15-285 mm), so the lungs below keep a
    wall of at least 30 mm to the outside, like a real chest wall.
    """
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[:, 5:-5, 5:-5] = 40.0
    grids = np.meshgrid(
        *(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)), indexing="ij"
    )
    return hu, np.stack(grids)


def _axial_affine(spacing: tuple[float, float, float], *, feet_first: bool) -> np.ndarray:
    """(slice, row, column) -> LPS: column along x, row along y, slice along +z or -z."""
    affine = np.zeros((4, 4))
    affine[0, 2], affine[1, 1] = spacing[2], spacing[1]
    affine[2, 0] = -spacing[0] if feet_first else spacing[0]
    affine[3, 3] = 1.0
    return affine


def test_lung_selection_rejects_gut_gas(model: BuiltinCTModel) -> None:
    spacing = (4.0, 3.0, 3.0)
    hu, (z, y, x) = _synthetic((50, 100, 100), spacing)
    lungs = np.zeros(hu.shape, dtype=bool)
    for cx in (90.0, 210.0):  # two lungs in the superior half (high slice index)
        lungs |= (((x - cx) / 45) ** 2 + ((y - 150) / 60) ** 2 <= 1) & (z >= 100)
    hu[lungs] = -850.0
    # Lung-dense (-850 HU) 70 mL blob far below the lungs: rejected by position.
    low = (x - 150) ** 2 + (y - 150) ** 2 + (z - 30) ** 2 <= 26**2
    hu[low] = -850.0
    # Pure gas (-1000 HU) 65 mL pocket at lung height between the lungs: rejected
    # by density (aerated lung is mostly above -950 HU, gut gas below).
    pure = (x - 150) ** 2 + (y - 225) ** 2 + (z - 150) ** 2 <= 25**2
    hu[pure] = -1000.0
    affine = _axial_affine(spacing, feet_first=False)
    volume = Volume(array=hu, spacing=spacing, affine=affine, datasets=[], modality="CT")

    masks = model.predict(volume)
    np.testing.assert_array_equal(masks[LUNGS], lungs)
    assert masks[BODY][low].all() and masks[BODY][pure].all()


def test_lung_selection_uses_patient_superior_not_slice_index(model: BuiltinCTModel) -> None:
    # Same scene stored feet-last: slice index grows towards the feet (affine
    # z-step negative), so the lungs are at LOW slice indices.
    spacing = (4.0, 3.0, 3.0)
    hu, (z, y, x) = _synthetic((50, 100, 100), spacing)
    lungs = np.zeros(hu.shape, dtype=bool)
    for cx in (90.0, 210.0):
        lungs |= (((x - cx) / 45) ** 2 + ((y - 150) / 60) ** 2 <= 1) & (z < 96)
    hu[lungs] = -850.0
    low = (x - 150) ** 2 + (y - 150) ** 2 + (z - 170) ** 2 <= 26**2  # inferior, lung-dense
    hu[low] = -850.0
    affine = _axial_affine(spacing, feet_first=True)
    volume = Volume(array=hu, spacing=spacing, affine=affine, datasets=[], modality="CT")
    np.testing.assert_array_equal(model.predict(volume)[LUNGS], lungs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tmp_path: Path, model: BuiltinCTModel) -> None:
    volume = load_series(write_ct_phantom(tmp_path, seed=2, **PHANTOM_GRIDS[1]))
    np.testing.assert_array_equal(model.predict(volume, "cuda"), model.predict(volume, "cpu"))
