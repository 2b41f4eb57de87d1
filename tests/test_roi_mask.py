"""ROI masks (roi_mask_uri): NIfTI and DICOM SEG boxes from the masks' own geometry, errors for
masks that cannot be used, and crops from a mask equal to those from the same box."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from phantoms import GEOMETRIES, box_hu, cube, series

from vfx_ray import storage
from vfx_ray.config import EASY, SynthConfig
from vfx_ray.imaging import dicom
from vfx_ray.imaging import masks as roi_mask
from vfx_ray.imaging.roi import ROI_COLUMNS, RoiBox
from vfx_ray.synth.cohort import MASK_ANNOTATIONS, generate_cohort
from vfx_ray.synth.masks import RAS_TO_LPS, nifti_box_mask, seg_box_mask

BOX = RoiBox(-6.25, 5.75, -10.0, 14.0, -12.5, 9.5)


def write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_a_nifti_mask_of_a_box_gives_that_box(tmp_path):
    uri = write(tmp_path / "m.nii.gz", nifti_box_mask(BOX))
    assert roi_mask.box_from_mask(*roi_mask.read_mask(uri)) == BOX


def test_the_same_region_on_a_sagittal_grid_gives_the_same_box(tmp_path):
    """Voxel (i, j, k) of a sagittal grid: i posterior along y, j inferior along -z, k across
    x; 0.5 mm in-plane, 1 mm across. The region is the box's voxels on that grid."""
    lo, hi = np.array(BOX.bounds[0::2]), np.array(BOX.bounds[1::2])
    lps = np.array([[0, 0, 1.0, 0], [0.5, 0, 0, 0], [0, -0.5, 0, 0], [0, 0, 0, 1]])
    lps[:3, 3] = [lo[0] + 0.5, lo[1] + 0.25, hi[2] - 0.25]  # centre of voxel (0, 0, 0)
    shape = (int((hi[1] - lo[1]) / 0.5), int((hi[2] - lo[2]) / 0.5), int(hi[0] - lo[0]))
    padded = np.zeros((shape[0] + 4, shape[1] + 4, shape[2] + 4), np.uint8)
    padded[2:-2, 2:-2, 2:-2] = 1  # the grid is larger than the region
    lps[:3, 3] -= lps[:3, :3] @ [2, 2, 2]
    image = nib.Nifti1Image(padded, RAS_TO_LPS @ lps)
    uri = write(tmp_path / "sag.nii", image.to_bytes())
    got = roi_mask.box_from_mask(*roi_mask.read_mask(uri))
    np.testing.assert_allclose(got.bounds, BOX.bounds, atol=1e-6)


def test_a_seg_on_the_ct_grid_gives_the_box_of_the_voxels_it_covers(tmp_path):
    g = GEOMETRIES["head_first"]  # 1 mm pixels, 2 mm slices, centred on the origin
    files = series(box_hu(g, [cube((0, 0, 0), 8)]), g, instance_numbers=True)
    uri = write(tmp_path / "m.seg.dcm", seg_box_mask(files, BOX, seed=1))
    got = roi_mask.box_from_mask(*roi_mask.read_mask(uri))
    centres = [dicom.read_header(d, k)["image_position"][2] for k, d in files]
    z = [c for c in centres if BOX.z_min <= c <= BOX.z_max]
    # pixel centres at k - 31.5 (k whole): inside the box from -5.5 to 5.5 in x, -9.5 to 13.5 in y
    expected = (-6.0, 6.0, -10.0, 14.0, min(z) - 1.0, max(z) + 1.0)
    np.testing.assert_allclose(got.bounds, expected, atol=1e-6)


def test_masks_that_cannot_be_used_are_error_rows_and_boxes_stay(tmp_path):
    empty = nib.Nifti1Image(np.zeros((3, 3, 3), np.uint8), np.eye(4))
    rows = pd.DataFrame([
        {"patient_id": "P1", "roi_mask_uri": write(tmp_path / "ok.nii.gz", nifti_box_mask(BOX))},
        {"patient_id": "P2", "roi_mask_uri": write(tmp_path / "empty.nii.gz", gzip.compress(empty.to_bytes()))},
        {"patient_id": "P3", "roi_mask_uri": str(tmp_path / "missing.nii.gz")},
        {"patient_id": "P4", "roi_mask_uri": str(tmp_path / "missing.nii.gz"),
         **dict(zip(ROI_COLUMNS, BOX.bounds, strict=True))},
    ])
    resolved, errors = roi_mask.resolve_masks(rows)
    assert resolved["patient_id"].tolist() == ["P1", "P4"]  # P4's own box wins over its mask
    assert resolved[list(ROI_COLUMNS)].to_numpy().tolist() == [list(BOX.bounds)] * 2
    assert [(e["patient_id"], e["stage"], e["error_type"]) for e in errors] == [
        ("P2", "annotations", "EmptyMask"), ("P3", "annotations", "BadMask")]
    assert "missing.nii.gz" in errors[1]["message"]


@pytest.mark.slow
def test_crops_from_masks_equal_crops_from_the_same_boxes(tmp_path, ray_session):
    """synth --roi-masks: odd patients get NIfTI masks of their boxes (same crops), even ones a
    SEG on the CT grid (crops of the box snapped to the voxels, no error)."""
    from vfx_ray.stages.crops import run_crops

    root = tmp_path / "cohort"
    generate_cohort(str(root), SynthConfig(patients=4, matrix=128, seed=9, roi_masks=True, difficulty=EASY), workers=1,
                    progress=False)
    boxes = run_crops(str(root / "dicom"), str(root / "annotations.csv"), str(tmp_path / "boxes"), progress=False)
    masks = run_crops(str(root / "dicom"), str(root / MASK_ANNOTATIONS), str(tmp_path / "masks"), progress=False)
    assert boxes["errors"] == masks["errors"] == 0 and masks["patients_with_crops"] == 4
    a, b = (storage.read_table(str(tmp_path / o / "crops.parquet")).to_pandas() for o in ("boxes", "masks"))
    nifti = ["VFX0001", "VFX0003"]
    key = ["patient_id", "slice_index"]
    a, b = (t[t["patient_id"].isin(nifti)].sort_values(key, ignore_index=True) for t in (a, b))
    pd.testing.assert_frame_equal(a.drop(columns=["image"]), b.drop(columns=["image"]))
    np.testing.assert_array_equal(np.stack(a["image"].map(np.asarray)), np.stack(b["image"].map(np.asarray)))
