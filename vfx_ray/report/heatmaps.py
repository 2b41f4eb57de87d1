"""Grad-CAM heatmaps of the example crops, each by the fold model that held its patient out.

A train-cv run's ``oof_predictions.parquet`` says in which fold each patient was a test
patient; that fold's ``fold_k/model.pt`` (``model.load_model``, the scorer's loader) made
its out-of-fold probabilities, so its Grad-CAM (``vfx_ray.ml.gradcam``) shows what those
probabilities looked at. Heatmaps only decorate the Fig. 3 plots: a scores folder, a run
without its models or an unreadable model is a note, never a failed report. torch is
imported only when there is a model to run, so reading a run stays light.
"""

from __future__ import annotations

import numpy as np

from vfx_ray import layout, storage
from vfx_ray.report.inputs import TRAIN_CV, RunData

Key = tuple[str, int]


def fold_model_uri(run_uri: str, fold: int) -> str:
    """``run/fold_k/model.pt``: where train-cv writes fold k's model."""
    return storage.join(layout.fold_dir(run_uri, fold), layout.MODEL)


def held_out_folds(run: RunData, patient_ids: list[str]) -> dict[str, int]:
    """patient_id -> the fold in which it was a test patient (the slices' ``fold`` column)."""
    rows = run.slices[run.slices["patient_id"].isin(patient_ids)].drop_duplicates("patient_id")
    return {str(p): int(k) for p, k in zip(rows["patient_id"], rows["fold"], strict=True)}


def _reason(exc: Exception) -> str:
    """The exception in one short line (torch's unpickling errors run to many)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:160]}{'…' if len(first) > 160 else ''}"


def _fold_heatmaps(uri: str, keys: list[Key], images: dict[Key, np.ndarray]) -> dict[Key, np.ndarray]:
    from vfx_ray.ml.gradcam import gradcam
    from vfx_ray.ml.model import load_model

    model, _ = load_model(uri)
    return dict(zip(keys, gradcam(model, np.stack([images[k] for k in keys])), strict=True))


def example_heatmaps(run: RunData, images: dict[Key, np.ndarray], notes: list[str]) -> dict[Key, np.ndarray]:
    """(patient_id, slice_index) -> Grad-CAM heatmap in [0, 1] of each crop in ``images``
    (C×S×S), by its patient's test-fold model; what cannot be drawn is said in ``notes``."""
    if not images:
        return {}
    if run.kind != TRAIN_CV or "fold" not in run.slices:
        notes.append("Grad-CAM heatmaps are not shown: a scores folder does not record which fold model held "
                     "each patient out (a train-cv run's fold_k/model.pt does); crops are drawn without them.")
        return {}
    fold_of = held_out_folds(run, sorted({pid for pid, _ in images}))
    by_fold: dict[int, list[Key]] = {}
    for key in sorted(images):
        by_fold.setdefault(fold_of[key[0]], []).append(key)
    maps: dict[Key, np.ndarray] = {}
    missing = []
    for fold, keys in sorted(by_fold.items()):
        uri = fold_model_uri(run.uri, fold)
        try:
            if not storage.exists(uri):
                missing.append(fold)
                continue
            maps.update(_fold_heatmaps(uri, keys, images))
        except Exception as exc:  # noqa: BLE001 - a heatmap only decorates: an unusable model costs it alone
            notes.append(f"Grad-CAM heatmaps of fold {fold} are not shown: cannot use {uri} ({_reason(exc)}).")
    if missing:
        notes.append(f"Grad-CAM heatmaps are not shown for fold{'s' if len(missing) > 1 else ''} "
                     f"{', '.join(map(str, missing))}: the run has no {layout.MODEL} there (e.g. "
                     f"{fold_model_uri(run.uri, missing[0])}); those crops are drawn without them.")
    return maps
