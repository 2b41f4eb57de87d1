"""Phantom CT series for the DICOM and geometry tests: boxes of known HU at known LPS mm.

The anatomy is sampled at each voxel's LPS centre (``voxel_lps``), so one phantom written with
any orientation is the same object in the patient frame.
"""

from __future__ import annotations

import io
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.uid import JPEGBaseline8Bit, JPEGLosslessSV1

from vfx_ray.synth.dicom_writer import PatientInfo, SeriesGeometry, voxel_lps, write_series

SHAPE = (24, 64, 64)  # slices, rows, columns
PIXEL_MM = 1.0
SLICE_MM = 2.0
PATIENT = PatientInfo("PHANTOM01", age=60, sex="F")
Box = tuple[Sequence[float], Sequence[float], float]  # (lo xyz, hi xyz, HU)


def centred_geometry(row: Sequence[float], col: Sequence[float], shape: tuple[int, int, int] = SHAPE,
                     pixel_mm: float = PIXEL_MM, slice_mm: float = SLICE_MM,
                     centre: Sequence[float] = (0.0, 0.0, 0.0)) -> SeriesGeometry:
    """A grid of ``shape`` whose centre voxel sits at ``centre`` (LPS mm)."""
    r, c = np.asarray(row, float), np.asarray(col, float)
    n = np.cross(r, c)
    k, i, j = ((s - 1) / 2 for s in shape)
    origin = np.asarray(centre, float) - k * slice_mm * n - i * pixel_mm * c - j * pixel_mm * r
    return SeriesGeometry(tuple(origin), tuple(r), tuple(c), (pixel_mm, pixel_mm), slice_mm)


def oblique(deg: float = 10.0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Row and column cosines of an axial plane tilted ``deg`` about x."""
    a = math.radians(deg)
    return (1.0, 0.0, 0.0), (0.0, math.cos(a), math.sin(a))


GEOMETRIES: dict[str, SeriesGeometry] = {
    "head_first": centred_geometry((1, 0, 0), (0, 1, 0)),
    "feet_first": centred_geometry((-1, 0, 0), (0, 1, 0)),  # normal -z: slices run downwards
    "oblique": centred_geometry(*oblique(10.0)),
}


def box_hu(geometry: SeriesGeometry, boxes: Sequence[Box], shape: tuple[int, int, int] = SHAPE,
           background: float = -1000.0) -> np.ndarray:
    """HU volume on ``geometry``: ``background`` with each box's HU where voxel centres fall."""
    p = voxel_lps(geometry, shape)
    hu = np.full(shape, background, np.float32)
    for lo, hi, value in boxes:
        inside = np.all((p >= np.asarray(lo)) & (p <= np.asarray(hi)), axis=-1)
        hu[inside] = value
    return hu


def field_hu(geometry: SeriesGeometry, fn: Callable[[np.ndarray], np.ndarray],
             shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """HU volume ``fn(lps)`` (``lps`` of shape (..., 3)) sampled at every voxel centre."""
    return fn(voxel_lps(geometry, shape)).astype(np.float32)


def cube(centre: Sequence[float], side: float, hu: float = 1000.0) -> Box:
    c = np.asarray(centre, float)
    return (c - side / 2, c + side / 2, hu)


def series(hu: np.ndarray, geometry: SeriesGeometry, **kwargs) -> list[tuple[str, bytes]]:
    """Shuffled files without InstanceNumber unless asked, so order can come only from geometry."""
    kwargs.setdefault("instance_numbers", False)
    return write_series(hu, geometry, kwargs.pop("patient", PATIENT), **kwargs)


def edit(files: list[tuple[str, bytes]], fn: Callable[[pydicom.Dataset, int], None],
         only: Sequence[int] | None = None) -> list[tuple[str, bytes]]:
    """Files with ``fn(dataset, position in list)`` applied (to ``only`` those positions)."""
    out = []
    for n, (name, data) in enumerate(files):
        if only is None or n in only:
            ds = pydicom.dcmread(io.BytesIO(data))
            fn(ds, n)
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
        out.append((name, data))
    return out


def _jpeg_lossless_frame(arr: np.ndarray, tmp: Path) -> bytes:
    """A JPEG Lossless SV1 codestream made by GDCM (inside SimpleITK), as a fragment."""
    path = tmp / "frame.dcm"
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.SetFileName(str(path))
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG")
    writer.Execute(sitk.GetImageFromArray(arr.astype(np.int16)))
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == JPEGLosslessSV1, ds.file_meta.TransferSyntaxUID
    return b"".join(generate_fragments(ds.PixelData))


def to_jpeg_lossless(files: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Classic files transcoded to JPEG Lossless (Process 14, SV1) with GDCM's encoder."""
    with tempfile.TemporaryDirectory() as tmp:
        def fn(ds: pydicom.Dataset, _: int) -> None:
            frame = _jpeg_lossless_frame(ds.pixel_array, Path(tmp))
            ds.PixelData = encapsulate([frame])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1

        return edit(files, fn)


def to_jpeg_baseline(files: list[tuple[str, bytes]], slope: float = 8.0,
                     intercept: float = -1024.0) -> list[tuple[str, bytes]]:
    """Classic files re-quantised to 8 bits (HU = v x slope + intercept) and JPEG baseline
    encoded by Pillow (lossy, quality 100): the only way 8-bit baseline CT exists."""
    from PIL import Image

    def fn(ds: pydicom.Dataset, _: int) -> None:
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        v = np.clip(np.rint((hu - intercept) / slope), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(v).save(buf, format="JPEG", quality=100, subsampling=0)
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit

    return edit(files, fn)
