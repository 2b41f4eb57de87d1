"""Diagnostic metrics of the paper, per slice and per patient, per fold and pooled.

Pure numpy/scipy/pandas. Conventions (Li et al. 2021, Statistics): label 1 = malignant is the
positive class; a probability >= threshold (0.5) is called malignant; a patient's probability
is the maximum over its slices (``mean`` and the ``centre`` slice are compared with it).

Every statistic carries a 95 % CI:

- sensitivity, specificity, accuracy: Wilson score interval (stays in [0, 1] and keeps its
  coverage near 1 and at a fold's small counts, where the Wald interval does not);
- ROC AUC: DeLong's variance (fast midrank algorithm of Sun & Xu 2014, normal approximation,
  clipped to [0, 1]) - deterministic, no seed - for patients;
- per-slice ROC AUC also by a patient-level (cluster) bootstrap: slices of one patient are not
  independent, so DeLong's per-slice CI, which counts each slice as a case, is too narrow.

Two AUCs on the same cases (aggregation rules, two runs) are compared by the paired DeLong
test. Undefined values (e.g. sensitivity of a fold without malignant cases, a CI with fewer
than two cases of a class) are ``None`` so they serialise to JSON ``null``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest, norm, rankdata

AUC_CI_METHOD = "DeLong (Sun & Xu 2014 midrank algorithm), normal approximation, clipped to [0, 1]"
RATE_CI_METHOD = "Wilson score interval"
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 2021
AUC_CLUSTER_CI_METHOD = (
    "patient-level (cluster) bootstrap: {n} resamples of the patients with replacement, each with all "
    "its slices, percentile interval, seed {seed}"
)
STATS = ("sensitivity", "specificity", "accuracy", "auc")
RULES = ("max", "mean", "centre")  # patient aggregation rules; max is the paper's
CENTRE_RULE = "centre: the middle slice of the patient's ROI by slice_index; of an even count the lower middle"
AGGREGATION_KEYS = ("n", "auc", "auc_ci_low", "auc_ci_high", *(
    f"{s}{x}" for s in ("sensitivity", "specificity", "accuracy") for x in ("", "_ci_low", "_ci_high")))


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


def wilson_ci(successes: int, n: int, confidence: float = 0.95) -> tuple[float | None, float | None]:
    """Wilson score interval of a proportion (scipy's): in [0, 1] and near its nominal coverage at
    rates near 1 and small n, where the Wald interval is not. (None, None) when n is 0."""
    if n == 0:
        return None, None
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _rate(name: str, hits: int, n: int) -> dict[str, float | None]:
    low, high = wilson_ci(hits, n)
    return {name: _ratio(hits, n), f"{name}_ci_low": low, f"{name}_ci_high": high}


def _z(confidence: float) -> float:
    return float(norm.ppf(0.5 + confidence / 2))


def _structural_components(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's V10 (k×m: per malignant case, the share of benign cases below it, ties 1/2) and
    V01 (k×n: per benign case, the share of malignant cases above it) of k scores at once, by
    midranks (Sun & Xu 2014): O((m + n) log(m + n)) instead of comparing every pair. Each
    row's mean is that score's AUC."""
    m, n = pos.shape[1], neg.shape[1]
    ranks_all = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    v10 = (ranks_all[:, :m] - rankdata(pos, axis=1)) / n
    v01 = 1.0 - (ranks_all[:, m:] - rankdata(neg, axis=1)) / m
    return v10, v01


def _delong(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The AUCs of k scores (rows) of the same cases and DeLong's k×k covariance matrix of them.

    AUCs are None without both classes; the covariance needs two cases of each class.
    """
    y = np.asarray(y_true).astype(int)
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    pos, neg = s[:, y == 1], s[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        return None, None
    v10, v01 = _structural_components(pos, neg)
    if m < 2 or n < 2:
        return v10.mean(axis=1), None
    return v10.mean(axis=1), np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n


def roc_auc_delong(
    y_true: np.ndarray, score: np.ndarray, confidence: float = 0.95
) -> dict[str, float | None]:
    """ROC AUC (ties count 1/2) with DeLong standard error and a two-sided CI.

    AUC is None without both classes; the SE/CI need at least two cases of each class.
    """
    out: dict[str, float | None] = {"auc": None, "auc_se": None, "auc_ci_low": None, "auc_ci_high": None}
    aucs, cov = _delong(y_true, score)
    if aucs is None:
        return out
    auc = float(aucs[0])
    out["auc"] = auc
    if cov is None:
        return out
    se, z = math.sqrt(cov[0, 0]), _z(confidence)
    out.update(auc_se=se, auc_ci_low=max(0.0, auc - z * se), auc_ci_high=min(1.0, auc + z * se))
    return out


def delong_paired(
    y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, confidence: float = 0.95
) -> dict[str, float | None]:
    """Paired DeLong test of AUC(a) = AUC(b), two scores of the same cases (DeLong et al. 1988).

    The two AUCs are correlated (same cases), so the SE of their difference takes their
    covariance from the structural components. Returns auc_a, auc_b, difference (a - b), se, z,
    two-sided p and the difference's CI. Identical rankings give difference 0, se 0, p 1; se 0
    with a non-zero difference leaves z and p None (the normal approximation says nothing).
    """
    keys = ("auc_a", "auc_b", "difference", "se", "z", "p", "difference_ci_low", "difference_ci_high")
    out: dict[str, float | None] = dict.fromkeys(keys)
    aucs, cov = _delong(y_true, np.vstack([np.asarray(score_a, float), np.asarray(score_b, float)]))
    if aucs is None:
        return out
    diff = float(aucs[0] - aucs[1])
    out.update(auc_a=float(aucs[0]), auc_b=float(aucs[1]), difference=diff)
    if cov is None:
        return out
    se = math.sqrt(max(0.0, cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]))
    half = _z(confidence) * se
    out.update(se=se, difference_ci_low=max(-1.0, diff - half), difference_ci_high=min(1.0, diff + half))
    if se > 1e-12:
        z = diff / se
        out.update(z=z, p=float(2 * norm.sf(abs(z))))
    elif abs(diff) <= 1e-12:
        out.update(z=0.0, p=1.0)
    return out


RESAMPLE_BLOCK = 64  # resamples computed at once: memory is this many weights per slice
BOOTSTRAP_BLOCK_BYTES = 16 << 20  # ... at most about this much for one block's arrays (fewer resamples on many slices)


def resample_blocks(n_groups: int, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                    block: int = RESAMPLE_BLOCK) -> Iterator[np.ndarray]:
    """:func:`resample_counts` in blocks of rows (the same rows: one generator draws them in turn)."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, block):
        yield rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=min(block, n_resamples - start))


def resample_counts(n_groups: int, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """n_resamples × n_groups: how often each patient is drawn in each bootstrap resample
    (n_groups draws with replacement, equal chances); fixed seed, so reports are reproducible."""
    return np.concatenate(list(resample_blocks(n_groups, n_resamples, seed)))


def cluster_bootstrap_aucs(
    y_true: np.ndarray, score: np.ndarray, groups: np.ndarray, counts: np.ndarray | Iterable[np.ndarray]
) -> np.ndarray:
    """Per-slice AUC of each resample of patients (``counts``: rows of ``resample_counts`` over
    the sorted unique ``groups``, or blocks of them): a drawn patient brings all its slices,
    once per draw, so a resample's AUC is the AUC with those slice weights. Computed as a
    weighted Mann-Whitney count over the slices sorted once, a block of resamples at a time:
    memory grows with slices, not with patients squared. NaN where a resample lacks a class."""
    y, s = np.asarray(y_true).astype(int), np.asarray(score, dtype=float)
    _, group = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(s, kind="stable")
    s, y, group = s[order], y[order], group[order]
    new_score = np.r_[True, s[1:] != s[:-1]]
    starts = np.flatnonzero(new_score)  # runs of tied scores
    tie = np.cumsum(new_score) - 1  # each slice's run
    pos = y == 1
    blocks = [counts] if isinstance(counts, np.ndarray) else counts
    out = [_weighted_aucs(c[:, group].astype(float), pos, starts, tie) for c in blocks]
    return np.concatenate(out) if out else np.zeros(0)


def _weighted_aucs(w: np.ndarray, pos: np.ndarray, starts: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """AUC (ties 1/2) of each row of slice weights ``w`` (slices sorted by score)."""
    neg_w = np.where(pos, 0.0, w)
    per_run = np.add.reduceat(neg_w, starts, axis=1)  # benign weight at each distinct score
    below = np.cumsum(per_run, axis=1) - per_run  # benign weight strictly below it
    beaten = below[:, tie[pos]] + 0.5 * per_run[:, tie[pos]]
    num = (w[:, pos] * beaten).sum(axis=1)
    den = w[:, pos].sum(axis=1) * neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def auc_cluster_bootstrap(
    y_true: np.ndarray,
    score: np.ndarray,
    groups: np.ndarray,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = 0.95,
) -> dict[str, float | None]:
    """Percentile CI of the per-slice AUC from a patient-level (cluster) bootstrap.

    Resampling patients, not slices, keeps each patient's correlated slices together, so the
    interval reflects the number of patients rather than of slices. None with fewer than two
    patients of a class. Resamples that lack a class are left out.
    """
    y = np.asarray(y_true).astype(int)
    g = np.asarray(groups)
    out: dict[str, float | None] = {"auc_cluster_ci_low": None, "auc_cluster_ci_high": None}
    if min(len(np.unique(g[y == 1])), len(np.unique(g[y == 0]))) < 2:
        return out
    block = max(1, min(RESAMPLE_BLOCK, BOOTSTRAP_BLOCK_BYTES // (6 * 8 * len(y))))  # ~6 float arrays of a block
    aucs = cluster_bootstrap_aucs(y, score, g, resample_blocks(len(np.unique(g)), n_resamples, seed, block))
    low, high = np.nanquantile(aucs, [(1 - confidence) / 2, (1 + confidence) / 2])
    out.update(auc_cluster_ci_low=float(low), auc_cluster_ci_high=float(high))
    return out


def binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Sensitivity, specificity, accuracy (Wilson 95 % CIs), confusion matrix and AUC (DeLong 95 % CI)."""
    y = np.asarray(y_true).astype(int)
    c = confusion(y, prob, threshold)
    n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    return {
        "n": int(len(y)),
        "n_malignant": n_pos,
        "n_benign": n_neg,
        **c,
        **_rate("sensitivity", c["tp"], n_pos),
        **_rate("specificity", c["tn"], n_neg),
        **_rate("accuracy", c["tp"] + c["tn"], len(y)),
        # rows: true benign, true malignant; columns: predicted benign, predicted malignant
        "confusion_matrix": [[c["tn"], c["fp"]], [c["fn"], c["tp"]]],
        **roc_auc_delong(y, prob),
    }


def _centre_probability(slices: pd.DataFrame, keys: list[str]) -> pd.Series:
    """Each patient's probability of its middle slice by slice_index (of an even count the lower
    middle: the ROI's centre, away from the partial-volume edges), indexed by ``keys``."""
    if "slice_index" not in slices.columns:
        raise ValueError("the centre rule needs the slices' slice_index")
    ordered = slices.sort_values([*keys, "slice_index"], kind="stable")
    g = ordered.groupby(keys, sort=True)
    middle = g.cumcount() == (g["probability"].transform("size") - 1) // 2
    return ordered[middle].set_index(keys)["probability"]


def per_patient(slices: pd.DataFrame, rule: str = "max") -> pd.DataFrame:
    """One row per patient: probability by ``rule`` over its slices, label, fold, n_slices.

    ``max`` is the paper's rule (the default); ``mean`` averages the slices; ``centre`` takes
    the middle slice by slice_index, of an even count the lower middle.
    """
    if rule not in RULES:
        raise ValueError(f"unknown patient aggregation rule {rule!r}: one of {', '.join(RULES)}")
    keys = ["patient_id"] + (["fold"] if "fold" in slices.columns else [])
    g = slices.groupby(keys, sort=True)
    if (g["label"].nunique() > 1).any():
        raise ValueError("a patient has slices with different labels")
    out = g.agg(label=("label", "first"), n_slices=("label", "size"))
    out.insert(0, "probability", _centre_probability(slices, keys) if rule == "centre" else g["probability"].agg(rule))
    return out.reset_index()


def level_metrics(
    slices: pd.DataFrame, threshold: float = 0.5, n_resamples: int = BOOTSTRAP_RESAMPLES
) -> dict[str, Any]:
    """``per_slice`` (with the patient-level bootstrap CI of its AUC) and ``per_patient`` metrics."""
    patients = per_patient(slices)
    y, p = slices["label"].to_numpy(), slices["probability"].to_numpy()
    return {
        "per_slice": {**binary_metrics(y, p, threshold),
                      **auc_cluster_bootstrap(y, p, slices["patient_id"].to_numpy(), n_resamples)},
        "per_patient": binary_metrics(
            patients["label"].to_numpy(), patients["probability"].to_numpy(), threshold
        ),
    }


def aggregation_rules(slices: pd.DataFrame, threshold: float = 0.5) -> dict[str, Any]:
    """Each patient aggregation rule's per-patient metrics and its paired DeLong test against max.

    The rules score the same patients, so their AUCs are compared pairwise (DeLong), not as
    independent samples. ``centre`` needs slice_index; without it the rule is left out and said so.
    """
    rules = [r for r in RULES if r != "centre" or "slice_index" in slices.columns]
    patients = {r: per_patient(slices, r) for r in rules}
    y, primary = patients["max"]["label"].to_numpy(), patients["max"]["probability"].to_numpy()
    out: dict[str, Any] = {}
    for rule, frame in patients.items():
        m = binary_metrics(y, frame["probability"].to_numpy(), threshold)
        test = delong_paired(y, frame["probability"].to_numpy(), primary) if rule != "max" else {}
        out[rule] = {**{k: m[k] for k in AGGREGATION_KEYS}, "auc_difference_vs_max": test.get("difference"),
                     "p_vs_max": test.get("p")}
    notes = [] if "centre" in rules else ["centre left out: the predictions have no slice_index"]
    return {"primary": "max", "centre_rule": CENTRE_RULE, "test": "paired DeLong of each rule's AUC against max",
            "rules": out, "notes": notes}


def _paired_slices(slices_a: pd.DataFrame, slices_b: pd.DataFrame, patient_ids: pd.Series) -> dict[str, Any] | None:
    """Paired DeLong per slice when both runs hold exactly the same slices of the shared patients."""
    cols = ["patient_id", "slice_index"]
    if any("slice_index" not in s.columns for s in (slices_a, slices_b)):
        return None
    a, b = (s[s["patient_id"].isin(patient_ids)] for s in (slices_a, slices_b))
    if a.duplicated(cols).any() or b.duplicated(cols).any() or len(a) != len(b):
        return None
    both = a[[*cols, "label", "probability"]].merge(b[[*cols, "probability"]], on=cols, suffixes=("_a", "_b"))
    if len(both) != len(a):
        return None
    return {"n": int(len(both)), **delong_paired(both["label"], both["probability_a"], both["probability_b"])}


def compare_runs(slices_a: pd.DataFrame, slices_b: pd.DataFrame) -> dict[str, Any]:
    """Run A against run B on the patients both scored: per-patient (max) paired DeLong, and per
    slice when the shared patients' slices (patient_id, slice_index) are the same in both.

    Raises ValueError when no patient is shared or a shared patient's label differs.
    """
    a, b = (per_patient(s)[["patient_id", "label", "probability"]] for s in (slices_a, slices_b))
    both = a.merge(b, on="patient_id", suffixes=("_a", "_b"))
    if both.empty:
        raise ValueError(f"the two runs share no patient ({len(a)} and {len(b)} patients): nothing to compare")
    differ = both.loc[both["label_a"] != both["label_b"], "patient_id"].tolist()
    if differ:
        raise ValueError(f"{len(differ)} shared patients have different labels in the two runs: {differ[:5]}")
    return {
        "n_patients_a": int(len(a)), "n_patients_b": int(len(b)), "n_shared": int(len(both)),
        "only_a": int(len(a) - len(both)), "only_b": int(len(b) - len(both)),
        "per_patient": {"n": int(len(both)),
                        **delong_paired(both["label_a"], both["probability_a"], both["probability_b"])},
        "per_slice": _paired_slices(slices_a, slices_b, both["patient_id"]),
    }


def _mean_sd(values: list[float | None]) -> dict[str, float | None]:
    v = np.array([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return {"mean": None, "sd": None, "n_folds": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None, "n_folds": int(len(v))}


def ci_methods(n_resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, str]:
    """How each 95 % CI was computed, for metrics.json's header and the report."""
    return {"auc_ci_method": AUC_CI_METHOD,
            "auc_cluster_ci_method": AUC_CLUSTER_CI_METHOD.format(n=n_resamples, seed=BOOTSTRAP_SEED),
            "rate_ci_method": RATE_CI_METHOD}


def summarize(oof: pd.DataFrame, threshold: float = 0.5, n_resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """metrics.json content from out-of-fold slice predictions.

    ``oof`` has one row per test slice: patient_id, fold, slice_index, probability, label.
    ``pooled`` is computed over all folds' predictions together (how the paper reports),
    ``folds`` per fold, ``fold_mean`` the mean and SD over folds of each statistic,
    ``aggregation`` the pooled patient aggregation rules against the paper's max.
    """
    per_fold = []
    for k, part in oof.groupby("fold", sort=True):
        per_fold.append({"fold": int(k), **level_metrics(part, threshold, n_resamples)})
    fold_mean = {
        level: {s: _mean_sd([f[level][s] for f in per_fold]) for s in STATS}
        for level in ("per_slice", "per_patient")
    }
    return {
        "threshold": threshold,
        "positive_class": "malignant (label 1); probability >= threshold is malignant",
        "patient_probability": "max over the patient's slices",
        **ci_methods(n_resamples),
        "auc_ci_level": 0.95,
        "pooled": level_metrics(oof, threshold, n_resamples),
        "folds": per_fold,
        "fold_mean": fold_mean,
        "aggregation": aggregation_rules(oof, threshold),
    }
