"""The synthetic ROI boxes as masks (``vfx-ray synth --roi-masks``): NIfTI and DICOM SEG.

- NIfTI (nibabel): a grid laid on the box itself (about 1 mm voxels whose outer faces are the
  box's faces), every voxel set: the mask's box is the annotation's box.
- DICOM SEG (highdicom): a binary segmentation of the CT series the annotations name, the
  voxels whose centres lie inside the box: what a viewer's ROI tool draws on the axial grid.
"""

from __future__ import annotations

import gzip
import io

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from vfx_ray.imaging.roi import RoiBox

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
NIFTI_VOXEL_MM = 1.0


def nifti_box_mask(box: RoiBox) -> bytes:
    """A gzipped NIfTI-1 mask filling exactly ``box`` (LPS mm)."""
    import nibabel as nib

    lo, hi = np.array(box.bounds[0::2]), np.array(box.bounds[1::2])
    shape = np.maximum(1, np.round((hi - lo) / NIFTI_VOXEL_MM)).astype(int)
    spacing = (hi - lo) / shape
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = np.diag(spacing)
    affine_lps[:3, 3] = lo + spacing / 2  # the centre of voxel (0, 0, 0)
    image = nib.Nifti1Image(np.ones(tuple(shape), np.uint8), RAS_TO_LPS @ affine_lps)
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), mtime=0)


def seg_box_mask(series: list[tuple[str, bytes]], box: RoiBox, seed: int) -> bytes:
    """A DICOM SEG (binary, one segment) of ``series``' voxels whose centres lie in ``box``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    images = [pydicom.dcmread(io.BytesIO(data)) for _, data in series]
    frames = np.stack([_inside(ds, box) for ds in images]).astype(np.uint8)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="ROI", segmented_property_type=codes.SCT.Lesion,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=images, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=generate_uid(entropy_srcs=[str(seed), "seg-series"]),
        series_number=100, sop_instance_uid=generate_uid(entropy_srcs=[str(seed), "seg"]), instance_number=1,
        manufacturer="vfx_ray synthetic", manufacturer_model_name="synth", software_versions="vfx_ray",
        device_serial_number="0")
    buf = io.BytesIO()
    seg.save_as(buf)
    return buf.getvalue()


def _inside(ds: pydicom.Dataset, box: RoiBox) -> np.ndarray:
    """Which pixels of one slice have their centre inside the box."""
    orientation = np.array(ds.ImageOrientationPatient, float)
    row_cos, col_cos = orientation[:3], orientation[3:]
    dr, dc = (float(v) for v in ds.PixelSpacing)
    i, j = np.mgrid[: int(ds.Rows), : int(ds.Columns)]
    p = np.array(ds.ImagePositionPatient, float) + i[..., None] * dr * col_cos + j[..., None] * dc * row_cos
    lo, hi = np.array(box.bounds[0::2]), np.array(box.bounds[1::2])
    return np.all((p >= lo) & (p <= hi), axis=-1)

