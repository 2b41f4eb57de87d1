"""Figures of how well the probabilities separate, per slice and per patient.

ROC curves (pooled and per fold), confusion matrices, calibration and a decision curve.
Each function returns a ``matplotlib.figure.Figure`` built without pyplot, so rendering
touches no global state (safe in notebooks, threads and headless jobs).
"""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import ConfusionMatrixDisplay, roc_curve

from vfx_ray.report.inputs import RunData
from vfx_ray.report.tables import LEVELS, fmt_auc

COLORS = {"per_slice": "tab:blue", "per_patient": "tab:red"}


def level_frames(run: RunData) -> dict[str, pd.DataFrame]:
    """label/probability (and fold) per slice and per patient."""
    return {"per_slice": run.slices, "per_patient": run.patients}


def _both_classes(frame: pd.DataFrame) -> bool:
    return frame["label"].nunique() == 2


def roc_figure(run: RunData) -> Figure:
    """Left: pooled ROC per slice and per patient; right: each fold's per-patient ROC."""
    folds = run.folds
    fig = Figure(figsize=(11 if folds else 5.5, 5), layout="constrained")
    axes = fig.subplots(1, 2 if folds else 1, squeeze=False)[0]
    for level, frame in level_frames(run).items():
        if _both_classes(frame):
            fpr, tpr, _ = roc_curve(frame["label"], frame["probability"])
            auc = fmt_auc(run.metrics["pooled"][level])
            axes[0].plot(fpr, tpr, color=COLORS[level], lw=2, label=f"{LEVELS[level]}: AUC {auc}")
    axes[0].set_title("Pooled out-of-fold predictions" if folds else "All scored patients")
    if folds:
        patients = run.patients
        by_fold = {f["fold"]: f for f in run.metrics.get("folds", [])}
        for k in folds:
            part = patients[patients["fold"] == k]
            if _both_classes(part):
                fpr, tpr, _ = roc_curve(part["label"], part["probability"])
                auc = by_fold.get(k, {}).get("per_patient", {}).get("auc")
                axes[1].plot(fpr, tpr, lw=1, alpha=0.8, label=f"fold {k}" + (f": {auc:.2f}" if auc is not None else ""))
        axes[1].set_title("Per patient, each fold")
    for ax in axes:
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        ax.set(xlabel="1 − specificity (false-positive rate)", ylabel="Sensitivity (true-positive rate)",
               xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal")
        ax.legend(loc="lower right", fontsize=8)
    return fig


def confusion_figure(run: RunData) -> Figure:
    """Pooled confusion matrices (rows: truth, columns: prediction at the threshold)."""
    fig = Figure(figsize=(9, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (level, name) in zip(axes, LEVELS.items(), strict=True):
        cm = np.array(run.metrics["pooled"][level]["confusion_matrix"])
        ConfusionMatrixDisplay(cm, display_labels=list(run.classes)).plot(ax=ax, cmap="Blues", colorbar=False)
        ax.set_title(f"{name} (threshold {run.threshold:g})")
    return fig


MAX_BIAS = ("A patient's probability is the maximum over its slices: the largest of several noisy "
            "probabilities exceeds what each of them expects, so the per-patient curve is biased upward "
            "(over-confident) even when each slice is calibrated.")


def calibration_figure(run: RunData, n_bins: int = 10) -> Figure:
    """Reliability diagram (observed malignant fraction per probability bin) of the per-patient
    maximum beside the per-slice probabilities, with the maximum's upward bias stated on the
    plot; the histograms show where the probabilities lie."""
    fig = Figure(figsize=(11, 5), layout="constrained")
    ax, hist = fig.subplots(1, 2)
    for level, frame in level_frames(run).items():
        observed, predicted = calibration_curve(frame["label"], frame["probability"], n_bins=n_bins, strategy="uniform")
        name = "Per patient (max over slices)" if level == "per_patient" else LEVELS[level]
        ax.plot(predicted, observed, marker="o", color=COLORS[level],
                label=f"{name}: mean p {frame['probability'].mean():.2f}, observed {frame['label'].mean():.2f}")
        hist.hist(frame["probability"], bins=np.linspace(0, 1, n_bins + 1), histtype="step", lw=2,
                  color=COLORS[level], label=name, density=True)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfectly calibrated")
    ax.set(xlabel="Mean predicted probability", ylabel="Observed fraction malignant", xlim=(0, 1), ylim=(0, 1),
           title=f"Calibration ({n_bins} equal-width bins)")
    fig.suptitle(textwrap.fill("Caveat: " + MAX_BIAS, 150), fontsize=9, color="#8a5a00", ha="center")
    hist.axvline(run.threshold, ls="--", color="black", lw=1, label="threshold")
    hist.set(xlabel="Predicted probability", ylabel="Density", title="Distribution of probabilities", xlim=(0, 1))
    ax.legend(fontsize=8, loc="lower right")
    hist.legend(fontsize=8)
    return fig


def net_benefit(y: np.ndarray, prob: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Decision-curve net benefit TP/n − FP/n · pt/(1 − pt) at each threshold pt (Vickers 2006)."""
    y = np.asarray(y).astype(bool)
    called = np.asarray(prob)[None, :] >= thresholds[:, None]
    tp = (called & y).sum(axis=1)
    fp = (called & ~y).sum(axis=1)
    return tp / len(y) - fp / len(y) * thresholds / (1 - thresholds)


def treat_all(prevalence: float, thresholds: np.ndarray) -> np.ndarray:
    """Net benefit of calling every case malignant: prev − (1 − prev) · pt/(1 − pt)."""
    pt = np.asarray(thresholds, float)
    return prevalence - (1 - prevalence) * pt / (1 - pt)


def decision_curve_figure(run: RunData, thresholds: np.ndarray | None = None) -> Figure:
    """Net benefit of acting on the model vs treating all or none, per patient and per slice;
    each level against its own treat-all line (its own prevalence: slices are not patients)."""
    pt = np.linspace(0.01, 0.99, 99) if thresholds is None else np.asarray(thresholds, float)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    top = 0.05
    for level, frame in level_frames(run).items():
        prevalence = float(frame["label"].mean())
        top = max(top, prevalence)
        ax.plot(pt, net_benefit(frame["label"], frame["probability"], pt), color=COLORS[level], lw=2,
                label=f"model, {LEVELS[level].lower()}")
        ax.plot(pt, treat_all(prevalence, pt), color=COLORS[level], lw=1.2, ls="--", alpha=0.8,
                label=f"treat all, {LEVELS[level].lower()} (prevalence {prevalence:.2f})")
    ax.axhline(0, color="black", lw=1, label="treat none")
    ax.axvline(run.threshold, ls=":", color="black", lw=0.8)
    ax.set(xlabel="Threshold probability", ylabel="Net benefit", xlim=(0, 1), ylim=(-0.05, top + 0.05),
           title="Decision curve")
    ax.legend(fontsize=8)
    return fig
