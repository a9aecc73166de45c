"""Site-supplied TorchScript models: label mapping, geometry, sliding windows, errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy import ndimage

from service.model_spec import ModelSpec
from tests.tiny_models import (
    LABELS,
    classification_spec,
    make_volume,
    sagittal_affine,
    save_bad_model,
    save_classifier,
    save_conv_segmenter,
    save_label_map_segmenter,
    save_threshold_segmenter,
    save_torchscript,
    segmentation_spec,
    threshold_net,
    to_spec,
)
from workers.inference.base import ClassificationModel, Code, SegmentationModel
from workers.inference.preprocess import prepare_input
from workers.models.torchscript import ModelError, TorchScriptModel

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _three_level_volume(affine=None) -> tuple[np.ndarray, object]:
    """Values 0 (outside), 1 (a big box) and 2 (a box inside it), faces on even voxels."""
    array = np.zeros((16, 18, 20), np.float32)
    array[2:14, 4:16, 4:18] = 1.0
    array[4:10, 6:12, 8:14] = 2.0
    return array, make_volume(array, affine=affine)


@pytest.fixture(scope="module")
def threshold_ts(tmp_path_factory):
    return save_threshold_segmenter(tmp_path_factory.mktemp("ts"), (0.5, 1.5))


# -- segmentation: label mapping ---------------------------------------------------------


def test_softmax_label_values_map_to_segments_in_declaration_order(threshold_ts):
    # Declared out of order: segment 0 is label value 2 (spleen), segment 1 value 1 (liver).
    model = TorchScriptModel(to_spec(segmentation_spec(threshold_ts, (2, 1))), "cpu")
    as_protocol: SegmentationModel = model  # the static interface the worker uses
    assert as_protocol.name == "tiny-seg" and as_protocol.version == "0.1"
    assert [s.label for s in model.segments] == ["spleen", "liver"]
    assert model.segments[0].type == Code("78961009", "SCT", "Spleen")
    array, volume = _three_level_volume()
    masks = model.predict(volume)
    assert masks.dtype == np.bool_ and masks.shape == (2, 16, 18, 20)
    np.testing.assert_array_equal(masks[0], array == 2)
    np.testing.assert_array_equal(masks[1], array == 1)


def test_argmax_activation_gives_the_softmax_labels(threshold_ts):
    spec = to_spec(segmentation_spec(threshold_ts, (1, 2), activation="argmax"))
    array, volume = _three_level_volume()
    masks = TorchScriptModel(spec, "cpu").predict(volume)
    np.testing.assert_array_equal(masks[0], array == 1)
    np.testing.assert_array_equal(masks[1], array == 2)


def test_sigmoid_channel_k_minus_1_is_label_value_k_and_labels_overlap(tmp_path):
    path = save_threshold_segmenter(tmp_path, (0.5, 1.5), sigmoid=True)
    spec = to_spec(segmentation_spec(path, (1, 2), activation="sigmoid"))
    array, volume = _three_level_volume()
    masks = TorchScriptModel(spec, "cpu").predict(volume)
    np.testing.assert_array_equal(masks[0], array > 0.5)  # channel 0: x > 0.5
    np.testing.assert_array_equal(masks[1], array > 1.5)  # channel 1: x > 1.5
    assert (masks[0] & masks[1]).sum() == (array == 2).sum()


def test_sigmoid_threshold_is_applied_to_probabilities(tmp_path):
    # Channel 0 is 20 * (x - 0.5): probability 0.5 at x = 0.5, 0.881 at x = 0.6.
    path = save_threshold_segmenter(tmp_path, (0.5,), sigmoid=True)
    array = np.full((2, 2, 4), 0.6, np.float32)
    array[..., :2] = 0.55  # probability 0.731
    decl = segmentation_spec(path, (1,), activation="sigmoid")
    decl["output"]["threshold"] = 0.8
    masks = TorchScriptModel(to_spec(decl), "cpu").predict(make_volume(array))
    np.testing.assert_array_equal(masks[0], array > 0.58)


def test_label_map_output_with_activation_none(tmp_path):
    path = save_label_map_segmenter(tmp_path, (0.5, 1.5))
    spec = to_spec(
        segmentation_spec(path, (2, 1), activation="none", orientation="RAS", spacing_mm=(2, 2, 2))
    )
    array, volume = _three_level_volume(sagittal_affine())
    masks = TorchScriptModel(spec, "cpu").predict(volume)
    # Nearest-neighbour labels on a 2 mm grid aligned with the boxes: exact.
    np.testing.assert_array_equal(masks[0], array == 2)
    np.testing.assert_array_equal(masks[1], array == 1)


# -- segmentation: geometry --------------------------------------------------------------


@pytest.mark.parametrize(
    "affine", [None, sagittal_affine((1.0, 1.0, 1.0), (5.0, -3.0, 9.0))], ids=["axial", "sagittal"]
)
@pytest.mark.parametrize("orientation", ["RAS", "LPS", None])
def test_masks_through_a_reoriented_2mm_grid_land_on_the_source_voxels(
    threshold_ts, affine, orientation
):
    spec = to_spec(
        segmentation_spec(threshold_ts, (1, 2), orientation=orientation, spacing_mm=(2, 2, 2))
    )
    array, volume = _three_level_volume(affine)
    masks = TorchScriptModel(spec, "cpu").predict(volume)
    assert not (masks[0] & masks[1]).any()
    labels = masks[0] * 1 + masks[1] * 2
    # Trilinear probabilities round off exactly the 8 corners of each box (0.75**3 < 0.5):
    # the outer box's corners become background, the inner box's become label 1.
    wrong = {tuple(int(i) for i in w) for w in np.argwhere(labels != array)}
    outer = {(a, b, c) for a in (2, 13) for b in (4, 15) for c in (4, 17)}
    inner = {(a, b, c) for a in (4, 9) for b in (6, 11) for c in (8, 13)}
    assert wrong == outer | inner
    assert all(labels[v] == 0 for v in outer) and all(labels[v] == 1 for v in inner)


def test_a_face_inside_a_coarse_network_voxel_comes_back_within_one_source_column(
    threshold_ts,
):
    # 3 mm slices, 0.7 mm pixels, network at 1.5 mm isotropic, RAS.
    array = np.zeros((8, 30, 30), np.float32)
    array[:, :, 10:] = 1.0  # the patient's left two thirds (columns run to L), face at 7 mm
    volume = make_volume(array, spacing=(3.0, 0.7, 0.7))
    spec = to_spec(
        segmentation_spec(threshold_ts, (1,), orientation="RAS", spacing_mm=(1.5, 1.5, 1.5))
    )
    masks = TorchScriptModel(spec, "cpu").predict(volume)
    assert masks.shape == (1, 8, 30, 30)
    # Every slice and row alike; the face lies inside a 1.5 mm network voxel, so it may
    # move by at most one 0.7 mm column, never more.
    assert (masks[0] == masks[0][:1, :1, :]).all()
    assert not masks[0][:, :, :10].any()  # nothing right of the face
    assert masks[0][:, :, 11:].all()  # column 10 may go either way


# -- sliding windows ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("roi", "overlap", "blend"),
    [
        ((8, 8, 8), 0.25, "gaussian"),
        ((7, 9, 30), 0.5, "constant"),  # ROI larger than the volume along one axis: padded
    ],
)
def test_sliding_window_equals_a_whole_volume_pass_for_a_pointwise_net(
    threshold_ts, roi, overlap, blend
):
    rng = np.random.default_rng(0)
    volume = make_volume(rng.uniform(0, 2, size=(12, 14, 16)))
    whole = TorchScriptModel(to_spec(segmentation_spec(threshold_ts, (1, 2))), "cpu")
    windowed = TorchScriptModel(
        to_spec(
            segmentation_spec(
                threshold_ts, (1, 2), roi_size=roi, overlap=overlap, blend=blend, sw_batch_size=3
            )
        ),
        "cpu",
    )
    image, _ = prepare_input(volume, whole.spec.input)
    torch.testing.assert_close(
        windowed._forward(image, windowed=True),
        whole._forward(image, windowed=True),
        atol=1e-4,
        rtol=1e-5,
    )
    np.testing.assert_array_equal(windowed.predict(volume), whole.predict(volume))


def test_sliding_window_of_a_3x3x3_net_agrees_away_from_window_edges(tmp_path):
    # Zero padding inside each window changes the outermost 2 voxels of every window;
    # gaussian blending gives those little weight, so the labels agree almost everywhere.
    path = save_conv_segmenter(tmp_path, channels=3, kernel_size=3)
    rng = np.random.default_rng(0)
    array = ndimage.gaussian_filter(rng.normal(size=(20, 24, 28)), 2).astype(np.float32) * 5
    volume = make_volume(array)
    whole = TorchScriptModel(to_spec(segmentation_spec(path, (1, 2))), "cpu").predict(volume)
    windowed = TorchScriptModel(
        to_spec(
            segmentation_spec(path, (1, 2), roi_size=(12, 12, 12), overlap=0.5, blend="gaussian")
        ),
        "cpu",
    ).predict(volume)
    assert whole.any(axis=(1, 2, 3)).all()
    assert (whole == windowed).mean() > 0.97


# -- classification ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_ts(tmp_path_factory):
    return save_classifier(tmp_path_factory.mktemp("cls"), (0.5, 1.5))


@pytest.mark.parametrize(("level", "expected"), [(0.0, 0), (1.0, 1), (2.0, 2)])
def test_softmax_classifier_picks_the_class_and_sums_to_one(classifier_ts, level, expected):
    spec = to_spec(
        classification_spec(
            classifier_ts, (0, 1, 2), roi_size=(4, 4, 4), spacing_mm=(2, 2, 2), orientation="RAS"
        )
    )
    model = TorchScriptModel(spec, "cpu")
    as_protocol: ClassificationModel = model
    assert [c.code.meaning for c in as_protocol.classes] == ["Normal", "Abnormal", "Indeterminate"]
    assert model.concept == Code("121071", "DCM", "Finding")
    probs = model.classify(make_volume(np.full((6, 10, 12), level, np.float32)))
    assert probs.dtype == np.float32 and probs.shape == (3,)
    assert int(np.argmax(probs)) == expected
    assert probs.sum() == pytest.approx(1.0, abs=1e-6)


def test_classes_follow_the_declaration_order_not_the_output_order(classifier_ts):
    spec = to_spec(classification_spec(classifier_ts, (2, 0, 1)))
    model = TorchScriptModel(spec, "cpu")
    assert [c.label for c in model.classes] == ["indeterminate", "normal", "abnormal"]
    probs = model.classify(make_volume(np.full((4, 4, 4), 2.0, np.float32)))
    # Logits at mean 2: [0, 15, 20]: class 2 (indeterminate) is the most probable.
    logits = torch.tensor([0.0, 10 * (2 - 0.5), 10 * (2 * 2 - 2.0)])
    expected = torch.softmax(logits, 0)[[2, 0, 1]].numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)


def test_sigmoid_classifier_gives_independent_probabilities(classifier_ts):
    spec = to_spec(classification_spec(classifier_ts, (0, 1, 2), activation="sigmoid"))
    probs = TorchScriptModel(spec, "cpu").classify(make_volume(np.ones((4, 4, 4), np.float32)))
    # Logits 10 * (k * mean - (t_1 + ... + t_k)) at mean 1: [0, 5, 0].
    np.testing.assert_allclose(
        probs, torch.sigmoid(torch.tensor([0.0, 5.0, 0.0])).numpy(), rtol=1e-5
    )
    assert probs.sum() > 1.5  # independent, not normalised


def test_a_classifier_returning_non_probabilities_with_activation_none_is_refused(classifier_ts):
    spec = to_spec(classification_spec(classifier_ts, (0, 1), activation="none"))
    with pytest.raises(ModelError, match="tiny-cls.*not probabilities"):
        TorchScriptModel(spec, "cpu").classify(make_volume(np.full((4, 4, 4), 2.0, np.float32)))


# -- errors ------------------------------------------------------------------------------


def test_too_few_channels_for_the_declared_labels(threshold_ts):
    spec = to_spec(segmentation_spec(threshold_ts, (1, 2, 3)))  # the net has 3 channels
    with pytest.raises(ModelError, match="'tiny-seg': 3 output channel.*at least 4"):
        TorchScriptModel(spec, "cpu").predict(make_volume(np.zeros((4, 4, 4))))


def test_label_map_activation_needs_one_channel(threshold_ts):
    spec = to_spec(segmentation_spec(threshold_ts, (1,), activation="none"))
    with pytest.raises(ModelError, match="1-channel label map, got 3 channels"):
        TorchScriptModel(spec, "cpu").predict(make_volume(np.zeros((4, 4, 4))))


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("nan", "NaN or infinite"),
        ("dims", r"shape \(1, channels, 4, 4, 4\), got \(1, 3, 4, 4\)"),
        ("shape", r"output spatial shape \(2, 2, 2\) differs from its input \(4, 4, 4\)"),
    ],
)
def test_bad_outputs_are_reported_with_the_model_name(tmp_path, fault, message):
    path = save_bad_model(tmp_path, fault)
    spec = to_spec(segmentation_spec(path, (1, 2), name="bad-net"))
    with pytest.raises(ModelError, match=f"'bad-net'.*{message}"):
        TorchScriptModel(spec, "cpu").predict(make_volume(np.zeros((4, 4, 4))))


def test_a_classifier_with_too_few_outputs(classifier_ts):
    decl = classification_spec(classifier_ts, (0, 1))
    decl["classes"][1]["index"] = 5
    with pytest.raises(ModelError, match="3 outputs, but class index 5"):
        TorchScriptModel(to_spec(decl), "cpu").classify(make_volume(np.zeros((4, 4, 4))))


def test_a_failing_forward_pass_names_the_model_and_input(tmp_path):
    path = save_torchscript(torch.nn.Conv3d(2, 3, 1), tmp_path / "two_channels.ts")
    spec = to_spec(segmentation_spec(path, (1,), name="two-in"))
    with pytest.raises(
        ModelError,
        match=r"'two-in': forward pass failed on input of shape "
        r"\(1, 1, 4, 4, 4\)",
    ):
        TorchScriptModel(spec, "cpu").predict(make_volume(np.zeros((4, 4, 4))))


def test_missing_and_non_torchscript_files_are_refused(tmp_path):
    path = save_threshold_segmenter(tmp_path, (0.5,))
    spec = to_spec(segmentation_spec(path, (1,)))
    path.unlink()
    with pytest.raises(ModelError, match="'tiny-seg': TorchScript file .* does not exist"):
        TorchScriptModel(spec, "cpu")
    torch.save(threshold_net((0.5,)).state_dict(), path)  # a pickle, not TorchScript
    with pytest.raises(ModelError, match="is not a TorchScript file"):
        TorchScriptModel(spec, "cpu")


def test_kind_mismatch_is_refused(threshold_ts, classifier_ts):
    seg = TorchScriptModel(to_spec(segmentation_spec(threshold_ts, (1,))), "cpu")
    with pytest.raises(ModelError, match="not classification"):
        seg.classify(make_volume(np.zeros((4, 4, 4))))
    cls = TorchScriptModel(to_spec(classification_spec(classifier_ts)), "cpu")
    with pytest.raises(ModelError, match="not segmentation"):
        cls.predict(make_volume(np.zeros((4, 4, 4))))


# -- precision and devices ---------------------------------------------------------------


def test_half_precision_on_cpu_runs_fp32_and_logs_once(threshold_ts, caplog):
    decl = segmentation_spec(threshold_ts, (1, 2), name="half-on-cpu")
    decl["precision"] = "fp16"
    model = TorchScriptModel(to_spec(decl), "cpu")
    array, volume = _three_level_volume()
    with caplog.at_level(logging.WARNING, logger="radnode.worker"):
        first = model.predict(volume)
        second = model.predict(volume)
    notes = [r for r in caplog.records if "CUDA only" in r.getMessage()]
    assert len(notes) == 1 and "half-on-cpu" in notes[0].getMessage()
    np.testing.assert_array_equal(first[1], array == 2)
    np.testing.assert_array_equal(first, second)


def test_spec_round_trips_through_yaml(threshold_ts):
    import yaml

    decl = segmentation_spec(
        threshold_ts, (1, 2), orientation="RAS", spacing_mm=[2, 2, 2], roi_size=[8, 8, 8]
    )
    spec = ModelSpec.model_validate(yaml.safe_load(yaml.safe_dump(decl)))
    assert spec.input.orientation == "RAS" and spec.input.roi_size == (8, 8, 8)
    assert [lab.label for lab in spec.labels] == [LABELS[0][0], LABELS[1][0]]


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_autocast_gives_the_fp32_masks(threshold_ts, precision):
    decl = segmentation_spec(
        threshold_ts, (1, 2), orientation="RAS", spacing_mm=(2, 2, 2), roi_size=(8, 8, 8)
    )
    decl["precision"] = precision
    model = TorchScriptModel(to_spec(decl), "cuda")
    assert next(model._module.parameters()).device.type == "cuda"
    array, volume = _three_level_volume()
    masks = model.predict(volume)
    cpu = TorchScriptModel(to_spec({**decl, "precision": "fp32"}), "cpu").predict(volume)
    # Half precision moves probabilities by ~1e-3: only near-tie corner voxels may differ.
    assert (masks != cpu).sum() <= 16
    assert masks.shape == (2, 16, 18, 20) and masks[1].sum() > 0


@needs_cuda
def test_predict_on_another_device_moves_the_model(threshold_ts, classifier_ts):
    model = TorchScriptModel(to_spec(segmentation_spec(threshold_ts, (1, 2))), "cpu")
    array, volume = _three_level_volume()
    masks = model.predict(volume, device="cuda")
    assert model.device.type == "cuda"
    np.testing.assert_array_equal(masks[1], array == 2)
    cls = TorchScriptModel(to_spec(classification_spec(classifier_ts)), "cuda:0")
    probs = cls.classify(make_volume(np.ones((4, 4, 4), np.float32)))
    assert int(np.argmax(probs)) == 1
