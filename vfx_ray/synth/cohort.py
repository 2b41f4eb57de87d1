"""The synthetic cohort: the plan (pure) and the archive writer.

``plan_cohort`` fixes who is malignant and every per-patient choice from ``cfg.seed``;
:mod:`patient` renders one patient from its spec alone (:mod:`study` a clinical study), so
the archive is identical whatever the number of worker processes.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import pydicom

from vfx_ray import layout, storage
from vfx_ray.config import SynthConfig
from vfx_ray.imaging.roi import ROI_COLUMNS, RoiBox
from vfx_ray.paper import FEATURES
from vfx_ray.synth.dicom_writer import TRANSFER_SYNTAXES
from vfx_ray.synth.patient import PatientSpec, patient_files
from vfx_ray.synth.study import clinical_study
from vfx_ray.synth.table1 import allocate

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ["patient_id", "series_instance_uid", "label", "vertebra", *ROI_COLUMNS, "age", "sex",
           *FEATURES, "study_instance_uid", "patient_position", "oblique_deg", "transfer_syntax",
           "enhanced", "pixel_spacing_mm", "slice_thickness_mm", "n_slices", "n_files"]
POSITIONS = ("HFS", "FFS")
COVERAGES = ("segment", "thoracolumbar")
STUDIES = ("single", "clinical")
MASK_ANNOTATIONS = "annotations_masks.csv"  # with --roi-masks: the ROIs as roi_mask_uri only


def _check_config(cfg: SynthConfig) -> None:
    if cfg.patients < 1:
        raise ValueError("SynthConfig.patients must be >= 1")
    if cfg.patient_position not in (*POSITIONS, "mixed"):
        raise ValueError(f"patient_position {cfg.patient_position!r}: use HFS, FFS or mixed")
    if cfg.transfer_syntax not in (*TRANSFER_SYNTAXES, "mixed"):
        raise ValueError(f"transfer_syntax {cfg.transfer_syntax!r}: use one of "
                         f"{', '.join(TRANSFER_SYNTAXES)} or mixed")
    lo, hi = cfg.n_vertebrae
    if cfg.coverage == "segment" and not 4 <= lo <= hi <= 8:
        raise ValueError("n_vertebrae must lie within 4..8 (the target needs two neighbours)")
    if cfg.coverage not in COVERAGES or cfg.study not in STUDIES:
        raise ValueError(f"coverage {cfg.coverage!r}, study {cfg.study!r}: use one of {COVERAGES} and {STUDIES}")
    if cfg.study == "clinical" and cfg.enhanced:
        raise ValueError("a clinical study is written as classic CT images; drop enhanced")
    if cfg.difficulty.roi_box not in ("shared", "lesion"):
        raise ValueError(f"difficulty.roi_box {cfg.difficulty.roi_box!r}: use shared or lesion")
    if cfg.dicomdir and cfg.study != "clinical":
        raise ValueError("dicomdir needs study='clinical' (the media layout of a whole study)")


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
        spacing = cfg.slice_spacing_mm  # drawn only when asked, so other cohorts keep their draws
        if cfg.overlap_fraction and cfg.slice_spacing_mm is None and rng.random() < cfg.overlap_fraction:
            spacing = cfg.slice_thickness_mm / 2
        specs.append(PatientSpec(
            patient_id=f"VFX{i + 1:0{width}d}", label=d.label, features=d.features, age=d.age,
            sex=d.sex, seed=seed, matrix=cfg.matrix,
            pixel_spacing_mm=round(float(rng.uniform(*cfg.pixel_spacing_mm)), 4),
            slice_thickness_mm=cfg.slice_thickness_mm,
            n_vertebrae=int(rng.integers(cfg.n_vertebrae[0], cfg.n_vertebrae[1] + 1)),
            patient_position=position, oblique_deg=cfg.oblique_deg, transfer_syntax=syntax,
            enhanced=cfg.enhanced, coverage=cfg.coverage, slice_spacing_mm=spacing,
            fov_mask=cfg.fov_mask, study=cfg.study, dicomdir=cfg.dicomdir, roi_masks=cfg.roi_masks,
            difficulty=cfg.difficulty,
        ))
    return specs


def write_patient(out_uri: str, spec: PatientSpec) -> dict:
    """Render and store one patient under ``out_uri/dicom/<patient_id>/``: one folder per
    series (``<series uid>/``), or a clinical study as its own layout (:mod:`study`)."""
    if spec.study == "clinical":
        files, row = clinical_study(spec)
        folder = storage.join(out_uri, "dicom", spec.patient_id)
    else:
        files, row = patient_files(spec)
        folder = storage.join(out_uri, "dicom", spec.patient_id, row["series_instance_uid"])
    for name, data in files:
        storage.write_bytes(storage.join(folder, name), data)
    if spec.roi_masks:
        row = {**row, "roi_mask_uri": write_mask(out_uri, spec, row, files)}
    return row


def write_mask(out_uri: str, spec: PatientSpec, row: dict, files: list[tuple[str, bytes]]) -> str:
    """The patient's ROI as a mask under ``out_uri/masks/``: NIfTI for odd patient numbers,
    DICOM SEG of the annotated series for even ones (the demo shows both forms; an Enhanced CT
    series, one multi-frame file, gets NIfTI); its URI."""
    from vfx_ray.synth.masks import nifti_box_mask, seg_box_mask

    box = RoiBox.from_record(row)
    if int(spec.patient_id.removeprefix("VFX")) % 2 or spec.enhanced:
        uri = storage.join(out_uri, "masks", f"{spec.patient_id}.nii.gz")
        storage.write_bytes(uri, nifti_box_mask(box))
        return uri
    uid = row["series_instance_uid"]
    series = [(n, d) for n, d in files
              if pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True).get("SeriesInstanceUID") == uid]
    uri = storage.join(out_uri, "masks", f"{spec.patient_id}.seg.dcm")
    storage.write_bytes(uri, seg_box_mask(series, box, spec.seed))
    return uri


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
    if cfg.roi_masks:  # the same patients, their ROIs given as masks only
        masks = pd.DataFrame(rows).sort_values("patient_id", ignore_index=True)
        masks = masks[["patient_id", "series_instance_uid", "label", "vertebra", "roi_mask_uri"]]
        storage.write_text(storage.join(out_uri, MASK_ANNOTATIONS), masks.to_csv(index=False))
    return frame


