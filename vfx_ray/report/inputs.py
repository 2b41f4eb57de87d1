"""What a report is made of: a run's slice predictions and metrics, its crops and annotations.

Two kinds of run folder are understood (local path or s3://, always read through
:mod:`vfx_ray.storage`): a train-cv run (``oof_predictions.parquet`` + ``metrics.json``, see
:mod:`vfx_ray.stages.train_cv`) and a scores folder (``scores.parquet``, see :mod:`vfx_ray.stages.score`) whose
patients carry labels. Both become one table of slice predictions with integer labels, so
every table and figure is drawn the same way. Missing crops or annotations are noted for the
report, never fatal: they only decorate the results.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vfx_ray import contracts, layout, paper, storage
from vfx_ray.errors import VfxError
from vfx_ray.evaluation import metrics
from vfx_ray.imaging import annotations as ann_mod
from vfx_ray.imaging.annotations import DEFAULT_CLASSES

TRAIN_CV, SCORES = "train-cv", "scores"


@dataclass
class RunData:
    """A run's predictions in one shape: one row per slice, label 1 = malignant."""

    uri: str
    kind: str  # train-cv | scores
    slices: pd.DataFrame  # patient_id, fold (train-cv only), slice_index, probability, label
    metrics: dict[str, Any]  # {"pooled": level_metrics, "folds": [...], "fold_mean": ... | None, "aggregation"}
    paper: dict[str, Any]
    threshold: float
    classes: tuple[str, str]
    config: dict[str, Any]
    crops_uri: str | None = None
    annotations_uri: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def patients(self) -> pd.DataFrame:
        """One row per patient: probability = max over slices (the paper's rule)."""
        return metrics.per_patient(self.slices)

    @property
    def folds(self) -> list[int]:
        return sorted(int(k) for k in self.slices["fold"].unique()) if "fold" in self.slices else []


def parent(uri: str) -> str:
    """The folder holding ``uri`` (posix for s3://, the OS's rules locally)."""
    if storage.is_s3(uri):
        return storage.S3_PREFIX + posixpath.dirname(uri[len(storage.S3_PREFIX):].rstrip("/"))
    return os.path.dirname(os.path.abspath(uri))


def _json(uri: str) -> dict[str, Any] | None:
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def run_kind(run_uri: str) -> str:
    """``train-cv`` or ``scores``, from the files in the folder; a clear error otherwise."""
    if storage.exists(storage.join(run_uri, layout.OOF_PREDICTIONS)):
        return TRAIN_CV
    if storage.exists(storage.join(run_uri, layout.SCORES)):
        return SCORES
    if storage.exists(storage.join(run_uri, layout.CONFIG)):
        raise VfxError("report", f"{run_uri} is a train-cv run without oof_predictions.parquet: "
                       "it has not finished; re-run the same train-cv command to complete it")
    raise VfxError("report", f"{run_uri} holds neither oof_predictions.parquet (a train-cv run) "
                   "nor scores.parquet (a scores folder); give one of those folders")


def _load_train_cv(run_uri: str) -> RunData:
    cols = ["patient_id", "fold", "slice_index", "probability", "label"]
    slices = storage.read_table(storage.join(run_uri, layout.OOF_PREDICTIONS)).select(cols).to_pandas()
    config = _json(storage.join(run_uri, layout.CONFIG)) or {}
    found = _json(storage.join(run_uri, layout.METRICS))
    threshold = float((found or {}).get("threshold", config.get("train", {}).get("threshold", 0.5)))
    slices = slices.astype({"label": int, "fold": int})
    current = found is not None and "aggregation" in found
    summary = found if current else {**(found or {}), **metrics.summarize(slices, threshold)}
    notes = [] if current else [
        "metrics.json is missing: metrics were computed from oof_predictions.parquet." if found is None else
        "metrics.json predates the confidence intervals and aggregation rules: its statistics were recomputed "
        "from oof_predictions.parquet."]
    return RunData(run_uri, TRAIN_CV, slices, summary, summary.get("paper") or paper.RESULTS, threshold,
                   DEFAULT_CLASSES, config, crops_uri=config.get("crops_uri"), notes=notes)


def _load_scores(run_uri: str) -> RunData:
    table = storage.read_table(storage.join(run_uri, layout.SCORES))
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    config = json.loads(meta.get("vfx_ray.config", "{}"))
    classes = tuple(config.get("classes") or DEFAULT_CLASSES)
    labelled = table.filter(pc.is_valid(table["label"]))
    if labelled.num_rows == 0:
        raise VfxError("report", f"{run_uri}/scores.parquet has no labelled patients: the report "
                       "compares predictions with labels; score annotations that carry a label")
    rows = []
    for pid, label, idx, probs in zip(*(labelled[c].to_pylist() for c in
                                        ("patient_id", "label", "slice_indices", "slice_probabilities")), strict=True):
        if label not in classes:
            raise VfxError("report", f"patient {pid} has label {label!r}, not one of {classes}")
        rows += [{"patient_id": pid, "slice_index": int(i), "probability": float(p),
                  "label": classes.index(label)} for i, p in zip(idx, probs, strict=True)]
    slices = pd.DataFrame(rows, columns=["patient_id", "slice_index", "probability", "label"])
    threshold = float(
        config.get("threshold", labelled["threshold"][0].as_py() if "threshold" in labelled.column_names else 0.5)
    )
    found = _json(storage.join(run_uri, layout.METRICS))
    if found is None or "auc_cluster_ci_low" not in found.get("per_slice", {}):  # none, or older than the CIs
        found = metrics.level_metrics(slices, threshold)
    pooled = {k: found[k] for k in ("per_slice", "per_patient")}
    notes = []
    if labelled.num_rows < table.num_rows:
        notes.append(f"{table.num_rows - labelled.num_rows} scored patients have no label and are left out.")
    summary = {**metrics.ci_methods(), "pooled": pooled, "folds": [], "fold_mean": None,
               "aggregation": metrics.aggregation_rules(slices, threshold)}
    return RunData(run_uri, SCORES, slices, summary, paper.RESULTS, threshold, classes, config, notes=notes)


def annotations_from_crops(crops_uri: str) -> str | None:
    """The annotations URI recorded in the crops job's manifest.json, if there is one."""
    folder = crops_uri if not crops_uri.endswith(".parquet") else parent(crops_uri)
    manifest = _json(storage.join(folder, layout.MANIFEST))
    return (manifest or {}).get("annotations") or None


def load_run(run_uri: str, crops_uri: str | None = None, annotations_uri: str | None = None) -> RunData:
    """A train-cv run or a labelled scores folder, with where its crops and annotations are.

    ``crops_uri`` / ``annotations_uri`` override what the run records (config.json's
    ``crops_uri``, then the crops job's manifest.json ``annotations``).
    """
    run = _load_train_cv(run_uri) if run_kind(run_uri) == TRAIN_CV else _load_scores(run_uri)
    run.crops_uri = crops_uri or run.crops_uri
    if annotations_uri:
        run.annotations_uri = annotations_uri
    elif run.crops_uri:
        try:
            run.annotations_uri = annotations_from_crops(run.crops_uri)
        except (OSError, ValueError) as exc:
            run.notes.append(f"Cannot read the crops job's manifest.json: {exc}")
    return run


def read_crop_images(crops_uri: str, patient_ids: list[str]) -> dict[tuple[str, int], np.ndarray]:
    """(patient_id, slice_index) -> the whole C×S×S crop (the model's input, for Grad-CAM),
    only for the patients asked: just those rows are read (a Parquet filter)."""
    fs, path = storage.filesystem(layout.crops_file(crops_uri))
    table = pq.read_table(path, filesystem=fs, columns=["patient_id", "slice_index", "image"],
                          filters=[("patient_id", "in", list(patient_ids))])
    if table.num_rows == 0:
        return {}
    images = contracts.images_from_arrow(table["image"])
    keys = zip(table["patient_id"].to_pylist(), table["slice_index"].to_pylist(), strict=True)
    return {(pid, int(k)): images[i] for i, (pid, k) in enumerate(keys)}


def middle_channel(image: np.ndarray) -> np.ndarray:
    """Channel 1 of 3: the slice itself, between its neighbours (what a crop is shown as)."""
    return image[image.shape[0] // 2]


def read_crops(crops_uri: str, patient_ids: list[str]) -> dict[tuple[str, int], np.ndarray]:
    """(patient_id, slice_index) -> middle channel (64x64) of the crop, only for the patients asked.

    Reads just those rows (a Parquet filter), so a large crops dataset costs little.
    """
    return {key: middle_channel(image) for key, image in read_crop_images(crops_uri, patient_ids).items()}


def read_annotations(uri: str) -> pd.DataFrame:
    """Annotations as they are (``annotations.read_annotations``, lenient): the report needs only
    patient_id and some optional columns."""
    return ann_mod.read_annotations(uri, lenient=True)
