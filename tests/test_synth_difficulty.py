"""The synthetic cohort's difficulty (issue 17): no shortcuts, and each setting does what it says."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from vfx_ray.config import EASY, CropConfig, SynthConfig, difficulty
from vfx_ray.imaging.geometry import select_slices, slice_x
from vfx_ray.imaging.roi import RoiBox
from vfx_ray.synth.anatomy import lateral_weight
from vfx_ray.synth.cohort import plan_cohort
from vfx_ray.synth.mimics import RATES
from vfx_ray.synth.patient import make_patient, patient_model
from vfx_ray.synth.shortcuts import shortcut_auc, shortcut_features
from vfx_ray.synth.table1 import Features
from vfx_ray.synth.texture import correlated_noise, plan_texture, trabecular

PAPER = plan_cohort(SynthConfig())  # the default cohort: 433 patients, seed 0


@pytest.fixture(scope="module")
def models():
    return [(s, patient_model(s)) for s in PAPER]


def test_the_default_cohort_is_the_paper_preset_and_table_1_is_unchanged():
    easy = plan_cohort(SynthConfig(difficulty=EASY))
    assert SynthConfig().difficulty == difficulty("paper")
    assert [(s.label, s.features, s.age, s.sex, s.seed) for s in PAPER] == \
        [(s.label, s.features, s.age, s.sex, s.seed) for s in easy]


def test_roi_boxes_are_drawn_alike_for_both_classes(models):
    """The easy cohort's box side gave the label away (AUC 0.97); the shared rule's must not."""
    from sklearn.metrics import roc_auc_score

    side = np.array([max(m.box[3] - m.box[2], m.box[5] - m.box[4]) for _, m in models])
    y = np.array([s.label == "malignant" for s, _ in models])
    assert abs(roc_auc_score(y, side) - 0.5) < 0.08
    easy = [patient_model(replace(s, difficulty=EASY)) for s, _ in models[:120]]
    side_easy = np.array([max(m.box[3] - m.box[2], m.box[5] - m.box[4]) for m in easy])
    assert roc_auc_score(y[:120], side_easy) > 0.9  # the check sees a shortcut where there is one


@pytest.mark.slow
def test_no_shortcut_in_box_geometry_or_crop_intensity_statistics():
    """Logistic regression on box side/volume/slices and per-channel crop mean and SD (HU),
    10-fold cross-validated, one row per patient: AUC <= 0.65 on the default cohort."""
    with ProcessPoolExecutor(2) as pool:
        features = pd.DataFrame(list(pool.map(shortcut_features, PAPER, chunksize=8)))
    assert len(features) == 433
    assert shortcut_auc(features) <= 0.65
    easy = plan_cohort(SynthConfig(patients=80, difficulty=EASY))
    with ProcessPoolExecutor(2) as pool:
        control = pd.DataFrame(list(pool.map(shortcut_features, easy, chunksize=8)))
    assert shortcut_auc(control, folds=5) > 0.9  # the same check catches the easy cohort's shortcut


def test_edge_slices_carry_less_lesion_than_centre_slices(models):
    """The lesion is narrower than the ROI: its lateral weight at the box's edge slices is lower."""
    cfg, lower = CropConfig(), 0
    for _, m in models:
        les = m.lesion
        assert m.box[0] < les.x_min and m.box[1] > les.x_max
        ks = select_slices(RoiBox(*m.box), cfg)
        w = lateral_weight(slice_x(ks, cfg.sagittal_thickness_mm), les.x_min, les.x_max, les.taper_mm)
        lower += bool(min(w[0], w[-1]) < w[len(w) // 2])
    assert lower / len(models) > 0.9


def test_conspicuity_scales_every_lesion_feature():
    """HU change of the lesion (HU with features minus HU without) is proportional to contrast."""
    spec = replace(PAPER[0], features=Features(bone_destruction=True, soft_tissue_mass=True))  # disjoint
    changes = []
    for c in (0.25, 0.5, 1.0):
        d = replace(spec.difficulty, conspicuity=c, mimic_rate=0.0, trabecular_hu=0.0)
        model = patient_model(replace(spec, difficulty=d))
        x, y, z = _grid_around(model)
        bare = replace(model.lesion, features=Features())
        base = replace(model, lesion=bare).hu_at(x, y, z)
        changes.append(np.abs(model.hu_at(x, y, z) - base).sum() / model.lesion.contrast)
    assert changes[0] > 0 and np.allclose(changes, changes[0], rtol=1e-3)


def _grid_around(model):
    x0, x1, y0, y1, z0, z1 = model.box
    g = np.meshgrid(np.linspace(x0, x1, 9), np.linspace(y0, y1, 40), np.linspace(z0, z1, 40), indexing="ij")
    return tuple(a.astype(np.float32) for a in g)


def test_osteoporotic_bone_is_as_common_per_class_as_the_preset_says(models):
    d = difficulty("paper")
    low = {label: np.mean([m.spine.hu_cancellous <= d.osteoporotic_hu[1] for s, m in models if s.label == label])
           for label in ("benign", "malignant")}
    assert low["benign"] == pytest.approx(d.osteoporotic_benign, abs=0.08)
    assert low["malignant"] == pytest.approx(d.osteoporotic_malignant, abs=0.08)


def test_class_specific_mimics_appear_only_in_their_class(models):
    haematoma = [s.label for s, m in models if m.extras.haematoma is not None]
    impaction = [s.label for s, m in models if m.extras.impaction is not None]
    sclerotic = [s.label for s, m in models
                 if s.label == "malignant" and m.lesion.destruction == "blastic" and m.lesion.dest_hu < 800]
    assert haematoma and set(haematoma) == {"benign"}
    assert impaction and set(impaction) == {"benign"}
    assert sclerotic  # subtle sclerotic metastases without a mass
    # mimics of either class are drawn whatever the class
    bone_islands = pd.Series({s.label: 0 for s, _ in models})
    for s, m in models:
        bone_islands[s.label] += m.extras.bone_island is not None
    n = pd.Series([s.label for s, _ in models]).value_counts()
    rate = RATES["bone_island"] * difficulty("paper").mimic_rate
    assert (bone_islands / n).between(rate - 0.06, rate + 0.06).all()
    none = patient_model(replace(PAPER[0], difficulty=replace(PAPER[0].difficulty, mimic_rate=0.0)))
    assert none.extras is None


def test_trabecular_texture_has_the_sd_asked_for():
    waves = plan_texture(np.random.default_rng(1))
    rng = np.random.default_rng(2)
    x, y, z = (rng.uniform(-200, 200, 20000).astype(np.float32) for _ in range(3))
    t = trabecular(x, y, z, waves, 30.0)
    assert abs(t.mean()) < 1.5 and t.std() == pytest.approx(30.0, rel=0.1)


def test_correlated_noise_sd_and_correlation_match_a_gaussian_kernel():
    """Filtered white noise: lag-1 correlation exp(-1 / (4 sigma^2)) with sigma in pixels."""
    noise = correlated_noise(np.random.default_rng(3), (4, 256, 256), 40.0, corr_mm=0.6, pixel_mm=0.7)
    assert noise.std() == pytest.approx(40.0, rel=0.02)
    sigma = 0.6 / 0.7
    lag1 = np.corrcoef(noise[:, :, :-1].ravel(), noise[:, :, 1:].ravel())[0, 1]
    assert lag1 == pytest.approx(np.exp(-1 / (4 * sigma**2)), abs=0.03)
    white = correlated_noise(np.random.default_rng(3), (2, 128, 128), 10.0, corr_mm=0.0, pixel_mm=0.7)
    assert abs(np.corrcoef(white[:, :, :-1].ravel(), white[:, :, 1:].ravel())[0, 1]) < 0.03


def test_the_paper_preset_renders_a_patient_in_the_volume():
    spec = replace(PAPER[1], matrix=128, pixel_spacing_mm=0.9)
    hu, geometry, row = make_patient(spec)
    assert hu.shape[1:] == (128, 128) and np.isfinite(hu).all()
    assert row["roi_x_min_mm"] < row["roi_x_max_mm"] and row["label"] == spec.label
