"""Geometry and intensity of the network input, and the way back to the source grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from service.model_spec import InputSpec, IntensitySpec
from tests.tiny_models import axial_affine, make_volume, sagittal_affine
from workers.inference.preprocess import (
    apply_intensity,
    axis_codes,
    orientation_transform,
    plan_grid,
    prepare_input,
    to_network_grid,
    to_source_grid,
)

SHAPE = (4, 5, 6)


def _marker_volume(affine: np.ndarray, spacing=(1.0, 1.0, 1.0), index=(1, 2, 3)):
    array = np.zeros(SHAPE, np.float32)
    array[index] = 7.0
    return make_volume(array, spacing, affine)


def _world(affine: np.ndarray, index) -> np.ndarray:
    return (affine @ np.array([*index, 1.0]))[:3]


# -- orientation -------------------------------------------------------------------------


def test_axis_codes_follow_patient_directions_of_an_lps_affine():
    assert axis_codes(np.eye(4)) == "LPS"
    assert axis_codes(np.diag([-1.0, -1.0, 1.0, 1.0])) == "RAS"
    assert axis_codes(axial_affine((3.0, 0.7, 0.7))) == "SPL"
    assert axis_codes(sagittal_affine()) == "RIP"
    # A gantry tilt of 20 degrees about x keeps the closest axes.
    tilt = np.deg2rad(20)
    tilted = axial_affine()
    tilted[:3, 0] = [0.0, np.sin(tilt), np.cos(tilt)]
    assert axis_codes(tilted) == "SPL"


def test_axial_volume_to_ras_puts_a_marker_where_hand_derivation_says():
    # Axial (slice, row, column) = (S, P, L). RAS: axis 0 = columns reversed,
    # axis 1 = rows reversed, axis 2 = slices.
    volume = _marker_volume(axial_affine(), index=(1, 2, 3))
    perm, flip = orientation_transform(volume.affine, "RAS")
    assert perm == (2, 1, 0) and flip == (True, True, False)
    image, plan = prepare_input(volume, InputSpec(orientation="RAS"))
    assert image.shape == (1, 1, 6, 5, 4)
    found = tuple(int(i) for i in np.argwhere(image[0, 0].numpy() == 7.0)[0])
    assert found == (6 - 1 - 3, 5 - 1 - 2, 1)
    assert plan.codes == "RAS"
    np.testing.assert_allclose(_world(plan.network_affine, found), _world(volume.affine, (1, 2, 3)))
    # RAS axis 0 runs to the patient's right: -x in LPS; axis 1 anterior: -y; axis 2: +z.
    np.testing.assert_allclose(plan.network_affine[:3, :3], np.diag([-1.0, -1.0, 1.0]))


def test_lps_orientation_of_an_axial_volume_only_permutes():
    perm, flip = orientation_transform(axial_affine(), "LPS")
    assert perm == (2, 1, 0) and flip == (False, False, False)
    assert orientation_transform(axial_affine(), None) == ((0, 1, 2), (False, False, False))


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PIR", "SAL"])
def test_sagittal_volume_reorients_to_any_codes_preserving_world_positions(codes):
    spacing = (2.0, 0.8, 0.5)
    affine = sagittal_affine(spacing, origin=(10.0, -20.0, 30.0))
    volume = _marker_volume(affine, spacing, index=(3, 1, 4))
    image, plan = prepare_input(volume, InputSpec(orientation=codes))
    assert plan.codes == codes
    found = tuple(int(i) for i in np.argwhere(image[0, 0].numpy() == 7.0)[0])
    np.testing.assert_allclose(_world(plan.network_affine, found), _world(affine, (3, 1, 4)))
    # spacing follows the axes: the network axis that came from source axis k has spacing k.
    np.testing.assert_allclose(
        np.linalg.norm(plan.network_affine[:3, :3], axis=0), [spacing[p] for p in plan.perm]
    )


def test_orientation_round_trip_restores_every_voxel():
    rng = np.random.default_rng(0)
    array = rng.normal(size=SHAPE).astype(np.float32)
    volume = make_volume(array, affine=sagittal_affine())
    image, plan = prepare_input(volume, InputSpec(orientation="RAS"))
    back = to_source_grid(image[0], plan, lambda x: x)
    np.testing.assert_array_equal(back[0].numpy(), array)


# -- spacing -----------------------------------------------------------------------------


def test_spacing_grid_has_exact_spacing_and_the_source_centre():
    spacing = (3.0, 0.7, 0.7)
    affine = axial_affine(spacing, origin=(-100.0, -120.0, 50.0))
    shape = (10, 40, 30)
    plan = plan_grid(shape, spacing, affine, InputSpec(orientation="RAS", spacing_mm=(1.5, 2, 2.5)))
    # RAS axes come from (column, row, slice): 30 x 0.7, 40 x 0.7, 10 x 3 mm.
    assert plan.network_shape == (round(30 * 0.7 / 1.5), round(40 * 0.7 / 2), round(10 * 3 / 2.5))
    np.testing.assert_allclose(np.linalg.norm(plan.network_affine[:3, :3], axis=0), [1.5, 2, 2.5])
    centre_source = _world(affine, [(n - 1) / 2 for n in shape])
    centre_network = _world(plan.network_affine, [(n - 1) / 2 for n in plan.network_shape])
    np.testing.assert_allclose(centre_network, centre_source, atol=1e-9)


def test_resampling_is_trilinear_interpolation_at_the_planned_positions():
    rng = np.random.default_rng(1)
    array = rng.normal(size=(7, 9, 11)).astype(np.float32)
    spec = InputSpec(spacing_mm=(2, 1.5, 0.6))
    plan = plan_grid(array.shape, (1.0, 1.0, 1.0), axial_affine(), spec)
    out = to_network_grid(torch.from_numpy(array)[None], plan)[0].numpy()
    pos = plan.network_positions()
    grid = np.meshgrid(*pos, indexing="ij")
    expected = ndimage.map_coordinates(array.astype(np.float64), grid, order=1, mode="nearest")
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("affine", "network_shape"),
    # RAS of axial (S, P, L): (L, P, S); of sagittal (R, I, P): (R, P, I) -> sizes / 2.
    [(axial_affine(), (10, 9, 8)), (sagittal_affine(), (8, 10, 9))],
    ids=["axial", "sagittal"],
)
def test_a_box_resampled_to_2mm_and_back_lands_on_its_source_voxels(affine, network_shape):
    array = np.zeros((16, 18, 20), np.float32)
    array[2:14, 4:16, 4:18] = 1.0  # faces on even voxel boundaries of the 2 mm grid
    volume = make_volume(array, affine=affine)
    image, plan = prepare_input(volume, InputSpec(orientation="RAS", spacing_mm=(2, 2, 2)))
    assert plan.network_shape == network_shape
    assert image.shape == (1, 1, *network_shape)
    scores = torch.cat([1.0 - image[0], image[0]])  # background, foreground "probabilities"
    mask = to_source_grid(scores, plan, lambda x: x.argmax(0, keepdim=True) == 1)[0].numpy()
    wrong = np.argwhere(mask != (array > 0.5))
    # Trilinear interpolation rounds off exactly the 8 corners (0.75**3 < 0.5); every face
    # lands on its source voxels.
    corners = {(z, y, x) for z in (2, 13) for y in (4, 15) for x in (4, 17)}
    assert {tuple(int(i) for i in w) for w in wrong} == corners
    # Nearest-neighbour labels come back exactly.
    labels = to_source_grid((image[0] > 0.5).float(), plan, lambda x: x > 0.5, mode="nearest")
    np.testing.assert_array_equal(labels[0].numpy(), array > 0.5)


def test_chunked_resampling_equals_one_pass():
    rng = np.random.default_rng(2)
    volume = make_volume(rng.normal(size=(9, 10, 11)), affine=sagittal_affine())
    spec = InputSpec(orientation="RAS", spacing_mm=(1.7, 1.3, 2.1))
    image, plan = prepare_input(volume, spec)
    source = torch.from_numpy(volume.array)[None]
    torch.testing.assert_close(to_network_grid(source, plan, chunk_elements=1), image[0])
    torch.testing.assert_close(to_network_grid(source, plan, chunk_elements=10**9), image[0])
    scores = torch.cat([image[0], -image[0], image[0] ** 2])
    whole = to_source_grid(scores, plan, lambda x: x, chunk_elements=10**9)
    chunked = to_source_grid(scores, plan, lambda x: x, chunk_elements=3 * 10)
    assert whole.shape == (3, 9, 10, 11)
    torch.testing.assert_close(chunked, whole)


def test_to_source_grid_rejects_output_of_the_wrong_shape():
    plan = plan_grid((4, 5, 6), (1.0, 1.0, 1.0), axial_affine(), InputSpec())
    with pytest.raises(ValueError, match="network output of shape"):
        to_source_grid(torch.zeros(2, 4, 5, 7), plan, lambda x: x)


# -- intensity ---------------------------------------------------------------------------


def _apply(values, **spec):
    image = torch.tensor(values, dtype=torch.float32)[None]
    return apply_intensity(image, IntensitySpec(**spec))[0].numpy()


def test_ct_window_maps_the_window_to_the_target_range_and_clips():
    out = _apply([-1000, -160, 40, 240, 3000], method="ct_window", center=40, width=400)
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1], atol=1e-6)
    out = _apply([-160, 40], method="ct_window", center=40, width=400, b_min=-1, b_max=1)
    np.testing.assert_allclose(out, [-1, 0], atol=1e-6)


def test_clip_scale_is_scale_intensity_range_with_optional_clip():
    out = _apply([-1000, 0, 2000], method="clip_scale", a_min=-1000, a_max=1000, clip=False)
    np.testing.assert_allclose(out, [0, 0.5, 1.5], atol=1e-6)
    out = _apply([-1000, 0, 2000], method="clip_scale", a_min=-1000, a_max=1000, clip=True)
    np.testing.assert_allclose(out, [0, 0.5, 1.0], atol=1e-6)


def test_zscore_uses_the_population_standard_deviation():
    out = _apply([1, 2, 3, 4], method="zscore")
    np.testing.assert_allclose(out, (np.array([1, 2, 3, 4]) - 2.5) / np.sqrt(1.25), atol=1e-6)
    out = _apply([0, 2, 4, 0], method="zscore", nonzero=True)
    np.testing.assert_allclose(out, [0, -1, 1, 0], atol=1e-6)


def test_percentile_maps_the_percentiles_to_the_target_range():
    values = np.arange(101, dtype=np.float32)  # percentile p is the value p
    out = _apply(values, method="percentile", lower=10, upper=90, clip=False)
    np.testing.assert_allclose(out[[0, 10, 50, 90, 100]], [-0.125, 0, 0.5, 1, 1.125], atol=1e-6)
    out = _apply(values, method="percentile", lower=10, upper=90, clip=True)
    np.testing.assert_allclose(out[[0, 100]], [0, 1], atol=1e-6)


def test_preprocessing_never_writes_into_the_source_array():
    array = np.array([[[0, 2], [4, 0]]] * 2, np.float32)
    volume = make_volume(array)
    image, _ = prepare_input(
        volume, InputSpec(intensity=IntensitySpec(method="zscore", nonzero=True))
    )
    np.testing.assert_array_equal(volume.array, np.array([[[0, 2], [4, 0]]] * 2, np.float32))
    np.testing.assert_allclose(image[0, 0, 0].numpy(), [[0, -1], [1, 0]], atol=1e-6)


def test_classifier_input_is_resized_to_a_fixed_size():
    volume = make_volume(np.ones((6, 10, 14), np.float32) * 3)
    image, _ = prepare_input(volume, InputSpec(spacing_mm=(2, 2, 2)), resize_to=(4, 4, 4))
    assert image.shape == (1, 1, 4, 4, 4)
    np.testing.assert_allclose(image.numpy(), 3.0, atol=1e-6)
    assert type(image) is torch.Tensor  # not a MONAI MetaTensor


def test_volumes_with_nan_or_the_wrong_rank_are_refused():
    array = np.zeros((3, 4, 5), np.float32)
    array[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        prepare_input(make_volume(array), InputSpec())
    flat = make_volume(np.zeros((3, 4, 5), np.float32))
    object.__setattr__(flat, "array", np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="slices, rows, columns"):
        prepare_input(flat, InputSpec())
