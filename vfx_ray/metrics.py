"""Diagnostic metrics of the paper, per slice and per patient, per fold and pooled.

Pure numpy/scipy/pandas. Conventions (Li et al. 2021, Statistics): label 1 = malignant is the
positive class; a probability >= threshold (0.5) is called malignant; a patient's probability
is the maximum over its slices. ROC AUC comes with a 95 % CI from DeLong's variance
(fast midrank algorithm of Sun & Xu 2014, normal approximation, clipped to [0, 1]) - chosen
over the bootstrap because it is deterministic and needs no seed. Undefined values (e.g.
sensitivity of a fold without malignant cases, a CI with fewer than two cases of a class)
are ``None`` so they serialise to JSON ``null``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm, rankdata

AUC_CI_METHOD = "DeLong (Sun & Xu 2014 midrank algorithm), normal approximation, clipped to [0, 1]"
STATS = ("sensitivity", "specificity", "accuracy", "auc")


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def confusion(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, int]:
    """Counts of TP/FP/TN/FN with ``prob >= threshold`` called malignant (label 1)."""
    y = np.asarray(y_true).astype(int)
    pred = np.asarray(prob, dtype=float) >= threshold
    return {
        "tp": int(np.sum(pred & (y == 1))),
        "fp": int(np.sum(pred & (y == 0))),
        "tn": int(np.sum(~pred & (y == 0))),
        "fn": int(np.sum(~pred & (y == 1))),
    }


def roc_auc_delong(
    y_true: np.ndarray, score: np.ndarray, confidence: float = 0.95
) -> dict[str, float | None]:
    """ROC AUC (ties count 1/2) with DeLong standard error and a two-sided CI.

    AUC is None without both classes; the SE/CI need at least two cases of each class.
    """
    y = np.asarray(y_true).astype(int)
    s = np.asarray(score, dtype=float)
    pos, neg = s[y == 1], s[y == 0]
    m, n = len(pos), len(neg)
    out: dict[str, float | None] = {"auc": None, "auc_se": None, "auc_ci_low": None, "auc_ci_high": None}
    if m == 0 or n == 0:
        return out
    ranks_all = rankdata(np.concatenate([pos, neg]))
    v10 = (ranks_all[:m] - rankdata(pos)) / n  # per positive: share of negatives below it
    v01 = 1.0 - (ranks_all[m:] - rankdata(neg)) / m  # per negative: share of positives above it
    auc = float(v10.mean())
    out["auc"] = auc
    if m < 2 or n < 2:
        return out
    se = math.sqrt(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)
    z = float(norm.ppf(0.5 + confidence / 2))
    out.update(auc_se=se, auc_ci_low=max(0.0, auc - z * se), auc_ci_high=min(1.0, auc + z * se))
    return out


def binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Sensitivity, specificity, accuracy, confusion matrix and AUC (95 % CI) of one set."""
    y = np.asarray(y_true).astype(int)
    c = confusion(y, prob, threshold)
    n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    return {
        "n": int(len(y)),
        "n_malignant": n_pos,
        "n_benign": n_neg,
        **c,
        "sensitivity": _ratio(c["tp"], n_pos),
        "specificity": _ratio(c["tn"], n_neg),
        "accuracy": _ratio(c["tp"] + c["tn"], len(y)),
        # rows: true benign, true malignant; columns: predicted benign, predicted malignant
        "confusion_matrix": [[c["tn"], c["fp"]], [c["fn"], c["tp"]]],
        **roc_auc_delong(y, prob),
    }


def per_patient(slices: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: probability = max over its slices (paper), label, fold, n_slices."""
    keys = ["patient_id"] + (["fold"] if "fold" in slices.columns else [])
    g = slices.groupby(keys, sort=True)
    out = g.agg(probability=("probability", "max"), label=("label", "first"), n_slices=("label", "size"))
    if (g["label"].nunique() > 1).any():
        raise ValueError("a patient has slices with different labels")
    return out.reset_index()


def level_metrics(slices: pd.DataFrame, threshold: float = 0.5) -> dict[str, Any]:
    """``per_slice`` and ``per_patient`` metrics of one set of slice predictions."""
    patients = per_patient(slices)
    return {
        "per_slice": binary_metrics(slices["label"].to_numpy(), slices["probability"].to_numpy(), threshold),
        "per_patient": binary_metrics(
            patients["label"].to_numpy(), patients["probability"].to_numpy(), threshold
        ),
    }


def _mean_sd(values: list[float | None]) -> dict[str, float | None]:
    v = np.array([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return {"mean": None, "sd": None, "n_folds": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None, "n_folds": int(len(v))}


def summarize(oof: pd.DataFrame, threshold: float = 0.5) -> dict[str, Any]:
    """metrics.json content from out-of-fold slice predictions.

    ``oof`` has one row per test slice: patient_id, fold, probability, label. ``pooled`` is
    computed over all folds' predictions together (how the paper reports), ``folds`` per fold,
    ``fold_mean`` the mean and SD over folds of each statistic.
    """
    per_fold = []
    for k, part in oof.groupby("fold", sort=True):
        per_fold.append({"fold": int(k), **level_metrics(part, threshold)})
    fold_mean = {
        level: {s: _mean_sd([f[level][s] for f in per_fold]) for s in STATS}
        for level in ("per_slice", "per_patient")
    }
    return {
        "threshold": threshold,
        "positive_class": "malignant (label 1); probability >= threshold is malignant",
        "patient_probability": "max over the patient's slices",
        "auc_ci_method": AUC_CI_METHOD,
        "auc_ci_level": 0.95,
        "pooled": level_metrics(oof, threshold),
        "folds": per_fold,
        "fold_mean": fold_mean,
    }
