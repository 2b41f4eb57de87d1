"""Li et al., Eur Radiol 2021: the numbers this project reproduces or compares itself with.

One home for them: ``config`` takes the cohort size from here, ``synth`` allocates Table 1,
``cv`` and the report set their results beside the paper's. Constants only, no imports.
"""

from __future__ import annotations

# Table 1: patients per class.
PAPER_N = {"malignant": 296, "benign": 137}
SLICE_THICKNESS_MM = 3.0  # the sagittal slices the crops come from
PATIENTS = sum(PAPER_N.values())  # 433
MALIGNANT_FRACTION = PAPER_N["malignant"] / PATIENTS  # 296 / 433
FEATURES = (
    "compression",
    "cortex_interruption",
    "soft_tissue_mass",
    "transverse_fracture_line",
    "multiple_segments",
    "bone_destruction",
)
# Table 1: patients with each feature present, per class.
FEATURE_COUNTS = {
    "malignant": {"compression": 250, "cortex_interruption": 290, "soft_tissue_mass": 276,
                  "transverse_fracture_line": 3, "multiple_segments": 161, "bone_destruction": 294},
    "benign": {"compression": 133, "cortex_interruption": 125, "soft_tissue_mass": 2,
               "transverse_fracture_line": 109, "multiple_segments": 30, "bone_destruction": 1},
}
MALE_COUNTS = {"malignant": 170, "benign": 53}
# (mean, sd, min, max) of age in years.
AGE = {"malignant": (57.8, 11.3, 27, 84), "benign": (62.8, 16.1, 14, 93)}

# Test-set results of the paper's ResNet50 (per slice and per patient, the max over slices).
RESULTS = {
    "per_slice": {"sensitivity": 0.90, "specificity": 0.79, "accuracy": 0.85},
    "per_patient": {"sensitivity": 0.95, "specificity": 0.80, "accuracy": 0.88},
}
