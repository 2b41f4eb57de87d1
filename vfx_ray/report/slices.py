"""Per-slice probabilities of one patient in the style of the paper's Fig. 3, with its crops.

The paper calls a patient malignant when the highest of its slices' probabilities reaches
the threshold: edge slices, diluted by partial volume, may stay below it without changing
the diagnosis. These plots show that rule at work for example true/false positives and
negatives, each slice's crop (the middle of its three channels) under its bar and, when the
fold model is at hand, its Grad-CAM heatmap under the crop. The true-positive examples are
patients the rule rescued (a slice below the threshold, the maximum at or above it), and the
edge-vs-centre table and figure measure the partial-volume pattern over the whole run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from vfx_ray.report.inputs import RunData

OUTCOMES = {"TP": "true positive", "FP": "false positive", "TN": "true negative", "FN": "false negative"}


def outcomes(patients: pd.DataFrame, threshold: float) -> pd.Series:
    """TP/FP/TN/FN of each patient (label 1 malignant; probability >= threshold called malignant)."""
    called = patients["probability"] >= threshold
    truth = patients["label"] == 1
    return pd.Series(np.select([called & truth, called & ~truth, ~called & ~truth], ["TP", "FP", "TN"], "FN"),
                     index=patients.index)


def rescued(slices: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Malignant patients the max rule called right although a slice fell below the threshold
    (the paper's Fig. 3 point): patient_id, min, max, n (slices), below (slices under the
    threshold), lowest min first."""
    mal = slices[slices["label"] == 1]
    table = (mal.assign(below=mal["probability"] < threshold).groupby("patient_id")
             .agg(min=("probability", "min"), max=("probability", "max"), n=("probability", "size"),
                  below=("below", "sum")).reset_index())
    table = table[(table["max"] >= threshold) & (table["min"] < threshold)]
    return table.sort_values(["min", "patient_id"]).reset_index(drop=True)


def pick_examples(run: RunData, per_outcome: int = 2) -> dict[str, list[str]]:
    """Patient ids to show per outcome: true positives the max rule rescued (lowest slice
    first; the most confident true positives only when no patient was rescued), the clearest
    true negatives and the most confidently wrong false positives/negatives; ties broken by
    patient id so reports are reproducible."""
    patients = run.patients.assign(outcome=lambda p: outcomes(p, run.threshold))
    picked = {}
    for name in OUTCOMES:
        part = patients[patients["outcome"] == name]
        high_first = name in ("TP", "FP")
        part = part.sort_values(["probability", "patient_id"], ascending=[not high_first, True])
        picked[name] = part["patient_id"].head(per_outcome).tolist()
    saved = rescued(run.slices, run.threshold)["patient_id"].head(per_outcome).tolist()
    picked["TP"] = saved or picked["TP"]
    return picked


# ---------------------------------------------------------------- edge vs centre
def slice_positions(slices: pd.DataFrame) -> pd.DataFrame:
    """The slices with ``offset``: slice_index minus the middle of the patient's slice range (0
    the centre, ±1, ±2 …; ±0.5, ±1.5 … for an even count), and ``position``: ``edge`` (first or
    last of two or more), ``centre`` (|offset| ≤ 0.5: the middle slice, or the middle two), else
    ``inner``. Edges are where the paper sees partial volume lower the probability."""
    by = slices.groupby("patient_id")["slice_index"]
    low, high = by.transform("min"), by.transform("max")
    offset = slices["slice_index"] - (low + high) / 2
    edge = ((slices["slice_index"] == low) | (slices["slice_index"] == high)) & (high > low)
    position = np.select([edge, offset.abs() <= 0.5], ["edge", "centre"], "inner")
    return slices.assign(offset=offset.astype(float), position=position)


def edge_centre_table(slices: pd.DataFrame, classes: tuple[str, str] = ("benign", "malignant")) -> pd.DataFrame:
    """Per class (malignant first): patients, then slices (n) and their mean probability at the
    edges and at the centre, and centre − edge. NaN where a class has no such slice."""
    pos = slice_positions(slices)
    rows = []
    for label in (1, 0):
        part = pos[pos["label"] == label]
        edge, centre = (part.loc[part["position"] == where, "probability"] for where in ("edge", "centre"))
        rows.append({"Class": classes[label], "Patients": int(part["patient_id"].nunique()),
                     "Edge slices": len(edge), "Edge mean": float(edge.mean()) if len(edge) else np.nan,
                     "Centre slices": len(centre), "Centre mean": float(centre.mean()) if len(centre) else np.nan})
        rows[-1]["Centre − edge"] = rows[-1]["Centre mean"] - rows[-1]["Edge mean"]
    return pd.DataFrame(rows)


def position_figure(run: RunData) -> Figure:
    """Left: mean ± SD probability per offset from the ROI centre, per class; right: edge vs
    centre slices per class as box plots. The threshold is drawn on both."""
    pos = slice_positions(run.slices)
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax, box = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    groups, names = [], []
    for label, colour, dx in ((1, "tab:red", 0.06), (0, "tab:blue", -0.06)):
        part = pos[pos["label"] == label]
        if part.empty:
            continue
        stats = part.groupby("offset")["probability"].agg(["mean", "std", "size"]).reset_index()
        ax.errorbar(stats["offset"] + dx, stats["mean"], yerr=stats["std"].fillna(0), color=colour, marker="o",
                    capsize=3, lw=1.5, label=f"{run.classes[label]} ({part['patient_id'].nunique()} patients)")
        for where in ("edge", "centre"):
            groups.append(part.loc[part["position"] == where, "probability"].to_numpy())
            names.append(f"{run.classes[label]}\n{where}")
    ax.set(xlabel="Slices from the centre of the patient's ROI slices (0 = centre)",
           ylabel="Malignancy probability (mean ± SD)", ylim=(0, 1.02), title="Probability by slice position")
    keep = [i for i, g in enumerate(groups) if len(g)]
    box.boxplot([groups[i] for i in keep], tick_labels=[names[i] for i in keep])
    box.set(ylabel="Malignancy probability", ylim=(0, 1.02), title="Edge vs centre slices")
    for a in (ax, box):
        a.axhline(run.threshold, ls="--", color="grey", lw=1, label=f"threshold {run.threshold:g}")
    ax.legend(fontsize=8, loc="lower center")
    return fig


def slice_probability_figure(run: RunData, patient_id: str,
                             crops: dict[tuple[str, int], np.ndarray] | None = None,
                             heatmaps: dict[tuple[str, int], np.ndarray] | None = None) -> Figure:
    """Bars of per-slice probability, threshold line, the maximum (the patient's) marked;
    the slices' crops below the bars when ``crops`` has them, and below those the crops with
    their Grad-CAM heatmap (values in [0, 1]) overlaid when ``heatmaps`` has them."""
    rows = run.slices[run.slices["patient_id"] == patient_id].sort_values("slice_index")
    if rows.empty:
        raise KeyError(f"patient {patient_id!r} is not in the run")
    ks, probs = rows["slice_index"].to_numpy(), rows["probability"].to_numpy()
    label = int(rows["label"].iloc[0])
    n, best = len(rows), int(np.argmax(probs))
    keys = [(patient_id, int(k)) for k in ks]
    has_crop = bool(crops) and any(k in crops for k in keys)
    has_heat = has_crop and bool(heatmaps) and any(k in heatmaps for k in keys)
    extra = ([None] + ([heatmaps] if has_heat else [])) if has_crop else []  # rows below: crops, Grad-CAM
    fig = Figure(figsize=(1.4 * n + 3.0, 3.5 + 1.7 * len(extra)), layout="constrained")
    grid = fig.add_gridspec(1 + len(extra), n, height_ratios=[2.2] + [1] * len(extra))
    ax = fig.add_subplot(grid[0, :])
    x = np.arange(n)
    colours = ["tab:red" if p >= run.threshold else "tab:blue" for p in probs]
    ax.bar(x, probs, width=0.6, color=colours, alpha=0.75)
    ax.plot(x, probs, color="black", lw=1, marker="o", ms=4)
    ax.axhline(run.threshold, ls="--", color="grey", lw=1, label=f"threshold {run.threshold:g}")
    ax.plot(x[best], min(probs[best] + 0.06, 1.04), ls="none", marker="*", ms=14, color="gold", mec="black",
            label="maximum = patient")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.annotate(f"max {probs[best]:.2f}", (x[best], probs[best]), xytext=(0, -14), textcoords="offset points",
                ha="center", fontsize=9, fontweight="bold")
    outcome = outcomes(pd.DataFrame({"probability": [probs.max()], "label": [label]}), run.threshold).iloc[0]
    ax.set(xticks=x, xticklabels=[f"slice {k}" for k in ks], ylim=(0, 1.1), xlim=(-0.5, n - 0.5),
           ylabel="Malignancy probability")
    ax.set_title(f"{patient_id}: {run.classes[label]}, {OUTCOMES[outcome]} "
                 f"(patient probability = max = {probs[best]:.2f})", fontsize=10)
    for row, heat in enumerate(extra, start=1):
        _crop_row(fig, grid, row, keys, crops, heat)
    return fig


def _crop_row(fig: Figure, grid: Any, row: int, keys: list[tuple[str, int]],
              crops: dict[tuple[str, int], np.ndarray], heat: dict[tuple[str, int], np.ndarray] | None) -> None:
    """One row of crops under the bars; with ``heat``, each crop's Grad-CAM blended over it
    (jet colour map, alpha 0.45), so the plain crop stays readable in the row above."""
    for i, key in enumerate(keys):
        cax = fig.add_subplot(grid[row, i])
        cax.set_axis_off()
        if key in crops and (heat is None or key in heat):
            cax.imshow(crops[key], cmap="gray", interpolation="nearest")
            if heat is not None:
                cax.imshow(heat[key], cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0, interpolation="bilinear")
        else:
            cax.text(0.5, 0.5, "no crop" if heat is None else "no Grad-CAM", ha="center", va="center",
                     transform=cax.transAxes, fontsize=8)
        if i == 0:
            cax.set_title("crop" if heat is None else "Grad-CAM (layer4)", fontsize=8, loc="left")
