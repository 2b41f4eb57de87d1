"""A lumbar/thoracic spine segment in HU as a function of DICOM patient coordinates (LPS, mm).

Everything is a vectorised function of (x, y, z) in mm, so the voxel grid (spacing, patient
position, gantry tilt) never changes the anatomy: x to the patient's left, y posterior,
z superior. The spine runs along z at x = 0; the vertebral body lies anterior (smaller y)
of the spinal canal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from vfx_ray.synth.dicom_writer import SeriesGeometry, voxel_lps
from vfx_ray.synth.texture import trabecular

VERTEBRA_NAMES = ("T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")
# A thoracolumbar examination (T1-S1) with one extra vertebra beyond each end.
THORACOLUMBAR = ("C7", *(f"T{i}" for i in range(1, 13)), "L1", "L2", "L3", "L4", "L5", "S1", "S2")
UPPER_THORACIC = {"C7", *(f"T{i}" for i in range(1, 7))}  # smaller bodies (15-19 mm high)
AIR_HU = -1000.0


@dataclass(frozen=True)
class Depression:
    """Superior endplate collapse inside a lateral slab: the geometry of vertebral compression."""

    depth_mm: float  # at the slab centre, body centre
    x_min: float
    x_max: float
    taper_mm: float  # partial-volume ramp at each lateral edge of the slab


@dataclass(frozen=True)
class Vertebra:
    name: str
    zc: float  # body centre, mm
    height: float  # body height, mm
    ax: float  # body semi-axis, lateral (x), mm
    ay: float  # body semi-axis, antero-posterior (y), mm
    depression: Depression | None = None


@dataclass(frozen=True)
class Spine:
    """One patient's segment; ``vertebrae`` run superior to inferior and include one extra
    vertebra beyond each end, so the volume's margins show spine rather than empty disc."""

    vertebrae: tuple[Vertebra, ...]
    cy: float  # y of the vertebral body centres
    canal_cy: float  # y of the spinal canal's axis
    disc_mm: float
    cortex_mm: float
    endplate_mm: float
    canal_r: float
    hu_cortex: float
    hu_cancellous: float
    hu_disc: float
    hu_posterior: float
    hu_canal: float
    hu_muscle: float
    hu_fat: float
    outline_ax: float  # body outline (skin) semi-axes and centre y
    outline_ay: float
    outline_cy: float
    trabecular_hu: float = 0.0  # SD of the texture of cancellous bone (0: flat)
    texture: tuple[tuple[float, float, float, float], ...] = ()  # its waves (synth.texture)

    @property
    def named(self) -> tuple[Vertebra, ...]:
        """The vertebrae the volume is built to show (without the two extras)."""
        return self.vertebrae[1:-1]


def build_spine(rng: np.random.Generator, n_vertebrae: int, levels: tuple[str, ...] = VERTEBRA_NAMES,
                disc_mm: tuple[float, float] = (8.0, 11.0)) -> Spine:
    """Random but plausible adult segment of ``n_vertebrae`` named vertebrae (+2 extras)
    taken from ``levels`` (a longer list: a longer examination, with thinner discs)."""
    n_total = n_vertebrae + 2
    start = int(rng.integers(0, len(levels) - n_total + 1))
    names = levels[start:start + n_total]
    scale = rng.uniform(0.9, 1.1)
    disc = rng.uniform(*disc_mm)
    verts, z = [], 0.0
    for i, name in enumerate(names):
        lumbar = name.startswith(("L", "S"))
        h = (rng.uniform(25.0, 29.0) if lumbar else rng.uniform(20.0, 24.0)) * scale
        if name in UPPER_THORACIC:
            h = rng.uniform(15.5, 19.0) * scale
        ax = (rng.uniform(21.0, 24.0) if lumbar else rng.uniform(17.0, 20.0)) * scale
        ay = (rng.uniform(15.0, 17.0) if lumbar else rng.uniform(13.5, 15.5)) * scale
        if i:
            z -= verts[-1].height / 2 + disc + h / 2
        verts.append(Vertebra(name, z, h, ax, ay))
    mid = (verts[1].zc + verts[-2].zc) / 2  # centre the named vertebrae around z = 0 ...
    offset = rng.uniform(-30.0, 30.0) - mid  # ... then a table position
    verts = [Vertebra(v.name, v.zc + offset, v.height, v.ax, v.ay) for v in verts]
    cy = rng.uniform(-10.0, 10.0)
    canal_r = rng.uniform(8.0, 9.5)
    return Spine(
        vertebrae=tuple(verts), cy=cy, canal_cy=cy + max(v.ay for v in verts) + 1.5 + canal_r,
        disc_mm=disc, cortex_mm=rng.uniform(1.6, 2.2),
        endplate_mm=rng.uniform(2.2, 2.8), canal_r=canal_r,
        hu_cortex=rng.uniform(780.0, 940.0), hu_cancellous=rng.uniform(170.0, 280.0),
        hu_disc=rng.uniform(75.0, 95.0), hu_posterior=rng.uniform(450.0, 600.0),
        hu_canal=rng.uniform(15.0, 30.0), hu_muscle=rng.uniform(45.0, 55.0),
        hu_fat=rng.uniform(-98.0, -82.0), outline_ax=rng.uniform(120.0, 150.0),
        outline_ay=rng.uniform(95.0, 110.0), outline_cy=cy - rng.uniform(15.0, 25.0),
    )


def lateral_weight(x: np.ndarray, x_min: float, x_max: float, taper: float) -> np.ndarray:
    """1 inside the slab's core, a cosine ramp to 0 over ``taper`` mm at each lateral edge.

    This is the partial-volume effect of the paper's Fig. 3: edge sagittal slices show less.
    """
    t = max(taper, 1e-6)
    inner = np.minimum(x - x_min, x_max - x) / t
    out = np.zeros(np.shape(inner), dtype=np.float32)
    ramp = (inner > 0) & (inner < 1)
    out[inner >= 1] = 1.0
    out[ramp] = 0.5 - 0.5 * np.cos(np.pi * inner[ramp])
    return out


@dataclass(frozen=True)
class BodyCoords:
    """Where points lie relative to one vertebral body."""

    r: np.ndarray  # normalised elliptic radius in the axial plane (1 = outer cortex surface)
    wall: np.ndarray  # mm from the point to the side wall along the radial ray (>0 inside)
    top: np.ndarray  # z of the (possibly depressed) superior endplate at (x, y)
    bottom: float

    def inside(self, z: np.ndarray) -> np.ndarray:
        return (self.r < 1) & (z <= self.top) & (z >= self.bottom)

    def shell_depth(self, z: np.ndarray) -> np.ndarray:
        """mm to the nearest body surface (side wall or endplate), each scaled to its thickness."""
        return np.minimum(self.wall, np.minimum(self.top - z, z - self.bottom))


def depression_depth(v: Vertebra, x: np.ndarray, y: np.ndarray, cy: float) -> np.ndarray:
    """Superior endplate sink (mm) at (x, y): deepest centrally, half at the AP walls."""
    d = v.depression
    if d is None:
        return np.zeros(np.broadcast(x, y).shape)
    ap = np.clip((y - cy) / v.ay, -1, 1)
    return d.depth_mm * lateral_weight(x, d.x_min, d.x_max, d.taper_mm) * (1 - 0.5 * ap**2)


def body_coords(v: Vertebra, x: np.ndarray, y: np.ndarray, cy: float) -> BodyCoords:
    dx, dy = x / v.ax, (y - cy) / v.ay
    r = np.sqrt(dx**2 + dy**2)
    rho = np.sqrt(x**2 + (y - cy) ** 2)
    boundary = np.where(r > 1e-6, rho / np.maximum(r, 1e-6), min(v.ax, v.ay))  # along the ray
    wall = boundary - rho
    top = v.zc + v.height / 2 - depression_depth(v, x, y, cy)
    return BodyCoords(r=r, wall=wall, top=top, bottom=v.zc - v.height / 2)


def _ellipse(x, y, cx, cy, ax, ay) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 < 1


def soft_tissue_hu(x: np.ndarray, y: np.ndarray, s: Spine) -> np.ndarray:
    """Air, body outline (fat), psoas and erector spinae muscles: z-independent."""
    hu = np.full(x.shape, AIR_HU, dtype=np.float32)
    hu[_ellipse(x, y, 0.0, s.outline_cy, s.outline_ax, s.outline_ay)] = s.hu_fat
    ax = max(v.ax for v in s.vertebrae)
    muscle = np.zeros(x.shape, dtype=bool)
    for side in (-1.0, 1.0):
        muscle |= _ellipse(x, y, side * (ax + 12.0), s.cy + 2.0, 11.0, 14.0)  # psoas
        muscle |= _ellipse(x, y, side * 23.0, s.canal_cy + 30.0, 15.0, 15.0)  # erector spinae
    hu[muscle] = s.hu_muscle
    return hu


def _posterior(x, y, z, v: Vertebra, s: Spine, hu: np.ndarray) -> None:
    """Pedicles + lamina ring around the canal, spinous and transverse processes (in place)."""
    zc, half = v.zc + 1.0, v.height * 0.4
    in_z = np.abs(z - zc) < half
    rho = np.sqrt(x**2 + (y - s.canal_cy) ** 2)
    ring = (rho >= s.canal_r) & (rho < s.canal_r + 5.0) & (y > s.cy)
    canal = rho < s.canal_r
    spinous = (np.abs(x) < 3.0) & (y >= s.canal_cy + s.canal_r) & (y < s.canal_cy + 38.0)
    spinous &= np.abs(z - (zc - 3.0)) < half * 0.75
    transverse = (np.abs(x) > s.canal_r) & (np.abs(x) < 40.0) & (np.abs(y - s.canal_cy) < 4.0)
    transverse &= np.abs(z - zc) < 5.0
    bone = (ring & in_z) | spinous | transverse
    hu[bone & (hu < s.hu_posterior)] = s.hu_posterior
    hu[canal] = s.hu_canal  # the canal runs through every level


def anatomy_hu(x: np.ndarray, y: np.ndarray, z: np.ndarray, s: Spine) -> np.ndarray:
    """Noise-free HU at LPS points (any shape). Vertebrae far from the points' z are skipped."""
    x, y, z = (np.asarray(a, dtype=np.float32) for a in np.broadcast_arrays(x, y, z))
    hu = soft_tissue_hu(x, y, s)
    if x.size == 0:
        return hu
    zmin, zmax = float(z.min()), float(z.max())
    half_disc = s.disc_mm / 2
    for v in s.vertebrae:
        reach = v.height / 2 + s.disc_mm + 2.0
        if zmax < v.zc - reach or zmin > v.zc + reach:
            continue
        near = np.abs(z - v.zc) < reach
        if not near.any():
            continue
        xs, ys, zs = x[near], y[near], z[near]
        b = body_coords(v, xs, ys, s.cy)
        inside = b.inside(zs)
        # the disc fills half the gap on each side, and any collapsed part of the body
        disc = (b.r < 1) & (zs >= b.bottom - half_disc) & (zs < v.zc + v.height / 2 + half_disc)
        shell = inside & ((b.wall < s.cortex_mm)
                          | (np.minimum(b.top - zs, zs - b.bottom) < s.endplate_mm))
        local = hu[near]
        _posterior(xs, ys, zs, v, s, local)
        local[disc] = s.hu_disc
        local[inside] = s.hu_cancellous
        if s.trabecular_hu:
            local[inside] += trabecular(xs[inside], ys[inside], zs[inside], s.texture, s.trabecular_hu)
        local[shell] = s.hu_cortex
        hu[near] = local
    return hu


def sample_volume(fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                  geometry: SeriesGeometry, shape: tuple[int, int, int], thickness: float,
                  n_sub: int = 3) -> np.ndarray:
    """``fn`` at every voxel of the grid, averaged over ``n_sub`` points across each slice's
    thickness (slice partial volume). One slice at a time, so memory stays at one slice."""
    n, rows, cols = shape
    normal = geometry.normal.astype(np.float32)
    plane = voxel_lps(replace(geometry, origin=(0.0, 0.0, 0.0)), (1, rows, cols))[0]
    plane = (plane + np.asarray(geometry.origin)).astype(np.float32)
    offsets = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    out = np.empty(shape, dtype=np.float32)
    for k in range(n):
        acc = np.zeros((rows, cols), dtype=np.float32)
        for o in offsets:
            p = plane + np.float32(k * geometry.slice_spacing + o * thickness) * normal
            acc += fn(p[..., 0], p[..., 1], p[..., 2])
        out[k] = acc / n_sub
    return out
