"""Per-slice probabilities of one patient in the style of the paper's Fig. 3, with its crops.

The paper calls a patient malignant when the highest of its slices' probabilities reaches
the threshold: edge slices, diluted by partial volume, may stay below it without changing
the diagnosis. These plots show that rule at work for example true/false positives and
negatives, each slice's crop (the middle of its three channels) under its bar.
"""

from __future__ import annotations

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


def pick_examples(run: RunData, per_outcome: int = 2) -> dict[str, list[str]]:
    """Patient ids of the most confident examples of each outcome (the clearest cases and the
    most confidently wrong ones), ties broken by patient id so reports are reproducible."""
    patients = run.patients.assign(outcome=lambda p: outcomes(p, run.threshold))
    picked = {}
    for name in OUTCOMES:
        part = patients[patients["outcome"] == name]
        high_first = name in ("TP", "FP")
        part = part.sort_values(["probability", "patient_id"], ascending=[not high_first, True])
        picked[name] = part["patient_id"].head(per_outcome).tolist()
    return picked


def slice_probability_figure(run: RunData, patient_id: str,
                             crops: dict[tuple[str, int], np.ndarray] | None = None) -> Figure:
    """Bars of per-slice probability, threshold line, the maximum (the patient's) marked;
    the slices' crops below the bars when ``crops`` has them."""
    rows = run.slices[run.slices["patient_id"] == patient_id].sort_values("slice_index")
    if rows.empty:
        raise KeyError(f"patient {patient_id!r} is not in the run")
    ks, probs = rows["slice_index"].to_numpy(), rows["probability"].to_numpy()
    label = int(rows["label"].iloc[0])
    n, best = len(rows), int(np.argmax(probs))
    have = [(patient_id, int(k)) in (crops or {}) for k in ks]
    fig = Figure(figsize=(1.4 * n + 3.0, 5.2 if any(have) else 3.5), layout="constrained")
    grid = fig.add_gridspec(2 if any(have) else 1, n, height_ratios=[2.2, 1] if any(have) else None)
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
    for i, (k, ok) in enumerate(zip(ks, have, strict=True)):
        if not any(have):
            break
        cax = fig.add_subplot(grid[1, i])
        cax.set_axis_off()
        if ok:
            cax.imshow(crops[(patient_id, int(k))], cmap="gray", interpolation="nearest")
        else:
            cax.text(0.5, 0.5, "no crop", ha="center", va="center", transform=cax.transAxes)
    return fig
