"""Network input from a :class:`Volume`, and network output back on the source grid.

A site-supplied model declares the geometry and intensities it was trained on
(:class:`service.model_spec.InputSpec`). :func:`prepare_input` builds the
network's input tensor from a radnode volume; :func:`to_source_grid` maps the
network's per-class output back onto the voxels of the source series, so every
SEG frame lies on a source frame.

Steps, in MONAI's usual order (``Orientation`` -> ``Spacing`` -> intensity):

1. **Orientation.** The source array is ``(slice, row, column)`` and
   ``Volume.affine`` maps it to LPS patient coordinates. The declared axis codes
   (``"RAS"``, ``"LPS"``, ...) name the patient direction each array axis points
   to, as nibabel's ``aff2axcodes`` and MONAI's ``Orientation`` define them:
   ``"RAS"`` means array axis 0 increases toward the patient's Right, axis 1
   toward Anterior, axis 2 toward Superior. The codes are patient directions,
   independent of the world frame: an LPS affine whose column points to +x
   points to the patient's Left (code ``L``); MONAI stores RAS affines, where
   +x is Right. (Feeding radnode's LPS affine to MONAI's ``Orientation`` as if
   it were RAS would swap L/R and A/P; this module never does that.) The
   reorientation is an exact permutation and flip of array axes, chosen from
   the direction cosines like nibabel's ``io_orientation`` (each array axis
   goes to the world axis it is most parallel to). Oblique volumes are
   assigned to their closest axes and are not resampled to be axis-aligned.
   MONAI's ``Orientation`` is not used because it needs nibabel (not a
   radnode dependency) and a RAS ``MetaTensor``; a permutation and flip is
   exact and costs nothing.
2. **Spacing.** The reoriented grid is resampled to ``spacing_mm`` with
   trilinear interpolation. The new grid has exactly ``spacing_mm``, has
   ``max(1, round(n * s / s'))`` voxels per axis and is centred on the
   source field of view (the two grids share their centre; MONAI's ``Spacing``
   instead keeps voxel 0 fixed; both give the network voxels of the declared
   size). Resampling is separable: one linear interpolation per axis with
   index gathers, which is exactly trilinear interpolation but needs memory
   proportional to the volume only, where ``grid_sample`` (what MONAI's
   ``Spacing`` uses) would need a 3-vector of float coordinates per output voxel
   (about 1 GB for a 512 x 512 x 300 CT). Values outside the source are the
   nearest edge value (``padding_mode="border"``).
3. **Intensity** (:func:`apply_intensity`): MONAI's own
   ``ScaleIntensityRange``, ``NormalizeIntensity`` and
   ``ScaleIntensityRangePercentiles`` on the resampled image, so the statistics
   of ``zscore`` and ``percentile`` are those of what the network sees.

The inverse (:func:`to_source_grid`) resamples network output *scores*
(probabilities or logits) with the same trilinear interpolation onto the
reoriented source grid, then reduces them (argmax or threshold) and undoes the
orientation. Interpolating scores, then taking the argmax, gives boundaries at
the source's own resolution; taking the argmax on the coarse grid first and
then copying nearest labels would give a staircase of the network's voxel
size. This is what MONAI bundles do too (``Invertd`` on the probabilities,
then ``AsDiscreted(argmax=True)``). A network that already returns a label map
(``activation: none``) is resampled with nearest-neighbour instead, as labels
cannot be averaged. The inverse works in chunks of source slices so that the
full-resolution score array of every class never exists at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from monai.transforms.intensity.array import (
    NormalizeIntensity,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
)
from monai.transforms.spatial.array import Resize
from monai.utils.type_conversion import convert_to_tensor

from service.model_spec import InputSpec, IntensitySpec
from workers.inference.base import Volume

__all__ = [
    "GridPlan",
    "apply_intensity",
    "axis_codes",
    "orientation_transform",
    "plan_grid",
    "prepare_input",
    "to_network_grid",
    "to_source_grid",
]

Shape3 = tuple[int, int, int]
Spacing3 = tuple[float, float, float]
Interpolation = Literal["linear", "nearest"]

#: Patient direction of the positive world axes of an LPS affine, per world axis.
_POSITIVE = "LPS"
#: Patient direction of the negative world axes of an LPS affine, per world axis.
_NEGATIVE = "RAI"
#: Elements per chunk of resampling on a CPU (8 MB of float32: fits in cache, and
#: avoids a fresh memory mapping per chunk; several times faster than 2**25).
CHUNK_ELEMENTS_CPU = 2**21
#: Elements per chunk of resampling on a CUDA device (fewer, larger kernels).
CHUNK_ELEMENTS_CUDA = 2**26


def _world_axes(affine: npt.NDArray[np.float64]) -> tuple[list[int], list[int]]:
    """World axis (0, 1, 2 = x, y, z) and sign (+1/-1) each array axis is closest to.

    Greedy on the absolute direction cosines: the largest cosine fixes its pair
    of array and world axes, then the next largest among the rest, so every
    world axis is used once even for strongly oblique volumes.
    """
    direction = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(direction, axis=0)
    if np.any(norms == 0) or not np.all(np.isfinite(direction)):
        raise ValueError(f"affine has a degenerate or non-finite direction matrix:\n{affine}")
    cosines = np.abs(direction / norms)  # (world, array)
    world = [-1, -1, -1]
    sign = [1, 1, 1]
    free_world = {0, 1, 2}
    free_array = {0, 1, 2}
    while free_array:
        best = max(
            ((w, a) for w in free_world for a in free_array), key=lambda wa: cosines[wa]
        )
        w, a = best
        world[a] = w
        sign[a] = 1 if direction[w, a] > 0 else -1
        free_world.discard(w)
        free_array.discard(a)
    return world, sign


def axis_codes(affine: npt.NDArray[np.float64]) -> str:
    """Axis codes of an array whose voxel-to-LPS affine is ``affine``.

    Parameters
    ----------
    affine : numpy.ndarray
        Shape ``(4, 4)``: array index ``(i, j, k, 1)`` to LPS patient
        coordinates in mm, like ``Volume.affine``.

    Returns
    -------
    str
        Three letters, the patient direction array axes 0, 1, 2 point to
        (nibabel/MONAI convention), e.g. ``"LPS"`` for an identity affine and
        ``"SPL"`` for a typical axial series stored as ``(slice, row, column)``
        with slices ordered foot to head.

    Raises
    ------
    ValueError
        If the direction matrix has a zero or non-finite column.
    """
    world, sign = _world_axes(affine)
    return "".join(
        (_POSITIVE if s > 0 else _NEGATIVE)[w] for w, s in zip(world, sign, strict=True)
    )


def orientation_transform(
    affine: npt.NDArray[np.float64], codes: str | None
) -> tuple[Shape3, tuple[bool, bool, bool]]:
    """Axis permutation and flips that reorient an array to ``codes``.

    Parameters
    ----------
    affine : numpy.ndarray
        Shape ``(4, 4)``, voxel index to LPS mm of the source array.
    codes : str or None
        Target axis codes, e.g. ``"RAS"``; ``None`` keeps the source axes.

    Returns
    -------
    perm : tuple[int, int, int]
        ``perm[i]`` is the source axis that becomes axis ``i``.
    flip : tuple[bool, bool, bool]
        ``flip[i]`` reverses axis ``i`` after the permutation.

    Raises
    ------
    ValueError
        If ``codes`` is not three letters, one from each of L/R, P/A, I/S.
    """
    if codes is None:
        return (0, 1, 2), (False, False, False)
    codes = codes.upper()
    world, sign = _world_axes(affine)
    target_world: list[int] = []
    target_sign: list[int] = []
    for code in codes:
        if code in _POSITIVE:
            target_world.append(_POSITIVE.index(code))
            target_sign.append(1)
        elif code in _NEGATIVE:
            target_world.append(_NEGATIVE.index(code))
            target_sign.append(-1)
        else:
            raise ValueError(f"axis code {code!r} in {codes!r} is not one of L R P A I S")
    if len(codes) != 3 or sorted(target_world) != [0, 1, 2]:
        raise ValueError(f"axis codes {codes!r}: one of L/R, one of P/A and one of I/S")
    perm = tuple(world.index(w) for w in target_world)
    flip = tuple(sign[p] != s for p, s in zip(perm, target_sign, strict=True))
    return (perm[0], perm[1], perm[2]), (flip[0], flip[1], flip[2])


def _resampled_size(n: int, spacing: float, new_spacing: float) -> int:
    return max(1, int(math.floor(n * spacing / new_spacing + 0.5)))


def _positions(n_in: int, s_in: float, n_out: int, s_out: float) -> npt.NDArray[np.float64]:
    """Centres of ``n_out`` voxels of size ``s_out`` in index coordinates of the input axis.

    Both grids are centred on the same point: output voxel ``j`` lies at
    input index ``(j + 0.5) * s_out / s_in - 0.5 + (n_in - n_out * s_out / s_in) / 2``.
    """
    ratio = s_out / s_in
    j = np.arange(n_out, dtype=np.float64)
    result: npt.NDArray[np.float64] = (j + 0.5) * ratio - 0.5 + (n_in - n_out * ratio) / 2.0
    return result


def _take(x: torch.Tensor, dim: int, index: npt.NDArray[np.int64]) -> torch.Tensor:
    """``x.index_select(dim, index)``.

    Along the last dimension through ``gather``, which is an order of
    magnitude faster there on a CPU.
    """
    idx = torch.from_numpy(index).to(x.device)
    if dim != x.ndim - 1:
        return x.index_select(dim, idx)
    shape = (*x.shape[:-1], len(index))
    return torch.gather(x, dim, idx.expand(shape))


def _resample_axis(
    x: torch.Tensor,
    dim: int,
    positions: npt.NDArray[np.float64],
    mode: Interpolation,
    copy: bool = False,
) -> torch.Tensor:
    """Sample ``x`` along ``dim`` at fractional ``positions`` (index units).

    Linear interpolation between the two neighbouring samples, or the nearest
    sample; positions beyond the ends take the edge value. Positions that are
    exactly the input's own indices select rows without arithmetic (a view of
    ``x`` unless ``copy``).
    """
    n = x.shape[dim]
    if np.allclose(positions, np.round(positions), rtol=0, atol=1e-6) and (
        positions.size == 0 or (positions.min() >= -1e-6 and positions.max() <= n - 1 + 1e-6)
    ):
        rows = np.round(positions).astype(np.int64)
        if len(rows) and not copy and rows[0] == 0 and len(rows) == n and (
            np.all(np.diff(rows) == 1)
        ):
            return x
        if len(rows) and np.all(np.diff(rows) == 1):
            part = x.narrow(dim, int(rows[0]), len(rows))
            return part.contiguous() if copy else part
        return _take(x, dim, rows)
    clipped = np.clip(positions, 0.0, n - 1.0)
    if mode == "nearest":
        nearest = np.floor(clipped + 0.5).astype(np.int64)
        return _take(x, dim, nearest)
    low = np.minimum(np.floor(clipped).astype(np.int64), n - 1)
    high = np.minimum(low + 1, n - 1)
    shape = [1] * x.ndim
    shape[dim] = len(positions)
    weight = torch.from_numpy((clipped - low).astype(np.float32)).to(x.device).reshape(shape)
    a = _take(x, dim, low)
    b = _take(x, dim, high)
    return torch.lerp(a, b, weight.to(a.dtype))


@dataclass(frozen=True)
class GridPlan:
    """How the source grid maps to the network's grid and back.

    Attributes
    ----------
    source_shape : tuple[int, int, int]
        ``(slices, rows, columns)`` of ``Volume.array``.
    source_spacing : tuple[float, float, float]
        mm, ``(slice, row, column)``.
    source_affine : numpy.ndarray
        ``(4, 4)``, source index to LPS mm.
    perm : tuple[int, int, int]
        Network axis ``i`` comes from source axis ``perm[i]``.
    flip : tuple[bool, bool, bool]
        Network axis ``i`` runs opposite to source axis ``perm[i]``.
    network_shape : tuple[int, int, int]
        Spatial shape of the network input (before any classifier resize).
    network_spacing : tuple[float, float, float]
        mm, in network axis order.
    """

    source_shape: Shape3
    source_spacing: Spacing3
    source_affine: npt.NDArray[np.float64]
    perm: Shape3
    flip: tuple[bool, bool, bool]
    network_shape: Shape3
    network_spacing: Spacing3

    @property
    def oriented_shape(self) -> Shape3:
        """Source shape in network axis order (after orientation, before spacing)."""
        s, p = self.source_shape, self.perm
        return s[p[0]], s[p[1]], s[p[2]]

    @property
    def oriented_spacing(self) -> Spacing3:
        """Source spacing in mm, in network axis order."""
        s, p = self.source_spacing, self.perm
        return s[p[0]], s[p[1]], s[p[2]]

    @property
    def codes(self) -> str:
        """Axis codes of the network grid (e.g. ``"RAS"``)."""
        return axis_codes(self.network_affine)

    def _oriented_to_source(self) -> npt.NDArray[np.float64]:
        """``(4, 4)``: reoriented index to source index."""
        m = np.zeros((4, 4))
        m[3, 3] = 1.0
        for i, (p, f) in enumerate(zip(self.perm, self.flip, strict=True)):
            if f:
                m[p, i] = -1.0
                m[p, 3] = self.source_shape[p] - 1
            else:
                m[p, i] = 1.0
        return m

    def _network_to_oriented(self) -> npt.NDArray[np.float64]:
        """``(4, 4)``: network index to reoriented index (scale and shift per axis)."""
        m = np.eye(4)
        for i in range(3):
            n_in, s_in = self.oriented_shape[i], self.oriented_spacing[i]
            n_out, s_out = self.network_shape[i], self.network_spacing[i]
            p0, p1 = _positions(n_in, s_in, n_out, s_out)[0], (s_out / s_in)
            m[i, i] = p1
            m[i, 3] = p0
        return m

    @property
    def network_affine(self) -> npt.NDArray[np.float64]:
        """``(4, 4)``: network grid index ``(i, j, k, 1)`` to LPS mm."""
        result: npt.NDArray[np.float64] = (
            self.source_affine @ self._oriented_to_source() @ self._network_to_oriented()
        )
        return result

    def source_positions(self) -> list[npt.NDArray[np.float64]]:
        """Per network axis: the source voxel centres in network index coordinates."""
        return [
            _positions(self.network_shape[i], self.network_spacing[i],
                       self.oriented_shape[i], self.oriented_spacing[i])
            for i in range(3)
        ]

    def network_positions(self) -> list[npt.NDArray[np.float64]]:
        """Per network axis: the network voxel centres in reoriented source index coordinates."""
        return [
            _positions(self.oriented_shape[i], self.oriented_spacing[i],
                       self.network_shape[i], self.network_spacing[i])
            for i in range(3)
        ]


def plan_grid(
    shape: Shape3,
    spacing: Spacing3,
    affine: npt.NDArray[np.float64],
    spec: InputSpec,
) -> GridPlan:
    """Plan the network grid of a source grid for the declared input.

    Parameters
    ----------
    shape : tuple[int, int, int]
        ``(slices, rows, columns)`` of the source.
    spacing : tuple[float, float, float]
        Source voxel size in mm, ``(slice, row, column)``.
    affine : numpy.ndarray
        ``(4, 4)``, source index to LPS mm.
    spec : InputSpec
        ``orientation`` and ``spacing_mm`` (in the order of the reoriented axes).

    Returns
    -------
    GridPlan

    Raises
    ------
    ValueError
        If the affine is degenerate or a spacing is not positive.
    """
    if any(s <= 0 or not math.isfinite(s) for s in spacing):
        raise ValueError(f"source spacing {spacing} mm: every value must be > 0")
    perm, flip = orientation_transform(affine, spec.orientation)
    oriented_shape = (shape[perm[0]], shape[perm[1]], shape[perm[2]])
    oriented_spacing = (spacing[perm[0]], spacing[perm[1]], spacing[perm[2]])
    if spec.spacing_mm is None:
        network_shape: Shape3 = oriented_shape
        network_spacing: Spacing3 = oriented_spacing
    else:
        network_spacing = (
            float(spec.spacing_mm[0]), float(spec.spacing_mm[1]), float(spec.spacing_mm[2])
        )
        network_shape = (
            _resampled_size(oriented_shape[0], oriented_spacing[0], network_spacing[0]),
            _resampled_size(oriented_shape[1], oriented_spacing[1], network_spacing[1]),
            _resampled_size(oriented_shape[2], oriented_spacing[2], network_spacing[2]),
        )
    return GridPlan(
        source_shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        source_spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        source_affine=np.asarray(affine, dtype=np.float64),
        perm=perm,
        flip=flip,
        network_shape=network_shape,
        network_spacing=network_spacing,
    )


def _inverse_perm(plan: GridPlan) -> Shape3:
    """``inverse[j]``: the network axis that source axis ``j`` becomes."""
    p = plan.perm
    return p.index(0), p.index(1), p.index(2)


def _network_positions_in_source_order(plan: GridPlan) -> list[npt.NDArray[np.float64]]:
    """Network voxel centres per source axis, as source indices.

    Entry ``j`` runs along network axis ``inverse[j]`` in network index order
    and holds source indices of axis ``j`` (flips applied).
    """
    positions = plan.network_positions()
    result = []
    for j, i in enumerate(_inverse_perm(plan)):
        p = positions[i]
        result.append(plan.source_shape[j] - 1.0 - p if plan.flip[i] else p)
    return result


def _source_positions_in_source_order(plan: GridPlan) -> list[npt.NDArray[np.float64]]:
    """Source voxel centres per source axis, as network indices.

    Entry ``j`` runs along source axis ``j`` in source index order and holds
    indices along network axis ``inverse[j]``.
    """
    positions = plan.source_positions()
    result = []
    for i in _inverse_perm(plan):
        p = positions[i]
        result.append(p[::-1].copy() if plan.flip[i] else p)
    return result


def _chunk_elements(device: torch.device, chunk_elements: int | None) -> int:
    if chunk_elements is not None:
        return max(1, chunk_elements)
    return CHUNK_ELEMENTS_CUDA if device.type == "cuda" else CHUNK_ELEMENTS_CPU


def _resample_chunked(
    x: torch.Tensor,
    positions: list[npt.NDArray[np.float64]],
    mode: Interpolation,
    chunk_elements: int,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Resample ``x`` ``(C, a0, a1, a2)`` at ``positions`` (one array per axis).

    Works in chunks of consecutive output positions along axis 0, each of at
    most about ``chunk_elements`` input or output elements, and applies
    ``reduce`` to every chunk before the chunks are joined. ``x`` may be a
    non-contiguous view (e.g. permuted and flipped): only the rows a chunk
    needs are copied.
    """
    channels, _, a1, a2 = x.shape
    n0, n1, n2 = (len(p) for p in positions)
    step = max(1, chunk_elements // max(1, channels * max(a1, n1) * max(a2, n2)))
    # Of the two in-chunk axes, the one whose size grows less goes first.
    inner = sorted((1, 2), key=lambda i: len(positions[i]) / x.shape[1 + i])
    pieces: list[torch.Tensor] = []
    for start in range(0, n0, step):
        part = _resample_axis(x, 1, positions[0][start:start + step], mode, copy=True)
        for i in inner:
            part = _resample_axis(part, 1 + i, positions[i], mode)
        if reduce is not None:
            result = reduce(part)
            if result.ndim != 4 or tuple(result.shape[1:]) != tuple(part.shape[1:]):
                raise ValueError(
                    f"reduce returned shape {tuple(result.shape)} for a chunk of shape "
                    f"{tuple(part.shape)}: expected (K, {', '.join(map(str, part.shape[1:]))})")
            part = result
        pieces.append(part)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def to_network_grid(
    image: torch.Tensor,
    plan: GridPlan,
    mode: Interpolation = "linear",
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """Reorient and resample a source-grid tensor onto the network grid.

    Parameters
    ----------
    image : torch.Tensor
        Shape ``(C, slices, rows, columns)``, floating point (``linear``) or
        any dtype (``nearest``), on any device.
    plan : GridPlan
        From :func:`plan_grid`.
    mode : {"linear", "nearest"}
        Trilinear or nearest-neighbour interpolation.
    chunk_elements : int or None
        Work in chunks of about this many elements (along the source's slice
        axis, its slowest in memory); ``None``: :data:`CHUNK_ELEMENTS_CPU` or
        :data:`CHUNK_ELEMENTS_CUDA`.

    Returns
    -------
    torch.Tensor
        Shape ``(C, *plan.network_shape)``, contiguous, same device and dtype.

    Raises
    ------
    ValueError
        If ``image`` is not ``(C, *plan.source_shape)``.
    """
    if image.ndim != 4 or tuple(image.shape[1:]) != plan.source_shape:
        raise ValueError(f"image of shape {tuple(image.shape)} is not (C, {plan.source_shape})")
    # All the work runs in the source's memory order; only the (smaller) result is
    # permuted: source-order axis j holds network axis inverse[j], already flipped.
    out = _resample_chunked(image, _network_positions_in_source_order(plan), mode,
                            _chunk_elements(image.device, chunk_elements))
    p = plan.perm
    return out.permute(0, 1 + p[0], 1 + p[1], 1 + p[2]).contiguous()


def to_source_grid(
    output: torch.Tensor,
    plan: GridPlan,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    mode: Interpolation = "linear",
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """Map network-grid scores onto the source grid and reduce them per voxel.

    Parameters
    ----------
    output : torch.Tensor
        Shape ``(C, *plan.network_shape)``: per-class scores (probabilities
        or logits; ``linear``) or a label map (``C == 1``; ``nearest``).
    plan : GridPlan
        The plan the network input was made with.
    reduce : callable
        Maps a chunk of scores resampled to the source grid, shape
        ``(C, m, rows, columns)`` (``m`` consecutive source slices), to a
        result of shape ``(K, m, rows, columns)``, e.g. argmax compared with
        label values, giving bool masks. It must work voxel by voxel.
    mode : {"linear", "nearest"}
        Interpolation of the scores.
    chunk_elements : int or None
        Upper bound on ``C * m * rows * columns`` per chunk (memory, and
        speed: on a CPU, chunks that stay in cache are several times faster);
        ``None``:
        :data:`CHUNK_ELEMENTS_CPU` or :data:`CHUNK_ELEMENTS_CUDA`.

    Returns
    -------
    torch.Tensor
        Shape ``(K, slices, rows, columns)`` on the source grid (source axis
        order, orientation undone), on ``output``'s device, dtype of
        ``reduce``'s result.

    Raises
    ------
    ValueError
        If ``output`` is not ``(C, *plan.network_shape)``, or ``reduce``
        returns the wrong shape.
    """
    if output.ndim != 4 or tuple(output.shape[1:]) != plan.network_shape:
        raise ValueError(
            f"network output of shape {tuple(output.shape)} is not "
            f"(channels, {', '.join(map(str, plan.network_shape))})"
        )
    # Permute the (smaller) network-grid scores into source axis order, then work in
    # chunks of source slices, writing the result in its own memory order.
    inverse = _inverse_perm(plan)
    scores = output.permute(0, 1 + inverse[0], 1 + inverse[1], 1 + inverse[2]).contiguous()
    return _resample_chunked(scores, _source_positions_in_source_order(plan), mode,
                             _chunk_elements(output.device, chunk_elements), reduce)


def apply_intensity(image: torch.Tensor, spec: IntensitySpec) -> torch.Tensor:
    """Map source values to network input values (MONAI intensity transforms).

    Parameters
    ----------
    image : torch.Tensor
        Shape ``(C, ...)``, float32 (HU for CT). Not modified.
    spec : IntensitySpec
        ``none``: unchanged. ``ct_window``: MONAI ``ScaleIntensityRange`` from
        ``[center - width/2, center + width/2]`` to ``[b_min, b_max]``, always
        clipped. ``clip_scale``: ``ScaleIntensityRange(a_min, a_max, b_min,
        b_max, clip)``. ``zscore``: ``NormalizeIntensity(nonzero,
        channel_wise=True)`` (population standard deviation; a zero standard
        deviation divides by 1; with ``nonzero`` zero voxels stay 0).
        ``percentile``: ``ScaleIntensityRangePercentiles(lower, upper, b_min,
        b_max, clip)`` (percentiles with linear interpolation, over the whole
        image).

    Returns
    -------
    torch.Tensor
        Same shape, float32, plain ``torch.Tensor`` (not a MONAI ``MetaTensor``),
        same device.

    Notes
    -----
    Semantics are MONAI's (``monai.transforms.intensity.array``), since the
    transforms themselves are called: see
    https://docs.monai.io/en/stable/transforms.html#intensity.
    """
    if spec.method == "none":
        return image.float()
    x = image.float().clone()  # MONAI's NormalizeIntensity writes into its input
    if spec.method == "ct_window":
        assert spec.center is not None and spec.width is not None  # validated by IntensitySpec
        transform: Callable[[torch.Tensor], object] = ScaleIntensityRange(
            a_min=spec.center - spec.width / 2, a_max=spec.center + spec.width / 2,
            b_min=spec.b_min, b_max=spec.b_max, clip=True,
        )
    elif spec.method == "clip_scale":
        assert spec.a_min is not None and spec.a_max is not None  # validated by IntensitySpec
        transform = ScaleIntensityRange(
            a_min=spec.a_min, a_max=spec.a_max, b_min=spec.b_min, b_max=spec.b_max,
            clip=spec.clip,
        )
    elif spec.method == "zscore":
        transform = NormalizeIntensity(nonzero=spec.nonzero, channel_wise=True)
    else:
        transform = ScaleIntensityRangePercentiles(
            lower=spec.lower, upper=spec.upper, b_min=spec.b_min, b_max=spec.b_max,
            clip=spec.clip,
        )
    result = convert_to_tensor(transform(x), track_meta=False, dtype=torch.float32)
    assert isinstance(result, torch.Tensor)
    return result


def prepare_input(
    volume: Volume,
    spec: InputSpec,
    device: str | torch.device = "cpu",
    resize_to: Shape3 | None = None,
) -> tuple[torch.Tensor, GridPlan]:
    """The network input tensor of a volume: orientation, spacing, intensity.

    Parameters
    ----------
    volume : Volume
        ``array`` ``(slices, rows, columns)`` float32, ``spacing`` mm,
        ``affine`` to LPS mm.
    spec : InputSpec
        The model's declared input.
    device : str or torch.device
        Where the tensor (and all the work) goes.
    resize_to : tuple[int, int, int] or None
        Classifiers: resize the prepared image to this fixed spatial size with
        MONAI ``Resize`` (``mode="area"``, its default: averaging when
        shrinking). ``None`` keeps the planned grid.

    Returns
    -------
    image : torch.Tensor
        Shape ``(1, 1, *plan.network_shape)`` (or ``(1, 1, *resize_to)``),
        float32, on ``device``, network axis order.
    plan : GridPlan
        The mapping, for :func:`to_source_grid`.

    Raises
    ------
    ValueError
        If the array is not three-dimensional or holds NaN/inf, or the
        geometry is degenerate.
    """
    array = volume.array
    if array.ndim != 3:
        raise ValueError(f"expected a (slices, rows, columns) volume, got shape {array.shape}")
    if array.size == 0:
        raise ValueError("the volume is empty")
    plan = plan_grid(
        (array.shape[0], array.shape[1], array.shape[2]), volume.spacing, volume.affine, spec
    )
    # A copy on the device: nothing below may write into the caller's array.
    source = torch.tensor(np.asarray(array, dtype=np.float32), device=device)
    if not bool(torch.isfinite(source).all()):
        raise ValueError("the volume holds NaN or infinite values")
    image = to_network_grid(source[None], plan, "linear")
    del source
    image = apply_intensity(image, spec.intensity)
    if resize_to is not None:
        resized = convert_to_tensor(
            Resize(spatial_size=resize_to, mode="area")(image), track_meta=False,
            dtype=torch.float32,
        )
        assert isinstance(resized, torch.Tensor)
        image = resized
    return image[None].contiguous(), plan
