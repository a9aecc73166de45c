"""A weight-free CT segmentation model: body, lungs and bone from HU thresholds.

Thresholds and morphology run as torch operations on the requested device;
connected components and hole filling use :mod:`scipy.ndimage` on the CPU.
Every structuring element is sized in mm through ``Volume.spacing``, so the
result does not depend on slice thickness or pixel size.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage

from workers.inference.base import Code, SegmentSpec, Volume

__all__ = ["BuiltinCTModel"]

BoolArray = npt.NDArray[np.bool_]
Kernel = tuple[int, int, int]

_ANATOMICAL_STRUCTURE: Final = Code("91723000", "SCT", "Anatomical Structure")

#: Body: voxels above this value (HU) are tissue rather than air.
BODY_HU: Final = -500.0
#: Body: radius (mm) of the opening that detaches the table and blankets. Tissue
#: thinner than about twice this is cut too: a chest wall thinner than ~7 mm
#: would let the lung leak to the outside air.
BODY_OPENING_MM: Final = 3.0
#: Lungs: voxels below this value (HU) inside the body are air.
AIR_HU: Final = -400.0
#: Lungs: voxels below this value (HU) are "pure" gas (bowel, stomach, outside).
PURE_GAS_HU: Final = -950.0
#: Lungs: a component whose fraction of pure-gas voxels exceeds this is gas in
#: the gut, not aerated lung (lung parenchyma sits mostly between -950 and -400).
MAX_PURE_GAS_FRACTION: Final = 0.5
#: Lungs: smallest air component (mL) considered lung.
LUNG_MIN_ML: Final = 20.0
#: Lungs: a further component must reach at least this fraction of the height of
#: the largest lung component, measured from that component's inferior end.
LUNG_MIN_TOP_FRACTION: Final = 0.5
#: Lungs: holes (vessels, airway walls) up to this area (mm^2) in the image
#: plane are filled.
LUNG_MAX_HOLE_MM2: Final = 500.0
#: Bone: voxels above this value (HU) inside the body are bone candidates.
BONE_HU: Final = 200.0
#: Bone: voxels above this value (HU) are cortical bone.
CORTICAL_HU: Final = 500.0
#: Bone: components with a smaller cortical fraction are contrast-enhanced
#: blood or organs (heart, aorta, kidneys: 200-350 HU but almost nothing above
#: 500 HU), not bone.
MIN_CORTICAL_FRACTION: Final = 0.05
#: Bone: smallest bone component kept (mL).
BONE_MIN_ML: Final = 0.5


def _kernel(radius_mm: float, spacing: tuple[float, float, float]) -> Kernel:
    """Odd box size per axis covering ``radius_mm`` on each side of the centre."""
    kz, ky, kx = (2 * int(math.floor(radius_mm / s + 0.5)) + 1 for s in spacing)
    return kz, ky, kx


def _window(mask: torch.Tensor, axis: int, size: int, dilate: bool) -> torch.Tensor:
    """Centred running OR (dilation) or AND (erosion) of ``size`` voxels along ``axis``.

    Voxels beyond the volume count as background for a dilation and as
    foreground for an erosion, so the volume's edge neither grows nor erodes a
    mask. Runs in ``O(log size)`` whole-volume operations (window doubling).
    """
    if size <= 1:
        return mask
    op = torch.logical_or if dilate else torch.logical_and
    radius = size // 2
    pad_shape = list(mask.shape)
    pad_shape[axis] = radius
    pad = torch.full(pad_shape, not dilate, dtype=torch.bool, device=mask.device)
    cur = torch.cat([pad, mask, pad], dim=axis)
    length = cur.shape[axis]
    width = 1
    while 2 * width <= size:
        cur = op(cur.narrow(axis, 0, length - width), cur.narrow(axis, width, length - width))
        length -= width
        width *= 2
    out_len = mask.shape[axis]
    if width < size:
        cur = op(cur.narrow(axis, 0, out_len), cur.narrow(axis, size - width, out_len))
    return cur


def _dilate(mask: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """Dilation of a bool ``(z, y, x)`` tensor by a box of ``kernel`` voxels."""
    for axis, size in enumerate(kernel):
        mask = _window(mask, axis, size, dilate=True)
    return mask


def _erode(mask: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """Erosion of a bool ``(z, y, x)`` tensor by a box of ``kernel`` voxels."""
    for axis, size in enumerate(kernel):
        mask = _window(mask, axis, size, dilate=False)
    return mask


def _largest_component(mask: BoolArray) -> BoolArray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    result: BoolArray = labels == int(np.argmax(sizes))
    return result


def _fill_holes_2d(mask: BoolArray, max_area_px: float | None = None) -> BoolArray:
    """Fill the holes of each slice of a ``(z, y, x)`` mask.

    A hole is a 4-connected in-plane background region not touching the slice
    border; with ``max_area_px`` only holes up to that many pixels are filled.
    Work is limited to the mask's bounding box: no hole can reach beyond it.
    """
    box = ndimage.find_objects(mask.astype(np.uint8))
    if not box or box[0] is None:
        return mask
    crop = mask[box[0]]
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    labels, count = ndimage.label(~crop, structure=structure)
    fill = np.ones(count + 1, dtype=bool)
    fill[0] = False
    border = np.concatenate(
        [
            labels[:, 0, :].ravel(),
            labels[:, -1, :].ravel(),
            labels[:, :, 0].ravel(),
            labels[:, :, -1].ravel(),
        ]
    )
    fill[border] = False
    if max_area_px is not None:
        fill &= np.bincount(labels.ravel(), minlength=count + 1) <= max_area_px
    result = mask.copy()
    result[box[0]] |= fill[labels]
    return result


class BuiltinCTModel:
    """Body, lungs and bone on CT by HU thresholds and morphology, no weights.

    Attributes
    ----------
    name : str
        ``"radnode-builtin-ct"``.
    version : str
        ``"1.0.0"``.
    segments : tuple[SegmentSpec, ...]
        ``body`` (SCT 38266002 "Entire body"), ``lungs`` (SCT 39607008
        "Lung"), ``bone`` (SCT 272673000 "Bone"), all in category SCT 91723000
        "Anatomical Structure" (DICOM PS3.16 CID 7150 / 7151).

    Notes
    -----
    The input must be in HU (``Volume.array`` of a CT series). Steps:

    body
        ``HU > -500``, opened with a box of radius 3 mm (detaches the table
        and thin blankets), largest 6-connected component (so arms lying
        apart from the trunk are left out), holes filled slice by slice.
        The 3 mm box stays well under the body wall's thickness, so holes
        such as the lungs stay closed.
    lungs
        ``HU < -400`` inside the body (so outside air is excluded by
        construction); 6-connected components of at least 20 mL whose
        fraction of ``HU < -950`` voxels is at most 0.5 (aerated lung lies
        mostly between -950 and -400 HU, gas in the bowel or stomach is
        mostly below -950). The largest such component is lung; another one
        is kept only if its superior end reaches the upper half of the
        largest one's superior-inferior extent (both lungs reach the same
        height; stomach and colon gas lie below the lung bases' upper half).
        In-plane holes up to 500 mm^2 (vessels) are then filled. Airways
        connected to the lungs (trachea, main bronchi) are included.
        Known limits: lungs with more than half their voxels below -950 HU
        (severe emphysema) are rejected; lung components under 20 mL (thin
        slivers of lung base at the top of an abdominal scan) are dropped;
        "superior" is LPS +z from ``Volume.affine``, so the rule holds for
        any slice order.
    bone
        ``HU > 200`` inside the body; 6-connected components of at least
        0.5 mL with at least 5 % of their voxels above 500 HU (cortical
        bone), which rejects contrast-filled heart, vessels and kidneys.
        Marrow below 200 HU is not included.
    """

    name: str = "radnode-builtin-ct"
    version: str = "1.0.0"
    segments: tuple[SegmentSpec, ...] = (
        SegmentSpec(
            label="body",
            category=_ANATOMICAL_STRUCTURE,
            type=Code("38266002", "SCT", "Entire body"),
            rgb=(177, 122, 101),
        ),
        SegmentSpec(
            label="lungs",
            category=_ANATOMICAL_STRUCTURE,
            type=Code("39607008", "SCT", "Lung"),
            rgb=(128, 174, 128),
        ),
        SegmentSpec(
            label="bone",
            category=_ANATOMICAL_STRUCTURE,
            type=Code("272673000", "SCT", "Bone"),
            rgb=(241, 214, 145),
        ),
    )

    def predict(self, volume: Volume, device: str = "cpu") -> npt.NDArray[np.bool_]:
        """Segment body, lungs and bone.

        Parameters
        ----------
        volume : Volume
            A CT volume, ``array`` of shape ``(slices, rows, columns)`` in HU,
            ``spacing`` in mm.
        device : str
            torch device for thresholds and morphology, e.g. ``"cpu"`` or
            ``"cuda:0"``.

        Returns
        -------
        numpy.ndarray
            Boolean, shape ``(3, slices, rows, columns)``: channels body,
            lungs, bone in the order of :attr:`segments`. Lungs and bone are
            subsets of body.

        Raises
        ------
        ValueError
            If ``volume.array`` is not three-dimensional.
        """
        array = volume.array
        if array.ndim != 3:
            raise ValueError(f"expected a (slices, rows, columns) volume, got shape {array.shape}")
        spacing = volume.spacing
        voxel_ml = volume.voxel_volume_ml
        with torch.inference_mode():
            hu = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)
            body = self._body(hu, spacing)
            body_t = torch.from_numpy(body).to(device)
            air = ((hu < AIR_HU) & body_t).cpu().numpy()
            dense = ((hu > BONE_HU) & body_t).cpu().numpy()
        lungs = self._lungs(air, array, volume.affine, spacing, voxel_ml)
        bone = self._bone(dense, array, voxel_ml)
        return np.stack([body, lungs, bone])

    @staticmethod
    def _body(hu: torch.Tensor, spacing: tuple[float, float, float]) -> BoolArray:
        kernel = _kernel(BODY_OPENING_MM, spacing)
        opened = _dilate(_erode(hu > BODY_HU, kernel), kernel)
        body = _largest_component(opened.cpu().numpy())
        return _fill_holes_2d(body)

    @staticmethod
    def _lungs(
        air: BoolArray,
        hu: npt.NDArray[np.float32],
        affine: npt.NDArray[np.float64],
        spacing: tuple[float, float, float],
        voxel_ml: float,
    ) -> BoolArray:
        labels, count = ndimage.label(air)
        if count == 0:
            return air
        flat = labels[air]
        voxels = np.bincount(flat, minlength=count + 1)
        volume_ml = voxels * voxel_ml
        pure = np.bincount(flat, weights=hu[air] < PURE_GAS_HU, minlength=count + 1)
        pure_fraction = pure / np.maximum(voxels, 1)
        candidate = (volume_ml >= LUNG_MIN_ML) & (pure_fraction <= MAX_PURE_GAS_FRACTION)
        candidate[0] = False
        if not candidate.any():
            return np.zeros_like(air)

        # Superior-inferior extent (LPS z, mm) of each candidate's bounding box.
        boxes = ndimage.find_objects(labels)
        z_low = np.full(count + 1, np.inf)
        z_high = np.full(count + 1, -np.inf)
        for index in np.flatnonzero(candidate):
            box = boxes[index - 1]
            if box is None:
                continue
            corners = np.array(
                [[s.start, s.stop - 1] for s in box], dtype=np.float64
            )  # (axis, low/high)
            grid = np.stack(np.meshgrid(*corners, indexing="ij"), axis=-1).reshape(-1, 3)
            z = grid @ affine[2, :3] + affine[2, 3]
            z_low[index], z_high[index] = z.min(), z.max()

        largest = int(np.argmax(np.where(candidate, volume_ml, -1.0)))
        threshold = z_low[largest] + LUNG_MIN_TOP_FRACTION * (z_high[largest] - z_low[largest])
        keep = candidate & (z_high >= threshold)
        keep[largest] = True
        lungs: BoolArray = keep[labels]
        max_hole_px = LUNG_MAX_HOLE_MM2 / (spacing[1] * spacing[2])
        return _fill_holes_2d(lungs, max_hole_px)

    @staticmethod
    def _bone(dense: BoolArray, hu: npt.NDArray[np.float32], voxel_ml: float) -> BoolArray:
        labels, count = ndimage.label(dense)
        if count == 0:
            return dense
        flat = labels[dense]
        voxels = np.bincount(flat, minlength=count + 1)
        cortical = np.bincount(flat, weights=hu[dense] > CORTICAL_HU, minlength=count + 1)
        keep = (voxels * voxel_ml >= BONE_MIN_ML) & (
            cortical >= MIN_CORTICAL_FRACTION * np.maximum(voxels, 1)
        )
        keep[0] = False
        bone: BoolArray = keep[labels]
        return bone
