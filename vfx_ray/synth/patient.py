"""One synthetic patient from its spec alone: anatomy, lesion, ROI box, acquisition grid, pixels.

``make_patient`` renders a patient from its :class:`PatientSpec` (which ``cohort.plan_cohort``
fixes from the cohort's seed), so the archive is identical whatever the number of worker
processes; ``study.clinical_study`` builds a clinical study's series on the same model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from pydicom.uid import generate_uid

from vfx_ray.config import EASY, SynthDifficulty
from vfx_ray.imaging.roi import ROI_COLUMNS
from vfx_ray.synth.anatomy import THORACOLUMBAR, Spine, anatomy_hu, build_spine, sample_volume
from vfx_ray.synth.dicom_writer import PatientInfo, SeriesGeometry, write_series
from vfx_ray.synth.lesions import Lesion, apply_lesions, plan_lesion, roi_box
from vfx_ray.synth.mimics import Extras, apply_extras, plan_difficulty, shared_box
from vfx_ray.synth.table1 import Features
from vfx_ray.synth.texture import correlated_noise

FOV_PADDING_HU = -3024.0  # outside the field of view: PixelPaddingValue -2000 as stored


@dataclass(frozen=True)
class PatientSpec:
    """Everything that decides one patient; anatomy and lesion details derive from ``seed``."""

    patient_id: str
    label: str  # malignant | benign
    features: Features
    age: int
    sex: str
    seed: int
    matrix: int
    pixel_spacing_mm: float
    slice_thickness_mm: float
    n_vertebrae: int
    patient_position: str  # HFS | FFS
    oblique_deg: float
    transfer_syntax: str
    enhanced: bool
    coverage: str = "segment"
    slice_spacing_mm: float | None = None
    fov_mask: bool = False
    study: str = "single"
    dicomdir: bool = False
    roi_masks: bool = False
    difficulty: SynthDifficulty = EASY

    @property
    def spacing_mm(self) -> float:
        return self.slice_spacing_mm or self.slice_thickness_mm


def cosines(position: str, tilt_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """(row_cosine, col_cosine) of an axial acquisition, tilted about x by ``tilt_deg``.

    HFS supine: rows run to the patient's left (+x), columns posterior (+y), normal +z.
    FFS supine: rows run to the patient's right (-x), normal -z (slice 0 most superior).
    """
    t = math.radians(tilt_deg)
    col = np.array([0.0, math.cos(t), math.sin(t)])
    row = np.array([1.0, 0.0, 0.0]) if position == "HFS" else np.array([-1.0, 0.0, 0.0])
    return row, col


def _corners(box: tuple[float, ...]) -> np.ndarray:
    x0, x1, y0, y1, z0, z1 = box
    return np.array([[x, y, z] for x in (x0, x1) for y in (y0, y1) for z in (z0, z1)])


def plan_geometry(spec: PatientSpec, rng: np.random.Generator, spine: Spine,
                  box: tuple[float, ...]) -> tuple[SeriesGeometry, int]:
    """Grid that covers the named vertebrae and holds the ROI box, with a jittered table position."""
    row, col = cosines(spec.patient_position, spec.oblique_deg)
    normal = np.cross(row, col)
    ps, m, ss = spec.pixel_spacing_mm, spec.matrix, spec.spacing_mm
    half = (m - 1) / 2 * ps
    top, bottom = spine.named[0], spine.named[-1]
    z_hi = top.zc + top.height / 2 + spine.disc_mm / 2
    z_lo = bottom.zc - bottom.height / 2 - spine.disc_mm / 2
    roi_c = _corners(box)
    jitter = rng.uniform(-1, 1, 2)
    z_mid = (z_hi + z_lo) / 2
    for centre in (np.array([4 * jitter[0], spine.cy + 12.0 + 5 * jitter[1], z_mid]),
                   np.array([(box[0] + box[1]) / 2, (box[2] + box[3]) / 2, z_mid])):
        # first choice: a table position around the spine; fallback: centred on the ROI
        rel = roi_c - centre
        if np.all(np.abs(rel @ row) <= half - ps / 2) and np.all(np.abs(rel @ col) <= half - ps / 2):
            break
    else:
        raise ValueError(f"{spec.patient_id}: field of view {m} x {ps:.2f} mm cannot hold the ROI; "
                         "use a larger matrix or pixel spacing")
    span = np.vstack([roi_c, [[centre[0], centre[1], z_lo], [centre[0], centre[1], z_hi]]])
    s = span @ normal
    s_min = float(s.min()) - ss / 2
    n = int(math.ceil((float(s.max()) + ss / 2 - s_min) / ss)) + 1
    origin = centre - half * row - half * col + (s_min - centre @ normal) * normal
    geometry = SeriesGeometry(tuple(float(v) for v in origin), tuple(float(v) for v in row),
                              tuple(float(v) for v in col), (ps, ps), ss)
    return geometry, n


def study_series_uids(spec: PatientSpec) -> tuple[str, str]:
    base = [spec.patient_id, str(spec.seed)]
    study = generate_uid(entropy_srcs=[*base, "study"])
    return study, generate_uid(entropy_srcs=[*base, study, "series"])


@dataclass(frozen=True)
class PatientModel:
    """One patient's anatomy, lesion, ROI box (LPS mm) and acquisition grid."""

    spine: Spine
    lesion: Lesion
    box: tuple[float, float, float, float, float, float]
    geometry: SeriesGeometry
    n_slices: int
    extras: Extras | None = None

    def hu_at(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Noise-free HU at LPS mm points, lesions and mimics included."""
        hu = apply_lesions(anatomy_hu(x, y, z, self.spine), x, y, z, self.spine, self.lesion)
        if self.extras is not None:
            apply_extras(hu, x, y, z, self.spine, self.lesion, self.extras)
        return hu


def patient_model(spec: PatientSpec) -> PatientModel:
    """Everything but the pixels; the same draws happen whatever the features."""
    rng = np.random.default_rng([spec.seed, 2])
    if spec.coverage == "thoracolumbar":  # T1-S1 named; thoracic discs are thinner than lumbar ones
        spine = build_spine(rng, len(THORACOLUMBAR) - 2, THORACOLUMBAR, disc_mm=(5.0, 7.5))
    else:
        spine = build_spine(rng, spec.n_vertebrae)
    d = spec.difficulty
    spine, lesion = plan_lesion(rng, spine, spec.features, d.lesion_width_mm)
    spine, lesion, extras = plan_difficulty(d, spec.seed, spec.label, spine, lesion)
    box = roi_box(spine, lesion) if d.roi_box == "lesion" else shared_box(spec.seed, d, spine, lesion)
    geometry, n = plan_geometry(spec, rng, spine, box)
    return PatientModel(spine, lesion, box, geometry, n, extras)


def make_patient(spec: PatientSpec, *, noise: bool = True) -> tuple[np.ndarray, SeriesGeometry, dict]:
    """(HU volume (n_slices, rows, cols) float32, geometry, annotation row) for one patient."""
    model = patient_model(spec)
    geometry, n, box, spine, lesion = (model.geometry, model.n_slices, model.box, model.spine,
                                       model.lesion)
    hu = sample_volume(model.hu_at, geometry, (n, spec.matrix, spec.matrix),
                       spec.slice_thickness_mm)
    if noise:  # CT quantum noise, its own stream so the anatomy never depends on it
        hu += image_noise(spec, hu.shape)
        if spec.fov_mask:
            hu[:, ~fov_disc(spec.matrix)] = FOV_PADDING_HU
    study, series = study_series_uids(spec)
    row = {
        "patient_id": spec.patient_id, "series_instance_uid": series, "label": spec.label,
        "vertebra": spine.vertebrae[lesion.target].name,
        **{c: round(float(v), 3) for c, v in zip(ROI_COLUMNS, box, strict=True)},
        "age": spec.age, "sex": spec.sex, **spec.features.as_dict(),
        "study_instance_uid": study, "patient_position": spec.patient_position,
        "oblique_deg": spec.oblique_deg, "transfer_syntax": spec.transfer_syntax,
        "enhanced": int(spec.enhanced), "pixel_spacing_mm": spec.pixel_spacing_mm,
        "slice_thickness_mm": spec.slice_thickness_mm, "n_slices": n,
        "n_files": 1 if spec.enhanced else n,
    }
    return hu, geometry, row


def image_noise(spec: PatientSpec, shape: tuple[int, ...]) -> np.ndarray:
    """The series' noise: white (the easy cohort's draws, unchanged) or kernel-correlated."""
    d, rng = spec.difficulty, np.random.default_rng([spec.seed, 3])
    sd = rng.uniform(*d.noise_hu)
    if d.noise_corr_mm <= 0:
        return rng.normal(0.0, sd, shape).astype(np.float32)
    return correlated_noise(rng, shape, sd, d.noise_corr_mm, spec.pixel_spacing_mm)


def fov_disc(matrix: int) -> np.ndarray:
    """The reconstruction's circular field of view: the disc inscribed in the matrix."""
    c = (matrix - 1) / 2
    i, j = np.ogrid[:matrix, :matrix]
    return (i - c) ** 2 + (j - c) ** 2 <= (matrix / 2) ** 2


def patient_files(spec: PatientSpec) -> tuple[list[tuple[str, bytes]], dict]:
    """The patient's DICOM files (name, bytes) and annotation row, without touching storage."""
    hu, geometry, row = make_patient(spec)
    files = write_series(
        hu, geometry, PatientInfo(spec.patient_id, spec.age, spec.sex),
        transfer_syntax=spec.transfer_syntax, enhanced=spec.enhanced,
        patient_position=spec.patient_position, study_uid=row["study_instance_uid"],
        series_uid=row["series_instance_uid"], seed=spec.seed)
    return files, row


def with_features(spec: PatientSpec, **features: bool) -> PatientSpec:
    """A copy of ``spec`` with some features switched (tests and figures)."""
    return replace(spec, features=replace(spec.features, **features))
