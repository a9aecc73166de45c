"""Assemble the instances of one series into one or more :class:`Volume`.

Sources
-------
* DICOM PS3.3 C.7.6.2.1.1 (Image Position and Orientation (Patient)): slices
  are ordered by their position along the normal of the image plane, never by
  file name or Instance Number.
* DICOM PS3.3 C.11.1.1.2 (Modality LUT: Rescale Slope and Intercept), applied
  to each slice or frame on its own.
* DICOM PS3.3 C.7.6.16 (Multi-frame Functional Groups): for enhanced
  multi-frame instances (Enhanced CT/MR, PS3.3 A.38 / A.36) the Plane Position
  (Patient), Plane Orientation (Patient), Pixel Measures and Pixel Value
  Transformation macros are read from the Per-frame Functional Groups Sequence
  (5200,9230), else from the Shared Functional Groups Sequence (5200,9229);
  C.7.6.16.2.2 (Frame Content: Stack ID, Temporal Position Index, Frame
  Acquisition Number), C.8.13.5.2 (MR Echo: Effective Echo Time) and
  C.8.16.1 / C.8.13.5.1 (Frame Type, Complex Image Component).
* DICOM PS3.3 C.7.6.1.1.2 (Image Type) and C.8.3.1 (MR Image Module: Echo
  Numbers, Temporal Position Identifier) for single-frame series.

A series whose images repeat slice positions (several echoes, magnitude and
phase, temporal positions, stacks) is split into several volumes, see
:func:`load_volumes`.

Pixel data is decoded with pydicom's ``pydicom.pixels`` backend, so every
transfer syntax that pydicom and the installed pylibjpeg plugins decode is
supported (native little and big endian, deflated, RLE, JPEG lossless,
JPEG-LS, JPEG 2000). highdicom's ``Image.get_volume`` is deliberately not used:
it needs regularly spaced, unsheared stacks (no gantry tilt, no uneven gaps),
one instance per volume, cannot split mixed series, and is much slower.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import cast

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_modality_lut
from pydicom.pixels.utils import pixel_array as decode_pixel_array
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from workers.inference.base import Volume

__all__ = ["VolumeError", "decode_frames", "load_series", "load_volumes"]

logger = logging.getLogger(__name__)

#: Largest difference allowed between the Image Orientation (Patient) values
#: of two slices of one volume (direction cosines, unitless).
ORIENTATION_TOLERANCE = 1e-4
#: Two slices closer than this along the normal (mm) are duplicates.
DUPLICATE_TOLERANCE_MM = 1e-3
#: A slice gap that differs from the median gap by more than this fraction of
#: it makes the series "non-uniform" (a warning, not an error).
GAP_TOLERANCE = 0.01

#: Values longer than this (bytes) are read from the file only when used.
DEFER_BYTES = 64 * 1024
_DEFERRABLE = frozenset((ImplicitVRLittleEndian, ExplicitVRLittleEndian))
_NATIVE_LITTLE_ENDIAN = frozenset(
    (ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
)

#: Dimensions a series may be split along, in the order they are tried: a
#: dimension is only used when the groups made so far still repeat slice
#: positions or mix geometry.
_SPLIT_ORDER = ("stack", "temporal", "component", "echo", "flavor", "acquisition", "instance")
#: Order of the parts of a volume key.
_KEY_ORDER = ("stack", "temporal", "echo", "component", "flavor", "acquisition", "instance")

_COMPONENTS = {
    "M": "magnitude",
    "MAGNITUDE": "magnitude",
    "P": "phase",
    "PHASE": "phase",
    "R": "real",
    "REAL": "real",
    "I": "imaginary",
    "IMAGINARY": "imaginary",
    "MIXED": "mixed",
}
_PHILIPS_MR = "Philips MR Imaging DD 001"

# A hashable, orderable dimension value: ``(0,)`` when absent, else
# ``(1, value)`` with ``value`` an int, float, str or tuple of those.
_DimValue = tuple[object, ...]


class VolumeError(ValueError):
    """The instances given cannot be assembled into a regular volume."""


class _Frame:
    """One 2-D image: a single-frame instance or one frame of a multi-frame one.

    The geometry is read at once; the split dimensions (:attr:`dims`) and the
    one-slice spacing fallback (:attr:`thickness`) only when first asked for,
    since most series form one volume and never need them.
    """

    __slots__ = (
        "_details",
        "_dims",
        "index",
        "intercept",
        "iop",
        "ipp",
        "number",
        "pixel_spacing",
        "shape",
        "slope",
    )

    def __init__(
        self,
        *,
        index: int,
        number: int,
        shape: tuple[int, int],
        iop: npt.NDArray[np.float64],
        ipp: npt.NDArray[np.float64],
        pixel_spacing: npt.NDArray[np.float64],
        slope: float,
        intercept: float,
        details: Callable[[], tuple[dict[str, _DimValue], float | None]],
    ) -> None:
        self.index = index  # into the list of datasets read
        self.number = number  # 1-based frame number
        self.shape = shape  # (rows, columns)
        self.iop = iop  # (6,) row then column direction cosines
        self.ipp = ipp  # (3,) LPS mm
        self.pixel_spacing = pixel_spacing  # (2,) row spacing, column spacing, mm
        self.slope = slope
        self.intercept = intercept
        self._details = details
        self._dims: tuple[dict[str, _DimValue], float | None] | None = None

    def _resolve(self) -> tuple[dict[str, _DimValue], float | None]:
        if self._dims is None:
            self._dims = self._details()
        return self._dims

    @property
    def dims(self) -> dict[str, _DimValue]:
        """Value of every split dimension (``_SPLIT_ORDER``)."""
        return self._resolve()[0]

    @property
    def thickness(self) -> float | None:
        """Spacing Between Slices, else Slice Thickness (mm), None when absent."""
        return self._resolve()[1]


@dataclass
class _Plan:
    """A group of frames that forms one volume, before its pixels are decoded."""

    frames: list[_Frame]
    key: str
    sort_key: tuple[_DimValue, ...]


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a series is read.

    Every dataset read stays alive (it goes into the :class:`Volume`), so each
    automatic collection scans all the objects read so far: measured about
    30 % of the read time for a 120-file Philips MR series. Reading creates no
    reference cycles that need collecting; the collector is re-enabled (if it
    was enabled) on the way out, also on error.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _read(path: str | os.PathLike[str]) -> Dataset:
    """Read one file; values over :data:`DEFER_BYTES` (the Pixel Data) are read later.

    Deferred values stay on disk until used (pydicom ``defer_size``): the
    native Pixel Data is then read straight into a scratch buffer by
    :func:`_deferred_native`, and the datasets kept in a :class:`Volume` do
    not hold a copy of it. Deflated files are read whole, since pydicom cannot
    re-read a deferred value from their compressed stream.
    """
    name = os.fspath(path)
    try:
        ds = pydicom.dcmread(name, defer_size=DEFER_BYTES)
        file_meta = getattr(ds, "file_meta", None)
        syntax = None if file_meta is None else file_meta.get("TransferSyntaxUID")
        if syntax == DeflatedExplicitVRLittleEndian:
            ds = pydicom.dcmread(name)
        return ds
    except (InvalidDicomError, OSError) as exc:
        raise VolumeError(f"cannot read {name!r} as DICOM: {exc}") from exc


def _floats(value: object, count: int, what: str, where: str) -> npt.NDArray[np.float64]:
    """``count`` finite numbers from a list of floats or a DS multi-value."""
    try:
        values = [float(v) for v in value]  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{where} has malformed {what}") from exc
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise VolumeError(f"{where} has malformed {what}")
    return np.asarray(values, dtype=np.float64)


def _number(value: object, default: float) -> float:
    """A DS/IS/FL value as float; ``default`` when absent, empty or not a number."""
    if value is None or value == "":
        return default
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
    return result if math.isfinite(result) else default


def _int_or_none(value: object) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)  # type: ignore[call-overload,no-any-return]
    except (TypeError, ValueError):
        return None


def _dim(value: object) -> _DimValue:
    return (0,) if value is None else (1, value)


# Tags read for every instance: parsed from the undecoded element bytes where
# possible, because pydicom's value conversion (DSfloat validation and the
# like) costs more than decoding an uncompressed slice.
_IOP, _IPP, _PIXEL_SPACING = 0x00200037, 0x00200032, 0x00280030
_SLOPE, _INTERCEPT = 0x00281053, 0x00281052
_ROWS, _COLUMNS, _SAMPLES, _FRAMES = 0x00280010, 0x00280011, 0x00280002, 0x00280008
_BITS_ALLOCATED, _BITS_STORED, _REPRESENTATION = 0x00280100, 0x00280101, 0x00280103
_PHOTOMETRIC, _PIXEL_DATA = 0x00280004, 0x7FE00010


def _raw(ds: Dataset, tag: int) -> bytes | None:
    """Value bytes of an element pydicom has not converted yet (little endian only)."""
    if tag not in ds:
        return None
    element = ds.get_item(tag, keep_deferred=True)
    if (
        isinstance(element, RawDataElement)
        and element.is_little_endian
        and isinstance(element.value, bytes)
    ):
        return element.value
    return None


def _decimals(ds: Dataset, tag: int) -> list[float] | None:
    """A DS or IS element (any multiplicity) as floats; None when absent or empty."""
    raw = _raw(ds, tag)
    if raw is not None:
        try:
            return [float(v) for v in raw.split(b"\\")]  # float() ignores padding spaces
        except ValueError:
            pass  # empty or unusual text: let pydicom convert it
    value = ds[tag].value if tag in ds else None
    if value is None or value == "":
        return None
    items = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    try:
        return [float(v) for v in items]
    except (TypeError, ValueError):
        return None


def _decimal(ds: Dataset, tag: int, default: float) -> float:
    values = _decimals(ds, tag)
    if not values or not math.isfinite(values[0]):
        return default
    return values[0]


def _unsigned(ds: Dataset, tag: int, default: int) -> int:
    """A US element (VM 1); ``default`` when absent."""
    raw = _raw(ds, tag)
    if raw is not None and len(raw) == 2:
        return int.from_bytes(raw, "little")
    value = ds[tag].value if tag in ds else None
    return default if value is None or value == "" else int(value)


def _code_strings(ds: Dataset, tag: int) -> list[str]:
    """A CS/LO element (any multiplicity) as stripped strings; [] when absent."""
    raw = _raw(ds, tag)
    if raw is not None:
        text = raw.decode("ascii", "replace")
        return [v.strip(" \x00") for v in text.split("\\")] if text.strip(" \x00") else []
    return [v.strip() for v in _values(ds[tag].value if tag in ds else None)]


def _code_string(ds: Dataset, tag: int) -> str:
    raw = _raw(ds, tag)
    if raw is not None:
        return raw.decode("ascii", "replace").strip(" \x00")
    value = ds[tag].value if tag in ds else None
    return "" if value is None else str(value).strip()


@dataclass(frozen=True)
class _Pixels:
    """Image Pixel Module attributes of one instance (PS3.3 C.7.6.3)."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str

    @classmethod
    def of(cls, ds: Dataset) -> _Pixels:
        bits_allocated = _unsigned(ds, _BITS_ALLOCATED, 16)
        return cls(
            rows=_unsigned(ds, _ROWS, 0),
            columns=_unsigned(ds, _COLUMNS, 0),
            frames=max(1, int(_decimal(ds, _FRAMES, 1.0))),
            samples=_unsigned(ds, _SAMPLES, 1),
            bits_allocated=bits_allocated,
            bits_stored=_unsigned(ds, _BITS_STORED, bits_allocated),
            signed=_unsigned(ds, _REPRESENTATION, 0) == 1,
            photometric=_code_string(ds, _PHOTOMETRIC),
        )


def _component(tokens: Sequence[str]) -> str | None:
    for token in tokens:
        name = _COMPONENTS.get(token.strip().upper())
        if name is not None:
            return name
    return None


def _philips_image_type(ds: Dataset) -> str | None:
    """Philips private MR image type (2005,xx11): M, P, R, I, B0, ..."""
    try:
        value = ds.private_block(0x2005, _PHILIPS_MR)[0x11].value
    except (KeyError, ValueError):
        return None
    return str(value).strip() or None


def _values(value: object) -> list[str]:
    """A multi-valued CS element (Image Type, Frame Type) as a list of str."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    try:
        return [str(v) for v in value]  # type: ignore[attr-defined]
    except TypeError:
        return [str(value)]


# Functional group macro sequences (PS3.3 C.7.6.16.2)
_PLANE_POSITION, _PLANE_ORIENTATION = 0x00209113, 0x00209116
_PIXEL_MEASURES, _PIXEL_VALUE_TRANSFORMATION = 0x00289110, 0x00289145
_FRAME_CONTENT, _MR_ECHO = 0x00209111, 0x00189114


def _sequence_item(item: Dataset | None, shared: Dataset | None, tag: int) -> Dataset | None:
    """First item of a functional group macro's sequence, per-frame first, then shared."""
    for group in (item, shared):
        if group is not None and tag in group:
            value = group[tag].value
            if value:
                first: Dataset = value[0]
                return first
    return None


#: The Frame Type macros' sequences (MR Image, MR Spectroscopy, CT Image, X-Ray
#: 3D, PET, Parametric Map Frame Type), PS3.3 C.8.13.5.1, C.8.15.3.1, ...
_FRAME_TYPE_SEQUENCES = (0x00189226, 0x00189227, 0x00189329, 0x00189504, 0x00189751, 0x00409092)


def _frame_type_item(item: Dataset | None, shared: Dataset | None) -> Dataset | None:
    """The item of the Frame Type macro (MR, CT, ...), per-frame first, then shared."""
    for group in (item, shared):
        if group is None:
            continue
        for tag in _FRAME_TYPE_SEQUENCES:
            if tag in group and group[tag].value:
                first: Dataset = group[tag].value[0]
                return first
    return None


def _thickness(source: Dataset) -> float | None:
    """Spacing Between Slices (0018,0088), else Slice Thickness (0018,0050), in mm."""
    value = _decimal(source, 0x00180088, 0.0) or _decimal(source, 0x00180050, 0.0)
    return value if value > 0 else None


def _integer(ds: Dataset, tag: int) -> int | None:
    """An IS element's first value; None when absent, empty or not an integer."""
    values = _decimals(ds, tag)
    if not values or not math.isfinite(values[0]):
        return None
    return int(values[0])


def _classic_details(ds: Dataset) -> tuple[dict[str, _DimValue], float | None]:
    """Split dimensions of a single-frame image (PS3.3 C.7.6.1.1.2, C.8.3.1)."""
    image_type = _code_strings(ds, 0x00080008)  # Image Type
    echo: object = None
    echo_number = _integer(ds, 0x00180086)  # Echo Numbers
    echo_time = _decimals(ds, 0x00180081)  # Echo Time
    if echo_number is not None:
        echo = ("number", echo_number)
    elif echo_time:
        echo = ("time", echo_time[0])
    component = (
        _component(_code_strings(ds, 0x00089208))  # Complex Image Component
        or _component(image_type[2:])
        or _component([_philips_image_type(ds) or ""])
    )
    dims = {
        "stack": _dim(None),
        "temporal": _dim(_integer(ds, 0x00200100)),  # Temporal Position Identifier
        "component": _dim(component),
        "echo": _dim(echo),
        "flavor": _dim("\\".join(image_type[2:]) or None),
        "acquisition": _dim(_integer(ds, 0x00200012)),  # Acquisition Number
        "instance": _dim(None),
    }
    return dims, _thickness(ds)


def _classic_frame(ds: Dataset, pixels: _Pixels, index: int, name: str) -> _Frame:
    iop = _decimals(ds, _IOP)
    ipp = _decimals(ds, _IPP)
    spacing = _decimals(ds, _PIXEL_SPACING)
    missing = [
        keyword
        for keyword, value in (
            ("ImageOrientationPatient", iop),
            ("ImagePositionPatient", ipp),
            ("PixelSpacing", spacing),
            ("Rows", pixels.rows or None),
            ("Columns", pixels.columns or None),
        )
        if value is None
    ]
    if missing:
        raise VolumeError(f"{name!r} lacks {', '.join(missing)}: cannot place it in a volume")
    return _Frame(
        index=index,
        number=1,
        shape=(pixels.rows, pixels.columns),
        iop=_floats(iop, 6, "Image Orientation (Patient)", repr(name)),
        ipp=_floats(ipp, 3, "Image Position (Patient)", repr(name)),
        pixel_spacing=_floats(spacing, 2, "Pixel Spacing", repr(name)),
        slope=_decimal(ds, _SLOPE, 1.0),
        intercept=_decimal(ds, _INTERCEPT, 0.0),
        details=lambda: _classic_details(ds),
    )


def _enhanced_details(
    ds: Dataset, index: int, item: Dataset, shared: Dataset | None, measures: Dataset
) -> tuple[dict[str, _DimValue], float | None]:
    """Split dimensions of one frame (PS3.3 C.7.6.16.2.2, C.8.13.5.1, C.8.13.5.2)."""
    content = _sequence_item(item, None, _FRAME_CONTENT) or Dataset()
    echo_item = _sequence_item(item, shared, _MR_ECHO)
    echo_time = None if echo_item is None else echo_item.get("EffectiveEchoTime")
    frame_type = _frame_type_item(item, shared)
    tokens: list[str] = []
    component: str | None = None
    if frame_type is not None:
        tokens = _code_strings(frame_type, 0x00089007)  # Frame Type
        component = _component(_code_strings(frame_type, 0x00089208))  # Complex Image Component
    component = (
        component or _component(tokens[2:]) or _component([_philips_image_type(ds) or ""])
    )
    dims = {
        "stack": _dim(str(content.StackID) if "StackID" in content else None),
        "temporal": _dim(_int_or_none(content.get("TemporalPositionIndex"))),
        "component": _dim(component),
        "echo": _dim(None if echo_time is None else ("time", _number(echo_time, 0.0))),
        "flavor": _dim("\\".join(tokens[2:]) or None),
        "acquisition": _dim(_int_or_none(content.get("FrameAcquisitionNumber"))),
        "instance": _dim(index),
    }
    return dims, _thickness(measures)


def _enhanced_frames(ds: Dataset, pixels: _Pixels, index: int, name: str) -> list[_Frame]:
    """One :class:`_Frame` per frame of an enhanced multi-frame instance (C.7.6.16)."""
    if "PerFrameFunctionalGroupsSequence" not in ds:
        raise VolumeError(
            f"{name!r} is a multi-frame instance without a Per-frame Functional Groups "
            "Sequence: no Plane Position (Patient) per frame, cannot place its frames"
        )
    count = pixels.frames
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != count:
        raise VolumeError(
            f"{name!r} has {count} frames but {len(per_frame)} Per-frame Functional Groups"
        )
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared: Dataset | None = shared_seq[0] if shared_seq else None
    shape = (pixels.rows, pixels.columns)
    frames: list[_Frame] = []
    for number, item in enumerate(per_frame, start=1):
        where = f"{name!r} frame {number}"
        position = _sequence_item(item, shared, _PLANE_POSITION)
        orientation = _sequence_item(item, shared, _PLANE_ORIENTATION)
        measures = _sequence_item(item, shared, _PIXEL_MEASURES)
        ipp = None if position is None else _decimals(position, _IPP)
        iop = None if orientation is None else _decimals(orientation, _IOP)
        spacing = None if measures is None else _decimals(measures, _PIXEL_SPACING)
        missing = [
            label
            for label, value in (
                ("PlanePositionSequence > ImagePositionPatient", ipp),
                ("PlaneOrientationSequence > ImageOrientationPatient", iop),
                ("PixelMeasuresSequence > PixelSpacing", spacing),
            )
            if value is None
        ]
        if missing or measures is None:
            raise VolumeError(f"{where} lacks {', '.join(missing)}: cannot place it in a volume")
        slope, intercept = _pixel_value_transform(item, shared, ds)
        frames.append(
            _Frame(
                index=index,
                number=number,
                shape=shape,
                iop=_floats(iop, 6, "Image Orientation (Patient)", where),
                ipp=_floats(ipp, 3, "Image Position (Patient)", where),
                pixel_spacing=_floats(spacing, 2, "Pixel Spacing", where),
                slope=slope,
                intercept=intercept,
                details=partial(_enhanced_details, ds, index, item, shared, measures),
            )
        )
    return frames


def _pixel_value_transform(
    item: Dataset | None, shared: Dataset | None, ds: Dataset
) -> tuple[float, float]:
    """(slope, intercept) of one frame: Pixel Value Transformation, else top level."""
    transform = _sequence_item(item, shared, _PIXEL_VALUE_TRANSFORMATION)
    source = transform if transform is not None else ds
    return _decimal(source, _SLOPE, 1.0), _decimal(source, _INTERCEPT, 0.0)


def _frame_rescales(ds: Dataset) -> list[tuple[float, float]]:
    """(slope, intercept) of every frame of ``ds``, in frame order."""
    count = _Pixels.of(ds).frames
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared: Dataset | None = shared_seq[0] if shared_seq else None
    if per_frame is None and shared is None:
        return [_pixel_value_transform(None, None, ds)] * count
    return [
        _pixel_value_transform(per_frame[k] if per_frame is not None else None, shared, ds)
        for k in range(count)
    ]


def _is_multiframe(ds: Dataset, pixels: _Pixels) -> bool:
    return pixels.frames > 1 or "PerFrameFunctionalGroupsSequence" in ds


def _frames_of(ds: Dataset, index: int, name: str) -> list[_Frame]:
    if not any(k in ds for k in (_PIXEL_DATA, 0x7FE00008, 0x7FE00009)):
        raise VolumeError(f"{name!r} lacks PixelData: it is not an image")
    pixels = _Pixels.of(ds)
    if pixels.samples != 1:
        raise VolumeError(f"{name!r} is not a single-sample (greyscale) image")
    if _is_multiframe(ds, pixels):
        return _enhanced_frames(ds, pixels, index, name)
    return [_classic_frame(ds, pixels, index, name)]


def _normal(iop: npt.NDArray[np.float64]) -> npt.NDArray[np.float64] | None:
    """Unit normal ``row_cosines x column_cosines``, None when degenerate."""
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 0.5:
        return None
    result: npt.NDArray[np.float64] = normal / norm
    return result


def _problem(frames: Sequence[_Frame]) -> str | None:
    """Why ``frames`` cannot form one volume, or None when they can."""
    first = frames[0]
    for frame in frames[1:]:
        if frame.shape != first.shape:
            return f"mixed matrix sizes {first.shape} and {frame.shape} (rows, columns)"
    iops = np.stack([f.iop for f in frames])
    bad = np.abs(iops - first.iop).max(axis=1) > ORIENTATION_TOLERANCE
    if bad.any():
        other = iops[int(np.argmax(bad))]
        return f"mixed Image Orientation (Patient) {first.iop.tolist()} and {other.tolist()}"
    spacings = np.stack([f.pixel_spacing for f in frames])
    bad = ~np.isclose(spacings, first.pixel_spacing, rtol=1e-4, atol=0.0).all(axis=1)
    if bad.any():
        other = spacings[int(np.argmax(bad))]
        return f"mixed Pixel Spacing {first.pixel_spacing.tolist()} and {other.tolist()}"
    normal = _normal(first.iop)
    if normal is None:
        return f"degenerate Image Orientation (Patient) {first.iop.tolist()}"
    positions = np.sort(np.stack([f.ipp for f in frames]) @ normal)
    gaps = np.diff(positions)
    if gaps.size and float(gaps.min()) < DUPLICATE_TOLERANCE_MM:
        i = int(np.argmin(gaps))
        return (
            f"two slices at the same position {positions[i]:.3f} mm along the normal "
            "(duplicate instances, or several images per position that no echo, image "
            "type, temporal position, stack or acquisition number tells apart)"
        )
    return None


def _partition(frames: list[_Frame]) -> tuple[list[list[_Frame]], list[str]]:
    """Split ``frames`` into groups that each form a volume.

    Returns the groups and the dimensions used. A dimension (``_SPLIT_ORDER``)
    splits only groups that cannot form a volume yet (repeated positions, mixed
    geometry); a group that already can is never split.
    """
    groups: list[tuple[list[_Frame], str | None]] = [(frames, _problem(frames))]
    used: list[str] = []
    for dim in _SPLIT_ORDER:
        if all(problem is None for _, problem in groups):
            break
        result: list[tuple[list[_Frame], str | None]] = []
        for group, problem in groups:
            by_value: dict[_DimValue, list[_Frame]] = {}
            if problem is not None:
                for frame in group:
                    by_value.setdefault(frame.dims[dim], []).append(frame)
            if len(by_value) > 1:
                if dim not in used:
                    used.append(dim)
                result.extend((part, _problem(part)) for part in by_value.values())
            else:
                result.append((group, problem))
        groups = result
    for _, problem in groups:
        if problem is not None:
            raise VolumeError(problem)
    return [group for group, _ in groups], used


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "x"


def _labeller(
    frames: Sequence[_Frame], datasets: Sequence[Dataset]
) -> Callable[[str, _DimValue], str]:
    """A function naming a dimension value in a volume key (filename-safe)."""
    echo_times = sorted(
        {
            float(value[1][1])  # type: ignore[index]
            for value in (f.dims["echo"] for f in frames)
            if len(value) == 2 and value[1][0] == "time"  # type: ignore[index]
        }
    )

    def label(dim: str, value: _DimValue) -> str:
        if len(value) < 2:
            return "other" if dim == "component" else f"no{dim}"
        raw = value[1]
        if dim == "stack":
            return f"stack{_slug(str(raw))}"
        if dim == "temporal":
            return f"volume{raw}"
        if dim == "echo":
            kind, number = cast(tuple[str, float], raw)
            if kind == "number":
                return f"echo{int(number)}"
            return f"echo{echo_times.index(float(number)) + 1}"
        if dim == "acquisition":
            return f"acq{raw}"
        if dim == "instance":
            index = cast(int, raw)
            instance = _int_or_none(datasets[index].get("InstanceNumber"))
            return f"instance{instance if instance is not None else index + 1}"
        return _slug(str(raw))

    return label


def _plans(
    groups: list[list[_Frame]], used: list[str], frames: list[_Frame], datasets: list[Dataset]
) -> list[_Plan]:
    """Name and order the groups: ``key`` from the split dimensions, ``""`` for one group."""
    if len(groups) == 1:
        return [_Plan(frames=groups[0], key="", sort_key=())]
    label = _labeller(frames, datasets)
    plans: list[_Plan] = []
    for group in groups:
        parts: list[str] = []
        for dim in _KEY_ORDER:
            values = {f.dims[dim] for f in group}
            if dim in used and len(values) == 1:
                parts.append(label(dim, next(iter(values))))
        sort_key = tuple(
            min(f.dims[d] for f in group)  # type: ignore[type-var]
            for d in _KEY_ORDER
            if d in used
        )
        plans.append(_Plan(frames=group, key="-".join(parts), sort_key=sort_key))
    plans.sort(key=lambda p: p.sort_key)  # type: ignore[arg-type,return-value]
    seen: dict[str, int] = {}
    for number, plan in enumerate(plans, start=1):
        # a group left whole while others were split may share no split value
        plan.key = plan.key or f"part{number}"
        count = seen.get(plan.key, 0)
        seen[plan.key] = count + 1
        if count:
            plan.key = f"{plan.key}-{count + 1}"
    return plans


def _geometry(
    frames: list[_Frame], series_uid: str, key: str
) -> tuple[list[_Frame], tuple[float, float, float], npt.NDArray[np.float64]]:
    """Sort frames along the normal; return them, the spacing and the affine."""
    first = frames[0]
    normal = _normal(first.iop)
    if normal is None:  # _problem() already refused it; keeps mypy informed
        raise VolumeError(f"series {series_uid}: degenerate Image Orientation (Patient)")
    ipps = np.stack([f.ipp for f in frames])
    positions = ipps @ normal
    order = np.argsort(positions, kind="stable")
    positions, ipps = positions[order], ipps[order]
    ordered = [frames[i] for i in order]
    where = f"series {series_uid}" + (f" ({key})" if key else "")

    gaps = np.diff(positions)
    if gaps.size:
        slice_spacing = float(np.median(gaps))
        if float(np.max(np.abs(gaps - slice_spacing))) > GAP_TOLERANCE * slice_spacing:
            logger.warning(
                "%s: non-uniform slice gaps (%.3f to %.3f mm); using the median "
                "%.3f mm as slice spacing",
                where,
                float(gaps.min()),
                float(gaps.max()),
                slice_spacing,
            )
        # Step between slice origins: normal component = spacing, plus any
        # in-plane shear (gantry tilt) measured over the whole stack.
        step = (ipps[-1] - ipps[0]) * (slice_spacing / float(positions[-1] - positions[0]))
    else:
        slice_spacing = first.thickness or 1.0
        step = normal * slice_spacing

    row_cos, col_cos = first.iop[:3], first.iop[3:]
    row_spacing, col_spacing = float(first.pixel_spacing[0]), float(first.pixel_spacing[1])
    affine: npt.NDArray[np.float64] = np.eye(4, dtype=np.float64)
    affine[:3, 0] = step
    affine[:3, 1] = col_cos * row_spacing
    affine[:3, 2] = row_cos * col_spacing
    affine[:3, 3] = ipps[0]
    return ordered, (slice_spacing, row_spacing, col_spacing), affine


def _fits(pixels: npt.NDArray[np.generic], bits_stored: int, signed: bool) -> bool:
    """Whether integer ``pixels`` already lie in the range of ``bits_stored`` bits."""
    if pixels.size == 0 or pixels.dtype.kind not in "iu":
        return True
    if signed:
        low, high = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
        return bool(int(pixels.min()) >= low and int(pixels.max()) <= high)
    return bool(int(pixels.max()) <= (1 << bits_stored) - 1)


def _native_view(ds: Dataset, pixels: _Pixels) -> npt.NDArray[np.generic] | None:
    """Little-endian native greyscale Pixel Data as a view, no copy; None if not that.

    The same array pydicom's native decoder returns for these transfer
    syntaxes, without its per-call set-up, which costs more than the view.
    """
    file_meta = getattr(ds, "file_meta", None)
    syntax = None if file_meta is None else file_meta.get("TransferSyntaxUID")
    if (
        syntax not in _NATIVE_LITTLE_ENDIAN
        or _PIXEL_DATA not in ds
        or pixels.bits_allocated not in (8, 16, 32)
        or pixels.photometric not in ("MONOCHROME1", "MONOCHROME2")
    ):
        return None
    dtype = np.dtype(f"<{'i' if pixels.signed else 'u'}{pixels.bits_allocated // 8}")
    count = pixels.frames * pixels.rows * pixels.columns
    data = ds.PixelData
    if not isinstance(data, bytes | bytearray) or len(data) < count * dtype.itemsize:
        return None
    view: npt.NDArray[np.generic] = np.frombuffer(data, dtype=dtype, count=count)
    return view.reshape(pixels.frames, pixels.rows, pixels.columns)


class _Scratch:
    """A byte buffer, grown as needed, that native Pixel Data is read into."""

    def __init__(self) -> None:
        self.buffer = np.empty(0, dtype=np.uint8)

    def get(self, size: int) -> npt.NDArray[np.uint8]:
        if self.buffer.size < size:
            self.buffer = np.empty(size, dtype=np.uint8)
        return self.buffer[:size]


def _deferred_native(
    ds: Dataset, pixels: _Pixels, scratch: _Scratch
) -> npt.NDArray[np.generic] | None:
    """Read deferred, native little-endian greyscale Pixel Data into ``scratch``.

    Returns a view on the scratch buffer, ``(frames, rows, columns)``, valid
    until the next instance is read into it; None when the element is
    not a deferred native one (the caller then lets pydicom read and decode).
    """
    if _PIXEL_DATA not in ds:
        return None
    element = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    filename = getattr(ds, "filename", None)
    if (
        not isinstance(element, RawDataElement)
        or element.value is not None
        or not isinstance(filename, str)
        or ds.file_meta.get("TransferSyntaxUID") not in _DEFERRABLE
        or pixels.bits_allocated not in (8, 16, 32)
        or pixels.photometric not in ("MONOCHROME1", "MONOCHROME2")
    ):
        return None
    dtype = np.dtype(f"<{'i' if pixels.signed else 'u'}{pixels.bits_allocated // 8}")
    count = pixels.frames * pixels.rows * pixels.columns
    size = count * dtype.itemsize
    if element.length < size:
        return None
    buffer = scratch.get(size)
    with open(filename, "rb") as fp:
        fp.seek(element.value_tell)
        if fp.readinto(buffer) != size:
            return None
    view: npt.NDArray[np.generic] = buffer.view(dtype)
    return view.reshape(pixels.frames, pixels.rows, pixels.columns)


def _stored_pixels(ds: Dataset, scratch: _Scratch | None = None) -> npt.NDArray[np.generic]:
    """Decoded stored values, shape ``(frames, rows, columns)``; a view where possible.

    Native (uncompressed) data is not copied: a view on the scratch buffer it
    was read into (deferred Pixel Data, see :func:`_read`) or on the Pixel Data
    bytes. When Bits Stored < Bits Allocated, pydicom's unused-bit correction
    (PS3.5 8.1.1), which copies, only runs when some value lies outside the
    range of Bits Stored.
    """
    try:
        info = _Pixels.of(ds)
        pixels = None if scratch is None else _deferred_native(ds, info, scratch)
        if pixels is None:
            pixels = _native_view(ds, info)
        if pixels is None:
            native = not ds.file_meta.TransferSyntaxUID.is_encapsulated
            pixels = decode_pixel_array(ds, view_only=True, correct_unused_bits=not native)
        if info.bits_stored < info.bits_allocated and not _fits(
            pixels, info.bits_stored, info.signed
        ):
            pixels = decode_pixel_array(ds)  # pydicom masks / sign-extends the unused bits
        return pixels.reshape(-1, info.rows, info.columns)
    except Exception as exc:  # decoder errors come in many types
        raise VolumeError(
            f"cannot decode pixel data of instance {ds.get('SOPInstanceUID', '?')}: {exc}"
        ) from exc


def _rescale_into(
    out: npt.NDArray[np.float32],
    pixels: npt.NDArray[np.generic],
    slope: float,
    intercept: float,
    ds: Dataset,
) -> None:
    """``out[...] = pixels * slope + intercept`` in float32 (PS3.3 C.11.1.1.2).

    A casting copy followed by in-place float32 operations: measured faster
    than one mixed-type ufunc call, which goes through numpy's buffered
    casting loop.
    """
    if "ModalityLUTSequence" in ds:
        np.copyto(out, apply_modality_lut(pixels, ds), casting="unsafe")
        return
    np.copyto(out, pixels, casting="unsafe")
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)


def decode_frames(ds: Dataset) -> npt.NDArray[np.float32]:
    """Decode every frame of an instance with its modality rescale applied.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A greyscale image instance, single- or multi-frame, in any transfer
        syntax pydicom can decode (with the pylibjpeg plugins: RLE, JPEG
        lossless, JPEG-LS, JPEG 2000).

    Returns
    -------
    numpy.ndarray
        Shape ``(frames, rows, columns)``, float32, in frame order (frame
        number ``k`` at index ``k - 1``), not sorted in space. Each frame has
        its own Rescale Slope and Intercept applied: from the Pixel Value
        Transformation macro of its per-frame or the shared functional groups
        (PS3.3 C.7.6.16.2.9), else the top-level attributes (C.11.1.1.2);
        HU for CT.

    Raises
    ------
    VolumeError
        If the pixel data cannot be decoded or is not greyscale.
    """
    if _Pixels.of(ds).samples != 1:
        raise VolumeError(
            f"instance {ds.get('SOPInstanceUID', '?')} is not a single-sample (greyscale) image"
        )
    frames = _stored_pixels(ds)
    rescales = _frame_rescales(ds)
    if len(rescales) != frames.shape[0]:
        raise VolumeError(
            f"instance {ds.get('SOPInstanceUID', '?')}: {frames.shape[0]} frames decoded, "
            f"Number of Frames says {len(rescales)}"
        )
    out = np.empty(frames.shape, dtype=np.float32)
    for k, (slope, intercept) in enumerate(rescales):
        _rescale_into(out[k], frames[k], slope, intercept, ds)
    return out


def load_volumes(paths: Sequence[str | os.PathLike[str] | Dataset]) -> list[Volume]:
    """Read the instances of one series into one or more 3-D volumes.

    Parameters
    ----------
    paths : sequence of str, os.PathLike or pydicom.dataset.Dataset
        The files (or already read datasets) of one Series Instance UID, in
        any order: single-frame images (one slice each), enhanced multi-frame
        images (Enhanced CT/MR, frames placed by their Plane Position (Patient)
        functional group, PS3.3 C.7.6.16), or both.

    Returns
    -------
    list[Volume]
        One volume per group of images that together form a stack, ordered by
        their key parts. Each ``Volume.array`` has shape
        ``(slices, rows, columns)``, float32, with each slice's modality
        rescale applied (HU for CT); slices are in the order of increasing
        position ``n . IPP`` along the normal ``n = row_cosines x
        column_cosines`` (PS3.3 C.7.6.2.1.1). ``spacing`` is ``(median gap
        between neighbouring slice positions, row spacing, column spacing)``
        in mm (a one-slice volume uses Spacing Between Slices, else Slice
        Thickness, else 1 mm). ``affine`` (4 x 4) maps ``(slice, row, column,
        1)`` to LPS mm: column 0 is the mean step between slice origins,
        scaled so that its component along ``n`` equals the median spacing
        (gantry-tilted, sheared stacks land on their origins); columns 1 and 2
        are the column direction cosines times the row spacing and the row
        direction cosines times the column spacing; column 3 is the first
        slice's IPP. ``datasets`` are the source instances: one per slice, in
        slice order, for single-frame images; each contributing multi-frame
        instance once (in the order slices first use them) otherwise; read
        from files, they leave uncompressed Pixel Data over 64 KiB on disk
        (pydicom deferred read: ``ds.pixel_array`` still works while the file
        exists). ``frames[k]`` is ``(index into datasets, 1-based frame
        number)`` of slice ``k``. ``key`` is ``""`` when the series forms one
        volume, else a distinct filename-safe name (see Notes).

    Raises
    ------
    VolumeError
        No files; unreadable files; images without pixel data or geometry
        (Image Position/Orientation (Patient), Pixel Spacing, or their
        functional groups); colour images; more than one Series Instance UID;
        a group that still repeats slice positions or mixes orientations,
        matrix sizes or pixel spacings after every split below; pixel data
        that cannot be decoded.

    Notes
    -----
    **Splitting.** When all images form one stack the series is one volume,
    whatever their Image Type, Echo or Acquisition Numbers. Otherwise the
    images are split, one dimension at a time and only where still needed,
    by: Stack ID; temporal position (Temporal Position Index, or Temporal
    Position Identifier (0020,0100)); complex component (Complex Image
    Component, else an M/P/R/I value of Image Type or Frame Type, else the
    Philips private image type (2005,xx11)); echo (Echo Numbers (0018,0086),
    else Echo Time / Effective Echo Time, ranked); Image Type values 3 and
    up; Acquisition Number / Frame Acquisition Number; and, for multi-frame
    instances, the instance. The key joins, in the order stack, temporal,
    echo, component, the other parts, the values of the dimensions used:
    ``"stack2"``, ``"volume3"``, ``"echo1"``, ``"magnitude"``/``"phase"``/
    ``"real"``/``"imaginary"``, ``"acq4"``, ``"instance5"``, e.g.
    ``"echo2-phase"``; only ``[a-z0-9_-]`` characters, so it is safe in file
    names. (A group that was never split and shares no split value gets
    ``"part<n>"``.) Images that still share a position after all these
    splits raise :class:`VolumeError`.

    **Non-uniform gaps** (e.g. gantry-tilt series with gaps of 4 and 7 mm)
    still load: a warning naming the Series Instance UID is logged and the
    median gap is used, so per-slice positions in the volume are then
    approximate. Only UIDs are ever logged, never patient data.

    **Speed and memory.** Each instance is decoded once. Uncompressed pixel
    data is read from the file into one reused scratch buffer (or viewed in
    place) and written straight into the float32 output with the rescale, so
    no decoded copy is made and none is kept in the datasets. Python's cyclic
    garbage collector is paused while the files are parsed and restored
    afterwards. Measured on the 134-slice 512 x 512 CT in
    shared/data: faster than ``[pydicom.dcmread(f).pixel_array for f in
    files]``.
    """
    if len(paths) == 0:
        raise VolumeError("no files given: a volume needs at least one slice")

    datasets: list[Dataset] = []
    frames: list[_Frame] = []
    with _gc_paused():
        for index, item in enumerate(paths):
            if isinstance(item, Dataset):
                ds = item
                name = f"instance {item.get('SOPInstanceUID', index)}"
            else:
                ds = _read(item)
                name = os.fspath(item)
            frames.extend(_frames_of(ds, index, name))
            datasets.append(ds)

    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) != 1 or "" in series_uids:
        raise VolumeError(
            f"expected one Series Instance UID, found {len(series_uids - {''})}"
            + (" and instances without one" if "" in series_uids else "")
        )
    series_uid = series_uids.pop()

    try:
        groups, used = _partition(frames)
    except VolumeError as exc:
        raise VolumeError(f"series {series_uid}: {exc}") from None
    plans = _plans(groups, used, frames, datasets)
    if len(plans) > 1:
        logger.info(
            "series %s: %d volumes split by %s: %s",
            series_uid,
            len(plans),
            ", ".join(used),
            ", ".join(p.key for p in plans),
        )

    # Geometry first (cheap), then decode every instance once into its slots.
    modality = str(datasets[0].get("Modality", ""))
    volumes: list[Volume] = []
    targets: dict[int, list[tuple[npt.NDArray[np.float32], _Frame]]] = {}
    for plan in plans:
        ordered, spacing, affine = _geometry(plan.frames, series_uid, plan.key)
        rows, columns = ordered[0].shape
        array = np.empty((len(ordered), rows, columns), dtype=np.float32)
        local: dict[int, int] = {}
        for k, frame in enumerate(ordered):
            local.setdefault(frame.index, len(local))
            targets.setdefault(frame.index, []).append((array[k], frame))
        volumes.append(
            Volume(
                array=array,
                spacing=spacing,
                affine=affine,
                datasets=[datasets[i] for i in local],
                modality=modality,
                frames=[(local[f.index], f.number) for f in ordered],
                key=plan.key,
            )
        )

    scratch = _Scratch()

    def fill(index: int) -> None:
        ds = datasets[index]
        stored = _stored_pixels(ds, scratch)
        for out, frame in targets[index]:
            if frame.number > stored.shape[0]:
                raise VolumeError(
                    f"series {series_uid}: instance {ds.get('SOPInstanceUID', '?')} decodes "
                    f"to {stored.shape[0]} frames, frame {frame.number} is missing"
                )
            pixels = stored[frame.number - 1]
            if pixels.shape != out.shape:
                raise VolumeError(
                    f"series {series_uid}: instance {ds.get('SOPInstanceUID', '?')} frame "
                    f"{frame.number} decodes to {pixels.shape}, expected {out.shape}"
                )
            _rescale_into(out, pixels, frame.slope, frame.intercept, ds)

    for index in sorted(targets):
        fill(index)
    return volumes


def load_series(paths: Sequence[str | os.PathLike[str] | Dataset]) -> Volume:
    """Read a series that forms exactly one 3-D volume.

    Parameters
    ----------
    paths : sequence of str, os.PathLike or pydicom.dataset.Dataset
        The files of one series, in any order (see :func:`load_volumes`).

    Returns
    -------
    Volume
        As described in :func:`load_volumes`: ``array`` of shape
        ``(slices, rows, columns)``, float32 (HU for CT), spacing in mm,
        affine to LPS mm, ``key == ""``.

    Raises
    ------
    VolumeError
        Everything :func:`load_volumes` raises, and a series that splits into
        several volumes (echoes, magnitude/phase, temporal positions, ...);
        the message lists their keys.
    """
    volumes = load_volumes(paths)
    if len(volumes) != 1:
        uid = str(volumes[0].datasets[0].get("SeriesInstanceUID", "?"))
        keys = ", ".join(v.key for v in volumes)
        raise VolumeError(
            f"series {uid} holds {len(volumes)} volumes ({keys}), not one: "
            "use load_volumes() to read them all"
        )
    return volumes[0]
