"""MONAI bundles: untrusted (TorchScript only) and trusted (MONAI ConfigParser)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer

from tests.tiny_models import make_bundle, make_volume, segmentation_spec, to_spec
from workers.models.bundle import BundleModel
from workers.models.torchscript import ModelError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _levels() -> tuple[np.ndarray, object]:
    array = np.zeros((10, 12, 14), np.float32)
    array[2:8, 2:10, 2:12] = 1.0
    array[4:6, 4:8, 4:10] = 2.0
    return array, make_volume(array)


def _spec(folder, values=(1, 2), **kw):
    return to_spec(
        segmentation_spec(folder, values, name="tiny-bundle", source="monai_bundle", **kw)
    )


@pytest.mark.parametrize("trusted", [False, True])
def test_threshold_bundle_maps_labels_through_either_loader(tmp_path, trusted):
    folder = make_bundle(tmp_path / "b", network="threshold", thresholds=(0.5, 1.5))
    model = BundleModel(_spec(folder, (2, 1), trusted=trusted), "cpu")
    assert model.loaded_from == ("config" if trusted else "torchscript")
    assert [s.label for s in model.segments] == ["spleen", "liver"]
    array, volume = _levels()
    masks = model.predict(volume)
    # Hand-set weights in model.pt / model.ts: value 2 -> spleen, value 1 -> liver.
    np.testing.assert_array_equal(masks[0], array == 2)
    np.testing.assert_array_equal(masks[1], array == 1)


def test_trusted_unet_bundle_runs_via_config_parser_with_its_weights_and_inferer(tmp_path):
    folder = make_bundle(tmp_path / "unet", network="unet", inferer_roi=(8, 8, 8))
    trusted = BundleModel(_spec(folder, trusted=True), "cpu")
    assert trusted.loaded_from == "config"
    assert type(trusted._module).__name__ == "UNet"
    assert isinstance(trusted._inferer, SlidingWindowInferer)
    assert tuple(trusted._inferer.roi_size) == (8, 8, 8)
    # The same weights as TorchScript, run with the same windows, give the same masks:
    # the config built the network and model.pt was loaded into it.
    untrusted = BundleModel(
        _spec(folder, trusted=False, roi_size=(8, 8, 8), blend="constant"), "cpu"
    )
    assert untrusted.loaded_from == "torchscript"
    rng = np.random.default_rng(0)
    volume = make_volume(rng.normal(size=(9, 11, 13)))
    a, b = trusted.predict(volume), untrusted.predict(volume)
    assert a.shape == (2, 9, 11, 13)
    np.testing.assert_array_equal(a, b)
    assert 0 < a.sum() < a.size  # random weights, but not a constant output


def test_declared_roi_size_overrides_the_bundle_inferer(tmp_path):
    folder = make_bundle(tmp_path / "b", network="unet", inferer_roi=(4, 4, 4))
    model = BundleModel(_spec(folder, trusted=True, roi_size=(8, 8, 8)), "cpu")
    volume = make_volume(np.random.default_rng(1).normal(size=(8, 8, 8)))
    windowed = model.predict(volume)
    # An 8^3 ROI on an 8^3 volume is one whole pass; the bundle's 4^3 windows differ.
    model.spec.input.roi_size = None
    bundle_inferer = model.predict(volume)
    model._inferer = None
    whole = model.predict(volume)
    np.testing.assert_array_equal(windowed, whole)
    assert (bundle_inferer != whole).any()


def test_yaml_config_and_nested_checkpoint(tmp_path):
    folder = make_bundle(
        tmp_path / "y",
        network="threshold",
        config_format="yaml",
        nested_checkpoint=True,
        with_ts=False,
        inferer_roi=None,
    )
    model = BundleModel(_spec(folder, trusted=True), "cpu")
    assert model.loaded_from == "config" and model._inferer is None
    array, volume = _levels()
    masks = model.predict(volume)
    np.testing.assert_array_equal(masks[1], array == 2)


def test_trusted_bundle_finds_its_own_scripts_package(tmp_path):
    folder = make_bundle(
        tmp_path / "b",
        network="threshold",
        with_ts=False,
        extra_config={"network_def": {"_target_": "tinybundle_scripts.net.TinyNet"}},
    )
    package = folder / "tinybundle_scripts"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "net.py").write_text(
        "import torch\n\n\nclass TinyNet(torch.nn.Conv3d):\n"
        "    def __init__(self):\n        super().__init__(1, 3, 1)\n"
    )
    model = BundleModel(_spec(folder, trusted=True), "cpu")
    assert type(model._module).__name__ == "TinyNet"
    assert str(folder) not in sys.path
    array, volume = _levels()
    np.testing.assert_array_equal(model.predict(volume)[1], array == 2)


def test_untrusted_bundle_never_evaluates_its_config(tmp_path):
    marker = tmp_path / "config-ran"
    evil = f"$open({str(marker)!r}, 'w').write('ran')"
    folder = make_bundle(tmp_path / "b", extra_config={"network_def": evil, "inferer": evil})
    model = BundleModel(_spec(folder, trusted=False), "cpu")
    array, volume = _levels()
    assert model.predict(volume)[0].sum() == (array == 1).sum()
    assert not marker.exists()


def test_trusted_bundle_evaluates_only_network_def_and_inferer(tmp_path):
    marker = tmp_path / "postprocessing-ran"
    folder = make_bundle(
        tmp_path / "b", extra_config={"postprocessing": f"$open({str(marker)!r}, 'w').write('ran')"}
    )
    model = BundleModel(_spec(folder, trusted=True), "cpu")
    assert model.loaded_from == "config"
    assert not marker.exists()


def test_untrusted_bundle_without_torchscript_is_refused(tmp_path):
    folder = make_bundle(tmp_path / "b")
    spec = _spec(folder, trusted=False)  # validated while model.ts existed
    (folder / "models" / "model.ts").unlink()
    with pytest.raises(
        ModelError, match="'tiny-bundle'.*no models/model.ts and is not marked trusted"
    ):
        BundleModel(spec, "cpu")


def test_trusted_bundle_without_weights_falls_back_to_torchscript(tmp_path):
    folder = make_bundle(tmp_path / "b", with_pt=False)
    model = BundleModel(_spec(folder, trusted=True), "cpu")
    assert model.loaded_from == "torchscript"
    (folder / "models" / "model.ts").unlink()
    with pytest.raises(ModelError, match="neither models/model.pt"):
        BundleModel(_spec(folder, trusted=True), "cpu")


def test_weights_that_do_not_fit_network_def_are_refused(tmp_path):
    folder = make_bundle(tmp_path / "b", network="threshold")
    torch.save({"weight": torch.zeros(5, 1, 1, 1, 1)}, folder / "models" / "model.pt")
    with pytest.raises(ModelError, match="cannot load weights .*model.pt into network_def"):
        BundleModel(_spec(folder, trusted=True), "cpu")


def test_a_broken_config_is_reported_as_the_models_fault(tmp_path):
    folder = make_bundle(tmp_path / "b", extra_config={"network_def": {"_target_": "NoSuchNet"}})
    with pytest.raises(ModelError, match="cannot build the bundle's network"):
        BundleModel(_spec(folder, trusted=True), "cpu")


# -- metadata cross-check ----------------------------------------------------------------


def test_declared_label_must_match_channel_def(tmp_path):
    folder = make_bundle(tmp_path / "b", channel_names=["background", "kidney", "spleen"])
    with pytest.raises(
        ModelError,
        match="label 'liver' \\(value 1\\) is declared as 'liver', "
        "but the bundle's channel 1 is 'kidney'",
    ):
        BundleModel(_spec(folder, (1, 2)), "cpu")


def test_label_beyond_the_output_channels_is_refused(tmp_path):
    folder = make_bundle(tmp_path / "b", thresholds=(0.5,), channel_names=["background", "liver"])
    spec = _spec(folder, (1,))
    spec.labels.append(spec.labels[0].model_copy(update={"value": 3, "label": "kidney"}))
    with pytest.raises(
        ModelError, match="needs output channel 3, but the bundle's output has 2 channels"
    ):
        BundleModel(spec, "cpu")


def test_label_on_the_background_channel_is_refused(tmp_path):
    folder = make_bundle(tmp_path / "b", channel_names=["liver", "background", "spleen"])
    with pytest.raises(ModelError, match="channel 1 is 'background'"):
        BundleModel(_spec(folder, (1, 2)), "cpu")


def test_sigmoid_labels_are_checked_against_channel_value_minus_1(tmp_path):
    folder = make_bundle(tmp_path / "b", thresholds=(0.5,), channel_names=["liver", "spleen"])
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "liver",
        "1": "spleen",
    }
    # Channel 0 is value 1 (liver) and channel 1 value 2 (spleen): accepted. (One spec,
    # its activation switched, reads the same channel_def both ways.)
    spec = _spec(folder, (1,))
    spec.labels.append(spec.labels[0].model_copy(update={"value": 2, "label": "spleen"}))
    spec.output.activation = "sigmoid"
    BundleModel(spec, "cpu")
    spec.output.activation = "softmax"  # now value 1 is channel 1, "spleen"
    with pytest.raises(ModelError, match="channel 1 is 'spleen'"):
        BundleModel(spec, "cpu")


def test_names_match_ignoring_case_and_qualifiers(tmp_path):
    folder = make_bundle(tmp_path / "b", channel_names=["background", "Liver", "Spleen (whole)"])
    BundleModel(_spec(folder, (1, 2)), "cpu")


def test_a_multi_channel_input_is_refused(tmp_path):
    folder = make_bundle(tmp_path / "b", input_channels=4)
    with pytest.raises(ModelError, match="input has 4 channels; radnode gives one"):
        BundleModel(_spec(folder), "cpu")


def test_missing_folder_or_metadata(tmp_path):
    folder = make_bundle(tmp_path / "b")
    spec = _spec(folder)
    (folder / "configs" / "metadata.json").unlink()
    with pytest.raises(ModelError, match="configs/metadata.json is missing"):
        BundleModel(spec, "cpu")
    spec.path = tmp_path / "nowhere"
    with pytest.raises(ModelError, match="bundle folder .*nowhere does not exist"):
        BundleModel(spec, "cpu")


@needs_cuda
def test_trusted_bundle_runs_on_cuda(tmp_path):
    folder = make_bundle(tmp_path / "b", network="threshold")
    model = BundleModel(_spec(folder, trusted=True), "cuda")
    assert next(model._module.parameters()).device.type == "cuda"
    array, volume = _levels()
    np.testing.assert_array_equal(model.predict(volume)[1], array == 2)
