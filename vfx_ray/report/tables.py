"""The report's tables: the paper's result figures beside ours, per fold, the patient
aggregation rules, a comparison with another run, and the paper's Table 1.

Tables are pandas DataFrames of display strings (plus numeric columns where a test wants
the number), so the HTML page, the Markdown file and a notebook show the same thing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import chi2_contingency, fisher_exact, ttest_ind, ttest_ind_from_stats
from scipy.stats.contingency import expected_freq

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
FISHER = "Fisher exact"  # a 2×2 table with an expected count below 5
# The CI of each level's AUC: per slice the patient-level bootstrap (slices of a patient are
# not independent, so DeLong per slice is too narrow), per patient DeLong.
AUC_CI = {"per_slice": "auc_cluster_ci", "per_patient": "auc_ci"}
RULE_NAMES = {"max": "Max (paper)", "mean": "Mean of slices", "centre": "Centre slice"}
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


def fmt_ci(m: dict[str, Any], prefix: str) -> str:
    """``low–high`` of ``prefix_low`` / ``prefix_high``; — when undefined."""
    low, high = m.get(f"{prefix}_low"), m.get(f"{prefix}_high")
    return "—" if low is None or high is None else f"{low:.3f}–{high:.3f}"


def fmt_auc(m: dict[str, Any], ci: str = "auc_ci") -> str:
    """AUC (low–high) with the CI named by ``ci`` (``auc_ci``: DeLong, ``auc_cluster_ci``: bootstrap)."""
    if m.get("auc") is None:
        return "—"
    if m.get(f"{ci}_low") is None:
        return fmt(m["auc"])
    return f"{m['auc']:.3f} ({fmt_ci(m, ci)})"


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
    """The paper's figures beside ours: sensitivity, specificity, accuracy (Wilson 95 % CI) and
    AUC (95 % CI: per slice the patient-level bootstrap, per patient DeLong)."""
    rows = []
    fold_mean = run.metrics.get("fold_mean")
    for level, name in LEVELS.items():
        ours = run.metrics["pooled"][level]
        for stat in ("sensitivity", "specificity", "accuracy", "auc"):
            row = {
                "Level": name,
                "Statistic": "ROC AUC" if stat == "auc" else stat.capitalize(),
                "Paper": fmt(run.paper.get(level, {}).get(stat), 2),
                "Ours, pooled": fmt(ours.get("auc")) if stat == "auc" else _with_counts(ours, stat),
                "Ours, 95 % CI": fmt_ci(ours, AUC_CI[level] if stat == "auc" else f"{stat}_ci"),
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
            row[f"{label} AUC (95 % CI)"] = fmt_auc(m[level], AUC_CI[level])
        rows.append(row)
    return pd.DataFrame(rows)


def _with_ci(m: dict[str, Any], stat: str) -> str:
    return "—" if m.get(stat) is None else f"{fmt(m[stat])} ({fmt_ci(m, f'{stat}_ci')})"


def aggregation_table(aggregation: dict[str, Any]) -> pd.DataFrame:
    """Per patient aggregation rule: AUC (DeLong CI), rates (Wilson CIs), paired DeLong against max."""
    rows = []
    for rule, r in aggregation["rules"].items():
        primary = rule == aggregation.get("primary", "max")
        rows.append({"Rule": RULE_NAMES.get(rule, rule), "Patients": r["n"], "AUC (95 % CI)": fmt_auc(r),
                     **{f"{s.capitalize()} (95 % CI)": _with_ci(r, s) for s in ABBREV},
                     "AUC − max": "—" if primary else fmt(r.get("auc_difference_vs_max")),
                     "p vs max (paired DeLong)": "—" if primary else fmt_p(r.get("p_vs_max"))})
    return pd.DataFrame(rows)


def _difference(t: dict[str, Any]) -> str:
    if t.get("difference") is None:
        return "—"
    if t.get("difference_ci_low") is None:
        return f"{t['difference']:+.3f}"
    return f"{t['difference']:+.3f} ({t['difference_ci_low']:+.3f} to {t['difference_ci_high']:+.3f})"


def comparison_table(comparison: dict[str, Any]) -> pd.DataFrame:
    """Run A against run B on their shared cases: both AUCs, A − B with its 95 % CI, paired DeLong p."""
    rows = []
    for level, name, unit in (("per_patient", "Per patient (max)", "patients"), ("per_slice", "Per slice", "slices")):
        t = comparison.get(level)
        if t is None:
            continue
        rows.append({"Level": name, "Shared cases": f"{t['n']} {unit}", "AUC A": fmt(t.get("auc_a")),
                     "AUC B": fmt(t.get("auc_b")), "Difference A − B (95 % CI)": _difference(t),
                     "p (paired DeLong)": fmt_p(t.get("p"))})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- Table 1
def chi2_p(table: np.ndarray) -> float | None:
    """χ² test p of a 2×2 table without Yates' correction (the paper's); None if undefined."""
    try:
        return float(chi2_contingency(np.asarray(table), correction=False)[1])
    except ValueError:  # a zero row or column: expected frequencies of 0
        return None


def two_by_two_p(table: np.ndarray) -> tuple[float | None, str]:
    """(p, test) of a 2×2 table: Fisher's exact test when an expected count is below 5, where the
    χ² approximation is poor (Cochran's rule); else χ² without Yates' correction (the paper's).
    (None, "—") when a row or column is empty: there is nothing to test."""
    t = np.asarray(table)
    if (t.sum(axis=0) == 0).any() or (t.sum(axis=1) == 0).any():
        return None, "—"
    if expected_freq(t).min() < 5:
        return float(fisher_exact(t).pvalue), FISHER
    return chi2_p(t), CHI2


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

    Columns: Parameter, Malignant, Benign, p (float), p value (text), Test (Welch t; χ², or
    Fisher's exact test for a 2×2 table with an expected count below 5), then the paper's
    figures with p recomputed from its published counts by the same rules. Rows exist only for
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
        rows.append(_counts_row("Gender (male/female)", f"{counts[0, 0]}/{counts[0, 1]}",
                                f"{counts[1, 0]}/{counts[1, 1]}", counts, paper,
                                f"{paper[0, 0]}/{paper[0, 1]}", f"{paper[1, 0]}/{paper[1, 1]}"))
    for feature in (f for f in FEATURES if f in present):
        f_m, f_b = (_flags(x[feature]).dropna() for x in (mal, ben))
        counts = np.array([[int(f_m.sum()), int(len(f_m) - f_m.sum())], [int(f_b.sum()), int(len(f_b) - f_b.sum())]])
        paper = np.array([[FEATURE_COUNTS[k][feature], PAPER_N[k] - FEATURE_COUNTS[k][feature]]
                          for k in ("malignant", "benign")])
        rows.append(_counts_row(FEATURE_NAMES[feature], _count(counts[0, 0], len(f_m)), _count(counts[1, 0], len(f_b)),
                                counts, paper, _count(paper[0, 0], PAPER_N["malignant"]),
                                _count(paper[1, 0], PAPER_N["benign"])))
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


def _counts_row(name: str, mal: str, ben: str, counts: np.ndarray, paper: np.ndarray, paper_mal: str,
                paper_ben: str) -> dict[str, Any]:
    """A 2×2 row; its Test says which test gave our p (and the paper's, where that differs)."""
    (p, test), (paper_p, paper_test) = two_by_two_p(counts), two_by_two_p(paper)
    shown = test if paper_test == test else f"{test} (paper: {paper_test})"
    return _row(name, mal, ben, p, shown, paper_mal, paper_ben, paper_p)


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
