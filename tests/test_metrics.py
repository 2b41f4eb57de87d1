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
from sklearn.metrics import roc_auc_score

from vfx_ray.evaluation import metrics

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


# ---------------------------------------------------------------- confidence intervals
def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson score interval written out: (p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n)."""
    p, z2 = k / n, Z95**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return centre - half, centre + half


def test_rates_carry_wilson_intervals_computed_by_hand():
    df = example()
    m = metrics.binary_metrics(df["label"], df["probability"], 0.5)
    # sensitivity 3/6: p = 1/2 is the centre; half-width 1.95996/1.64024 · √(1/24 + 3.84146/144) = 0.31238
    assert (m["sensitivity_ci_low"], m["sensitivity_ci_high"]) == pytest.approx((0.187616, 0.812384), abs=1e-6)
    assert (m["specificity_ci_low"], m["specificity_ci_high"]) == pytest.approx(wilson(3, 4), rel=1e-9)
    assert (m["accuracy_ci_low"], m["accuracy_ci_high"]) == pytest.approx((0.312674, 0.831820), abs=1e-6)
    patient = metrics.level_metrics(df)["per_patient"]  # sensitivity 2/3, specificity 1/2
    assert (patient["sensitivity_ci_low"], patient["sensitivity_ci_high"]) == pytest.approx(wilson(2, 3), rel=1e-9)
    assert patient["specificity_ci_low"] == pytest.approx(wilson(1, 2)[0], rel=1e-9)
    all_hit = metrics.binary_metrics(np.array([1, 1, 0]), np.array([0.9, 0.8, 0.1]))
    assert (all_hit["sensitivity_ci_low"], all_hit["sensitivity_ci_high"]) == pytest.approx((0.342380, 1.0), abs=1e-6)
    one_class = metrics.binary_metrics(np.array([1, 1]), np.array([0.7, 0.2]))
    assert one_class["specificity_ci_low"] is None and one_class["specificity_ci_high"] is None


# ---------------------------------------------------------------- paired DeLong
def brute_paired(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(difference, se, p) from every malignant-benign pair (O(m·n)), no ranks, no covariance matrix:
    Var(AUCa − AUCb) = Var(V10a − V10b)/m + Var(V01a − V01b)/n."""
    def components(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos, neg = s[y == 1], s[y == 0]
        psi = np.array([[1.0 if p > q else 0.5 if p == q else 0.0 for q in neg] for p in pos])
        return psi.mean(axis=1), psi.mean(axis=0)

    (a10, a01), (b10, b01) = components(a), components(b)
    diff = a10.mean() - b10.mean()
    se = math.sqrt(np.var(a10 - b10, ddof=1) / len(a10) + np.var(a01 - b01, ddof=1) / len(a01))
    return diff, se, math.erfc(abs(diff / se) / math.sqrt(2))


def test_paired_delong_equals_a_brute_force_computation():
    rng = np.random.default_rng(7)
    y = np.array([1] * 9 + [0] * 7)
    a = np.round(rng.uniform(0, 1, 16) + 0.3 * y, 1)  # rounded: ties within and across classes
    b = np.round(0.5 * a + rng.uniform(0, 0.6, 16), 1)
    t = metrics.delong_paired(y, a, b)
    diff, se, p = brute_paired(y, a, b)
    assert t["difference"] == pytest.approx(diff, rel=1e-12) and t["se"] == pytest.approx(se, rel=1e-12)
    assert t["p"] == pytest.approx(p, rel=1e-9) and t["z"] == pytest.approx(diff / se, rel=1e-12)
    assert t["auc_a"] == pytest.approx(metrics.roc_auc_delong(y, a)["auc"])
    assert t["difference_ci_low"] == pytest.approx(diff - Z95 * se, rel=1e-9)


def test_paired_delong_known_values():
    # A ranks both malignant cases above both benign (AUC 1). B: malignant 0.9, 0.1 vs benign
    # 0.8, 0.2: V10b = [1, 0], V01b = [1/2, 1/2], AUC 1/2. Var = Var([0, 1])/2 + 0 = 1/4, se 1/2,
    # z = (1 − 1/2)/(1/2) = 1, p = 2·(1 − Φ(1)) = erfc(1/√2).
    y = np.array([1, 1, 0, 0])
    t = metrics.delong_paired(y, np.array([0.9, 0.8, 0.1, 0.2]), np.array([0.9, 0.1, 0.8, 0.2]))
    assert (t["auc_a"], t["auc_b"], t["difference"], t["se"], t["z"]) == pytest.approx((1.0, 0.5, 0.5, 0.5, 1.0))
    assert t["p"] == pytest.approx(math.erfc(1 / math.sqrt(2)), rel=1e-12)
    same = metrics.delong_paired(y, np.array([0.9, 0.3, 0.4, 0.2]), np.array([0.9, 0.3, 0.4, 0.2]))
    assert (same["difference"], same["se"], same["p"]) == (0.0, 0.0, 1.0)
    assert metrics.delong_paired(np.array([1, 1]), np.array([0.1, 0.2]), np.array([0.3, 0.4]))["p"] is None


# ---------------------------------------------------------------- patient-level bootstrap of the per-slice AUC
def cohort(n: int = 24, seed: int = 3) -> pd.DataFrame:
    """One slice per patient: label and a noisy probability."""
    rng = np.random.default_rng(seed)
    label = (np.arange(n) % 2).astype(int)
    prob = np.clip(0.35 + 0.3 * label + rng.normal(0, 0.2, n), 0, 1)
    return pd.DataFrame({"patient_id": [f"P{i:02d}" for i in range(n)], "label": label, "probability": prob})


@pytest.mark.slow
def test_cluster_bootstrap_of_copied_slices_is_the_patient_bootstrap_and_wider_than_delong():
    patients = cohort()
    copies = patients.loc[patients.index.repeat(3)]  # every patient's 3 slices identical
    y, p, g = (copies[c].to_numpy() for c in ("label", "probability", "patient_id"))
    ci = metrics.auc_cluster_bootstrap(y, p, g)
    # the same seeded resamples of patients, each AUC by scikit-learn on one row per patient
    counts = metrics.resample_counts(len(patients), metrics.BOOTSTRAP_RESAMPLES, metrics.BOOTSTRAP_SEED)
    aucs = [roc_auc_score(patients["label"], patients["probability"], sample_weight=w) for w in counts
            if patients["label"][w > 0].nunique() == 2]
    low, high = np.quantile(aucs, [0.025, 0.975])
    assert (ci["auc_cluster_ci_low"], ci["auc_cluster_ci_high"]) == pytest.approx((low, high), abs=1e-12)
    one_slice = metrics.auc_cluster_bootstrap(patients["label"], patients["probability"], patients["patient_id"])
    assert one_slice == pytest.approx(ci, abs=1e-12)
    naive = metrics.binary_metrics(y, p)  # DeLong counts the 72 copies as 72 cases
    assert ci["auc_cluster_ci_high"] - ci["auc_cluster_ci_low"] > 1.3 * (naive["auc_ci_high"] - naive["auc_ci_low"])
    assert ci["auc_cluster_ci_low"] < naive["auc_ci_low"] and naive["auc_ci_high"] < 1.0


def test_cluster_bootstrap_aucs_are_weighted_aucs_and_deterministic(monkeypatch):
    rng = np.random.default_rng(5)
    slices = cohort(16).loc[lambda d: d.index.repeat(1 + d.index % 3)].reset_index(drop=True)
    slices["probability"] = np.round(slices["probability"] + rng.normal(0, 0.1, len(slices)), 1)  # ties
    y, p, g = (slices[c].to_numpy() for c in ("label", "probability", "patient_id"))
    counts = metrics.resample_counts(16, 50, seed=11)
    assert counts.shape == (50, 16) and (counts.sum(axis=1) == 16).all()
    got = metrics.cluster_bootstrap_aucs(y, p, g, counts)
    index = np.unique(g, return_inverse=True)[1]
    for r in range(10):  # a drawn patient's slices weigh as often as it was drawn
        w = counts[r][index]
        expected = roc_auc_score(y, p, sample_weight=w) if len(set(y[w > 0])) == 2 else np.nan
        assert got[r] == pytest.approx(expected, rel=1e-12, nan_ok=True)
    blocks = metrics.resample_blocks(16, 50, seed=11, block=7)  # the same resamples, 7 at a time
    assert np.array_equal(metrics.cluster_bootstrap_aucs(y, p, g, blocks), got, equal_nan=True)
    first = metrics.auc_cluster_bootstrap(y, p, g, n_resamples=300)
    assert metrics.auc_cluster_bootstrap(y, p, g, n_resamples=300) == first
    assert metrics.auc_cluster_bootstrap(y, p, g, n_resamples=300, seed=1) != first
    monkeypatch.setattr(metrics, "BOOTSTRAP_BLOCK_BYTES", 1)  # a resample at a time: the same interval
    assert metrics.auc_cluster_bootstrap(y, p, g, n_resamples=300) == first
    monkeypatch.undo()
    per_slice = metrics.level_metrics(slices)["per_slice"]
    assert per_slice["auc_cluster_ci_low"] == metrics.auc_cluster_bootstrap(y, p, g)["auc_cluster_ci_low"]


# ---------------------------------------------------------------- aggregation rules and run comparison
def test_per_patient_rules_mean_and_centre():
    df = example().assign(slice_index=[40, 41] * 5)
    df = pd.concat([df, pd.DataFrame([("A", 0, 1, 0.5, 39), ("A", 0, 1, 0.1, 42)], columns=df.columns)])
    # A: slices 39..42 = 0.5, 0.9, 0.3, 0.1 -> max 0.9, mean 0.45, centre (even: lower middle, 40) 0.9
    # B: 40, 41 = 0.6, 0.5 -> centre 0.6 (40)
    assert metrics.per_patient(df).equals(metrics.per_patient(df, "max"))
    mean = metrics.per_patient(df, "mean").set_index("patient_id")["probability"]
    assert mean["A"] == pytest.approx(0.45) and mean["C"] == pytest.approx(0.45)
    centre = metrics.per_patient(df, "centre").set_index("patient_id")
    assert centre["probability"].to_dict() == {"A": 0.9, "B": 0.6, "C": 0.2, "D": 0.4, "E": 0.45}
    assert centre.loc["A", "n_slices"] == 4
    three = pd.DataFrame({"patient_id": "X", "label": 1, "slice_index": [7, 5, 6], "probability": [0.1, 0.2, 0.3]})
    assert metrics.per_patient(three, "centre")["probability"].tolist() == [0.3]  # slice 6
    with pytest.raises(ValueError, match="slice_index"):
        metrics.per_patient(example(), "centre")
    with pytest.raises(ValueError, match="median"):
        metrics.per_patient(df, "median")


def test_summary_aggregation_section_tests_each_rule_against_max():
    rng = np.random.default_rng(2)
    n = 20
    slices = pd.DataFrame({"patient_id": np.repeat([f"P{i}" for i in range(n)], 3),
                           "fold": np.repeat(np.arange(n) % 2, 3), "label": np.repeat(np.arange(n) % 2, 3),
                           "slice_index": np.tile([10, 11, 12], n)})
    slices["probability"] = np.clip(0.3 + 0.3 * slices["label"] + rng.normal(0, 0.2, len(slices)), 0, 1)
    s = metrics.summarize(slices, 0.5, n_resamples=200)
    rules = s["aggregation"]["rules"]
    assert set(rules) == {"max", "mean", "centre"} and rules["max"]["p_vs_max"] is None
    g = slices.groupby("patient_id")
    y = g["label"].first().to_numpy()
    centre = g["probability"].agg(lambda s: s.to_numpy()[1])  # slices 10, 11, 12: the middle is 11
    for rule, prob in (("mean", g["probability"].mean()), ("centre", centre)):
        diff, _, p = brute_paired(y, prob.to_numpy(), g["probability"].max().to_numpy())
        assert rules[rule]["auc_difference_vs_max"] == pytest.approx(diff)
        assert rules[rule]["p_vs_max"] == pytest.approx(p)
    assert rules["max"]["auc"] == s["pooled"]["per_patient"]["auc"]
    assert rules["mean"]["sensitivity"] == pytest.approx(np.mean(g["probability"].mean()[y == 1] >= 0.5))
    assert "200 resamples" in s["auc_cluster_ci_method"] and s["pooled"]["per_slice"]["auc_cluster_ci_low"] is not None
    assert metrics.summarize(example())["aggregation"]["notes"]  # no slice_index: centre left out, said so


def test_compare_runs_on_shared_patients():
    a = example().assign(slice_index=[0, 1] * 5)
    b = a[a["patient_id"] != "E"].assign(probability=lambda d: d["probability"].iloc[::-1].to_numpy())
    b = pd.concat([b, pd.DataFrame({"patient_id": ["F"], "fold": [1], "label": [0], "probability": [0.3],
                                    "slice_index": [0]})])
    c = metrics.compare_runs(a, b)
    assert (c["n_patients_a"], c["n_patients_b"], c["n_shared"], c["only_a"], c["only_b"]) == (5, 5, 4, 1, 1)
    shared = ["A", "B", "C", "D"]
    pa, pb = (metrics.per_patient(s).set_index("patient_id").loc[shared] for s in (a, b))
    diff, se, p = brute_paired(pa["label"].to_numpy(), pa["probability"].to_numpy(), pb["probability"].to_numpy())
    assert c["per_patient"]["n"] == 4 and c["per_patient"]["difference"] == pytest.approx(diff)
    assert c["per_patient"]["p"] == pytest.approx(p)
    sa, sb = (s[s["patient_id"].isin(shared)].sort_values(["patient_id", "slice_index"]) for s in (a, b))
    assert c["per_slice"]["n"] == 8
    assert c["per_slice"]["p"] == pytest.approx(brute_paired(sa["label"].to_numpy(), sa["probability"].to_numpy(),
                                                             sb["probability"].to_numpy())[2])
    assert metrics.compare_runs(a, b.assign(slice_index=b["slice_index"] + 1))["per_slice"] is None
    with pytest.raises(ValueError, match="share no patient"):
        metrics.compare_runs(a, b.assign(patient_id="Z" + b["patient_id"]))
    with pytest.raises(ValueError, match="different labels"):
        metrics.compare_runs(a, b.assign(label=1 - b["label"]))
