"""A weight-free MR segmentation model: the foreground (head or body) mask.

Works on any MR magnitude series, whatever its contrast, scanner scaling or
field strength: Gaussian smoothing, an automatic Otsu threshold on the
*logarithm* of the intensities, hole filling, the largest 3-D connected
component, a morphological opening and closing, and a final half-level
refinement of the outline.

Smoothing, thresholding and morphology run as torch operations on the
requested device; connected components and hole filling use
:mod:`scipy.ndimage` on the CPU. Every kernel is sized in mm through
``Volume.spacing``, so the result does not depend on slice thickness or pixel
size.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from scipy import ndimage

from workers.inference.base import Code, SegmentSpec, Volume

__all__ = ["BuiltinMRModel", "otsu_log_threshold"]

BoolArray = npt.NDArray[np.bool_]
Kernel = tuple[int, int, int]
Spacing = tuple[float, float, float]

#: Standard deviation (mm) of the Gaussian that suppresses noise before
#: thresholding. Axes with voxels larger than three times this are not smoothed.
SMOOTH_SIGMA_MM: Final = 1.0
#: Percentile of the smoothed volume taken as its "bright tissue" level: robust
#: to a few very bright voxels (vessels, fat, artefacts).
ROBUST_MAX_PERCENTILE: Final = 99.5
#: The threshold is computed on ``log(I + c)`` with ``c`` this fraction of the
#: bright-tissue level, so that exact zeros (scanners that blank the
#: background) map to a finite value and the histogram has the same shape
#: whatever the scanner's scale.
LOG_OFFSET_FRACTION: Final = 0.01
#: Number of bins of the log-intensity histogram.
HISTOGRAM_BINS: Final = 256
#: At most this many voxels (an evenly strided subset) estimate a percentile.
PERCENTILE_SAMPLE: Final = 1_000_000
#: Radius (mm) of the opening that detaches noise speckles and thin ghosting
#: from the subject before the largest component is taken.
OPENING_MM: Final = 1.0
#: Radius (mm) of the closing that bridges narrow dark gaps in the outline
#: (skin folds, thin dark lines at the surface).
CLOSING_MM: Final = 3.0
#: Radius (mm) of the box whose brightest foreground voxel gives the local
#: tissue level for the outline refinement.
LOCAL_LEVEL_MM: Final = 5.0
#: Outline voxels darker than this fraction of the local tissue level are
#: outside: the 50 % level of an edge is where a partial-volume voxel holds
#: half tissue, which makes the mask's volume unbiased.
EDGE_FRACTION: Final = 0.5


def _kernel(radius_mm: float, spacing: Spacing) -> Kernel:
    """Odd box size per axis covering ``radius_mm`` on each side of the centre."""
    kz, ky, kx = (2 * int(math.floor(radius_mm / s + 0.5)) + 1 for s in spacing)
    return kz, ky, kx


def _gaussian(image: torch.Tensor, sigma_mm: float, spacing: Spacing) -> torch.Tensor:
    """Separable Gaussian smoothing of a ``(z, y, x)`` float tensor, edges replicated.

    Axes whose voxel size exceeds ``3 * sigma_mm`` are left alone (their
    kernel would be a single tap).
    """
    x = image[None, None]
    for axis, step in enumerate(spacing):
        sigma = sigma_mm / step
        if sigma < 1.0 / 3.0:
            continue
        radius = int(math.ceil(3.0 * sigma))
        taps = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
        weights = torch.exp(-0.5 * (taps / sigma) ** 2)
        weights /= weights.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = weights.numel()
        pad = [0, 0, 0, 0, 0, 0]  # (x low, x high, y low, y high, z low, z high)
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        x = F.conv3d(F.pad(x, pad, mode="replicate"), weights.view(shape))
    return x[0, 0]


def _box_max(values: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """Running maximum of a float ``(z, y, x)`` tensor over a centred box.

    Separable: one 1-D max-pool per axis. The padding is ``-inf``, so voxels
    beyond the volume never win.
    """
    x = values[None, None]
    for axis, size in enumerate(kernel):
        if size <= 1:
            continue
        window = [1, 1, 1]
        window[axis] = size
        padding = [0, 0, 0]
        padding[axis] = size // 2
        x = F.max_pool3d(x, kernel_size=window, stride=1, padding=padding)
    return x[0, 0]


def _dilate(mask: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """Dilation of a bool ``(z, y, x)`` tensor by a box; outside counts as background."""
    return _box_max(mask.to(torch.float32), kernel) > 0.5


def _erode(mask: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """Erosion of a bool ``(z, y, x)`` tensor by a box; outside counts as foreground.

    Treating the outside as foreground means a subject cut by the field of
    view is not eaten away from the cut.
    """
    return _box_max((~mask).to(torch.float32), kernel) < 0.5


def _largest_component(mask: BoolArray) -> BoolArray:
    """The largest 6-connected component of a ``(z, y, x)`` mask; empty stays empty."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    result: BoolArray = labels == int(np.argmax(sizes))
    return result


def _fill_holes(mask: BoolArray) -> BoolArray:
    """Fill the in-plane holes of every slice, which also leaves no 3-D cavity.

    A hole is a 4-connected background region of one slice (one index of axis
    0) that does not touch that slice's border. Afterwards all background of
    every slice is connected to the border within the slice, so no 3-D
    background component is enclosed either. Filling only adds voxels that
    touch the mask, so a connected mask stays connected.
    """
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    labels, count = ndimage.label(~mask, structure=structure)
    if count == 0:
        return mask
    enclosed = np.ones(count + 1, dtype=bool)
    enclosed[0] = False
    border = np.concatenate(
        [
            labels[:, 0, :].ravel(),
            labels[:, -1, :].ravel(),
            labels[:, :, 0].ravel(),
            labels[:, :, -1].ravel(),
        ]
    )
    enclosed[border] = False
    filled: BoolArray = mask | enclosed[labels]
    return filled


def _otsu(histogram: npt.NDArray[np.float64], centres: npt.NDArray[np.float64]) -> float:
    """Otsu's threshold: the bin boundary that maximises the between-class variance."""
    total = float(histogram.sum())
    if total <= 0:
        return float(centres[0])
    p = histogram / total
    w0 = np.cumsum(p)[:-1]
    mu = np.cumsum(p * centres)[:-1]
    mu_total = float(np.dot(p, centres))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_total * w0 - mu) ** 2 / (w0 * (1.0 - w0))
    between[~np.isfinite(between)] = -1.0
    i = int(np.argmax(between))
    return float(0.5 * (centres[i] + centres[i + 1]))


def _quantile(values: torch.Tensor, q: float) -> float:
    """Quantile of a tensor from an evenly strided subset of at most 1e6 values."""
    flat = values.reshape(-1)
    sample = flat[:: max(1, flat.numel() // PERCENTILE_SAMPLE)].to(torch.float32)
    return float(torch.quantile(sample, q))


def otsu_log_threshold(smoothed: torch.Tensor) -> float:
    """Foreground threshold of a non-negative MR volume by Otsu on log intensities.

    Parameters
    ----------
    smoothed : torch.Tensor
        Float tensor of any shape with values ``>= 0``, e.g. a smoothed
        magnitude volume of shape ``(slices, rows, columns)``, on any device.

    Returns
    -------
    float
        Threshold ``t`` in the units of ``smoothed``: foreground is
        ``smoothed > t``. ``inf`` when the volume has no positive signal, so
        that nothing is foreground.

    Notes
    -----
    With ``h`` the 99.5th percentile of ``smoothed`` and ``c = 0.01 h``, a
    256-bin histogram of ``log(smoothed + c)`` over ``[log c, log(h + c)]``
    (values above ``h`` counted in the top bin) is split by Otsu's method
    (N. Otsu, IEEE Trans. SMC 9(1), 1979) and the split mapped back to
    intensity. Why the logarithm: a receive coil's bias field *multiplies*
    the signal, so in log space it shifts tissue by the same amount whatever
    its level, and the wide linear spread of tissue values (which in a linear
    histogram pulls Otsu's split up into the tissue, towards the class with
    the larger variance) shrinks to a compact mode far from the noise; the
    split then lands in the gap between the noise and the darkest tissue.
    Because ``c`` is relative to ``h``, ``t(k I) = k t(I)``: the scanner's
    arbitrary scaling does not matter.
    """
    high = _quantile(smoothed, ROBUST_MAX_PERCENTILE / 100.0)
    if not high > 0.0:
        high = float(smoothed.max())
    if not (high > 0.0 and math.isfinite(high)):
        return math.inf
    offset = LOG_OFFSET_FRACTION * high
    low_log, high_log = math.log(offset), math.log(high + offset)
    logs = torch.log(smoothed.to(torch.float32) + offset).clamp_(low_log, high_log)
    histogram = torch.histc(logs, bins=HISTOGRAM_BINS, min=low_log, max=high_log)
    edges = np.linspace(low_log, high_log, HISTOGRAM_BINS + 1)
    centres = 0.5 * (edges[:-1] + edges[1:])
    return math.exp(_otsu(histogram.double().cpu().numpy(), centres)) - offset


class BuiltinMRModel:
    """Foreground (head or body) mask on MR, by automatic threshold and morphology.

    Attributes
    ----------
    name : str
        ``"radnode-builtin-mr"``.
    version : str
        ``"1.0.0"``.
    segments : tuple[SegmentSpec, ...]
        One segment, ``body``: category SCT 91723000 "Anatomical Structure"
        (DICOM PS3.16 CID 7150), type SCT 38266002 "Entire body" (CID 7151).

    Notes
    -----
    Codes. The category is the "Anatomical Structure" code of CID 7150 in the
    current PS3.16, SCT 91723000, also used by radnode's CT model. (SCT
    123037004, which older dcmqi/Slicer terminology files label "Anatomical
    Structure", is the SNOMED CT top-level concept "Body structure", legacy
    SRT T-D000A; CID 7150 does not list it.) The type is SCT 38266002 "Entire
    body" (CID 7151, and CID 4 anatomic regions): the mask is all of the
    subject that gives signal, and the model does not recognise the body
    region, so the generic concept of "the body, as opposed to the air around
    it" is right for every MR series, whereas a region code such as SCT
    69536005 "Head" would be wrong for a knee or an abdomen. As for any
    segment, the mask covers the body only within the field of view. For a
    test object (phantom) the code is not anatomically true: the model
    cannot tell a phantom from a patient.

    Steps, on ``Volume.array`` (any magnitude scaling, no calibration):

    1. non-finite values become 0; the volume is shifted so that its 0.1st
       percentile is 0 (reconstructions with a negative offset);
    2. Gaussian smoothing, sigma 1 mm per axis (axes with voxels over 3 mm
       are not smoothed);
    3. threshold by :func:`otsu_log_threshold` (Otsu on ``log(I + c)``),
       robust to the bias field and to the scanner's arbitrary scale; the
       threshold lands just above the noise, below the darkest tissue;
    4. in-plane holes filled slice by slice, so that tissue enclosed by a
       dark layer (scalp outside a dark skull) joins what it encloses;
    5. opening with a box of radius 1 mm (detaches noise and thin ghosting
       that touch the subject), then the largest 6-connected component;
    6. closing with a box of radius 3 mm, which bridges thin dark gaps in the
       outline, then holes filled again and the largest component; voxels
       beyond the volume count as foreground for every erosion, so a subject
       cut by the field of view keeps its cut edge;
    7. outline refinement: the low global threshold of step 3 places the
       outline in the partial-volume fringe, which overestimates volumes by
       several percent. Outline voxels (a background voxel in their 3x3x3
       neighbourhood; voxels beyond the volume do not count, so a cut by the
       field of view is kept) whose smoothed value is below half the brightest
       foreground value within 5 mm are removed, once: the outline moves to
       the 50 % level of the local edge, where it is unbiased whatever the
       bias field. Holes are filled and the largest component taken again.

    The result is one 6-connected component whose slices have no holes
    (hence no enclosed 3-D cavity either). Known limits: it needs some
    background (air) in the field of view, otherwise Otsu splits dark from
    bright tissue; tissue at the surface darker than the noise floor (far
    from a surface coil) is left out; air cavities open to the outside in
    the acquisition plane (nostrils, mouth) stay outside; phase images and
    other non-magnitude data give meaningless masks.
    """

    name: str = "radnode-builtin-mr"
    version: str = "1.0.0"
    segments: tuple[SegmentSpec, ...] = (
        SegmentSpec(
            label="body",
            category=Code("91723000", "SCT", "Anatomical Structure"),
            type=Code("38266002", "SCT", "Entire body"),
            rgb=(177, 122, 101),
        ),
    )

    def predict(self, volume: Volume, device: str = "cpu") -> npt.NDArray[np.bool_]:
        """Segment the foreground of an MR volume.

        Parameters
        ----------
        volume : Volume
            An MR volume: ``array`` of shape ``(slices, rows, columns)``
            (magnitude, any scale), ``spacing`` in mm.
        device : str
            torch device for smoothing, threshold and morphology, e.g.
            ``"cpu"`` or ``"cuda:0"``.

        Returns
        -------
        numpy.ndarray
            Boolean, shape ``(1, slices, rows, columns)``: the foreground, one
            6-connected component without holes, or all False when the volume
            has no signal.

        Raises
        ------
        ValueError
            If ``volume.array`` is not three-dimensional or a spacing is not a
            positive finite number.
        """
        array = volume.array
        if array.ndim != 3:
            raise ValueError(f"expected a (slices, rows, columns) volume, got shape {array.shape}")
        if len(volume.spacing) != 3 or not all(
            math.isfinite(float(s)) and float(s) > 0 for s in volume.spacing
        ):
            raise ValueError(f"spacing must be three positive numbers (mm), got {volume.spacing}")
        sz, sy, sx = (float(s) for s in volume.spacing)
        spacing = (sz, sy, sx)
        empty = np.zeros((1, *array.shape), dtype=bool)
        if array.size == 0:
            return empty
        with torch.inference_mode():
            image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)
            image = torch.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
            image = (image - _quantile(image, 0.001)).clamp_(min=0.0)
            smoothed = _gaussian(image, SMOOTH_SIGMA_MM, spacing)
            threshold = otsu_log_threshold(smoothed)
            if not math.isfinite(threshold):
                return empty
            raw = _fill_holes((smoothed > threshold).cpu().numpy())
            raw_t = torch.from_numpy(raw).to(device)
            opening = _kernel(OPENING_MM, spacing)
            body = _largest_component(_dilate(_erode(raw_t, opening), opening).cpu().numpy())
            if not body.any():
                # The opening removed everything (a subject thinner than about
                # twice its radius): fall back to the unopened mask.
                body = _largest_component(raw)
            closing = _kernel(CLOSING_MM, spacing)
            closed = _erode(_dilate(torch.from_numpy(body).to(device), closing), closing)
            body_t = torch.from_numpy(_largest_component(_fill_holes(closed.cpu().numpy())))
            body_t = body_t.to(device)

            level = _box_max(smoothed * body_t, _kernel(LOCAL_LEVEL_MM, spacing))
            outline = body_t & ~_erode(body_t, (3, 3, 3))
            body_t &= ~(outline & (smoothed < EDGE_FRACTION * level))
            body = body_t.cpu().numpy()
        result = _largest_component(_fill_holes(body))
        return result[None]
