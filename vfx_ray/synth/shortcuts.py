"""Does the cohort give its labels away without the lesions? (issue 17)

A classifier that sees only the ROI box's geometry and the crops' intensity statistics (no
pattern, no position) should do little better than chance; the easy cohort's box alone gave
AUC 0.97. :func:`shortcut_auc` is that check: a logistic regression, cross-validated with one
patient per row, on features :func:`shortcut_features` takes from the crops the pipeline would
make. Only the part of each series the crops read is rendered, so the whole default cohort
(433 patients) takes about a minute.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from vfx_ray.config import CropConfig
from vfx_ray.imaging.dicom import Volume
from vfx_ray.imaging.geometry import crop_box, crop_samples
from vfx_ray.imaging.roi import RoiBox
from vfx_ray.synth.anatomy import sample_volume
from vfx_ray.synth.patient import PatientSpec, image_noise, patient_model


def roi_volume(spec: PatientSpec, cfg: CropConfig) -> tuple[Volume, RoiBox]:
    """The voxels of the patient's series that its crops read (same grid, same anatomy; the
    noise is drawn for this part only), and its ROI."""
    model = patient_model(spec)
    g = model.geometry
    roi = RoiBox(*model.box, patient_id=spec.patient_id)
    row_sp, col_sp = g.pixel_spacing
    steps = np.column_stack([np.asarray(g.row_cosine) * col_sp, np.asarray(g.col_cosine) * row_sp,
                             g.normal * g.slice_spacing])  # voxel (column, row, slice) -> mm
    lo, hi = crop_box(roi, cfg)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ijk = np.linalg.solve(steps, (corners - np.asarray(g.origin)).T).T  # (column, row, slice)
    start = np.maximum(np.floor(ijk.min(axis=0)).astype(int) - 2, 0)
    stop = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 3, [spec.matrix, spec.matrix, model.n_slices])
    origin = np.asarray(g.origin) + steps @ start
    sub = replace(g, origin=tuple(float(v) for v in origin))
    shape = (int(stop[2] - start[2]), int(stop[1] - start[1]), int(stop[0] - start[0]))
    hu = sample_volume(model.hu_at, sub, shape, spec.slice_thickness_mm) + image_noise(spec, shape)
    volume = Volume(hu=hu, origin=origin, spacing=np.array([col_sp, row_sp, g.slice_spacing]),
                    direction=g.direction(), patient_id=spec.patient_id, series_instance_uid="")
    return volume, roi


def shortcut_features(spec: PatientSpec, cfg: CropConfig | None = None) -> dict[str, float]:
    """Box side, box volume and, per channel, the mean and SD of the patient's crops in HU
    (averaged over its slices): what a shortcut could use."""
    cfg = cfg or CropConfig()
    volume, roi = roi_volume(spec, cfg)
    images = np.stack([r["image"] for r in crop_samples(volume, roi, cfg, normalize=False)])
    y0, y1, z0, z1 = roi.square()
    x0, x1 = roi.x_min, roi.x_max
    row: dict[str, float] = {"side_mm": y1 - y0, "volume_ml": (x1 - x0) * (roi.y_max - roi.y_min)
                             * (roi.z_max - roi.z_min) / 1000,
                             "n_slices": len(images), "malignant": float(spec.label == "malignant")}
    for c in range(images.shape[1]):
        row[f"mean_{c}"] = float(images[:, c].mean())
        row[f"sd_{c}"] = float(images[:, c].std(axis=(1, 2)).mean())
    return row


def shortcut_auc(features: pd.DataFrame, folds: int = 10, seed: int = 0) -> float:
    """Per-patient AUC of a logistic regression on the shortcut features, out of fold."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = features.drop(columns=["malignant"]).to_numpy()
    y = features["malignant"].to_numpy().astype(int)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    prob = cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, prob))
