"""MONAI Model Zoo bundles (``source: monai_bundle``).

A bundle is a folder (MONAI Bundle specification,
https://docs.monai.io/en/stable/mb_specification.html)::

    configs/metadata.json        network_data_format: inputs, outputs, channel_def
    configs/inference.json|yaml  network_def, inferer, pre/post-processing (Python!)
    models/model.pt              weights (state dict)
    models/model.ts              the same network as TorchScript (optional)

How a bundle runs depends on ``trusted`` in its declaration:

* **not trusted**: only ``configs/metadata.json`` (plain JSON, never evaluated)
  and ``models/model.ts`` are read; the inference config is never parsed, so
  none of its ``$`` expressions or ``_target_`` components run. A bundle
  without ``models/model.ts`` is refused (export it with ``python -m
  monai.bundle ckpt_export``, or mark it trusted).
* **trusted**: MONAI's :class:`monai.bundle.ConfigParser` reads the inference
  config (``bundle_root`` set to the folder, the folder on ``sys.path`` for
  the bundle's own ``scripts`` package), instantiates ``network_def``
  and the weights ``models/model.pt`` are loaded with
  ``torch.load(weights_only=True)`` and ``load_state_dict(strict=True)``
  (a checkpoint nested as ``{"model": ...}`` or ``{"state_dict": ...}`` is
  unwrapped). Its ``inferer`` (e.g. ``SlidingWindowInferer``), when defined,
  runs segmentation unless the declaration sets ``input.roi_size``, which then
  wins. A trusted bundle without the config or the weights falls back to
  ``models/model.ts``.

In both cases pre- and post-processing come from the :class:`ModelSpec`
(orientation, spacing, intensity, activation), **not** from the bundle's
``preprocessing``/``postprocessing`` sections: those start with
``LoadImaged`` from files on disk and end with ``SaveImaged`` to files, while
radnode has an in-memory :class:`~workers.inference.base.Volume` and writes
DICOM SEG. The site transcribes the bundle's transforms (e.g. ``Orientationd
axcodes RAS``, ``Spacingd pixdim``, ``ScaleIntensityRanged``) into the spec.
Inference itself is :class:`~workers.models.torchscript.TorchModel`'s, shared
with TorchScript models.

Before loading, the declared labels (or classes) are cross-checked against the
bundle's ``network_data_format.outputs`` (``num_channels``, ``channel_def``),
and its input must have one channel.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from service.model_spec import ModelSpec
from workers.models.torchscript import (
    Inferer,
    ModelError,
    TorchModel,
    load_torchscript,
    resolve_device,
)

__all__ = ["BundleModel", "check_metadata", "read_metadata"]

log = logging.getLogger("radnode.worker")

#: Inference config names, in the order they are looked for (MONAI Bundle specification).
INFERENCE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")


def read_metadata(folder: Path, model_name: str) -> dict[str, Any]:
    """``configs/metadata.json`` of a bundle, as plain JSON (nothing evaluated).

    Raises
    ------
    ModelError
        If the folder or file is missing, or is not a JSON object.
    """
    path = folder / "configs" / "metadata.json"
    if not folder.is_dir():
        raise ModelError(f"model {model_name!r}: MONAI bundle folder {folder} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"model {model_name!r}: {folder} is not a MONAI bundle: "
                         "configs/metadata.json is missing") from exc
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {model_name!r}: cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"model {model_name!r}: {path} is not a JSON object")
    return data


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _names_match(channel: str, *declared: str) -> bool:
    """Whether a channel_def name and a declared label/meaning name the same thing.

    Case, spaces and punctuation are ignored; one may contain the other
    (``"kidney"`` matches ``"Right kidney"``).
    """
    c = _normalise(channel)
    if not c:
        return True
    return any(d and (c in d or d in c) for d in map(_normalise, declared))


def _first(section: Any, what: str, model_name: str) -> dict[str, Any] | None:
    """The first entry of ``network_data_format.inputs``/``outputs``, or ``None``."""
    if not isinstance(section, dict) or not section:
        return None
    name = "image" if what == "inputs" and "image" in section else (
        "pred" if what == "outputs" and "pred" in section else next(iter(section)))
    entry = section[name]
    if not isinstance(entry, dict):
        raise ModelError(f"model {model_name!r}: metadata network_data_format.{what}.{name} is "
                         "not an object")
    return entry


def check_metadata(spec: ModelSpec, metadata: Mapping[str, Any]) -> None:
    """Cross-check a declaration against a bundle's ``network_data_format``.

    Checks that the input has one channel, that the output has enough
    channels for the declared labels (channel ``k`` is label value ``k`` for
    ``softmax``/``argmax``, ``k - 1`` for ``sigmoid``) or classes (index), and
    that each declared label or class names the same structure as
    ``channel_def`` of its channel (case and punctuation ignored; one name may
    contain the other; a declared label on a ``background`` channel is an
    error). Missing ``num_channels``/``channel_def`` are not checked.

    Parameters
    ----------
    spec : ModelSpec
        The declaration.
    metadata : mapping
        Parsed ``configs/metadata.json``.

    Raises
    ------
    ModelError
        Listing every mismatch.
    """
    fmt = metadata.get("network_data_format", {})
    if not isinstance(fmt, dict):
        raise ModelError(f"model {spec.name!r}: metadata network_data_format is not an object")
    problems: list[str] = []
    inp = _first(fmt.get("inputs"), "inputs", spec.name)
    if inp is not None and inp.get("num_channels") not in (None, 1):
        problems.append(f"the bundle's input has {inp['num_channels']} channels; radnode "
                        "gives one (a single series)")
    out = _first(fmt.get("outputs"), "outputs", spec.name)
    if out is None:
        if problems:
            raise ModelError(f"model {spec.name!r}: " + "; ".join(problems))
        return
    raw_defs = out.get("channel_def") or {}
    try:
        channel_def = {int(k): str(v) for k, v in dict(raw_defs).items()}
    except (TypeError, ValueError) as exc:
        raise ModelError(f"model {spec.name!r}: metadata channel_def keys must be channel "
                         f"numbers: {exc}") from exc
    num_channels = out.get("num_channels")
    activation = spec.output.activation
    wanted: list[tuple[int, str, tuple[str, ...]]] = []  # (channel, what, names)
    if spec.kind == "segmentation":
        for lab in spec.labels:
            channel = lab.value - 1 if activation == "sigmoid" else lab.value
            wanted.append((channel, f"label {lab.label!r} (value {lab.value})",
                           (lab.label, lab.type.meaning)))
    else:
        for cls in spec.classes:
            wanted.append((cls.index, f"class {cls.label!r} (index {cls.index})",
                           (cls.label, cls.code.meaning)))
    multi_channel = not (spec.kind == "segmentation" and activation == "none")
    for channel, what, names in wanted:
        if multi_channel and isinstance(num_channels, int) and channel >= num_channels:
            problems.append(f"{what} needs output channel {channel}, but the bundle's output "
                            f"has {num_channels} channels")
            continue
        if channel not in channel_def:
            if channel_def:
                problems.append(f"{what}: channel_def has no entry {channel} (it defines "
                                f"{dict(sorted(channel_def.items()))})")
            continue
        name = channel_def[channel]
        if _normalise(name) == "background" or not _names_match(name, *names):
            problems.append(f"{what} is declared as {names[0]!r}, but the bundle's channel "
                            f"{channel} is {name!r}")
    if problems:
        raise ModelError(f"model {spec.name!r} does not match its bundle's metadata: "
                         + "; ".join(problems))


def _state_dict(checkpoint: Any, path: Path, model_name: str) -> Mapping[str, Any]:
    if isinstance(checkpoint, Mapping) and not all(
        isinstance(v, torch.Tensor) for v in checkpoint.values()
    ):
        for key in ("model", "state_dict", "network"):
            if isinstance(checkpoint.get(key), Mapping):
                return checkpoint[key]  # type: ignore[no-any-return]
    if not isinstance(checkpoint, Mapping):
        raise ModelError(f"model {model_name!r}: {path} holds a {type(checkpoint).__name__}, "
                         "not a state dict")
    return checkpoint


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    """Put the bundle folder first on ``sys.path`` while its config is instantiated.

    As MONAI's ``ConfigWorkflow.run`` does, so that ``_target_: scripts.net.Net``
    finds the bundle's own ``scripts`` package. Imported modules stay in
    ``sys.modules``: two bundles with a same-named package in one worker
    process share the first one loaded.
    """
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _load_trusted(
    folder: Path, config: Path, weights: Path, model_name: str
) -> tuple[torch.nn.Module, Inferer | None]:
    """Instantiate ``network_def`` (and ``inferer``) with MONAI's ConfigParser; load weights."""
    from monai.bundle.config_parser import ConfigParser

    parser = ConfigParser()
    try:
        parser.read_meta(str(folder / "configs" / "metadata.json"))
        parser.read_config(str(config))
        parser["bundle_root"] = str(folder)
        if "network_def" not in parser:
            raise ModelError(f"model {model_name!r}: {config} defines no network_def")
        with _on_sys_path(folder):
            network = parser.get_parsed_content("network_def")
            inferer = parser.get_parsed_content("inferer") if "inferer" in parser else None
    except ModelError:
        raise
    except Exception as exc:  # the config may raise anything; report it as the model's fault
        raise ModelError(f"model {model_name!r}: cannot build the bundle's network from "
                         f"{config}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(network, torch.nn.Module):
        raise ModelError(f"model {model_name!r}: network_def in {config} is a "
                         f"{type(network).__name__}, not a torch.nn.Module")
    if inferer is not None and not callable(inferer):
        raise ModelError(f"model {model_name!r}: inferer in {config} is not callable")
    try:
        checkpoint = torch.load(str(weights), map_location="cpu", weights_only=True)
        network.load_state_dict(_state_dict(checkpoint, weights, model_name), strict=True)
    except ModelError:
        raise
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        raise ModelError(f"model {model_name!r}: cannot load weights {weights} into "
                         f"network_def: {exc}") from exc
    return network, inferer


class BundleModel(TorchModel):
    """A MONAI bundle run through :class:`~workers.models.torchscript.TorchModel`.

    Parameters
    ----------
    spec : ModelSpec
        ``source: monai_bundle``; ``spec.path`` is the bundle folder.
    device : str or torch.device
        Where to load and run it; ``"auto"`` picks CUDA when available.

    Attributes
    ----------
    metadata : dict
        Parsed ``configs/metadata.json``.
    loaded_from : str
        ``"config"`` (trusted: ConfigParser + ``model.pt``) or ``"torchscript"``
        (``models/model.ts``).

    Raises
    ------
    ModelError
        If the folder or its metadata is missing or invalid, the declaration
        does not match the metadata, an untrusted bundle has no
        ``models/model.ts``, or the network cannot be built or loaded.
    """

    def __init__(self, spec: ModelSpec, device: str | torch.device = "cpu") -> None:
        if spec.path is None:
            raise ModelError(f"model {spec.name!r}: source monai_bundle needs path")
        folder = Path(spec.path)
        self.metadata = read_metadata(folder, spec.name)
        check_metadata(spec, self.metadata)
        target = resolve_device(device)
        torchscript = folder / "models" / "model.ts"
        weights = folder / "models" / "model.pt"
        config = next((folder / "configs" / n for n in INFERENCE_CONFIGS
                       if (folder / "configs" / n).is_file()), None)
        inferer: Inferer | None = None
        if spec.trusted and config is not None and weights.is_file():
            module, inferer = _load_trusted(folder, config, weights, spec.name)
            self.loaded_from = "config"
        elif torchscript.is_file():
            if spec.trusted:
                log.info("model %s: trusted bundle without %s, loading models/model.ts",
                         spec.name, "models/model.pt" if config else "an inference config")
            module = load_torchscript(torchscript, target, spec.name)
            self.loaded_from = "torchscript"
        elif not spec.trusted:
            raise ModelError(
                f"model {spec.name!r}: bundle {folder} has no models/model.ts and is not marked "
                "trusted; running its config would execute arbitrary Python. Export it to "
                "TorchScript (python -m monai.bundle ckpt_export) or set trusted: true if you "
                "trust its author")
        else:
            raise ModelError(
                f"model {spec.name!r}: bundle {folder} has neither models/model.pt with "
                f"configs/inference.json (or .yaml) nor models/model.ts")
        super().__init__(spec, module, target, inferer=inferer)
