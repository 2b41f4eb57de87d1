"""Patient-level cross-validation splits: stratified by label, grouped by patient, seeded.

Pure functions on tables; no Ray, no I/O. Like nnU-Net's ``splits_final.json``, the splits
are computed once, saved as ``splits.json`` in the run folder and reused by every later step,
so re-running or resuming a cross-validation can never reshuffle patients between folds.

A split dict looks like::

    {"version": 1, "n_folds": 10, "val_fraction": 0.1, "seed": 0,
     "patients": {"P001": 1, ...},                         # patient -> label
     "folds": [{"fold": 0, "train": [...], "val": [...], "test": [...]}, ...]}

``test`` is the held-out fold (every patient is in exactly one), ``val`` is ~``val_fraction``
of the remaining patients (stratified) for early stopping, ``train`` is the rest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

SPLITS_VERSION = 1


def patient_labels(crops: pd.DataFrame) -> pd.DataFrame:
    """One row per patient (``patient_id``, ``label``) from a per-slice crops frame.

    Raises ValueError when a patient has no label or two different labels: folds are
    stratified on the patient's label, so it must be unique.
    """
    if crops.empty:
        raise ValueError("no crops: cannot make folds from an empty table")
    if crops["label"].isna().any():
        bad = sorted(crops.loc[crops["label"].isna(), "patient_id"].unique())[:5]
        raise ValueError(f"crops without a label (e.g. patients {bad}); training needs labels")
    per = crops.groupby("patient_id")["label"].agg(["min", "max"])
    mixed = per.index[per["min"] != per["max"]].tolist()
    if mixed:
        raise ValueError(f"patients with two different labels: {mixed[:5]}")
    out = per["min"].astype(int).rename("label").reset_index()
    return out.sort_values("patient_id", kind="stable").reset_index(drop=True)


def make_splits(
    patients: pd.DataFrame, n_folds: int, val_fraction: float, seed: int
) -> dict[str, Any]:
    """Stratified patient folds with a stratified validation subset of each training part.

    ``patients`` has one row per patient with ``patient_id`` and ``label`` (0/1). Patients are
    sorted by id first, so the result depends only on the cohort and the seed, not row order.
    """
    if patients["patient_id"].duplicated().any():
        raise ValueError("patients table has duplicate patient_id rows; pass one row per patient")
    pts = patients.sort_values("patient_id", kind="stable").reset_index(drop=True)
    ids = pts["patient_id"].astype(str).to_numpy()
    labels = pts["label"].astype(int).to_numpy()
    counts = np.bincount(labels, minlength=2)
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if counts.min() < n_folds:
        raise ValueError(
            f"{n_folds} stratified folds need at least {n_folds} patients of each class; "
            f"have {counts[0]} benign and {counts[1]} malignant (lower n_folds)"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = []
    for k, (rest_idx, test_idx) in enumerate(skf.split(ids, labels)):
        train_ids, val_ids = _val_split(ids[rest_idx], labels[rest_idx], val_fraction, seed + k)
        folds.append(
            {
                "fold": k,
                "train": sorted(train_ids),
                "val": sorted(val_ids),
                "test": sorted(ids[test_idx].tolist()),
            }
        )
    splits = {
        "version": SPLITS_VERSION,
        "n_folds": n_folds,
        "val_fraction": val_fraction,
        "seed": seed,
        "patients": {str(i): int(y) for i, y in zip(ids, labels, strict=True)},
        "folds": folds,
    }
    check_splits(splits)
    return splits


def _val_split(
    ids: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Stratified (train, val) patient ids; at least one val patient per class when possible."""
    if val_fraction == 0.0:
        return ids.tolist(), []
    n_classes = len(np.unique(labels))
    n_val = max(int(round(val_fraction * len(ids))), n_classes)
    if n_val >= len(ids) - n_classes:
        raise ValueError(
            f"too few training patients ({len(ids)}) to hold out a validation set "
            f"of {n_val}; use fewer folds or a smaller val_fraction"
        )
    stratify = labels if np.bincount(labels).min() >= 2 else None
    tr, va = train_test_split(
        ids, test_size=n_val, stratify=stratify, random_state=seed, shuffle=True
    )
    return tr.tolist(), va.tolist()


def check_splits(splits: Mapping[str, Any]) -> None:
    """Raise ValueError unless no patient is in two parts of a fold and each is tested once."""
    everyone = set(splits["patients"])
    tested: list[str] = []
    for f in splits["folds"]:
        tr, va, te = set(f["train"]), set(f["val"]), set(f["test"])
        if tr & va or tr & te or va & te:
            raise ValueError(f"fold {f['fold']}: a patient is in two of train/val/test")
        if tr | va | te != everyone:
            raise ValueError(f"fold {f['fold']}: train+val+test is not the whole cohort")
        tested.extend(f["test"])
    if len(tested) != len(set(tested)) or set(tested) != everyone:
        raise ValueError("every patient must be tested exactly once across folds")


def same_cohort(splits: Mapping[str, Any], patients: pd.DataFrame) -> bool:
    """True when saved splits were made for exactly these patients with these labels."""
    now = {str(p): int(y) for p, y in zip(patients["patient_id"], patients["label"], strict=True)}
    return dict(splits["patients"]) == now


def splits_to_json(splits: Mapping[str, Any]) -> str:
    return json.dumps(splits, indent=1, sort_keys=True)


def splits_from_json(text: str) -> dict[str, Any]:
    """Parse and validate a ``splits.json``."""
    splits = json.loads(text)
    if splits.get("version") != SPLITS_VERSION:
        raise ValueError(f"splits.json version {splits.get('version')!r} is not {SPLITS_VERSION}")
    check_splits(splits)
    return splits
