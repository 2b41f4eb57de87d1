"""The serial tool a user would write instead of `vfx-ray crops`: the baseline of benchmarks/ingest.py.

SimpleITK's ImageSeriesReader (GDCM) reads each annotated series from a local folder, and
sitk.Resample cuts the paper's crops: per sagittal 3 mm slice in the ROI, the slice and its
two neighbours as slab means on the ROI's square, 64 x 64, z-scored. One process, no Ray, no
error handling. Prints one JSON line: patients and crops (benchmarks/ingest.py times the
whole process, start-up included).

    python benchmarks/sitk_loop.py ARCHIVE_FOLDER ANNOTATIONS_CSV [MODEL_PT]

With MODEL_PT it also scores each patient's crops with that model (the baseline of
benchmarks/score.py: SimpleITK crops + the model, one process).
"""

import csv
import json
import math
import os
import sys

import numpy as np
import SimpleITK as sitk

SIZE, SLAB_MM, MAX_SLICES = 64, 3.0, 5


def series_files(folder: str, uid: str) -> list[str]:
    for root, _, files in os.walk(folder):
        if files and uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(root):
            return sitk.ImageSeriesReader.GetGDCMSeriesFileNames(root, uid)
    raise FileNotFoundError(uid)


def slab(image: sitk.Image, x: float, y0: float, z0: float, px: float) -> np.ndarray:
    ref = sitk.Image([3, SIZE, SIZE], sitk.sitkFloat32)
    ref.SetOrigin([x - SLAB_MM / 3, y0 + px / 2, z0 + px / 2])
    ref.SetSpacing([SLAB_MM / 3, px, px])
    out = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    return sitk.GetArrayViewFromImage(out).mean(axis=2)[::-1]


def crops(image: sitk.Image, r: dict[str, float]) -> list[np.ndarray]:
    side = max(r["roi_y_max_mm"] - r["roi_y_min_mm"], r["roi_z_max_mm"] - r["roi_z_min_mm"])
    y0 = (r["roi_y_min_mm"] + r["roi_y_max_mm"] - side) / 2
    z0 = (r["roi_z_min_mm"] + r["roi_z_max_mm"] - side) / 2
    first, last = math.ceil(r["roi_x_min_mm"] / SLAB_MM), math.floor(r["roi_x_max_mm"] / SLAB_MM)
    ks = list(range(first, last + 1))[:MAX_SLICES] or [round((r["roi_x_min_mm"] + r["roi_x_max_mm"]) / 2 / SLAB_MM)]
    out = []
    for k in ks:
        a = np.stack([slab(image, c * SLAB_MM, y0, z0, side / SIZE) for c in (k - 1, k, k + 1)])
        out.append((a - a.mean()) / (a.std() + 1e-6))
    return out


def main(archive: str, annotations: str, model: str | None = None) -> None:
    """``model``: a model.pt; each patient's crops are then scored (the max over its slices)."""
    score = None
    if model:
        import torch

        from vfx_ray.ml.model import load_model

        net = load_model(model)[0].eval()
        score = lambda x: torch.sigmoid(net(torch.from_numpy(np.stack(x)).float())).max().item()  # noqa: E731
    n_patients = n_crops = 0
    with open(annotations) as f:
        for row in csv.DictReader(f):
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(series_files(os.path.join(archive, row["patient_id"]), row["series_instance_uid"]))
            image = sitk.Cast(reader.Execute(), sitk.sitkFloat32)
            x = crops(image, {k: float(v) for k, v in row.items() if k.startswith("roi_")})
            if score:
                with torch.inference_mode():
                    score(x)
            n_crops += len(x)
            n_patients += 1
    print(json.dumps({"patients": n_patients, "crops": n_crops}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
