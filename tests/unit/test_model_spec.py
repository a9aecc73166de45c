"""Model declarations: what `radnode config check` accepts and the exact reasons it refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from service.cli import main
from service.config import load_settings
from service.errors import ConfigError
from service.model_spec import AcceptSpec, ModelSpec

LIVER = {"value": 1, "label": "Liver",
         "type": {"value": "10200004", "scheme": "SCT", "meaning": "Liver"}}


def _config(tmp_path: Path, models: list[dict[str, Any]],
            rules: list[dict[str, Any]] | None = None) -> Path:
    path = tmp_path / "radnode.yaml"
    data: dict[str, Any] = {"data_dir": str(tmp_path / "data"), "models": models}
    if rules is not None:
        data["rules"] = rules
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _weights(tmp_path: Path) -> Path:
    path = tmp_path / "net.pt"
    path.write_bytes(b"TorchScript archive (not opened by the node)")
    return path


def _bundle(tmp_path: Path, *, model_ts: bool,
            channel_def: dict[str, str] | None = None) -> Path:
    folder = tmp_path / "bundle"
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    meta: dict[str, Any] = {"version": "0.1.0", "network_data_format": {"outputs": {
        "pred": {"channel_def": channel_def or {"0": "background", "1": "liver"}}}}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta), encoding="utf-8")
    if model_ts:
        (folder / "models" / "model.ts").write_bytes(b"ts")
    return folder


def test_builtins_are_always_declared_and_a_site_model_is_added(tmp_path: Path) -> None:
    path = _config(tmp_path, [{"name": "liver-net", "version": "2.1", "path":
                               str(_weights(tmp_path)), "labels": [LIVER],
                               "accepts": {"modalities": ["ct"]},
                               "input": {"orientation": "ras", "spacing_mm": [1.5, 1.5, 2],
                                         "roi_size": [96, 96, 64],
                                         "intensity": {"method": "ct_window", "center": 40,
                                                       "width": 400}},
                               "time_limit_s": 1200}],
                   [{"name": "liver", "models": ["liver-net"]}])
    settings = load_settings(path)
    assert [m.name for m in settings.models] == [
        "liver-net", "radnode-builtin-ct", "radnode-builtin-mr"]
    spec = settings.model("liver-net")
    assert spec.accepts.modalities == ["CT"]
    assert spec.input.orientation == "RAS"
    assert spec.input.spacing_mm == (1.5, 1.5, 2.0)
    assert spec.labels[0].category.meaning == "Anatomical Structure"  # default category


@pytest.mark.parametrize(("model", "message"), [
    ({"name": "x", "path": "/nonexistent/net.pt", "labels": [LIVER]},
     "TorchScript file /nonexistent/net.pt does not exist"),
    ({"name": "x", "source": "torchscript", "labels": [LIVER]}, "source torchscript needs path"),
    ({"name": "radnode-builtin-ct", "source": "builtin", "labels": [LIVER]},
     "a built-in model's labels are fixed"),
    ({"name": "nnunet", "source": "builtin"}, "no built-in model named 'nnunet'"),
    ({"name": "x", "path": "WEIGHTS"}, "a segmentation model needs labels"),
    ({"name": "x", "path": "WEIGHTS", "labels": [LIVER, LIVER]}, "label values repeat: [1, 1]"),
    ({"name": "x", "path": "WEIGHTS", "kind": "classification",
      "classes": [{"index": 0, "label": "a",
                   "code": {"value": "1", "scheme": "99X", "meaning": "a"}}]},
     "a classification model needs at least 2 classes"),
    ({"name": "x", "path": "WEIGHTS", "labels": [LIVER], "input": {"orientation": "RLS"}},
     "orientation 'RLS': three axis codes"),
    ({"name": "x", "path": "WEIGHTS", "labels": [LIVER],
      "input": {"intensity": {"method": "ct_window", "center": 40}}},
     "ct_window needs center and width"),
    ({"name": "x", "path": "WEIGHTS", "labels": [LIVER],
      "accepts": {"conditions": {"BodyPart": "CHEST"}}},
     "condition on 'BodyPart': not a DICOM keyword"),
    ({"name": "x", "path": "WEIGHTS", "labels": [LIVER],
      "accepts": {"conditions": {"BodyPartExamined": "(CHEST"}}},
     "bad regular expression"),
    ({"name": "x", "path": "WEIGHTS", "labels": [LIVER], "time_limit_s": 60,
      "soft_time_limit_s": 60}, "soft_time_limit_s must be less than time_limit_s"),
    ({"name": "x", "path": "WEIGHTS", "labels": [{**LIVER, "rgb": [0, 300, 0]}]},
     "each channel must be 0-255"),
    ({"name": "x", "path": "WEIGHTS", "labels": [LIVER], "device": "gpu0"},
     "device 'gpu0': auto, cpu, cuda or cuda:N"),
    ({"name": "../x", "path": "WEIGHTS", "labels": [LIVER]}, "model name '../x'"),
])
def test_bad_declarations_say_exactly_what_is_wrong(
    tmp_path: Path, model: dict[str, Any], message: str,
) -> None:
    if model.get("path") == "WEIGHTS":
        model = {**model, "path": str(_weights(tmp_path))}
    with pytest.raises(ConfigError) as info:
        load_settings(_config(tmp_path, [model]))
    assert message in str(info.value)
    assert "models.0" in str(info.value)  # where in the file


def test_rule_must_name_a_declared_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_config(tmp_path, [], [{"name": "liver", "models": ["liver-net"]}]))
    assert "model 'liver-net' is not declared" in str(info.value)
    assert "rules[0]" in str(info.value)
    assert "(line " in str(info.value)  # where in the file


def test_model_names_are_unique(tmp_path: Path) -> None:
    weights = str(_weights(tmp_path))
    twice = {"name": "liver-net", "path": weights, "labels": [LIVER]}
    with pytest.raises(ConfigError, match="repeated: liver-net"):
        load_settings(_config(tmp_path, [twice, twice]))


def test_untrusted_bundle_needs_torchscript(tmp_path: Path) -> None:
    folder = _bundle(tmp_path, model_ts=False)
    base = {"name": "b", "source": "monai_bundle", "path": str(folder), "labels": [LIVER]}
    with pytest.raises(ConfigError, match="not marked trusted and has no models/model.ts"):
        load_settings(_config(tmp_path, [base]))
    assert load_settings(_config(tmp_path, [{**base, "trusted": True}])).model("b").trusted


def test_bundle_labels_must_exist_in_its_channel_def(tmp_path: Path) -> None:
    folder = _bundle(tmp_path, model_ts=True, channel_def={"0": "background", "1": "liver"})
    wrong = {**LIVER, "value": 2}
    with pytest.raises(ConfigError, match=r"value 2 \(channel 2\), which the bundle.s channel_def"):
        load_settings(_config(tmp_path, [{"name": "b", "source": "monai_bundle",
                                          "path": str(folder), "labels": [wrong]}]))


def test_sigmoid_bundle_channel_is_label_value_minus_1(tmp_path: Path) -> None:
    folder = _bundle(tmp_path, model_ts=True, channel_def={"0": "TC", "1": "WT", "2": "ET"})
    labels = [{**LIVER, "value": v, "label": n} for v, n in ((1, "TC"), (2, "WT"), (3, "ET"))]
    spec = load_settings(_config(tmp_path, [{
        "name": "brats", "source": "monai_bundle", "path": str(folder), "labels": labels,
        "output": {"activation": "sigmoid"}}])).model("brats")
    assert [lab.value for lab in spec.labels] == [1, 2, 3]
    with pytest.raises(ConfigError, match="value 3 \\(channel 3\\)"):
        load_settings(_config(tmp_path, [{"name": "brats", "source": "monai_bundle",
                                          "path": str(folder), "labels": labels}]))


def test_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a MONAI bundle: configs/metadata.json"):
        load_settings(_config(tmp_path, [{"name": "b", "source": "monai_bundle",
                                          "path": str(tmp_path), "labels": [LIVER]}]))


def test_accept_rules() -> None:
    accepts = AcceptSpec(modalities=["mr"], conditions={"SeriesDescription": ".*t1.*"})
    assert accepts.rejects("MR", {"SeriesDescription": "t1_fl2d_sag"}) is None
    assert accepts.rejects("CT", {"SeriesDescription": "t1"}) == "modality CT is not one of MR"
    assert accepts.rejects("MR", {}) == "SeriesDescription is absent"
    assert "does not match" in str(accepts.rejects("MR", {"SeriesDescription": "T2 FLAIR"}))


def test_config_check_lists_models_and_refuses_bad_ones(tmp_path: Path) -> None:
    runner = CliRunner()
    good = _config(tmp_path, [{"name": "liver-net", "path": str(_weights(tmp_path)),
                               "labels": [LIVER], "accepts": {"modalities": ["CT"]}}])
    result = runner.invoke(main, ["config", "check", "--config", str(good)])
    assert result.exit_code == 0, result.output
    assert "model liver-net 1: segmentation (torchscript" in result.output
    assert "accepts CT, outputs: Liver" in result.output
    bad = _config(tmp_path, [{"name": "x", "path": "/missing.pt", "labels": [LIVER]}])
    result = runner.invoke(main, ["config", "check", "--config", str(bad)])
    assert result.exit_code != 0
    assert "TorchScript file /missing.pt does not exist" in result.output


def test_spec_round_trips_through_yaml(tmp_path: Path) -> None:
    spec = ModelSpec(name="liver-net", path=_weights(tmp_path), labels=[LIVER])  # type: ignore[list-item]
    again = ModelSpec.model_validate(yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json"))))
    assert again == spec
