"""Tiny networks built in code, saved as TorchScript files or MONAI bundles, for tests.

Every ``save_*`` function writes into a folder the caller owns (``tmp_path``)
and returns the path; every ``*_spec`` function returns a YAML-able dict for
the ``models:`` section of the config, which :func:`to_spec` validates into a
:class:`~service.model_spec.ModelSpec`.

The *threshold* networks have hand-set weights so their output is known:
with thresholds ``t1 < t2 < ...`` a softmax segmenter's argmax at a voxel of
value ``x`` is the number of thresholds below ``x`` (label value ``k`` for
``t_k < x < t_k+1``); a sigmoid segmenter's channel ``k - 1`` is above 0.5
exactly where ``x > t_k``. They are pointwise (1 x 1 x 1 convolutions), so
sliding windows, resampling and reorientation can be checked voxel by voxel.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import monai
import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from service.model_spec import ModelSpec
from workers.inference.base import Volume

#: (label, SNOMED CT type code, meaning) of label values 1, 2, 3 of the tiny segmenters.
LABELS: tuple[tuple[str, str, str], ...] = (
    ("liver", "10200004", "Liver"),
    ("spleen", "78961009", "Spleen"),
    ("kidney", "64033007", "Kidney"),
)
#: (label, SNOMED CT code, meaning) of class indices 0, 1, 2 of the tiny classifier.
CLASSES: tuple[tuple[str, str, str], ...] = (
    ("normal", "17621005", "Normal"),
    ("abnormal", "263654008", "Abnormal"),
    ("indeterminate", "82334004", "Indeterminate"),
)


# -- networks ----------------------------------------------------------------------------


def threshold_net(
    thresholds: Sequence[float], *, sigmoid: bool = False, scale: float = 20.0
) -> nn.Conv3d:
    """A 1 x 1 x 1 convolution whose output encodes intensity thresholds.

    Softmax (``sigmoid=False``): ``len(thresholds) + 1`` channels, channel
    ``k`` is ``scale * (k * x - (t_1 + ... + t_k))``; consecutive channels
    differ by ``scale * (x - t_k)``, so the argmax is the number of thresholds
    below ``x``. Sigmoid: ``len(thresholds)`` channels, channel ``k - 1`` is
    ``scale * (x - t_k)``.
    """
    t = torch.tensor([float(v) for v in thresholds])
    if sigmoid:
        conv = nn.Conv3d(1, len(t), kernel_size=1)
        weight = torch.full((len(t),), scale)
        bias = -scale * t
    else:
        conv = nn.Conv3d(1, len(t) + 1, kernel_size=1)
        weight = scale * torch.arange(len(t) + 1, dtype=torch.float32)
        bias = -scale * torch.cat([torch.zeros(1), torch.cumsum(t, 0)])
    with torch.no_grad():
        conv.weight.copy_(weight.view(-1, 1, 1, 1, 1))
        assert conv.bias is not None
        conv.bias.copy_(bias)
    return conv.eval()


class LabelMapNet(nn.Module):
    """Returns a 1-channel label map: the number of thresholds below each voxel."""

    def __init__(self, thresholds: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("thresholds", torch.tensor([float(v) for v in thresholds]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.thresholds.view(1, -1, 1, 1, 1)
        return (x > t).float().sum(dim=1, keepdim=True)


def conv_net(channels: int = 3, kernel_size: int = 3, seed: int = 0) -> nn.Module:
    """A random 3-D conv net, zero-padded so the output has the input's spatial shape."""
    generator = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv3d(1, 4, kernel_size, padding=kernel_size // 2),
        nn.ReLU(),
        nn.Conv3d(4, channels, kernel_size, padding=kernel_size // 2),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return net.eval()


class ClassifierNet(nn.Module):
    """Logits ``scale * (k * mean - (t_1 + ... + t_k))``: class = thresholds below the mean."""

    def __init__(self, thresholds: Sequence[float], scale: float = 10.0) -> None:
        super().__init__()
        t = torch.tensor([float(v) for v in thresholds])
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(1, len(t) + 1)
        with torch.no_grad():
            self.fc.weight.copy_(scale * torch.arange(len(t) + 1, dtype=torch.float32)[:, None])
            self.fc.bias.copy_(-scale * torch.cat([torch.zeros(1), torch.cumsum(t, 0)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))


class BadNet(nn.Module):
    """A 3-channel network whose output is wrong in one way (``fault``)."""

    def __init__(self, fault: str) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 3, kernel_size=1)
        self.fault = fault

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.fault == "nan":
            return y * float("nan")
        if self.fault == "dims":
            return y.mean(dim=2)
        if self.fault == "shape":
            return torch.nn.functional.avg_pool3d(y, 2)
        return y


def tiny_unet(out_channels: int = 3, seed: int = 0) -> nn.Module:
    """A two-level MONAI ``UNet`` with 4 and 8 channels (needs even spatial sizes)."""
    torch.manual_seed(seed)
    return monai.networks.nets.UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=out_channels,
        channels=(4, 8),
        strides=(2,),
        num_res_units=0,
    ).eval()


UNET_CONFIG: dict[str, Any] = {
    "_target_": "UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "channels": [4, 8],
    "strides": [2],
    "num_res_units": 0,
}


# -- saving ------------------------------------------------------------------------------


def save_torchscript(
    module: nn.Module, path: Path, example_shape: Sequence[int] = (1, 1, 4, 4, 4)
) -> Path:
    """``torch.jit.script`` (or ``trace`` when scripting fails) and ``torch.jit.save``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated in torch
        try:
            scripted = torch.jit.script(module.eval())
        except Exception:  # noqa: BLE001 - fall back to tracing
            scripted = torch.jit.trace(module.eval(), torch.zeros(tuple(example_shape)))
        torch.jit.save(scripted, str(path))
    return path


def save_threshold_segmenter(
    folder: Path,
    thresholds: Sequence[float] = (0.5,),
    *,
    sigmoid: bool = False,
    name: str = "threshold.ts",
) -> Path:
    """TorchScript file of :func:`threshold_net`."""
    return save_torchscript(threshold_net(thresholds, sigmoid=sigmoid), folder / name)


def save_label_map_segmenter(
    folder: Path, thresholds: Sequence[float] = (0.5,), name: str = "labelmap.ts"
) -> Path:
    """TorchScript file of :class:`LabelMapNet` (``activation: none``)."""
    return save_torchscript(LabelMapNet(thresholds), folder / name)


def save_conv_segmenter(
    folder: Path, channels: int = 3, kernel_size: int = 3, seed: int = 0, name: str = "conv.ts"
) -> Path:
    """TorchScript file of :func:`conv_net`."""
    return save_torchscript(conv_net(channels, kernel_size, seed), folder / name)


def save_classifier(
    folder: Path, thresholds: Sequence[float] = (0.5, 1.5), name: str = "classifier.ts"
) -> Path:
    """TorchScript file of :class:`ClassifierNet` (``len(thresholds) + 1`` classes)."""
    return save_torchscript(ClassifierNet(thresholds), folder / name)


def save_bad_model(folder: Path, fault: Literal["nan", "dims", "shape"]) -> Path:
    """TorchScript file of :class:`BadNet`: NaN output, 4-D output, or half-size output."""
    return save_torchscript(BadNet(fault), folder / f"bad_{fault}.ts")


def make_bundle(
    folder: Path,
    *,
    network: Literal["threshold", "unet"] = "threshold",
    thresholds: Sequence[float] = (0.5, 1.5),
    channel_names: Sequence[str] | None = None,
    input_channels: int = 1,
    with_ts: bool = True,
    with_pt: bool = True,
    with_config: bool = True,
    config_format: Literal["json", "yaml"] = "json",
    inferer_roi: Sequence[int] | None = (8, 8, 8),
    nested_checkpoint: bool = False,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write a minimal MONAI bundle folder and return it.

    Parameters
    ----------
    folder : pathlib.Path
        The bundle folder (created).
    network : {"threshold", "unet"}
        ``threshold``: ``network_def`` is a ``torch.nn.Conv3d`` 1 x 1 x 1 whose
        ``model.pt`` holds :func:`threshold_net` weights (softmax, label value
        ``k`` for ``t_k < x < t_k+1``); ``unet``: a tiny MONAI ``UNet`` with
        random weights, 3 output channels.
    thresholds : sequence of float
        For ``threshold``.
    channel_names : sequence of str or None
        ``channel_def`` of the output (default ``background`` then
        :data:`LABELS` names).
    input_channels : int
        ``num_channels`` of the input in the metadata.
    with_ts, with_pt, with_config : bool
        Write ``models/model.ts``, ``models/model.pt``, ``configs/inference.*``.
    config_format : {"json", "yaml"}
    inferer_roi : sequence of int or None
        ROI of a ``SlidingWindowInferer`` ``inferer`` in the config; ``None``
        leaves ``inferer`` out.
    nested_checkpoint : bool
        Save ``model.pt`` as ``{"model": state_dict}``.
    extra_config : dict or None
        Extra top-level config entries (e.g. ``$`` expressions).
    """
    if network == "threshold":
        net: nn.Module = threshold_net(thresholds)
        channels = len(thresholds) + 1
        net_def: dict[str, Any] = {
            "_target_": "torch.nn.Conv3d",
            "in_channels": 1,
            "out_channels": channels,
            "kernel_size": 1,
        }
    else:
        net = tiny_unet()
        channels = 3
        net_def = dict(UNET_CONFIG)
    names = (
        list(channel_names)
        if channel_names is not None
        else (["background"] + [lab[0] for lab in LABELS][: channels - 1])
    )
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "name": f"radnode tiny {network} bundle",
        "task": "test segmentation",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": input_channels,
                    "spatial_shape": [8, 8, 8],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": channels,
                    "spatial_shape": [8, 8, 8],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {str(i): n for i, n in enumerate(names)},
                }
            },
        },
    }
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(parents=True, exist_ok=True)
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    if with_config:
        config: dict[str, Any] = {
            "imports": ["$import torch"],
            "bundle_root": ".",
            "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
            "network_def": net_def,
            "network": "$@network_def.to(@device)",
            # What a real bundle has and radnode never runs: it loads files from disk.
            "preprocessing": {
                "_target_": "Compose",
                "transforms": [
                    {"_target_": "LoadImaged", "keys": "image"},
                    {"_target_": "EnsureChannelFirstd", "keys": "image"},
                ],
            },
        }
        if inferer_roi is not None:
            config["inferer"] = {
                "_target_": "SlidingWindowInferer",
                "roi_size": list(inferer_roi),
                "sw_batch_size": 2,
                "overlap": 0.25,
            }
        config.update(extra_config or {})
        if config_format == "json":
            (folder / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
        else:
            import yaml

            (folder / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    if with_pt:
        state = net.state_dict()
        torch.save({"model": state} if nested_checkpoint else state, folder / "models" / "model.pt")
    if with_ts:
        save_torchscript(net, folder / "models" / "model.ts", (1, 1, 8, 8, 8))
    return folder


# -- declarations ------------------------------------------------------------------------


def label_dicts(values: Sequence[int]) -> list[dict[str, Any]]:
    """``labels:`` entries for label values (1 = liver, 2 = spleen, 3 = kidney)."""
    result = []
    for value in values:
        label, code, meaning = LABELS[value - 1]
        result.append(
            {
                "value": value,
                "label": label,
                "type": {"value": code, "scheme": "SCT", "meaning": meaning},
            }
        )
    return result


def class_dicts(indices: Sequence[int]) -> list[dict[str, Any]]:
    """``classes:`` entries for class indices (0 normal, 1 abnormal, 2 indeterminate)."""
    return [
        {
            "index": i,
            "label": CLASSES[i][0],
            "code": {"value": CLASSES[i][1], "scheme": "SCT", "meaning": CLASSES[i][2]},
        }
        for i in indices
    ]


def segmentation_spec(
    path: Path,
    values: Sequence[int] = (1,),
    *,
    name: str = "tiny-seg",
    source: Literal["torchscript", "monai_bundle"] = "torchscript",
    activation: str = "softmax",
    trusted: bool = False,
    **input_spec: Any,
) -> dict[str, Any]:
    """YAML-able declaration of a tiny segmenter; ``input_spec`` fills ``input:``."""
    return {
        "name": name,
        "version": "0.1",
        "kind": "segmentation",
        "source": source,
        "path": str(path),
        "trusted": trusted,
        "accepts": {"modalities": ["CT"]},
        "input": dict(input_spec),
        "output": {"activation": activation},
        "labels": label_dicts(values),
    }


def classification_spec(
    path: Path,
    indices: Sequence[int] = (0, 1, 2),
    *,
    name: str = "tiny-cls",
    activation: str = "softmax",
    **input_spec: Any,
) -> dict[str, Any]:
    """YAML-able declaration of the tiny classifier; ``input_spec`` fills ``input:``."""
    return {
        "name": name,
        "version": "0.1",
        "kind": "classification",
        "source": "torchscript",
        "path": str(path),
        "accepts": {"modalities": ["CT"]},
        "input": dict(input_spec),
        "output": {"activation": activation},
        "classes": class_dicts(indices),
    }


def to_spec(declaration: dict[str, Any]) -> ModelSpec:
    """Validate a declaration dict into a :class:`ModelSpec`."""
    return ModelSpec.model_validate(declaration)


# -- volumes -----------------------------------------------------------------------------


def axial_affine(
    spacing: Sequence[float] = (1.0, 1.0, 1.0), origin: Sequence[float] = (0.0, 0.0, 0.0)
) -> npt.NDArray[np.float64]:
    """Axial ``(slice, row, column)`` to LPS: slices foot to head, rows to P, columns to L."""
    affine = np.eye(4)
    affine[:3, :3] = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=float) * np.asarray(
        spacing, dtype=float
    )
    affine[:3, 3] = origin
    return affine


def sagittal_affine(
    spacing: Sequence[float] = (1.0, 1.0, 1.0), origin: Sequence[float] = (0.0, 0.0, 0.0)
) -> npt.NDArray[np.float64]:
    """Sagittal ``(slice, row, column)`` to LPS.

    Image Orientation (Patient) ``[0, 1, 0, 0, 0, -1]``: columns run to
    Posterior, rows to Inferior; the slice normal (row x column cosines) is
    ``-x``, so slices run toward the patient's Right. Axis codes ``RIP``.
    """
    affine = np.eye(4)
    direction = np.array([[-1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float)
    affine[:3, :3] = direction * np.asarray(spacing, dtype=float)
    affine[:3, 3] = origin
    return affine


def make_volume(
    array: npt.ArrayLike,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    affine: npt.NDArray[np.float64] | None = None,
    modality: str = "CT",
) -> Volume:
    """A :class:`Volume` without source datasets (axial affine unless given)."""
    data = np.asarray(array, dtype=np.float32)
    sp = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    return Volume(
        array=data,
        spacing=sp,
        affine=axial_affine(sp) if affine is None else np.asarray(affine, float),
        datasets=[],
        modality=modality,
    )
