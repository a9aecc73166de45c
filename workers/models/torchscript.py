"""Site-supplied TorchScript models, run with the pre/post-processing their spec declares.

:class:`TorchModel` runs any ``torch.nn.Module`` (a TorchScript module, or a
network a trusted MONAI bundle built) the way its
:class:`~service.model_spec.ModelSpec` declares: input through
:func:`workers.inference.preprocess.prepare_input`, a forward pass (whole
volume, MONAI ``sliding_window_inference`` when ``input.roi_size`` is set, or
a bundle's own inferer), activation, and for segmentations the scores mapped
back onto the source grid (:func:`workers.inference.preprocess.to_source_grid`).
:class:`TorchScriptModel` loads a ``torch.jit.save`` file;
:class:`workers.models.bundle.BundleModel` reuses :class:`TorchModel`.

Output conventions (``output.activation``, see :class:`~service.model_spec.OutputSpec`):

* segmentation, network output ``(1, C, *spatial)`` on the input grid:

  - ``softmax``: probabilities ``softmax`` over ``C`` channels, resampled to
    the source grid, argmax; label value ``k`` is channel ``k`` (0 is
    background), so ``C`` must exceed the largest declared value;
  - ``argmax``: like ``softmax`` on the raw scores (argmax is the same);
  - ``sigmoid``: one channel per label, channel ``value - 1``, probability
    above ``output.threshold``; labels may overlap;
  - ``none``: ``C == 1``, the network returns a label map; it is resampled
    with nearest neighbour and rounded.

* classification, network output ``(1, N)`` (trailing singleton dimensions
  allowed): ``softmax`` over all ``N`` outputs, ``sigmoid`` per output, or
  ``none`` (already probabilities, each must lie in ``[0, 1]``); entry ``i``
  of the result is output ``spec.classes[i].index``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.inferers.utils import sliding_window_inference

from service.model_spec import ModelSpec
from workers.inference.base import ClassSpec, Code, SegmentSpec, Volume
from workers.inference.preprocess import GridPlan, prepare_input, to_source_grid

__all__ = ["Inferer", "ModelError", "TorchModel", "TorchScriptModel", "load_torchscript",
           "resolve_device"]

log = logging.getLogger("radnode.worker")

#: A bundle's inferer: ``inferer(inputs, network) -> output`` (``monai.inferers.Inferer``).
Inferer = Callable[[torch.Tensor, Callable[..., Any]], Any]

_warned_lock = threading.Lock()
_warned: set[tuple[str, str]] = set()


class ModelError(ValueError):
    """A site-supplied model cannot be loaded, or its output does not fit its declaration.

    The message names the model.
    """


def _log_once(key: tuple[str, str], message: str, *args: object) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message, *args)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch device from a declared device string.

    Parameters
    ----------
    device : str, torch.device or None
        ``"cpu"``, ``"cuda"``, ``"cuda:N"``; ``"auto"`` or ``None`` pick
        ``cuda`` when a CUDA device is available, else ``cpu``.

    Returns
    -------
    torch.device
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_torchscript(path: Path, device: torch.device, model_name: str) -> torch.nn.Module:
    """Load a ``torch.jit.save`` file onto ``device``, in eval mode.

    Parameters
    ----------
    path : pathlib.Path
        The TorchScript file.
    device : torch.device
        ``map_location`` of ``torch.jit.load``.
    model_name : str
        Used in error messages.

    Returns
    -------
    torch.nn.Module
        The ``torch.jit.ScriptModule``, in ``eval()`` mode.

    Raises
    ------
    ModelError
        If the file is missing or is not a TorchScript archive (a pickled
        ``torch.save`` checkpoint is refused: it could run arbitrary code).
    """
    if not path.is_file():
        raise ModelError(f"model {model_name!r}: TorchScript file {path} does not exist")
    try:
        with warnings.catch_warnings():
            # torch >= 2.10 deprecates TorchScript, but it is still the format MONAI
            # bundles ship (models/model.ts) and the only safe one: nothing unpickled.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated",
                                    category=DeprecationWarning)
            module: torch.nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
                str(path), map_location=device)
    except (RuntimeError, ValueError) as exc:
        raise ModelError(
            f"model {model_name!r}: {path} is not a TorchScript file (save it with "
            f"torch.jit.save(torch.jit.script(net), path)): {exc}"
        ) from exc
    module.eval()
    return module


def _code(code: Any) -> Code:
    return Code(value=code.value, scheme=code.scheme, meaning=code.meaning)


def _tensor_output(value: Any, model_name: str) -> torch.Tensor:
    """The tensor a network returned: a tensor, or the first item of a tuple/list."""
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise ModelError(f"model {model_name!r} returned {type(value).__name__}, not a tensor")
    return value


class TorchModel:
    """A ``torch.nn.Module`` run as its :class:`ModelSpec` declares.

    Implements :class:`~workers.inference.base.SegmentationModel` when
    ``spec.kind`` is ``segmentation`` and
    :class:`~workers.inference.base.ClassificationModel` when it is
    ``classification``.

    Parameters
    ----------
    spec : ModelSpec
        The declaration.
    module : torch.nn.Module
        The network: input ``(B, 1, *spatial)`` float32, output
        ``(B, C, *spatial)`` (segmentation) or ``(B, N)`` (classification).
        Moved to ``device`` and put in ``eval()`` mode.
    device : str or torch.device
        Resolved torch device (``"auto"`` picks CUDA when available).
    inferer : callable or None
        A MONAI ``Inferer`` (``inferer(inputs, network)``) used for
        segmentation instead of a whole-volume pass when ``spec.input.roi_size``
        is not set.

    Attributes
    ----------
    name, version : str
        From the spec.
    spec : ModelSpec
    device : torch.device
        Where the module currently is.
    segments : tuple[SegmentSpec, ...]
        One per ``spec.labels`` entry, in that order (empty for a classifier).
    classes : tuple[ClassSpec, ...]
        One per ``spec.classes`` entry, in that order (empty for a segmentation).
    concept : Code
        ``spec.concept``.
    """

    def __init__(
        self,
        spec: ModelSpec,
        module: torch.nn.Module,
        device: str | torch.device = "cpu",
        *,
        inferer: Inferer | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.version = spec.version
        self.segments: tuple[SegmentSpec, ...] = tuple(
            SegmentSpec(label=lab.label, category=_code(lab.category), type=_code(lab.type),
                        rgb=lab.rgb)
            for lab in spec.labels
        )
        self.classes: tuple[ClassSpec, ...] = tuple(
            ClassSpec(label=c.label, code=_code(c.code)) for c in spec.classes
        )
        self.concept = _code(spec.concept)
        self.device = resolve_device(device)
        self._module = module.to(self.device).eval()
        self._inferer = inferer
        self._lock = threading.Lock()

    # -- running ---------------------------------------------------------------------

    def _use_device(self, device: str | torch.device | None) -> torch.device:
        target = self.device if device is None else resolve_device(device)
        if target != self.device:
            self._module = self._module.to(target)
            self.device = target
        return target

    @contextlib.contextmanager
    def _autocast(self, device: torch.device) -> Iterator[None]:
        precision = self.spec.precision
        if precision == "fp32":
            yield
            return
        if device.type != "cuda":
            _log_once((self.name, "precision"),
                      "model %s: precision %s is for CUDA only; running fp32 on %s",
                      self.name, precision, device)
            yield
            return
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        with torch.autocast(device_type="cuda", dtype=dtype):
            yield

    def _forward(self, image: torch.Tensor, *, windowed: bool) -> torch.Tensor:
        """Network output for ``image`` ``(1, 1, *spatial)``, as float32.

        ``windowed`` allows sliding windows (or the bundle's inferer).
        """
        roi = self.spec.input.roi_size
        device = image.device
        try:
            with torch.inference_mode(), self._autocast(device):
                if windowed and roi is not None:
                    out: Any = sliding_window_inference(
                        image, roi_size=roi, sw_batch_size=self.spec.input.sw_batch_size,
                        predictor=self._module, overlap=self.spec.input.overlap,
                        mode=self.spec.input.blend,
                    )
                elif windowed and self._inferer is not None:
                    out = self._inferer(image, self._module)
                else:
                    out = self._module(image)
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise ModelError(
                f"model {self.name!r}: forward pass failed on input of shape "
                f"{tuple(image.shape)} on {device}: {exc}"
            ) from exc
        result = _tensor_output(out, self.name).float()
        if not bool(torch.isfinite(result).all()):
            raise ModelError(f"model {self.name!r} returned NaN or infinite values "
                             f"(output shape {tuple(result.shape)})")
        return result

    # -- segmentation ----------------------------------------------------------------

    def _check_segmentation_output(self, out: torch.Tensor, plan: GridPlan) -> torch.Tensor:
        """``(C, *network_shape)`` from a ``(1, C, *network_shape)`` output, checked."""
        if out.ndim != 5 or out.shape[0] != 1:
            raise ModelError(
                f"model {self.name!r}: expected a segmentation output of shape (1, channels, "
                f"{', '.join(map(str, plan.network_shape))}), got {tuple(out.shape)}")
        if tuple(out.shape[2:]) != plan.network_shape:
            raise ModelError(
                f"model {self.name!r}: output spatial shape {tuple(out.shape[2:])} differs from "
                f"its input {plan.network_shape}; the network must return one score per input "
                "voxel")
        channels = out.shape[1]
        values = [lab.value for lab in self.spec.labels]
        activation = self.spec.output.activation
        if activation in ("softmax", "argmax"):
            needed = max(values) + 1
            if channels < max(2, needed):
                raise ModelError(
                    f"model {self.name!r}: {channels} output channel(s), but activation "
                    f"{activation} with label values up to {max(values)} needs at least "
                    f"{max(2, needed)} (channel k is label value k, channel 0 background)")
        elif activation == "sigmoid":
            if channels < max(values):
                raise ModelError(
                    f"model {self.name!r}: {channels} output channel(s), but activation sigmoid "
                    f"with label values up to {max(values)} needs at least {max(values)} "
                    "(channel value-1 is label value)")
        elif channels != 1:
            raise ModelError(
                f"model {self.name!r}: activation none expects a 1-channel label map, got "
                f"{channels} channels")
        return out[0]

    def predict(
        self, volume: Volume, device: str | torch.device | None = None
    ) -> npt.NDArray[np.bool_]:
        """Segment a volume.

        Parameters
        ----------
        volume : Volume
            ``array`` ``(slices, rows, columns)`` float32, ``spacing`` mm,
            ``affine`` to LPS mm.
        device : str, torch.device or None
            Where to run; ``None`` keeps the device the model is on. A
            different device moves the model there.

        Returns
        -------
        numpy.ndarray
            Bool, shape ``(len(segments), slices, rows, columns)`` on the grid
            of ``volume.array``; channel ``i`` is ``spec.labels[i]``.

        Raises
        ------
        ModelError
            If the model is not a segmentation model, or its output has the
            wrong number of dimensions, channels or spatial shape, or holds
            NaN/inf, or the forward pass fails.
        ValueError
            If the volume is not 3-D or holds NaN/inf.
        """
        if self.spec.kind != "segmentation":
            raise ModelError(f"model {self.name!r} is a {self.spec.kind} model, not segmentation")
        with self._lock:
            target = self._use_device(device)
            image, plan = prepare_input(volume, self.spec.input, target)
            out = self._check_segmentation_output(self._forward(image, windowed=True), plan)
            del image
            masks = self._to_masks(out, plan)
        return masks.cpu().numpy()

    def _to_masks(self, out: torch.Tensor, plan: GridPlan) -> torch.Tensor:
        """Bool ``(labels, slices, rows, columns)`` from ``(C, *network_shape)`` scores."""
        values = [lab.value for lab in self.spec.labels]
        activation = self.spec.output.activation
        if activation == "sigmoid":
            threshold = self.spec.output.threshold
            probs = torch.sigmoid(out[[v - 1 for v in values]])
            return to_source_grid(probs, plan, lambda x: x > threshold)
        value_t = torch.tensor(values, device=out.device).view(-1, 1, 1, 1)
        if activation == "none":
            return to_source_grid(out, plan, lambda x: x.round().long() == value_t,
                                  mode="nearest")
        scores = torch.softmax(out, dim=0) if activation == "softmax" else out
        # max(...).indices: the first maximum, as argmax, but several times faster on a
        # CPU along a non-last dimension.
        return to_source_grid(scores, plan,
                              lambda x: x.max(dim=0, keepdim=True).indices == value_t)

    # -- classification --------------------------------------------------------------

    def classify(
        self, volume: Volume, device: str | torch.device | None = None
    ) -> npt.NDArray[np.float32]:
        """Class probabilities of a volume.

        The prepared image is resized to ``input.roi_size`` when it is set
        (classifiers take a fixed input size); there is no sliding window.

        Parameters
        ----------
        volume : Volume
            The input series.
        device : str, torch.device or None
            Where to run; ``None`` keeps the model's device.

        Returns
        -------
        numpy.ndarray
            Shape ``(len(classes),)``, float32 in ``[0, 1]``; entry ``i`` is
            ``spec.classes[i]`` (network output ``spec.classes[i].index``).
            With ``softmax`` and every output declared, they sum to 1.

        Raises
        ------
        ModelError
            If the model is not a classifier, its output is not ``(1, N)``
            with ``N`` above every class index, holds NaN/inf, or (``none``)
            holds values outside ``[0, 1]``.
        """
        if self.spec.kind != "classification":
            raise ModelError(f"model {self.name!r} is a {self.spec.kind} model, not "
                             "classification")
        with self._lock:
            target = self._use_device(device)
            image, _plan = prepare_input(volume, self.spec.input, target,
                                         resize_to=self.spec.input.roi_size)
            out = self._forward(image, windowed=False)
        if out.ndim < 2 or out.shape[0] != 1 or any(d != 1 for d in out.shape[2:]):
            raise ModelError(f"model {self.name!r}: expected a classification output of shape "
                             f"(1, classes), got {tuple(out.shape)}")
        logits = out.reshape(-1)
        indices = [c.index for c in self.spec.classes]
        if logits.numel() <= max(indices):
            raise ModelError(f"model {self.name!r}: {logits.numel()} outputs, but class index "
                             f"{max(indices)} is declared")
        activation = self.spec.output.activation
        if activation == "softmax":
            probs = torch.softmax(logits, dim=0)
        elif activation == "sigmoid":
            probs = torch.sigmoid(logits)
        else:
            probs = logits
            if bool(((probs < 0) | (probs > 1)).any()):
                raise ModelError(f"model {self.name!r}: activation none, but outputs "
                                 f"{probs.tolist()} are not probabilities in [0, 1]")
        result: npt.NDArray[np.float32] = probs[indices].cpu().numpy().astype(np.float32)
        return result


class TorchScriptModel(TorchModel):
    """A model saved with ``torch.jit.save``, declared with ``source: torchscript``.

    Parameters
    ----------
    spec : ModelSpec
        ``spec.path`` is the TorchScript file.
    device : str or torch.device
        Where to load it (``map_location``); ``"auto"`` picks CUDA when available.

    Raises
    ------
    ModelError
        If ``spec.path`` is unset, missing or not TorchScript.
    """

    def __init__(self, spec: ModelSpec, device: str | torch.device = "cpu") -> None:
        if spec.path is None:
            raise ModelError(f"model {spec.name!r}: source torchscript needs path")
        target = resolve_device(device)
        module = load_torchscript(Path(spec.path), target, spec.name)
        super().__init__(spec, module, target)
