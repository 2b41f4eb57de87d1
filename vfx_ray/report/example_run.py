"""A small, fake but format-valid train-cv run, for the notebooks, docs and tests of the report.

No training happens: per-slice probabilities are drawn so that each patient's slices peak in
the middle and fall off at the edges (the partial-volume pattern of the paper's Fig. 3), with
a few patients on the wrong side of the threshold so every outcome (TP/FP/TN/FN) occurs.
Labels, ages, sexes and the six visual features follow Table 1 (``synth.table1.allocate``).
Everything else is what ``train_cv.finalize`` and the crops job write: oof_predictions.parquet,
metrics.json (``metrics.summarize`` + the paper's figures), config.json with ``crops_uri``,
crops.parquet (``contracts.crops_table``) and manifest.json naming annotations.csv.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa

from vfx_ray import contracts, layout, paper, storage
from vfx_ray.config import SynthConfig, TrainConfig
from vfx_ray.evaluation import metrics
from vfx_ray.synth.table1 import allocate

WRONG = {"malignant": (0.42, 0.18), "benign": (0.72, 0.61)}  # peaks of the misclassified patients


def _peaks(labels: list[str], rng: np.random.Generator) -> np.ndarray:
    """Each patient's highest slice probability; the first two of each class are errors."""
    peaks = np.where(np.array(labels) == "malignant", rng.uniform(0.55, 0.99, len(labels)),
                     rng.uniform(0.02, 0.45, len(labels)))
    for cls, wrong in WRONG.items():
        idx = [i for i, lab in enumerate(labels) if lab == cls][: len(wrong)]
        peaks[idx] = wrong[: len(idx)]
    return peaks


def _crop(label: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A 3×size×size z-scored image with a bright blob (malignant) or a dark band (benign)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = rng.normal(0.0, 0.6, (3, size, size))
    img += 2.5 * np.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / 0.02) if label else -2.0 * (np.abs(yy - 0.5) < 0.07)
    return ((img - img.mean()) / img.std()).astype(np.float32)


def example_slices(n_patients: int = 30, n_folds: int = 3, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(out-of-fold slice predictions, annotations) of a fake cohort."""
    rng = np.random.default_rng(seed)
    demo = allocate(n_patients, SynthConfig().malignant_fraction, seed)
    labels = [d.label for d in demo]
    peaks = _peaks(labels, rng)
    rows, ann = [], []
    folds = {cls: 0 for cls in ("malignant", "benign")}  # stratified: each class dealt round-robin
    for i, (d, peak) in enumerate(zip(demo, peaks, strict=True)):
        pid, n = f"EX{i:03d}", int(rng.integers(3, 6))
        fold = folds[d.label] % n_folds
        folds[d.label] += 1
        factor = np.ones(n)
        factor[[0, -1]] = rng.uniform(0.45, 0.9, 2)  # edge slices: partial volume
        centre = np.arange(n) != n // 2
        factor[centre] *= rng.uniform(0.85, 1.0, centre.sum())
        for j, f in enumerate(factor):
            rows.append({"patient_id": pid, "fold": fold, "slice_index": 40 + j,
                         "probability": float(np.clip(peak * f, 0.001, 0.999)),
                         "label": int(d.label == "malignant")})
        ann.append({"patient_id": pid, "label": d.label, "vertebra": "L2", "age": d.age, "sex": d.sex,
                    **d.features.as_dict()})
    return pd.DataFrame(rows), pd.DataFrame(ann)


def write_example_run(root_uri: str, n_patients: int = 30, n_folds: int = 3, seed: int = 0,
                      crops: bool = True) -> str:
    """Write ``root/run`` (a train-cv run folder), ``root/crops`` and ``root/annotations.csv``.

    Returns the run folder's URI. ``crops=False`` leaves the crops dataset out (config.json
    still points at where it would be) to show how the report handles missing crops.
    """
    oof, ann = example_slices(n_patients, n_folds, seed)
    run, crops_dir = storage.join(root_uri, "run"), storage.join(root_uri, "crops")
    ann_uri, crops_uri = storage.join(root_uri, layout.ANNOTATIONS), storage.join(crops_dir, layout.CROPS)
    buf = io.StringIO()
    ann.to_csv(buf, index=False)
    storage.write_text(ann_uri, buf.getvalue())
    if crops:
        rng = np.random.default_rng(seed + 1)
        storage.write_table(contracts.crops_table(
            {"patient_id": r.patient_id, "series_instance_uid": f"1.2.826.0.1.{r.patient_id}", "vertebra": "L2",
             "slice_index": r.slice_index, "slice_x_mm": 3.0 * r.slice_index, "label": r.label,
             "image": _crop(r.label, rng)} for r in oof.itertuples()), crops_uri)
        storage.write_text(storage.join(crops_dir, layout.MANIFEST),
                           json.dumps({"annotations": ann_uri, "crops": len(oof), "example": True}, indent=2))
    cfg = TrainConfig(n_folds=n_folds)
    storage.write_text(
        storage.join(run, layout.CONFIG),
        json.dumps(
            {"train": dataclasses.asdict(cfg), "crops_uri": crops_uri, "params": {}, "versions": {"example": True}},
            indent=2,
        ),
    )
    table = pa.Table.from_pandas(oof, preserve_index=False).cast(pa.schema(
        [("patient_id", pa.string()), ("fold", pa.int32()), ("slice_index", pa.int32()),
         ("probability", pa.float64()), ("label", pa.int8())]))
    storage.write_table(table, storage.join(run, layout.OOF_PREDICTIONS))
    summary = metrics.summarize(oof, cfg.threshold)
    summary.update(unlabelled_patients_excluded=[], paper=paper.RESULTS)
    storage.write_text(storage.join(run, layout.METRICS), json.dumps(summary, indent=2))
    return run
