"""ROI boxes from masks: an annotation's ``roi_mask_uri`` as NIfTI (nibabel) or DICOM SEG (highdicom).

The box is the mask's bounding box in patient coordinates (LPS, mm), computed from the
mask's own geometry: the extents of its non-zero voxels (each voxel's centre +/- half a voxel
along its grid axes) mapped through its affine. A mask drawn on the axial grid, on a sagittal
reformat or resampled anywhere else gives the same box for the same region. NIfTI affines are
RAS (x right-to-left flipped, y flipped); DICOM SEG's, through highdicom, are LPS already.
"""

from __future__ import annotations

import gzip
import io
import itertools
from typing import Any

import numpy as np
import pandas as pd

from vfx_ray import storage
from vfx_ray.errors import VfxError
from vfx_ray.imaging.roi import ROI_COLUMNS, RoiBox

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
NIFTI_SUFFIXES = (".nii", ".nii.gz")
GZIP_MAGIC = b"\x1f\x8b"


def read_mask(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(non-zero voxels as a boolean array, 4x4 affine from array indices to LPS mm)."""
    data = storage.read_bytes(uri)
    if uri.endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        image = nib.Nifti1Image.from_bytes(gzip.decompress(data) if data[:2] == GZIP_MAGIC else data)
        array = np.asanyarray(image.dataobj)
        return array.reshape(array.shape[:3]) != 0, RAS_TO_LPS @ image.affine
    import highdicom as hd
    import pydicom

    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(data)))
    volume = seg.get_volume(combine_segments=True)
    return np.asarray(volume.array) != 0, np.asarray(volume.affine, float)


def box_from_mask(mask: np.ndarray, affine: np.ndarray, uri: str = "the mask") -> RoiBox:
    """The LPS box holding every non-zero voxel whole."""
    found = np.argwhere(mask)
    if not len(found):
        raise VfxError("annotations", f"{uri} is empty: no voxel of the ROI is set", error_type="EmptyMask")
    lo, hi = found.min(axis=0) - 0.5, found.max(axis=0) + 0.5
    corners = np.array([[*c, 1.0] for c in itertools.product(*zip(lo, hi, strict=True))])
    lps = (affine @ corners.T)[:3].T
    # to a micrometre: NIfTI keeps its affine in float32 (a few nm of error at 100 mm)
    bounds = [round(float(v), 3) for axis in range(3) for v in (lps[:, axis].min(), lps[:, axis].max())]
    return RoiBox(*bounds)


def needs_mask(row: pd.Series) -> bool:
    """A row whose box comes from its mask: a mask URI and no complete box."""
    mask = row.get("roi_mask_uri")
    has_mask = isinstance(mask, str) and mask.strip() != ""
    return has_mask and not all(pd.notna(row.get(c)) and str(row.get(c)).strip() != "" for c in ROI_COLUMNS)


def resolve_masks(annotations: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The annotations with each mask-only row's box filled in from its mask; a row whose
    mask cannot be read or is empty is left out with an error row naming the patient."""
    if "roi_mask_uri" not in annotations.columns:
        return annotations, []
    out = annotations.copy()
    for c in ROI_COLUMNS:
        out[c] = pd.to_numeric(out[c], errors="coerce") if c in out.columns else np.nan
    errors, drop = [], []
    for i, row in out.iterrows():
        if not needs_mask(row):
            continue
        uri = str(row["roi_mask_uri"]).strip()
        try:
            out.loc[i, list(ROI_COLUMNS)] = box_from_mask(*read_mask(uri), uri=uri).bounds
        except Exception as exc:  # noqa: BLE001 - one bad mask never stops the batch
            err = exc if isinstance(exc, VfxError) else VfxError(
                "annotations", f"{uri}: cannot read the ROI mask: {exc}", error_type="BadMask")
            err.patient_id = str(row.get("patient_id"))
            errors.append(err.row())
            drop.append(i)
    return out.drop(index=drop), errors
