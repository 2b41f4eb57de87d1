"""The synthetic cohort: plan (pure), one patient in memory, and the archive writer.

``plan_cohort`` fixes who is malignant and every per-patient choice from ``cfg.seed``;
``make_patient`` renders one patient from its spec alone, so the archive is identical
whatever the number of worker processes.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from pydicom.uid import generate_uid

from vfx_ray import layout, storage
from vfx_ray.config import SynthConfig
from vfx_ray.paper import FEATURES
from vfx_ray.roi import ROI_COLUMNS
from vfx_ray.synth.anatomy import Spine, anatomy_hu, build_spine, sample_volume
from vfx_ray.synth.dicom_writer import (
    TRANSFER_SYNTAXES,
    PatientInfo,
    SeriesGeometry,
    write_series,
)
from vfx_ray.synth.lesions import Lesion, apply_lesions, plan_lesion, roi_box
from vfx_ray.synth.table1 import Features, allocate

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ["patient_id", "series_instance_uid", "label", "vertebra", *ROI_COLUMNS, "age", "sex",
           *FEATURES, "study_instance_uid", "patient_position", "oblique_deg", "transfer_syntax",
           "enhanced", "pixel_spacing_mm", "slice_thickness_mm", "n_slices", "n_files"]
POSITIONS = ("HFS", "FFS")


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


def _check_config(cfg: SynthConfig) -> None:
    if cfg.patients < 1:
        raise ValueError("SynthConfig.patients must be >= 1")
    if cfg.patient_position not in (*POSITIONS, "mixed"):
        raise ValueError(f"patient_position {cfg.patient_position!r}: use HFS, FFS or mixed")
    if cfg.transfer_syntax not in (*TRANSFER_SYNTAXES, "mixed"):
        raise ValueError(f"transfer_syntax {cfg.transfer_syntax!r}: use one of "
                         f"{', '.join(TRANSFER_SYNTAXES)} or mixed")
    lo, hi = cfg.n_vertebrae
    if not 4 <= lo <= hi <= 8:
        raise ValueError("n_vertebrae must lie within 4..8 (the target needs two neighbours)")


def plan_cohort(cfg: SynthConfig) -> list[PatientSpec]:
    """Who is malignant, features, age, sex and acquisition choices: pure in ``cfg``."""
    _check_config(cfg)
    demo = allocate(cfg.patients, cfg.malignant_fraction, cfg.seed)
    children = np.random.SeedSequence(cfg.seed).spawn(cfg.patients)
    width = max(4, len(str(cfg.patients)))
    specs = []
    for i, (d, child) in enumerate(zip(demo, children, strict=True)):
        seed = int(child.generate_state(1, dtype=np.uint32)[0])
        rng = np.random.default_rng([seed, 1])
        position = (POSITIONS[int(rng.integers(2))] if cfg.patient_position == "mixed"
                    else cfg.patient_position)
        syntax = (list(TRANSFER_SYNTAXES)[int(rng.integers(len(TRANSFER_SYNTAXES)))]
                  if cfg.transfer_syntax == "mixed" else cfg.transfer_syntax)
        specs.append(PatientSpec(
            patient_id=f"VFX{i + 1:0{width}d}", label=d.label, features=d.features, age=d.age,
            sex=d.sex, seed=seed, matrix=cfg.matrix,
            pixel_spacing_mm=round(float(rng.uniform(*cfg.pixel_spacing_mm)), 4),
            slice_thickness_mm=cfg.slice_thickness_mm,
            n_vertebrae=int(rng.integers(cfg.n_vertebrae[0], cfg.n_vertebrae[1] + 1)),
            patient_position=position, oblique_deg=cfg.oblique_deg, transfer_syntax=syntax,
            enhanced=cfg.enhanced,
        ))
    return specs


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
    ps, m, ss = spec.pixel_spacing_mm, spec.matrix, spec.slice_thickness_mm
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

    def hu_at(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Noise-free HU at LPS mm points, lesions included."""
        return apply_lesions(anatomy_hu(x, y, z, self.spine), x, y, z, self.spine, self.lesion)


def patient_model(spec: PatientSpec) -> PatientModel:
    """Everything but the pixels; the same draws happen whatever the features."""
    rng = np.random.default_rng([spec.seed, 2])
    spine = build_spine(rng, spec.n_vertebrae)
    spine, lesion = plan_lesion(rng, spine, spec.features)
    box = roi_box(spine, lesion)
    geometry, n = plan_geometry(spec, rng, spine, box)
    return PatientModel(spine, lesion, box, geometry, n)


def make_patient(spec: PatientSpec, *, noise: bool = True) -> tuple[np.ndarray, SeriesGeometry, dict]:
    """(HU volume (n_slices, rows, cols) float32, geometry, annotation row) for one patient."""
    model = patient_model(spec)
    geometry, n, box, spine, lesion = (model.geometry, model.n_slices, model.box, model.spine,
                                       model.lesion)
    hu = sample_volume(model.hu_at, geometry, (n, spec.matrix, spec.matrix),
                       spec.slice_thickness_mm)
    if noise:  # CT quantum noise, its own stream so the anatomy never depends on it
        rng = np.random.default_rng([spec.seed, 3])
        hu += rng.normal(0.0, rng.uniform(10.0, 20.0), hu.shape).astype(np.float32)
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


def patient_files(spec: PatientSpec) -> tuple[list[tuple[str, bytes]], dict]:
    """The patient's DICOM files (name, bytes) and annotation row, without touching storage."""
    hu, geometry, row = make_patient(spec)
    files = write_series(
        hu, geometry, PatientInfo(spec.patient_id, spec.age, spec.sex),
        transfer_syntax=spec.transfer_syntax, enhanced=spec.enhanced,
        patient_position=spec.patient_position, study_uid=row["study_instance_uid"],
        series_uid=row["series_instance_uid"], seed=spec.seed)
    return files, row


def write_patient(out_uri: str, spec: PatientSpec) -> dict:
    """Render and store one patient under ``out_uri/dicom/<patient_id>/<series uid>/``."""
    files, row = patient_files(spec)
    folder = storage.join(out_uri, "dicom", spec.patient_id, row["series_instance_uid"])
    for name, data in files:
        storage.write_bytes(storage.join(folder, name), data)
    return row


def _write_task(args: tuple[str, PatientSpec]) -> dict:
    return write_patient(*args)


def generate_cohort(out_uri: str, cfg: SynthConfig, *, workers: int | None = None,
                    progress: bool = True) -> pd.DataFrame:
    """Write the DICOM archive and ``annotations.csv`` under ``out_uri``; returns the annotations."""
    import pandas as pd  # imported here: pool workers never need it
    from tqdm import tqdm

    specs = plan_cohort(cfg)
    workers = max(1, min(workers or os.cpu_count() or 1, len(specs)))
    tasks = [(out_uri, s) for s in specs]
    bar = dict(total=len(specs), desc="synth", unit="patient", disable=not progress)
    if workers == 1:
        rows = [_write_task(t) for t in tqdm(tasks, **bar)]
    else:
        # spawn: safe whatever threads the parent runs (Ray, BLAS), same result as serial
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            rows = list(tqdm(pool.map(_write_task, tasks), **bar))
    frame = pd.DataFrame(rows, columns=COLUMNS).sort_values("patient_id", ignore_index=True)
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    storage.write_text(storage.join(out_uri, layout.ANNOTATIONS), buf.getvalue())
    return frame


def with_features(spec: PatientSpec, **features: bool) -> PatientSpec:
    """A copy of ``spec`` with some features switched (tests and figures)."""
    return replace(spec, features=replace(spec.features, **features))
