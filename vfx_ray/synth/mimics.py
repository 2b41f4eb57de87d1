"""What makes the synthetic cohort hard (issue 17): per-patient conspicuity, osteoporosis,
trabecular texture, mimics of either class, and an ROI box drawn the same way for both.

Mimics are findings that look like the other class's signs:
- for everybody (drawn whatever the class): the aorta in front of the spine, with a calcified
  wall in some; Schmorl nodes (lucent endplate notches), haemangiomas (lucent with coarse
  vertical trabeculae, like a lytic lesion), bone islands (dense foci, like a blastic one);
- benign only: a paravertebral haematoma (soft tissue like a tumour mass) and sclerotic
  impaction under the collapsed endplate (dense, like a blastic metastasis);
- malignant only: a subtle sclerotic metastasis without a mass.

Every draw here comes from the patient's own stream ``[seed, 4]``, so the ``easy`` cohort
(which takes none of this) keeps its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from vfx_ray.config import SynthDifficulty
from vfx_ray.synth.anatomy import Spine, body_coords, lateral_weight
from vfx_ray.synth.lesions import Lesion, blend
from vfx_ray.synth.texture import plan_texture

# Probability of each mimic at SynthDifficulty.mimic_rate = 1.
RATES = {"aorta_calcified": 0.5, "schmorl": 0.25, "haemangioma": 0.12, "bone_island": 0.15,
         "haematoma": 0.4, "impaction": 0.5, "subtle_sclerotic": 0.7}


@dataclass(frozen=True)
class Focus:
    """An ellipsoid in the target's body: centre and semi-axes (mm), and its HU."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    hu: float


@dataclass(frozen=True)
class Extras:
    """One patient's mimics; ``None`` where the patient has none of that kind."""

    aorta: tuple[float, float, float]  # centre x, y and radius (mm), along z
    aorta_calcified: bool
    schmorl: Focus | None = None
    haemangioma: Focus | None = None
    bone_island: Focus | None = None
    haematoma: tuple[float, float] | None = None  # depth (mm), HU
    impaction: tuple[float, float] | None = None  # depth under the endplate (mm), HU


def plan_difficulty(d: SynthDifficulty, seed: int, label: str, spine: Spine,
                    lesion: Lesion) -> tuple[Spine, Lesion, Extras | None]:
    """The patient's bone density, texture, lesion contrast and mimics (``None``: no mimics)."""
    rng = np.random.default_rng([seed, 4])
    subtle = rng.random() < d.subtle_fraction
    contrast = d.conspicuity * rng.uniform(*(d.subtle_contrast if subtle else d.contrast))
    porosis = d.osteoporotic_benign if label == "benign" else d.osteoporotic_malignant
    hu_bone = rng.uniform(*d.osteoporotic_hu) if rng.random() < porosis else spine.hu_cancellous
    spine = replace(spine, hu_cancellous=hu_bone, trabecular_hu=d.trabecular_hu,
                    texture=plan_texture(rng) if d.trabecular_hu else ())
    lesion = replace(lesion, contrast=contrast)
    if d.mimic_rate <= 0:
        return spine, lesion, None
    hit = {name: rng.random() < p * d.mimic_rate for name, p in RATES.items()}
    f = lesion.features
    if label == "malignant" and f.bone_destruction and not f.soft_tissue_mass and hit["subtle_sclerotic"]:
        lesion = replace(lesion, destruction="blastic", dest_hu=hu_bone + rng.uniform(250.0, 450.0))
    v = spine.vertebrae[lesion.target]
    r = rng.uniform(9.0, 13.0)
    extras = Extras(
        aorta=(rng.uniform(8.0, 20.0), spine.cy - v.ay - r - rng.uniform(1.0, 4.0), r),
        aorta_calcified=hit["aorta_calcified"],
        schmorl=_focus(rng, spine, lesion, "endplate", (3.0, 5.0), spine.hu_disc) if hit["schmorl"] else None,
        haemangioma=_focus(rng, spine, lesion, "body", (5.0, 9.0), rng.uniform(0.0, 40.0))
        if hit["haemangioma"] else None,
        bone_island=_focus(rng, spine, lesion, "body", (2.0, 4.0), rng.uniform(800.0, 1000.0))
        if hit["bone_island"] else None,
        haematoma=(rng.uniform(3.0, 7.0), rng.uniform(55.0, 75.0))
        if label == "benign" and not f.soft_tissue_mass and hit["haematoma"] else None,
        impaction=(rng.uniform(3.0, 7.0), hu_bone + rng.uniform(250.0, 450.0))
        if label == "benign" and f.compression and hit["impaction"] else None,
    )
    return spine, lesion, extras


def _focus(rng: np.random.Generator, spine: Spine, lesion: Lesion, where: str,
           size: tuple[float, float], hu: float) -> Focus:
    v = spine.vertebrae[lesion.target]
    radius = rng.uniform(*size)
    x = rng.uniform(lesion.x_min, lesion.x_max)
    y = spine.cy + rng.uniform(-0.4, 0.4) * v.ay
    if where == "endplate":
        z = v.zc + rng.choice([-1, 1]) * v.height / 2
        radii = (radius, radius, radius * 0.7)
    else:
        z = v.zc + rng.uniform(-0.25, 0.25) * v.height
        radii = (radius, radius, radius)
    return Focus((float(x), float(y), float(z)), radii, float(hu))


def shared_box(seed: int, d: SynthDifficulty, spine: Spine,
               lesion: Lesion) -> tuple[float, float, float, float, float, float]:
    """The ROI box by one rule for both classes: the target's body and the lesion's lateral
    extent, with margins and a jitter drawn from the same distributions whatever the class
    (the anterior margin shows some paravertebral tissue, a mass or a mimic or neither)."""
    rng = np.random.default_rng([seed, 5])
    v = spine.vertebrae[lesion.target]
    mx = rng.uniform(*d.roi_lateral_margin_mm)
    ant, post, mz = rng.uniform(3.0, 12.0), rng.uniform(1.0, 3.0), rng.uniform(1.0, 4.0)
    jy, jz = rng.uniform(-1.5, 1.5, 2)
    return (lesion.x_min - mx, lesion.x_max + mx, spine.cy - v.ay - ant + jy, spine.cy + v.ay + post + jy,
            v.zc - v.height / 2 - mz + jz, v.zc + v.height / 2 + mz + jz)


def _ellipsoid(x, y, z, focus: Focus) -> np.ndarray:
    (cx, cy, cz), (rx, ry, rz) = focus.centre, focus.radii
    q = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2
    return np.clip((1 - q) / 0.3, 0, 1).astype(np.float32)


def apply_extras(hu: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray, spine: Spine,
                 lesion: Lesion, extras: Extras) -> np.ndarray:
    """``hu`` (lesions already drawn) with the patient's mimics drawn in (in place)."""
    v = spine.vertebrae[lesion.target]
    b = body_coords(v, x, y, spine.cy)
    inside = b.inside(z).astype(np.float32)
    _aorta(hu, x, y, extras)
    for focus in (extras.schmorl, extras.haemangioma, extras.bone_island):
        if focus is not None:
            alpha = _ellipsoid(x, y, z, focus) * inside
            if focus is extras.haemangioma:  # coarse vertical trabeculae every ~2.5 mm
                alpha *= np.where(np.cos(2.5 * (y - spine.cy)) > 0.7, 0.3, 1.0).astype(np.float32)
            blend(hu, alpha, focus.hu)
    w = lateral_weight(x, lesion.x_min, lesion.x_max, lesion.taper_mm) * np.float32(lesion.contrast)
    if extras.impaction is not None:
        depth, value = extras.impaction
        blend(hu, w * inside * (z > b.top - depth), value)
    if extras.haematoma is not None:
        depth, value = extras.haematoma
        front = (y < spine.cy - v.ay * np.sqrt(np.clip(1 - (x / v.ax) ** 2, 0, 1)))
        band = front & (y > spine.cy - v.ay - depth) & (np.abs(z - v.zc) < v.height * 0.6)
        blend(hu, w * band * (b.r >= 1), value)
    return hu


def _aorta(hu: np.ndarray, x: np.ndarray, y: np.ndarray, extras: Extras) -> None:
    ax, ay, r = extras.aorta
    rho = np.sqrt((x - ax) ** 2 + (y - ay) ** 2)
    hu[rho < r] = 40.0
    if extras.aorta_calcified:  # a calcified plaque on the wall's posterior half
        hu[(rho >= r - 1.5) & (rho < r) & (y > ay)] = 500.0
