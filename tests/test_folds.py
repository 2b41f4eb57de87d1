"""Patient folds: disjoint parts, each patient tested once, stratified, seeded, reusable."""

from __future__ import annotations

import pandas as pd
import pytest

from vfx_ray.evaluation import folds


def cohort(n: int = 60, n_malignant: int = 40) -> pd.DataFrame:
    return pd.DataFrame(
        {"patient_id": [f"P{i:03d}" for i in range(n)], "label": [1] * n_malignant + [0] * (n - n_malignant)}
    )


def test_parts_disjoint_and_each_patient_tested_once():
    s = folds.make_splits(cohort(), n_folds=10, val_fraction=0.1, seed=0)
    assert len(s["folds"]) == 10
    tested = []
    for f in s["folds"]:
        tr, va, te = set(f["train"]), set(f["val"]), set(f["test"])
        assert not (tr & va) and not (tr & te) and not (va & te)
        assert tr | va | te == set(s["patients"])
        tested += f["test"]
    assert sorted(tested) == sorted(s["patients"])


def test_stratified_test_and_val():
    s = folds.make_splits(cohort(), n_folds=10, val_fraction=0.1, seed=0)
    for f in s["folds"]:
        assert sum(s["patients"][p] for p in f["test"]) == 4  # 40 malignant / 10 folds
        assert len(f["test"]) == 6
        val_labels = [s["patients"][p] for p in f["val"]]
        assert len(val_labels) == 5  # round(0.1 * 54)
        assert 0 in val_labels and 1 in val_labels


def test_seeded_and_order_independent():
    a = folds.make_splits(cohort(), 5, 0.1, seed=3)
    b = folds.make_splits(cohort().sample(frac=1.0, random_state=1), 5, 0.1, seed=3)
    c = folds.make_splits(cohort(), 5, 0.1, seed=4)
    assert a == b
    assert a["folds"] != c["folds"]


def test_json_roundtrip_and_cohort_check():
    s = folds.make_splits(cohort(), 5, 0.1, seed=0)
    back = folds.splits_from_json(folds.splits_to_json(s))
    assert back == s
    assert folds.same_cohort(back, cohort())
    assert not folds.same_cohort(back, cohort(n=61))


def test_patient_labels_from_slices():
    crops = pd.DataFrame({"patient_id": ["B", "A", "A", "B"], "label": [0, 1, 1, 0]})
    assert folds.patient_labels(crops).to_dict("list") == {"patient_id": ["A", "B"], "label": [1, 0]}
    with pytest.raises(ValueError, match="two different labels"):
        folds.patient_labels(pd.DataFrame({"patient_id": ["A", "A"], "label": [0, 1]}))


def test_errors_are_explicit():
    with pytest.raises(ValueError, match="at least 10 patients of each class"):
        folds.make_splits(cohort(20, 15), 10, 0.1, 0)
    broken = folds.make_splits(cohort(), 5, 0.1, 0)
    broken["folds"][0]["val"].append(broken["folds"][0]["test"][0])
    with pytest.raises(ValueError, match="two of train/val/test"):
        folds.check_splits(broken)
