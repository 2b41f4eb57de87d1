"""The paper's six visual features on the target vertebra, as functions of LPS mm.

Every change lies in a lateral slab ``[x_min, x_max]`` (``SynthDifficulty.lesion_width_mm``: 6-12 mm,
9-15 mm in the ``easy`` cohort, i.e. 2-5 sagittal 3 mm slices)
and fades toward the slab's edges (partial volume, the paper's Fig. 3). Malignant signs
(bone destruction, paravertebral soft tissue mass) and the benign sign (transverse fracture
line) differ visibly on sagittal slices; compression and cortex interruption occur in both.
``multiple_segments`` changes a neighbour vertebra, outside the ROI box (the paper's ROI is
the single worst vertebra; its Fig. 5 notes the other segments are not in the box).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from vfx_ray.synth.anatomy import Depression, Spine, body_coords, lateral_weight
from vfx_ray.synth.table1 import Features

ROI_MARGIN_MM = 1.0


@dataclass(frozen=True)
class Lesion:
    target: int  # index into Spine.vertebrae
    features: Features
    x_min: float  # lateral slab holding every change (LPS x, mm)
    x_max: float
    taper_mm: float
    compression_frac: float  # central height loss vs the neighbours' mean height (0 when absent)
    gap_wall: str  # "anterior" | "posterior": where the cortex is interrupted
    gap_z: float
    gap_h: float
    mass_depth: float  # antero-posterior thickness of the paravertebral mass, mm
    mass_zc: float
    mass_rz: float
    mass_hu: float
    line_z: float  # centre of the transverse fracture line (sclerotic band)
    line_mm: float
    line_hu: float
    destruction: str  # "lytic" | "blastic"
    dest_hu: float
    dest_dy: float  # centre offset of the destroyed region from the body centre (y, z)
    dest_dz: float
    dest_ry: float  # semi-axes as fractions of the body's ay and height
    dest_rz: float
    dest_phase: float
    neighbour: int | None  # the other affected vertebra (multiple segments)
    neighbour_frac: float
    contrast: float = 1.0  # every feature's blend toward its HU is scaled by this (conspicuity)


def plan_lesion(rng: np.random.Generator, spine: Spine, features: Features,
                width_mm: tuple[float, float] = (9.0, 15.0)) -> tuple[Spine, Lesion]:
    """Pick the target vertebra and every lesion parameter; returns the spine with the
    collapsed endplates (compression) applied to its geometry."""
    n = len(spine.vertebrae)
    target = int(rng.integers(2, n - 2))  # a named vertebra with named neighbours on both sides
    v = spine.vertebrae[target]
    width = rng.uniform(*width_mm)
    xc = rng.uniform(-6.0, 6.0)
    x_min, x_max = xc - width / 2, xc + width / 2
    taper = width * rng.uniform(0.22, 0.3)
    # every draw happens whatever the features, so switching one feature changes nothing else
    comp = rng.uniform(0.3, 0.45) * features.compression  # height loss vs the neighbours
    ref_h = (spine.vertebrae[target - 1].height + spine.vertebrae[target + 1].height) / 2
    depth = max(0.0, v.height - (1 - comp) * ref_h) if comp else 0.0
    h_left = v.height - depth
    bottom = v.zc - v.height / 2
    step, neighbour_frac = int(rng.choice([-1, 1])), rng.uniform(0.22, 0.35)
    neighbour = target + step if features.multiple_segments else None
    lesion = Lesion(
        target=target, features=features, x_min=x_min, x_max=x_max, taper_mm=taper,
        compression_frac=comp,
        gap_wall="anterior" if rng.random() < 0.7 else "posterior",
        gap_z=bottom + h_left * rng.uniform(0.35, 0.6), gap_h=rng.uniform(6.0, 10.0),
        mass_depth=rng.uniform(9.0, 15.0), mass_zc=v.zc + v.height * rng.uniform(-0.1, 0.1),
        mass_rz=v.height * rng.uniform(0.4, 0.6), mass_hu=rng.uniform(35.0, 55.0),
        line_z=bottom + h_left * rng.uniform(0.3, 0.6), line_mm=rng.uniform(2.5, 3.5),
        line_hu=rng.uniform(650.0, 850.0),
        destruction="blastic" if rng.random() < 0.25 else "lytic",
        dest_hu=0.0, dest_dy=rng.uniform(-0.2, 0.2) * v.ay, dest_dz=0.0,
        dest_ry=rng.uniform(0.55, 0.7), dest_rz=rng.uniform(0.28, 0.36),
        dest_phase=rng.uniform(0, 2 * np.pi),
        neighbour=neighbour, neighbour_frac=neighbour_frac if neighbour is not None else 0.0,
    )
    blastic, lytic = rng.uniform(1000.0, 1250.0), rng.uniform(5.0, 45.0)
    dest_hu = blastic if lesion.destruction == "blastic" else lytic
    lesion = replace(lesion, dest_hu=dest_hu, dest_dz=-depth / 2 + rng.uniform(-2, 2))
    verts = list(spine.vertebrae)
    if comp:
        verts[target] = replace(v, depression=Depression(depth, x_min, x_max, taper))
    if neighbour is not None:
        nb = verts[neighbour]
        verts[neighbour] = replace(nb, depression=Depression(
            lesion.neighbour_frac * nb.height, x_min, x_max, taper))
    return replace(spine, vertebrae=tuple(verts)), lesion


def blend(hu: np.ndarray, alpha: np.ndarray, value: float) -> None:
    """Move ``hu`` toward ``value`` by ``alpha`` (0..1) in place: partial volume of a finding."""
    np.add(hu, alpha * (value - hu), out=hu, casting="unsafe")


def _destruction(hu, x, y, z, spine: Spine, lesion: Lesion, index: int, scale: float,
                 w: np.ndarray) -> None:
    """Lytic or blastic region replacing cancellous bone, with an irregular margin."""
    v = spine.vertebrae[index]
    b = body_coords(v, x, y, spine.cy)
    yc, zc = spine.cy + lesion.dest_dy, v.zc + (lesion.dest_dz if index == lesion.target else 0)
    ry, rz = lesion.dest_ry * v.ay * scale, lesion.dest_rz * v.height * scale
    q = ((y - yc) / ry) ** 2 + ((z - zc) / rz) ** 2
    q = q * (1 + 0.18 * np.sin(0.9 * y + 0.7 * z + lesion.dest_phase))  # moth-eaten margin
    alpha = w * np.clip((1 - q) / 0.2, 0, 1) * b.inside(z)
    blend(hu, alpha, lesion.dest_hu)


def apply_lesions(hu: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray, spine: Spine,
                  lesion: Lesion) -> np.ndarray:
    """HU with the target's features (and the neighbour's, for multiple segments) drawn in.

    ``spine`` must be the one returned by :func:`plan_lesion` (it carries the compression).
    """
    hu = np.array(hu, dtype=np.float32, copy=True)
    slab = (x > lesion.x_min) & (x < lesion.x_max)  # nothing changes outside the slab
    if not slab.any():
        return hu
    hu[slab] = _apply_in_slab(hu[slab], x[slab], y[slab], z[slab], spine, lesion)
    return hu


def _apply_in_slab(hu: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray, spine: Spine,
                   lesion: Lesion) -> np.ndarray:
    w = lateral_weight(x, lesion.x_min, lesion.x_max, lesion.taper_mm) * np.float32(lesion.contrast)
    f, v, cy = lesion.features, spine.vertebrae[lesion.target], spine.cy
    b = body_coords(v, x, y, cy)
    inside = b.inside(z)
    if f.bone_destruction:
        _destruction(hu, x, y, z, spine, lesion, lesion.target, 1.0, w)
    if f.transverse_fracture_line:
        dz = z - lesion.line_z
        band = inside & (np.abs(dz) < lesion.line_mm / 2)
        cleft = inside & (dz >= lesion.line_mm / 2) & (dz < lesion.line_mm / 2 + 1.5)
        blend(hu, w * band, lesion.line_hu)
        blend(hu, w * cleft, 30.0)
    if f.cortex_interruption:
        side = (y < cy - 0.3 * v.ay) if lesion.gap_wall == "anterior" else (y > cy + 0.3 * v.ay)
        gap = inside & side & (b.wall < spine.cortex_mm + 1.0)
        gap &= np.abs(z - lesion.gap_z) < lesion.gap_h / 2
        blend(hu, w * gap, lesion.dest_hu if f.bone_destruction and lesion.destruction == "lytic"
               else 40.0)
    if f.soft_tissue_mass:
        half = lesion.mass_depth / 2 + 1.5
        my = cy - v.ay - lesion.mass_depth / 2 + 1.5
        q = ((y - my) / half) ** 2 + ((z - lesion.mass_zc) / lesion.mass_rz) ** 2
        alpha = w * np.clip((1 - q) / 0.25, 0, 1) * ~inside * (b.r >= 1)
        blend(hu, alpha, lesion.mass_hu)
    if lesion.neighbour is not None and f.bone_destruction:
        _destruction(hu, x, y, z, spine, lesion, lesion.neighbour, 0.7, w)
    return hu


def roi_box(spine: Spine, lesion: Lesion) -> tuple[float, float, float, float, float, float]:
    """(x_min, x_max, y_min, y_max, z_min, z_max) in LPS mm around the target's abnormal area:
    the lesion slab across the target body (and its paravertebral mass), plus a 1 mm margin."""
    v, m = spine.vertebrae[lesion.target], ROI_MARGIN_MM
    y_min = spine.cy - v.ay
    z_min, z_max = v.zc - v.height / 2, v.zc + v.height / 2
    if lesion.features.soft_tissue_mass:
        y_min -= lesion.mass_depth + 0.5
        z_min = min(z_min, lesion.mass_zc - lesion.mass_rz)
        z_max = max(z_max, lesion.mass_zc + lesion.mass_rz)
    return (lesion.x_min, lesion.x_max, y_min - m, spine.cy + v.ay + m, z_min - m, z_max + m)
