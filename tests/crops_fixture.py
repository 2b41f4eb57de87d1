"""A tiny synthetic crops table with a class-dependent pattern a CNN learns in an epoch or two.

Malignant crops carry a bright blob (soft-tissue mass / destruction), benign crops a dark
horizontal band (transverse fracture line). Each patient has ``slices`` consecutive slices.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from vfx_ray import contracts


def crop_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (3, size, size) z-scored-ish crop whose pattern depends on the label."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = rng.normal(0.0, 0.5, (3, size, size)).astype(np.float32)
    cy, cx = 0.5 + rng.uniform(-0.1, 0.1, 2)
    if label == 1:
        img += 2.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
    else:
        img -= 2.0 * (np.abs(yy - cy) < 0.08)
    return img.astype(np.float32)


def make_crops(
    n_patients: int = 24,
    slices: int = 3,
    size: int = 32,
    seed: int = 0,
    malignant_every: int = 2,
) -> pa.Table:
    """Crops for ``n_patients`` (every ``malignant_every``-th patient benign... see below).

    Patient i is malignant unless ``i % malignant_every == 0``; with the default 2 the cohort
    is balanced. Patient ids are ``P000``, ``P001``, ...
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        label = 0 if i % malignant_every == 0 else 1
        for s in range(slices):
            rows.append(
                {
                    "patient_id": f"P{i:03d}",
                    "series_instance_uid": f"1.2.826.0.1.{i}",
                    "vertebra": "L2",
                    "slice_index": 10 + s,
                    "slice_x_mm": -6.0 + 3.0 * s,
                    "label": label,
                    "image": crop_image(label, size, rng),
                    "box_y_min_mm": 0.0,
                    "box_y_max_mm": 30.0,
                    "box_z_min_mm": 0.0,
                    "box_z_max_mm": 30.0,
                }
            )
    return contracts.crops_table(rows, channels=3, size=size)
