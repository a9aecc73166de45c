"""Declarations of the models a site runs (the ``models:`` section of the config).

The node validates every declaration at start-up (``radnode config check``) and
uses it to route series (:class:`AcceptSpec`) and to set per-job time limits;
the workers use it to load and run the model. Nothing here imports torch.

Axis conventions
----------------
radnode's volumes are ``(slice, row, column)`` in LPS patient space. A model
that was trained on reoriented data (MONAI ``Orientation(axcodes="RAS")``,
nnU-Net) declares ``input.orientation`` (three axis codes, the direction each
array axis points to, as in nibabel and MONAI) and ``input.spacing_mm`` in the
order of those axes. Without ``orientation`` the network sees radnode's own
``(slice, row, column)`` order and ``spacing_mm`` is given in that order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydicom.datadict import tag_for_keyword

#: Built-in weight-free models and the modality each accepts by default.
BUILTIN_MODELS: dict[str, str] = {
    "radnode-builtin-ct": "CT",
    "radnode-builtin-mr": "MR",
}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_AXCODES = {frozenset("LR"), frozenset("PA"), frozenset("IS")}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CodeSpec(_Spec):
    """A coded concept (DICOM PS3.3 8.8, Code Sequence Macro).

    Attributes
    ----------
    value : str
        Code Value, e.g. ``"10200004"``.
    scheme : str
        Coding Scheme Designator, e.g. ``"SCT"`` (SNOMED CT), ``"DCM"``.
    meaning : str
        Code Meaning, e.g. ``"Liver"``.
    """

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(default="SCT", min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)


#: SNOMED CT 91723000 "Anatomical Structure" (DICOM PS3.16 CID 7150), the default category.
ANATOMICAL_STRUCTURE = CodeSpec(value="91723000", scheme="SCT", meaning="Anatomical Structure")
#: DICOM "Finding" (DCM 121071), the default concept of a classification result.
FINDING = CodeSpec(value="121071", scheme="DCM", meaning="Finding")


class LabelSpec(_Spec):
    """One output label of a segmentation model; becomes one SEG segment.

    Attributes
    ----------
    value : int
        Label value in the network's output: the class index after argmax
        (``output.activation`` ``softmax``/``argmax``, 0 being background) or
        the channel index (``sigmoid``, channel 0 is label value 1).
    label : str
        Segment Label (0062,0005).
    category : CodeSpec
        Segmented Property Category Code (0062,0003), DICOM PS3.16 CID 7150.
    type : CodeSpec
        Segmented Property Type Code (0062,000F), DICOM PS3.16 CID 7151.
    rgb : tuple[int, int, int]
        Recommended display colour, 0-255 per channel.
    """

    value: int = Field(ge=1, le=65535)
    label: str = Field(min_length=1, max_length=64)
    category: CodeSpec = Field(default_factory=lambda: ANATOMICAL_STRUCTURE.model_copy())
    type: CodeSpec
    rgb: tuple[int, int, int] = (255, 0, 0)

    @field_validator("rgb")
    @classmethod
    def _check_rgb(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError(f"rgb {list(value)}: each channel must be 0-255")
        return value


class ClassSpec(_Spec):
    """One output class of a classification model.

    Attributes
    ----------
    index : int
        Index of the class in the network's output vector (0-based).
    label : str
        Human-readable name, used in logs and the dashboard.
    code : CodeSpec
        The coded value written as the qualitative evaluation of the TID 1500
        SR when this class has the highest probability.
    """

    index: int = Field(ge=0)
    label: str = Field(min_length=1, max_length=64)
    code: CodeSpec


class AcceptSpec(_Spec):
    """Which series a model accepts.

    Attributes
    ----------
    modalities : list[str]
        Modality (0008,0060) values, e.g. ``["CT"]``; empty accepts any.
    conditions : dict[str, str]
        DICOM keyword to a regular expression that must match the whole
        attribute value (as text, case-insensitive) of the series' first
        instance, e.g. ``{"BodyPartExamined": "CHEST|ABDOMEN"}``. A missing
        attribute does not match.
    min_slices : int
        Fewest instances (or frames) a series needs.
    """

    modalities: list[str] = Field(default_factory=list)
    conditions: dict[str, str] = Field(default_factory=dict)
    min_slices: int = Field(default=1, ge=1)

    @field_validator("modalities")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [m.strip().upper() for m in value]

    @field_validator("conditions")
    @classmethod
    def _check_conditions(cls, value: dict[str, str]) -> dict[str, str]:
        for keyword, pattern in value.items():
            if tag_for_keyword(keyword) is None:
                raise ValueError(f"condition on {keyword!r}: not a DICOM keyword "
                                 "(e.g. BodyPartExamined, SeriesDescription)")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"condition on {keyword}: bad regular expression "
                                 f"{pattern!r}: {exc}") from exc
        return value

    def rejects(self, modality: str, attributes: dict[str, str]) -> str | None:
        """Why a series is not accepted, or ``None`` when it is.

        Parameters
        ----------
        modality : str
            The series' Modality.
        attributes : dict[str, str]
            DICOM keyword to value as text, read from one instance; must hold
            every keyword in ``conditions``.
        """
        if self.modalities and modality.upper() not in self.modalities:
            return f"modality {modality or '?'} is not one of {', '.join(self.modalities)}"
        for keyword, pattern in self.conditions.items():
            text = attributes.get(keyword)
            if text is None:
                return f"{keyword} is absent"
            if not re.fullmatch(pattern, text.strip(), flags=re.IGNORECASE):
                return f"{keyword} does not match {pattern!r}"
        return None


class IntensitySpec(_Spec):
    """How source values become network input (MONAI's intensity transforms).

    * ``none``: values as loaded (HU for CT);
    * ``ct_window``: ``[center - width/2, center + width/2]`` HU mapped to
      ``[b_min, b_max]``, clipped;
    * ``clip_scale``: ``[a_min, a_max]`` mapped to ``[b_min, b_max]``
      (MONAI ``ScaleIntensityRange``), clipped when ``clip``;
    * ``zscore``: subtract the mean, divide by the standard deviation, over
      non-zero voxels when ``nonzero`` (MONAI ``NormalizeIntensity``);
    * ``percentile``: the ``lower``/``upper`` percentiles mapped to
      ``[b_min, b_max]`` (MONAI ``ScaleIntensityRangePercentiles``).
    """

    method: Literal["none", "ct_window", "clip_scale", "zscore", "percentile"] = "none"
    center: float | None = None
    width: float | None = Field(default=None, gt=0)
    a_min: float | None = None
    a_max: float | None = None
    b_min: float = 0.0
    b_max: float = 1.0
    clip: bool = True
    nonzero: bool = False
    lower: float = Field(default=0.5, ge=0, le=100)
    upper: float = Field(default=99.5, ge=0, le=100)

    @model_validator(mode="after")
    def _check_method(self) -> IntensitySpec:
        if self.method == "ct_window" and (self.center is None or self.width is None):
            raise ValueError("intensity method ct_window needs center and width (HU)")
        if self.method == "clip_scale":
            if self.a_min is None or self.a_max is None:
                raise ValueError("intensity method clip_scale needs a_min and a_max")
            if self.a_max <= self.a_min:
                raise ValueError("intensity clip_scale: a_max must be greater than a_min")
        if self.method == "percentile" and self.upper <= self.lower:
            raise ValueError("intensity percentile: upper must be greater than lower")
        return self


class InputSpec(_Spec):
    """Geometry and intensity of the network's input.

    Attributes
    ----------
    orientation : str or None
        Axis codes such as ``"RAS"`` (array axis 0 points to the patient's
        Right... as in nibabel/MONAI); ``None`` keeps ``(slice, row, column)``.
    spacing_mm : tuple[float, float, float] or None
        Voxel size the network expects, mm, in the order of the (reoriented)
        array axes; ``None`` keeps the source spacing.
    intensity : IntensitySpec
    roi_size : tuple[int, int, int] or None
        Sliding-window ROI in voxels (MONAI ``sliding_window_inference``);
        ``None`` runs the whole volume at once.
    overlap : float
        Overlap of neighbouring windows, 0 <= overlap < 1.
    sw_batch_size : int
        Windows per forward pass.
    blend : str
        ``gaussian`` or ``constant`` window blending.
    """

    orientation: str | None = None
    spacing_mm: tuple[float, float, float] | None = None
    intensity: IntensitySpec = Field(default_factory=IntensitySpec)
    roi_size: tuple[int, int, int] | None = None
    overlap: float = Field(default=0.25, ge=0, lt=1)
    sw_batch_size: int = Field(default=1, ge=1)
    blend: Literal["gaussian", "constant"] = "gaussian"

    @field_validator("orientation")
    @classmethod
    def _check_orientation(cls, value: str | None) -> str | None:
        if value is None:
            return None
        codes = value.strip().upper()
        if len(codes) != 3 or any(sum(c in pair for c in codes) != 1 for pair in _AXCODES):
            raise ValueError(f"orientation {value!r}: three axis codes, one of L/R, one of "
                             "P/A and one of I/S, e.g. RAS or LPS")
        return codes

    @field_validator("spacing_mm")
    @classmethod
    def _check_spacing(
        cls, value: tuple[float, float, float] | None
    ) -> tuple[float, float, float] | None:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError(f"spacing_mm {list(value)}: every value must be > 0 mm")
        return value

    @field_validator("roi_size")
    @classmethod
    def _check_roi(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and any(v < 1 for v in value):
            raise ValueError(f"roi_size {list(value)}: every value must be >= 1 voxel")
        return value


class OutputSpec(_Spec):
    """How the network's raw output becomes labels or probabilities.

    Attributes
    ----------
    activation : str
        ``softmax`` (segmentation: argmax over channels, channel k is label
        value k; classification: softmax probabilities), ``sigmoid`` (one
        channel per label/class, thresholded at ``threshold``), ``argmax``
        (like softmax without computing probabilities), ``none`` (the network
        already returns a label map, or probabilities for a classifier).
    threshold : float
        Probability threshold for ``sigmoid``.
    """

    activation: Literal["softmax", "sigmoid", "argmax", "none"] = "softmax"
    threshold: float = Field(default=0.5, gt=0, lt=1)


class ModelSpec(_Spec):
    """One model a site runs.

    Attributes
    ----------
    name, version : str
        Algorithm Name and Version written into every SEG and SR.
    kind : str
        ``segmentation`` (results: SEG + TID 1500 SR with volumes) or
        ``classification`` (result: TID 1500 SR with a coded finding and the
        probability of each class).
    source : str
        ``builtin`` (``name`` is one of :data:`BUILTIN_MODELS`),
        ``torchscript`` (``path`` is a ``torch.jit.save`` file) or
        ``monai_bundle`` (``path`` is a MONAI bundle folder).
    path : pathlib.Path or None
    trusted : bool
        A MONAI bundle may execute its inference config (arbitrary Python)
        only when the admin set this; otherwise only its TorchScript file
        (``models/model.ts``) is loaded, and a bundle without one is refused.
    queue : str
        The Celery queue its jobs go to (workers consume queues: ``gpu``, ``cpu``).
    device : str or None
        ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; ``None`` uses ``worker.device``.
    precision : str
        ``fp32``, or ``fp16``/``bf16`` autocast (CUDA only; CPU runs fp32).
    time_limit_s, soft_time_limit_s : int or None
        Celery hard and soft time limits of one job of this model; ``None``
        uses ``worker.time_limit_s`` (soft: 90 % of the hard limit).
    labels : list[LabelSpec]
        Segmentation outputs (not for ``builtin``: their labels are fixed).
    classes : list[ClassSpec]
        Classification outputs.
    concept : CodeSpec
        Concept name of the classification's qualitative evaluation.
    """

    name: str
    version: str = Field(default="1", min_length=1, max_length=64)
    kind: Literal["segmentation", "classification"] = "segmentation"
    source: Literal["builtin", "torchscript", "monai_bundle"] = "torchscript"
    path: Path | None = None
    trusted: bool = False
    accepts: AcceptSpec = Field(default_factory=AcceptSpec)
    input: InputSpec = Field(default_factory=InputSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    queue: str = Field(default="gpu", pattern=r"^[A-Za-z0-9._-]{1,50}$")
    device: str | None = None
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    time_limit_s: int | None = Field(default=None, ge=10)
    soft_time_limit_s: int | None = Field(default=None, ge=5)
    labels: list[LabelSpec] = Field(default_factory=list)
    classes: list[ClassSpec] = Field(default_factory=list)
    concept: CodeSpec = Field(default_factory=lambda: FINDING.model_copy())

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"model name {value!r}: 1-64 letters, digits, '.', '_' or '-'")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"device {value!r}: auto, cpu, cuda or cuda:N")
        return value

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        problems: list[str] = []
        if self.source == "builtin":
            if self.name not in BUILTIN_MODELS:
                problems.append(f"source builtin: no built-in model named {self.name!r} "
                                f"(built-in: {', '.join(BUILTIN_MODELS)})")
            if self.labels or self.classes:
                problems.append("a built-in model's labels are fixed: remove labels/classes")
            if self.kind != "segmentation":
                problems.append("built-in models are segmentation models")
        else:
            problems.extend(self._check_source())
        if self.kind == "segmentation" and self.source != "builtin":
            if not self.labels:
                problems.append("a segmentation model needs labels (value, label, type code)")
            if self.classes:
                problems.append("classes are for classification models; use labels")
            values = [label.value for label in self.labels]
            if len(set(values)) != len(values):
                problems.append(f"label values repeat: {sorted(values)}")
        if self.kind == "classification":
            if len(self.classes) < 2:
                problems.append("a classification model needs at least 2 classes")
            if self.labels:
                problems.append("labels are for segmentation models; use classes")
            indices = [c.index for c in self.classes]
            if len(set(indices)) != len(indices):
                problems.append(f"class indices repeat: {sorted(indices)}")
            if self.output.activation == "argmax":
                problems.append("a classifier needs probabilities: activation softmax, "
                                "sigmoid or none")
        if (self.time_limit_s is not None and self.soft_time_limit_s is not None
                and self.soft_time_limit_s >= self.time_limit_s):
            problems.append("soft_time_limit_s must be less than time_limit_s")
        if problems:
            raise ValueError(f"model {self.name!r}: " + "; ".join(problems))
        return self

    def _check_source(self) -> list[str]:
        if self.path is None:
            return [f"source {self.source} needs path"]
        if self.source == "torchscript":
            if not self.path.is_file():
                return [f"TorchScript file {self.path} does not exist"]
            return []
        metadata = self.path / "configs" / "metadata.json"
        if not self.path.is_dir():
            return [f"MONAI bundle folder {self.path} does not exist"]
        if not metadata.is_file():
            return [f"{self.path} is not a MONAI bundle: configs/metadata.json is missing"]
        try:
            channels = bundle_channel_def(self.path)
        except (OSError, ValueError) as exc:
            return [f"{metadata} is not valid: {exc}"]
        problems: list[str] = []
        if channels and self.kind == "segmentation":
            # sigmoid: channel k-1 is label value k; otherwise channel k is value k
            shift = 1 if self.output.activation == "sigmoid" else 0
            for label in self.labels:
                if label.value - shift not in channels:
                    problems.append(
                        f"label {label.label!r} has value {label.value} (channel "
                        f"{label.value - shift}), which the bundle's channel_def does not "
                        f"define (it has channels {sorted(channels)})")
        if not self.trusted and not (self.path / "models" / "model.ts").is_file():
            problems.append(
                f"bundle {self.path} is not marked trusted and has no models/model.ts: "
                "its config would have to run arbitrary Python; set trusted: true only "
                "if you trust its author, or export it to TorchScript")
        return problems

    @property
    def segment_count(self) -> int:
        """Number of SEG segments (0 for a classifier or a built-in model)."""
        return len(self.labels)


def bundle_channel_def(folder: Path) -> dict[int, str]:
    """Output channels a MONAI bundle declares: channel index to name.

    Read from ``configs/metadata.json``,
    ``network_data_format.outputs.pred.channel_def`` (MONAI Bundle
    specification); empty when the bundle does not declare them.

    Raises
    ------
    OSError
        If the file cannot be read.
    ValueError
        If it is not JSON or ``channel_def`` has keys that are not integers.
    """
    data = json.loads((folder / "configs" / "metadata.json").read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("the top level is not a JSON object")
    outputs = data.get("network_data_format", {}).get("outputs", {})
    pred = outputs.get("pred", {}) if isinstance(outputs, dict) else {}
    channels = pred.get("channel_def", {}) if isinstance(pred, dict) else {}
    try:
        return {int(k): str(v) for k, v in dict(channels).items()}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"channel_def keys must be channel numbers: {exc}") from exc


def builtin_spec(name: str) -> ModelSpec:
    """The declaration of built-in model ``name`` (accepting its modality).

    Raises
    ------
    KeyError
        If ``name`` is not a built-in model.
    """
    modality = BUILTIN_MODELS[name]
    return ModelSpec(name=name, version="1.0.0", source="builtin",
                     accepts=AcceptSpec(modalities=[modality]))


def default_models() -> list[ModelSpec]:
    """Every built-in model, as declared when the config has no ``models:``."""
    return [builtin_spec(name) for name in BUILTIN_MODELS]


def find_model(models: list[ModelSpec], name: str) -> ModelSpec | None:
    """The declaration named ``name`` (built-ins are always declared)."""
    for spec in models:
        if spec.name == name:
            return spec
    return builtin_spec(name) if name in BUILTIN_MODELS else None


def model_attributes(models: list[ModelSpec]) -> set[str]:
    """DICOM keywords that some model's accept conditions read."""
    return {k for spec in models for k in spec.accepts.conditions}


def describe(spec: ModelSpec) -> dict[str, Any]:
    """A short JSON-able summary for ``radnode config check`` and the API."""
    return {"name": spec.name, "version": spec.version, "kind": spec.kind,
            "source": spec.source, "path": str(spec.path) if spec.path else None,
            "accepts": spec.accepts.modalities or ["any"],
            "outputs": [lab.label for lab in spec.labels] or [c.label for c in spec.classes]}
