"""Every metric against numbers worked out by hand on a fixed 5-patient, 10-slice example.

Patients (label; slice probabilities) and folds:
  A (1; 0.9, 0.3)  B (1; 0.6, 0.5)  C (0; 0.2, 0.7)   -> fold 0
  D (0; 0.4, 0.1)  E (1; 0.45, 0.2)                   -> fold 1
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from vfx_ray import metrics

Z95 = 1.959963984540054


def example() -> pd.DataFrame:
    rows = [
        ("A", 0, 1, 0.9), ("A", 0, 1, 0.3),
        ("B", 0, 1, 0.6), ("B", 0, 1, 0.5),
        ("C", 0, 0, 0.2), ("C", 0, 0, 0.7),
        ("D", 1, 0, 0.4), ("D", 1, 0, 0.1),
        ("E", 1, 1, 0.45), ("E", 1, 1, 0.2),
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["patient_id", "fold", "label", "probability"])


def test_per_slice_counts_and_rates():
    df = example()
    m = metrics.binary_metrics(df["label"], df["probability"], 0.5)
    # malignant slices 0.9 0.3 0.6 0.5 0.45 0.2: >= 0.5 are 0.9 0.6 0.5 (0.5 counts) -> TP 3, FN 3
    # benign slices 0.2 0.7 0.4 0.1: 0.7 -> FP 1, TN 3
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 3, 1, 3)
    assert m["confusion_matrix"] == [[3, 1], [3, 3]]
    assert m["sensitivity"] == pytest.approx(3 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(6 / 10)


def test_per_slice_auc_and_delong_ci():
    df = example()
    m = metrics.binary_metrics(df["label"], df["probability"])
    # pairs won by each malignant slice over the 4 benign (ties 1/2): 4, 2, 3, 3, 3, 1.5 = 16.5 / 24
    assert m["auc"] == pytest.approx(16.5 / 24)
    # DeLong: V10 = [1, .5, .75, .75, .75, .375], var(ddof=1) = 0.2421875 / 5
    #         V01 = [11/12, 1/6, 2/3, 1],            var(ddof=1) = 0.421875 / 3
    se = math.sqrt(0.2421875 / 5 / 6 + 0.421875 / 3 / 4)
    assert m["auc_se"] == pytest.approx(se)
    assert m["auc_ci_low"] == pytest.approx(16.5 / 24 - Z95 * se)  # 0.27999
    assert m["auc_ci_high"] == 1.0  # 1.0950 clipped


def test_per_patient_max_and_metrics():
    df = example()
    p = metrics.per_patient(df)
    assert dict(zip(p["patient_id"], p["probability"], strict=True)) == {
        "A": 0.9, "B": 0.6, "C": 0.7, "D": 0.4, "E": 0.45
    }  # fmt: skip
    m = metrics.level_metrics(df)["per_patient"]
    # A, B TP; E (0.45) FN; C (0.7) FP; D TN
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 1)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # malignant 0.9, 0.6, 0.45 vs benign 0.7, 0.4: wins 2 + 1 + 1 = 4 of 6
    assert m["auc"] == pytest.approx(4 / 6)
    # V10 = [1, .5, .5] var = 1/12; V01 = [1/3, 1] var = 2/9 -> var = 1/36 + 1/9 = 5/36
    assert m["auc_se"] == pytest.approx(math.sqrt(5 / 36))
    assert (m["auc_ci_low"], m["auc_ci_high"]) == (0.0, 1.0)  # 0.667 -+ 0.730, clipped


def test_summary_per_fold_pooled_and_undefined_values():
    s = metrics.summarize(example(), 0.5)
    assert s["pooled"]["per_slice"]["n"] == 10 and s["pooled"]["per_patient"]["n"] == 5
    f0, f1 = s["folds"]
    # fold 0 patients: A 0.9 TP, B 0.6 TP, C 0.7 FP -> sens 1, spec 0, acc 2/3
    assert (f0["per_patient"]["sensitivity"], f0["per_patient"]["specificity"]) == (1.0, 0.0)
    assert f0["per_patient"]["accuracy"] == pytest.approx(2 / 3)
    # fold 1 patients: D 0.4 TN, E 0.45 FN -> sens 0, spec 1, acc 1/2, AUC 1 (0.45 > 0.4), no CI
    p1 = f1["per_patient"]
    assert (p1["sensitivity"], p1["specificity"], p1["accuracy"], p1["auc"]) == (0.0, 1.0, 0.5, 1.0)
    assert p1["auc_ci_low"] is None
    assert s["fold_mean"]["per_patient"]["accuracy"]["mean"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    one_class = metrics.binary_metrics(np.array([1, 1]), np.array([0.7, 0.2]))
    assert one_class["specificity"] is None and one_class["auc"] is None
    assert one_class["sensitivity"] == 0.5
