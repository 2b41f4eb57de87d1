"""Pure geometry: volumes as SimpleITK images, sagittal 3 mm slabs around an ROI box, the paper's crops.

Everything is sampled in DICOM patient coordinates (LPS, mm; SimpleITK's physical space is the
same), so head-first, feet-first, oblique and gantry-tilted acquisitions give the same crops.
Sagittal images follow the reading convention: superior at the top (row 0 = highest z) and
anterior at the left (column 0 = smallest y, as LPS y points posterior).

Sagittal slices lie on a fixed patient-frame grid, ``x_k = SLICE_ANCHOR_MM + k * thickness``,
so a slice index means the same position whatever the acquisition's extent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from vfx_ray.config import CropConfig
from vfx_ray.errors import VfxError
from vfx_ray.imaging.dicom import AIR_HU, SeriesLayout, Volume
from vfx_ray.imaging.roi import RoiBox

SLICE_ANCHOR_MM = 0.0


def to_sitk(volume: Volume) -> sitk.Image:
    """The volume's decoded slices as a SimpleITK image whose physical points are LPS mm (a copy)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.hu, dtype=np.float32))
    origin = np.asarray(volume.origin, float)
    if volume.first_slice:
        origin = origin + _affine(volume) @ np.array([0.0, 0.0, volume.first_slice])
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(v) for v in volume.spacing])
    image.SetDirection([float(v) for v in np.asarray(volume.direction).ravel()])
    return image


@dataclass(frozen=True)
class SagittalGrid:
    """Where a sagittal stack's pixels are: slab centres (x), column centres (y), row centres (z)."""

    slice_index: np.ndarray
    x_mm: np.ndarray
    y_mm: np.ndarray  # increasing: column 0 is anterior
    z_mm: np.ndarray  # decreasing: row 0 is superior
    thickness_mm: float


def slice_x(k: np.ndarray | int, thickness_mm: float) -> np.ndarray:
    """Centre x (mm) of sagittal slice ``k`` on the fixed patient-frame grid."""
    return SLICE_ANCHOR_MM + np.asarray(k) * thickness_mm


def select_slices(roi: RoiBox, cfg: CropConfig) -> np.ndarray:
    """Slice indices whose centres fall in [x_min, x_max]; at least one, at most ``max_slices``.

    An ROI narrower than a slice takes the slice nearest its centre; a wide one keeps the
    ``max_slices`` consecutive slices centred on it.
    """
    t = cfg.sagittal_thickness_mm
    first = math.ceil((roi.x_min - SLICE_ANCHOR_MM) / t - 1e-9)
    last = math.floor((roi.x_max - SLICE_ANCHOR_MM) / t + 1e-9)
    centre_k = (roi.centre[0] - SLICE_ANCHOR_MM) / t
    if first > last:
        return np.array([round(centre_k)])
    if last - first + 1 > cfg.max_slices:
        start = round(centre_k - (cfg.max_slices - 1) / 2)
        first = min(max(start, first), last - cfg.max_slices + 1)
        last = first + cfg.max_slices - 1
    return np.arange(first, last + 1)


def _affine(volume: Volume | SeriesLayout) -> np.ndarray:
    """3x3 matrix from (j, i, k) voxel index to LPS offset from the origin."""
    return np.asarray(volume.direction, float) * np.asarray(volume.spacing, float)[None, :]


def _extent(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """LPS bounding box (lo, hi) of the whole volume, voxel edges included."""
    shape = np.array(volume.shape[::-1], float)  # (j, i, k)
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in shape], indexing="ij")).reshape(3, -1)
    points = np.asarray(volume.origin, float)[:, None] + _affine(volume) @ corners
    return points.min(axis=1), points.max(axis=1)


def _voxel_range(volume: Volume | SeriesLayout, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, stop) voxel indices (j, i, k) covering an LPS box with one voxel of margin for
    linear interpolation (more at the far side); empty (stop <= start) when disjoint."""
    corners = np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij")).reshape(3, -1)
    index = np.linalg.solve(_affine(volume), corners - np.asarray(volume.origin, float)[:, None])
    shape = volume.shape[::-1]
    start = np.maximum(np.floor(index.min(axis=1)).astype(int) - 1, 0)
    stop = np.minimum(np.ceil(index.max(axis=1)).astype(int) + 2, shape)
    return start, stop


def _subimage(volume: Volume, lo: np.ndarray, hi: np.ndarray) -> sitk.Image | None:
    """The voxels near an LPS box as an image (no whole-volume copy); None when disjoint."""
    start, stop = _voxel_range(volume, lo, hi)
    if np.any(stop <= start):
        return None
    (j0, i0, k0), (j1, i1, k1) = start, stop
    first, decoded = volume.first_slice, volume.hu.shape[0]
    if k0 < first or k1 > first + decoded:
        raise ValueError(f"slices {k0}..{k1 - 1} are needed but only {first}..{first + decoded - 1} "
                         "were decoded (see slices_needed)")
    part = Volume(hu=volume.hu[k0 - first:k1 - first, i0:i1, j0:j1],
                  origin=np.asarray(volume.origin, float) + _affine(volume) @ start,
                  spacing=volume.spacing, direction=volume.direction,
                  patient_id=volume.patient_id, series_instance_uid=volume.series_instance_uid)
    return to_sitk(part)


def _slab(image: sitk.Image | None, x_mm: float, y_mm: np.ndarray, z_mm: np.ndarray,
          step: float, thickness_mm: float) -> np.ndarray:
    """Mean over a ``thickness_mm`` slab centred at ``x_mm`` on the (z rows, y columns) grid.

    ``y_mm`` increases and ``z_mm`` decreases, both by ``step``.

    Linear samples on an identity-direction reference grid in LPS mm, ``n_sub`` across the slab
    (about one per voxel), averaged; points outside the volume are air.
    """
    shape = (len(z_mm), len(y_mm))
    if image is None:
        return np.full(shape, AIR_HU, np.float32)
    n_sub = max(3, math.ceil(thickness_mm / min(image.GetSpacing())))
    dx = thickness_mm / n_sub
    ref = sitk.Image([n_sub, len(y_mm), len(z_mm)], sitk.sitkFloat32)
    ref.SetOrigin([x_mm - thickness_mm / 2 + dx / 2, float(y_mm[0]), float(z_mm[-1])])
    ref.SetSpacing([dx, step, step])
    out = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(out).mean(axis=2)  # (z ascending, y)
    return np.ascontiguousarray(arr[::-1], dtype=np.float32)


def _check_inside(volume: Volume, roi: RoiBox) -> None:
    lo, hi = _extent(volume)
    c = roi.centre
    index = np.linalg.solve(_affine(volume), c - np.asarray(volume.origin, float))
    if np.any(index < -0.5) or np.any(index > np.array(volume.shape[::-1]) - 0.5):
        box = ", ".join(f"{a} {lo[n]:.1f}..{hi[n]:.1f}" for n, a in enumerate("xyz"))
        raise VfxError("crop", f"ROI centre ({c[0]:.1f}, {c[1]:.1f}, {c[2]:.1f}) mm is outside "
                       f"the volume ({box} mm); check the ROI is in this series' LPS coordinates",
                       patient_id=roi.patient_id or volume.patient_id,
                       series_instance_uid=volume.series_instance_uid, error_type="RoiOutside")


def crop_box(roi: RoiBox, cfg: CropConfig) -> tuple[np.ndarray, np.ndarray]:
    """The LPS box (lo, hi) whose voxels :func:`crop_samples` reads: the ROI's square in y and
    z, and in x its sagittal slabs with their neighbours, each a slab thickness wide."""
    t, half = cfg.sagittal_thickness_mm, cfg.channels // 2
    ks = select_slices(roi, cfg)
    y0, y1, z0, z1 = roi.square()
    xs = slice_x(np.array([ks[0] - half, ks[-1] + half]), t)
    return np.array([xs[0] - t, y0, z0]), np.array([xs[-1] + t, y1, z1])


def slices_needed(layout: SeriesLayout, roi: RoiBox, cfg: CropConfig) -> tuple[int, int]:
    """The volume slices ``[k0, k1)`` that :func:`crop_samples` reads for this ROI, known from
    the headers alone: decoding only these gives the same crops as decoding the whole series."""
    start, stop = _voxel_range(layout, *crop_box(roi, cfg))
    if np.any(stop <= start):
        return 0, 0
    return int(start[2]), int(stop[2])


def zscore(image: np.ndarray) -> np.ndarray:
    """Mean 0, sd 1 over the whole sample; a constant sample becomes zeros."""
    image = image.astype(np.float32)
    sd = float(image.std())
    return (image - image.mean()) / sd if sd > 1e-6 else image - image.mean()


def crop_samples(volume: Volume, roi: RoiBox, cfg: CropConfig | None = None, *,
                 normalize: bool = True, only: int | None = None) -> list[dict[str, Any]]:
    """The paper's samples: per sagittal slice in the ROI, (slice - t, slice, slice + t) channels.

    Each channel is a ``cfg.sagittal_thickness_mm`` slab on the ROI's smallest square box,
    resampled linearly to ``crop_size`` x ``crop_size``; ``normalize`` z-scores each sample.
    Rows match :func:`vfx_ray.contracts.crops_schema` (the caller adds label and vertebra).
    ``only``: just that slice's row (none if it is not one of the ROI's), the same values.
    """
    cfg = cfg or CropConfig()
    if cfg.channels % 2 != 1:
        raise ValueError(f"channels must be odd (a slice and its neighbours), got {cfg.channels}")
    _check_inside(volume, roi)
    t, n, half = cfg.sagittal_thickness_mm, cfg.crop_size, cfg.channels // 2
    ks = select_slices(roi, cfg)
    if only is not None:
        ks = ks[ks == only]
        if not len(ks):
            return []
    y0, y1, z0, z1 = roi.square()
    pixel = (y1 - y0) / n
    y_mm = y0 + pixel * (np.arange(n) + 0.5)
    z_mm = z1 - pixel * (np.arange(n) + 0.5)
    slab_ks = np.arange(ks[0] - half, ks[-1] + half + 1)
    xs = slice_x(slab_ks, t)
    image = _subimage(volume, *crop_box(roi, cfg))
    slabs = {int(k): _slab(image, float(x), y_mm, z_mm, pixel, t) for k, x in zip(slab_ks, xs, strict=True)}
    rows = []
    for k in ks:
        sample = np.stack([slabs[int(k) + o] for o in range(-half, half + 1)])
        rows.append({
            "patient_id": roi.patient_id or volume.patient_id,
            "series_instance_uid": volume.series_instance_uid,
            "slice_index": int(k),
            "slice_x_mm": float(slice_x(k, t)),
            "image": zscore(sample) if normalize else sample,
            "box_y_min_mm": float(y0), "box_y_max_mm": float(y1),
            "box_z_min_mm": float(z0), "box_z_max_mm": float(z1),
        })
    return rows


def sagittal_reformat(volume: Volume, thickness_mm: float = CropConfig.sagittal_thickness_mm,
                      spacing_mm: float = CropConfig.inplane_spacing_mm
                      ) -> tuple[np.ndarray, SagittalGrid]:
    """The whole volume as sagittal slabs on the crops' grid: array (n_x, n_z rows, n_y columns).

    For notebooks and figures; one slab is resampled at a time, so memory is the output's.
    """
    lo, hi = _extent(volume)
    ks = np.arange(math.ceil((lo[0] - SLICE_ANCHOR_MM) / thickness_mm),
                   math.floor((hi[0] - SLICE_ANCHOR_MM) / thickness_mm) + 1)
    y_mm = lo[1] + spacing_mm * (np.arange(max(1, int((hi[1] - lo[1]) / spacing_mm))) + 0.5)
    z_mm = hi[2] - spacing_mm * (np.arange(max(1, int((hi[2] - lo[2]) / spacing_mm))) + 0.5)
    image = to_sitk(volume)
    stack = np.empty((len(ks), len(z_mm), len(y_mm)), np.float32)
    xs = slice_x(ks, thickness_mm)
    for n, x in enumerate(xs):
        stack[n] = _slab(image, float(x), y_mm, z_mm, spacing_mm, thickness_mm)
    return stack, SagittalGrid(ks, np.asarray(xs, float), y_mm, z_mm, thickness_mm)
