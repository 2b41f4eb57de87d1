"""Table 1 of Li et al. 2021 reproduced by the cohort plan (no DICOM written here)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from vfx_ray.config import SynthConfig
from vfx_ray.paper import FEATURE_COUNTS, FEATURES, PAPER_N
from vfx_ray.synth.cohort import plan_cohort
from vfx_ray.synth.table1 import apportion, scaled_count


@pytest.fixture(scope="module")
def default_plan():
    return plan_cohort(SynthConfig())


def _counts(specs, label):
    rows = [s for s in specs if s.label == label]
    return len(rows), {f: sum(getattr(s.features, f) for s in rows) for f in FEATURES}


def _p_value(specs, feature):
    table = []
    for label in ("malignant", "benign"):
        n, counts = _counts(specs, label)
        table.append([counts[feature], n - counts[feature]])
    return chi2_contingency(np.array(table), correction=False).pvalue


def test_default_cohort_has_table1_counts_exactly(default_plan):
    assert len(default_plan) == 433
    assert [s.patient_id for s in default_plan[:2]] == ["VFX0001", "VFX0002"]
    for label in ("malignant", "benign"):
        n, counts = _counts(default_plan, label)
        assert n == PAPER_N[label]
        assert counts == FEATURE_COUNTS[label]
    males = {lab: sum(s.sex == "M" for s in default_plan if s.label == lab)
             for lab in ("malignant", "benign")}
    assert males == {"malignant": 170, "benign": 53}


def test_default_cohort_ages_match_table1(default_plan):
    for label, (mean, sd, lo, hi) in {"malignant": (57.8, 11.3, 27, 84),
                                      "benign": (62.8, 16.1, 14, 93)}.items():
        ages = np.array([s.age for s in default_plan if s.label == label])
        assert abs(ages.mean() - mean) < 0.05
        assert abs(ages.std(ddof=1) - sd) < 0.15
        assert (ages.min(), ages.max()) == (lo, hi)


def test_chi_square_p_values_match_the_paper(default_plan):
    p = {f: _p_value(default_plan, f) for f in FEATURES}
    for f in FEATURES:
        if f == "cortex_interruption":
            assert 0.0005 < p[f] <= 0.0015, p[f]  # the paper reports 0.001
            assert round(p[f], 3) == 0.001
        else:
            assert p[f] < 0.001, (f, p[f])


def test_features_are_shuffled_not_blocked(default_plan):
    """Exact counts are shuffled across patients: no feature sits in a contiguous block."""
    mal = [s for s in default_plan if s.label == "malignant"]
    flags = np.array([s.features.multiple_segments for s in mal])
    assert 0 < flags[:148].sum() < 148 and 0 < flags[148:].sum() < 148
    labels = np.array([s.label == "malignant" for s in default_plan])
    assert 0 < labels[:200].sum() < 200


@pytest.mark.parametrize("n", [10, 60, 200])
def test_smaller_cohorts_keep_the_proportions(n):
    specs = plan_cohort(SynthConfig(patients=n, seed=4))
    n_mal, _ = _counts(specs, "malignant")
    assert n_mal == round(n * 296 / 433)
    for label in ("malignant", "benign"):
        size, counts = _counts(specs, label)
        for f in FEATURES:
            expected = size * FEATURE_COUNTS[label][f] / PAPER_N[label]
            assert abs(counts[f] - expected) <= 0.5 + 1e-9, (label, f, counts[f], expected)
            assert counts[f] == scaled_count(FEATURE_COUNTS[label][f], PAPER_N[label], size)


def test_apportion_is_largest_remainder():
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(7, [296, 137]) == [5, 2]
    assert sum(apportion(433, [0.2, 0.3, 0.5])) == 433
    with pytest.raises(ValueError):
        apportion(3, [0, 0])


def test_plan_is_pure_and_seeded():
    a = plan_cohort(SynthConfig(patients=30, seed=1))
    assert a == plan_cohort(SynthConfig(patients=30, seed=1))
    b = plan_cohort(SynthConfig(patients=30, seed=2))
    assert [s.label for s in a] != [s.label for s in b]
    assert {s.seed for s in a}.isdisjoint({s.seed for s in b})


def test_plan_variety_options():
    specs = plan_cohort(SynthConfig(patients=40, patient_position="mixed", transfer_syntax="mixed",
                                    oblique_deg=12.0, enhanced=True, matrix=512))
    assert {s.patient_position for s in specs} == {"HFS", "FFS"}
    assert len({s.transfer_syntax for s in specs}) >= 4
    assert all(s.oblique_deg == 12.0 and s.enhanced and s.matrix == 512 for s in specs)
    assert all(0.6 <= s.pixel_spacing_mm <= 0.9 and 4 <= s.n_vertebrae <= 6 for s in specs)
    with pytest.raises(ValueError, match="patient_position"):
        plan_cohort(SynthConfig(patients=2, patient_position="PRONE"))
