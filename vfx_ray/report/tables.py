"""The report's tables: the paper's result figures beside ours, per fold, and its Table 1.

Tables are pandas DataFrames of display strings (plus numeric columns where a test wants
the number), so the HTML page, the Markdown file and a notebook show the same thing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import chi2_contingency, ttest_ind, ttest_ind_from_stats

from vfx_ray.paper import AGE, FEATURE_COUNTS, FEATURES, MALE_COUNTS, PAPER_N
from vfx_ray.report.inputs import RunData

LEVELS = {"per_slice": "Per slice", "per_patient": "Per patient"}
FEATURE_NAMES = {
    "compression": "Vertebral compression",
    "cortex_interruption": "Bone cortex interruption",
    "soft_tissue_mass": "Paravertebral soft tissue mass",
    "transverse_fracture_line": "Transverse fracture line",
    "multiple_segments": "Multiple segments",
    "bone_destruction": "Bone destruction",
}
ABBREV = {"sensitivity": "sens.", "specificity": "spec.", "accuracy": "acc."}
COHORT_COLUMNS = ("age", "sex", *FEATURES)
CHI2 = "χ²"  # Pearson χ² via chi2_contingency(correction=False): no Yates correction
WELCH = "Welch t"
_TRUE = {"1", "1.0", "true", "yes", "y", "present"}
_FALSE = {"0", "0.0", "false", "no", "n", "absent"}


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def fmt_p(p: float | None) -> str:
    """p as the paper prints it: ``< 0.001`` or three decimals."""
    if p is None or math.isnan(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def fmt_auc(m: dict[str, Any]) -> str:
    if m.get("auc") is None:
        return "—"
    if m.get("auc_ci_low") is None:
        return fmt(m["auc"])
    return f"{m['auc']:.3f} ({m['auc_ci_low']:.3f}–{m['auc_ci_high']:.3f})"


def _with_counts(m: dict[str, Any], stat: str) -> str:
    num, den = {"sensitivity": ("tp", "n_malignant"), "specificity": ("tn", "n_benign"),
                "accuracy": (None, "n")}[stat]
    hits = m["tp"] + m["tn"] if num is None else m[num]
    return f"{fmt(m.get(stat))} ({hits}/{m[den]})"


def _mean_sd(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None:
        return "—"
    sd = entry.get("sd")
    return fmt(entry["mean"]) + ("" if sd is None else f" ± {sd:.3f}")


def results_table(run: RunData) -> pd.DataFrame:
    """The paper's figures beside ours: sensitivity, specificity, accuracy, AUC (95 % CI)."""
    rows = []
    fold_mean = run.metrics.get("fold_mean")
    for level, name in LEVELS.items():
        ours = run.metrics["pooled"][level]
        for stat in ("sensitivity", "specificity", "accuracy", "auc"):
            row = {
                "Level": name,
                "Statistic": "ROC AUC (95 % CI)" if stat == "auc" else stat.capitalize(),
                "Paper": fmt(run.paper.get(level, {}).get(stat), 2),
                "Ours, pooled": fmt_auc(ours) if stat == "auc" else _with_counts(ours, stat),
            }
            if fold_mean:
                row["Ours, fold mean ± SD"] = _mean_sd(fold_mean[level].get(stat))
            rows.append(row)
    return pd.DataFrame(rows)


def fold_table(run: RunData) -> pd.DataFrame:
    """One row per fold (and the pooled row): sizes and each statistic at both levels."""
    entries = [(str(f["fold"]), f) for f in run.metrics.get("folds", [])] + [("pooled", run.metrics["pooled"])]
    rows = []
    for name, m in entries:
        row = {"Fold": name, "Patients": m["per_patient"]["n"], "Slices": m["per_slice"]["n"]}
        for level, label in LEVELS.items():
            for stat in ("sensitivity", "specificity", "accuracy"):
                row[f"{label} {ABBREV[stat]}"] = fmt(m[level].get(stat))
            row[f"{label} AUC (95 % CI)"] = fmt_auc(m[level])
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- Table 1
def chi2_p(table: np.ndarray) -> float | None:
    """χ² test p of a 2×2 table without Yates' correction (the paper's); None if undefined."""
    try:
        return float(chi2_contingency(np.asarray(table), correction=False)[1])
    except ValueError:  # a zero row or column: expected frequencies of 0
        return None


def _flags(values: pd.Series) -> pd.Series:
    """0/1, booleans or yes/no words as 1.0/0.0, anything else NaN."""
    if values.dtype == object:
        text = values.astype(str).str.strip().str.lower()
        return text.map(lambda t: 1.0 if t in _TRUE else 0.0 if t in _FALSE else np.nan)
    return pd.to_numeric(values, errors="coerce").astype(float).where(lambda v: v.isna() | (v == 0) | (v == 1))


def _sex(values: pd.Series) -> pd.Series:
    first = values.astype(str).str.strip().str.upper().str[:1]
    return first.where(first.isin(["M", "F"]))


def _count(present: int, n: int) -> str:
    return f"{present} ({100 * present / n:.1f}%)" if n else "0"


def cohort_table(cohort: pd.DataFrame) -> pd.DataFrame | None:
    """Paper Table 1 for a cohort (one row per patient, ``label`` 1 malignant / 0 benign).

    Columns: Parameter, Malignant, Benign, p (float), p value (text), Test, then the paper's
    figures with p recomputed from its published counts by the same tests. Rows exist only for
    the columns the annotations carry; None when they carry none of them.
    """
    present = [c for c in COHORT_COLUMNS if c in cohort.columns]
    if not present:
        return None
    mal, ben = cohort[cohort["label"] == 1], cohort[cohort["label"] == 0]
    rows = []
    if "age" in present:
        a, b = (pd.to_numeric(x["age"], errors="coerce").dropna() for x in (mal, ben))
        p = float(ttest_ind(a, b, equal_var=False).pvalue) if min(len(a), len(b)) >= 2 else None
        paper_p = float(ttest_ind_from_stats(*AGE["malignant"][:2], PAPER_N["malignant"],
                                             *AGE["benign"][:2], PAPER_N["benign"], equal_var=False).pvalue)
        rows.append(_row("Age (years)", _age(a), _age(b), p, WELCH,
                         "{} ± {}".format(*AGE["malignant"][:2]), "{} ± {}".format(*AGE["benign"][:2]), paper_p))
    if "sex" in present:
        s_m, s_b = _sex(mal["sex"]), _sex(ben["sex"])
        counts = np.array([[(s_m == "M").sum(), (s_m == "F").sum()], [(s_b == "M").sum(), (s_b == "F").sum()]])
        paper = np.array([[MALE_COUNTS[k], PAPER_N[k] - MALE_COUNTS[k]] for k in ("malignant", "benign")])
        rows.append(
            _row(
                "Gender (male/female)",
                f"{counts[0, 0]}/{counts[0, 1]}",
                f"{counts[1, 0]}/{counts[1, 1]}",
                chi2_p(counts),
                CHI2,
                f"{paper[0, 0]}/{paper[0, 1]}",
                f"{paper[1, 0]}/{paper[1, 1]}",
                chi2_p(paper),
            )
        )
    for feature in (f for f in FEATURES if f in present):
        f_m, f_b = (_flags(x[feature]).dropna() for x in (mal, ben))
        counts = np.array([[int(f_m.sum()), int(len(f_m) - f_m.sum())], [int(f_b.sum()), int(len(f_b) - f_b.sum())]])
        paper = np.array([[FEATURE_COUNTS[k][feature], PAPER_N[k] - FEATURE_COUNTS[k][feature]]
                          for k in ("malignant", "benign")])
        rows.append(_row(FEATURE_NAMES[feature], _count(counts[0, 0], len(f_m)), _count(counts[1, 0], len(f_b)),
                         chi2_p(counts), CHI2, _count(paper[0, 0], PAPER_N["malignant"]),
                         _count(paper[1, 0], PAPER_N["benign"]), chi2_p(paper)))
    table = pd.DataFrame(rows)
    return table.rename(columns={"Malignant": f"Malignant (N = {len(mal)})", "Benign": f"Benign (N = {len(ben)})"})


def _age(values: pd.Series) -> str:
    if len(values) == 0:
        return "—"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}" if len(values) > 1 else f"{values.mean():.1f}"


def _row(name: str, mal: str, ben: str, p: float | None, test: str, paper_mal: str, paper_ben: str,
         paper_p: float | None) -> dict[str, Any]:
    return {"Parameter": name, "Malignant": mal, "Benign": ben, "p": p, "p value": fmt_p(p), "Test": test,
            f"Paper malignant (N = {PAPER_N['malignant']})": paper_mal,
            f"Paper benign (N = {PAPER_N['benign']})": paper_ben, "Paper p": fmt_p(paper_p)}


def cohort_frame(run: RunData, annotations: pd.DataFrame) -> pd.DataFrame:
    """The run's patients (their labels as trained/scored) joined to their annotation columns."""
    labels = run.patients[["patient_id", "label"]]
    extra = [c for c in COHORT_COLUMNS if c in annotations.columns]
    return labels.merge(annotations[["patient_id", *extra]].drop_duplicates("patient_id"), on="patient_id", how="inner")


# ---------------------------------------------------------------- Markdown
def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency for a few rows)."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])
