"""Pure DICOM reading: headers, the series index, slice order, HU volumes and geometry checks.

Bytes in, records and arrays out; no Ray and no I/O. Every user-facing failure is a
:class:`~vfx_ray.errors.VfxError` whose ``stage`` is ``header`` (one object's header),
``decode`` (one object's content: unreadable, not CT, no or undecodable pixel data, too big)
or ``geometry`` (the slices of a series do not form one regular volume). PS3.x are the
parts of the DICOM Standard.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.pixels import apply_rescale, iter_pixels
from pydicom.uid import UID

from vfx_ray.config import CropConfig
from vfx_ray.errors import VfxError
from vfx_ray.imaging.guards import (
    MIN_SPACING_MM,
    bad_values,
    check_codestreams,
    is_decoder_failure,
    items,
    parse,
    vector,
)
from vfx_ray.imaging.guards import PIXEL_DATA_TAGS as PIXEL_DATA_TAGS  # re-exported
from vfx_ray.imaging.guards import error as _error

AIR_HU = -1000.0
MAX_MATRIX = 4096  # rows or columns above this are refused before decoding (decompression bombs)
MAX_VOXELS = 600_000_000  # per series: 2.4 GB as float32
MIN_SERIES_SLICES = 2  # a sagittal reformat needs at least two axial positions
MAX_TILT_DEG = 45.0  # steeper gantry tilts are refused
DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage: a DICOMDIR
HEADER_PREFIX_BYTES = 256 * 1024  # a classic CT header almost always ends well before this
_PLACE = {  # frame attribute: (Enhanced functional group sequence, keyword), PS3.3 C.7.6.16.2
    "position": ("PlanePositionSequence", "ImagePositionPatient"),
    "orientation": ("PlaneOrientationSequence", "ImageOrientationPatient"),
    "spacing": ("PixelMeasuresSequence", "PixelSpacing"),
    "thickness": ("PixelMeasuresSequence", "SliceThickness"),
    "slope": ("PixelValueTransformationSequence", "RescaleSlope"),
    "intercept": ("PixelValueTransformationSequence", "RescaleIntercept"),
}
_TEXT_FIELDS = {  # header record field: DICOM keyword
    "patient_id": "PatientID", "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID", "sop_instance_uid": "SOPInstanceUID",
    "sop_class_uid": "SOPClassUID", "modality": "Modality", "image_type": "ImageType",
    "series_description": "SeriesDescription", "convolution_kernel": "ConvolutionKernel",
}
_SERIES_FIELDS = ("series_instance_uid", "patient_id", "study_instance_uid", "modality",
                  "sop_class_uid", "series_description", "image_type", "convolution_kernel",
                  "pixel_spacing", "slice_thickness", "rows", "columns")  # from its first object
PLANES = ("sagittal", "coronal", "axial")  # the patient axis (x, y, z) a slice's normal is nearest
MIN_PLANE_COSINE = 0.7  # a normal further than ~45 degrees from every axis: "oblique"


@dataclass
class Volume:
    """A CT series as HU voxels ``hu[k, i, j]`` (slice, row, column) in LPS mm.

    Voxel ``(k, i, j)`` lies at ``origin + direction @ ((j, i, k) * spacing)``; ``direction``'s
    columns are the row cosine, the column cosine and the unit step between slices (the normal
    unless the gantry is tilted): ITK's convention, so ``geometry.to_sitk`` is a plain copy.
    """

    hu: np.ndarray
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    patient_id: str
    series_instance_uid: str
    # ``hu`` may hold only slices ``first_slice ..`` of a series of ``series_slices`` (the ones
    # an ROI needs); origin and indices stay the whole series', so crops are the same either way.
    first_slice: int = 0
    series_slices: int | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns) of the whole series, decoded or not."""
        n, rows, cols = self.hu.shape
        return (n if self.series_slices is None else self.series_slices, rows, cols)


@dataclass
class _Frame:
    """One 2D frame's place and rescale, known before decoding."""

    key: str
    file_index: int
    frame_index: int
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    shape: tuple[int, int]
    slope: float
    intercept: float


def _floats(value: Any) -> list[float] | None:
    return None if value is None else [float(v) for v in value]


def _float(value: Any, default: float | None = None) -> float | None:
    return default if value is None or value == "" else float(value)


def _text(value: Any) -> str:
    """A string; a multi-valued one (e.g. ImageType) joined with backslashes as DICOM does."""
    return str(value or "") if value is None or isinstance(value, str) else "\\".join(map(str, value))


def _is_enhanced(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _attr(ds: Dataset, name: str, frame: int = 0) -> Any:
    """A frame's :data:`_PLACE` attribute: top level for classic images; for Enhanced ones the
    frame's own functional group, else the shared group (PS3.3 C.7.6.16)."""
    sequence, attr = _PLACE[name]
    if not _is_enhanced(ds):
        return ds.get(attr)
    groups = [*items(ds, "PerFrameFunctionalGroupsSequence")[frame:frame + 1],
              *items(ds, "SharedFunctionalGroupsSequence")[:1]]
    for group in groups:
        if (found := items(group, sequence)) and attr in found[0]:
            return found[0].get(attr)
    return None


def read_header(data: bytes, object_key: str, *, object_size: int | None = None,
                max_file_bytes: int = CropConfig.max_file_bytes) -> dict[str, Any]:
    """The flat header record of one DICOM object, without decoding pixel data.

    ``data`` is the whole object or its first bytes (``object_size`` = the full size, see
    :data:`HEADER_PREFIX_BYTES`); a prefix ending inside the header raises HeaderBeyondPrefix.
    """
    return header_and_parse(data, object_key, object_size=object_size, max_file_bytes=max_file_bytes)[0]


def header_and_parse(data: bytes, object_key: str, *, object_size: int | None = None,
                     max_file_bytes: int = CropConfig.max_file_bytes) -> tuple[dict[str, Any], tuple]:
    """The header record and the parse it came from, which :func:`load_volume` can reuse
    (one parse per object when the whole object is at hand)."""
    parsed = parse(data, object_key, "header", max_file_bytes, object_size)
    with bad_values("header", object_key):
        return _header_record(parsed[0], parsed[1], object_key,
                              len(data) if object_size is None else object_size), parsed


def object_kind(ds: Dataset, has_pixels: bool) -> str:
    """``directory`` (a DICOMDIR: the media's index, in no series), ``image`` (pixel data) or
    ``non-image`` (a structured report, presentation state, key object selection, raw data)."""
    meta = getattr(ds, "file_meta", Dataset())
    if str(meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID") or "") == DIRECTORY_SOP_CLASS:
        return "directory"
    return "image" if has_pixels else "non-image"


def _header_record(ds: Dataset, has_pixels: bool, object_key: str, size: int) -> dict[str, Any]:
    kind = object_kind(ds, has_pixels)
    missing = [n for n in ("SeriesInstanceUID", "SOPInstanceUID") if not ds.get(n)]
    if missing and kind != "directory":
        raise _error("header", "MissingTag", f"{object_key}: required tag(s) {', '.join(missing)} "
                     "missing or empty; the object cannot be placed in a series", object_key)
    ts = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    record = {
        "object_key": object_key,
        "size": size,
        **{name: _text(ds.get(tag)) for name, tag in _TEXT_FIELDS.items()},
        "transfer_syntax_uid": str(ts) if ts else None,
        "rows": int(ds.Rows) if "Rows" in ds else None,
        "columns": int(ds.Columns) if "Columns" in ds else None,
        "number_of_frames": int(ds.get("NumberOfFrames") or 1),
        "image_orientation": _floats(_attr(ds, "orientation")),
        "image_position": None if _is_enhanced(ds) else _floats(_attr(ds, "position")),
        "pixel_spacing": _floats(_attr(ds, "spacing")),
        "slice_thickness": _float(_attr(ds, "thickness")),
        "has_pixel_data": has_pixels,
        "object_kind": kind,
    }
    if kind == "directory":  # indexed on its own (see group_series), never a series member
        record["series_instance_uid"] = None
    return record


def series_record(headers: list[dict[str, Any]]) -> dict[str, Any]:
    """One series-index row from one series' headers (descriptions from the first by key)."""
    rows = sorted(headers, key=lambda h: h["object_key"])
    return {
        **{name: rows[0][name] for name in _SERIES_FIELDS},
        "orientation": rows[0]["image_orientation"],
        "transfer_syntax_uid": "\\".join(sorted({h["transfer_syntax_uid"] or "" for h in rows})),
        "object_keys": [h["object_key"] for h in rows],
        "instance_count": len(rows),
        "n_frames": int(sum(h["number_of_frames"] for h in rows)),
        "total_bytes": int(sum(h["size"] for h in rows)),
        "all_have_pixel_data": all(h["has_pixel_data"] for h in rows),
        "object_kind": rows[0]["object_kind"],
        "plane": plane(rows[0]["image_orientation"]),
        "extent_mm": extent(rows),
    }


SUMMED_SERIES_FIELDS = ("instance_count", "n_frames", "total_bytes")


def merge_series(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The :func:`series_record` of the union of two disjoint parts of one series, from their
    records alone (a series spread over chunks is indexed chunk by chunk). Either may hold only
    some of its keys (a summary keeps its first): the fields "from the first object" come
    from the part with the smaller first key."""
    first, other = (a, b) if a["object_keys"][0] <= b["object_keys"][0] else (b, a)
    merged = {**first, **{n: int(a[n]) + int(b[n]) for n in SUMMED_SERIES_FIELDS}}
    syntaxes = {*a["transfer_syntax_uid"].split("\\"), *b["transfer_syntax_uid"].split("\\")}
    merged["transfer_syntax_uid"] = "\\".join(sorted(syntaxes))
    merged["all_have_pixel_data"] = bool(a["all_have_pixel_data"] and b["all_have_pixel_data"])
    merged["object_keys"] = sorted(first["object_keys"] + other["object_keys"])
    boxes = (a["extent_mm"], b["extent_mm"])
    merged["extent_mm"] = None if None in boxes else [
        min(lo) if i % 2 == 0 else max(lo) for i, lo in enumerate(zip(*boxes, strict=True))]
    return merged


def plane(orientation: list[float] | None) -> str | None:
    """``axial``, ``sagittal``, ``coronal`` or ``oblique``: the plane of a slice from its
    ImageOrientationPatient (a gantry tilt up to ~45 degrees is still axial)."""
    if not orientation or len(orientation) != 6:
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    axis = int(np.argmax(np.abs(normal)))
    return PLANES[axis] if abs(normal[axis]) >= MIN_PLANE_COSINE * np.linalg.norm(normal) else "oblique"


def extent(headers: list[dict[str, Any]]) -> list[float] | None:
    """The LPS box (x min, x max, y min, y max, z min, z max, mm) of a series' pixel centres,
    from the corners of every slice; None when a header lacks its place (Enhanced CT)."""
    corners = []
    for h in headers:
        o, p, s = h["image_orientation"], h["image_position"], h["pixel_spacing"]
        if not (o and p and s and h["rows"] and h["columns"]):
            return None
        row, col = np.asarray(o[:3]) * s[1] * (h["columns"] - 1), np.asarray(o[3:]) * s[0] * (h["rows"] - 1)
        corners += [np.asarray(p) + a * row + b * col for a in (0, 1) for b in (0, 1)]
    if not corners:
        return None
    lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
    return [round(float(v), 3) for pair in zip(lo, hi, strict=True) for v in pair]


def group_series(headers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The series index: one :func:`series_record` per SeriesInstanceUID (never by folder),
    then one row per DICOMDIR (no series uid: it indexes the media, it is not an image)."""
    by_uid: dict[str, list[dict[str, Any]]] = {}
    directories = []
    for h in headers:
        if h["series_instance_uid"] is None:
            directories.append(h)
        else:
            by_uid.setdefault(h["series_instance_uid"], []).append(h)
    return [series_record(hs) for _, hs in sorted(by_uid.items())] + [
        series_record([h]) for h in sorted(directories, key=lambda h: h["object_key"])]


def _frames(ds: Dataset, key: str, has_pixels: bool, file_index: int, budget: int
            ) -> list[_Frame]:
    """Place and rescale of every frame of a grayscale CT image (PS3.3 C.7.6.2 or C.7.6.16).

    ``budget`` caps the declared voxels before decoding (decompression bombs)."""
    modality = _text(ds.get("Modality"))
    if modality != "CT":
        raise _error("decode", "NotCT", f"{key}: Modality is {modality or 'missing'!r}, not 'CT'; "
                     "choose the CT series in the annotations", key)
    if not has_pixels or "Rows" not in ds or "Columns" not in ds:
        raise _error("decode", "NoPixelData", f"{key}: no pixel data (or no Rows/Columns); the "
                     "object is not an image, was stripped, or is truncated", key)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise _error("decode", "NotGrayscale", f"{key}: {ds.SamplesPerPixel} samples per pixel; "
                     "CT must be grayscale (derived colour images are not supported)", key)
    rows, cols, n = int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames") or 1)
    if min(rows, cols, n) < 1:
        raise _error("decode", "BadValue", f"{key}: declares {n} frame(s) of {rows}x{cols}; the "
                     "header is corrupt", key)
    if max(rows, cols) > MAX_MATRIX or rows * cols * n > budget:
        raise _error("decode", "TooManyVoxels", f"{key}: declares {n} frame(s) of {rows}x{cols}, "
                     f"beyond {MAX_MATRIX} per side or load_volume's max_voxels per series", key)
    frames = []
    for f in range(n):
        pos, iop, sp, slope, icpt = (_attr(ds, name, f) for name in (
            "position", "orientation", "spacing", "slope", "intercept"))
        if pos is None or iop is None or sp is None:
            raise _error("decode", "MissingTag", f"{key}: frame {f} lacks ImagePositionPatient, "
                         "ImageOrientationPatient or PixelSpacing; it cannot be placed", key)
        rescale = vector([_float(slope, 1.0), _float(icpt, 0.0)], 2, "rescale", key)
        frames.append(_Frame(key, file_index, f, vector(pos, 3, "ImagePositionPatient", key),
                             vector(iop, 6, "ImageOrientationPatient", key),
                             tuple(vector(sp, 2, "PixelSpacing", key, MIN_SPACING_MM)),
                             (rows, cols), *rescale))
    return frames


def _same(values: list[Any], what: str, fix: str, error_type: str, uid: str) -> None:
    """Raise when a per-slice value differs from the first slice's (beyond 1e-3)."""
    ref = np.asarray(values[0], float)
    odd = [v for v in values if np.abs(np.asarray(v, float) - ref).max() > 1e-3]
    if odd:
        show = [np.round(np.asarray(v, float), 4).tolist() for v in (values[0], odd[0])]
        raise _error("geometry", error_type, f"series {uid}: mixed {what} ({show[0]} in "
                     f"{len(values) - len(odd)} slices, {show[1]} in {len(odd)}); {fix}", uid=uid)


def _axes(iop: np.ndarray, uid: str) -> np.ndarray:
    """Columns row cosine, column cosine, normal; they must be orthonormal (PS3.3 C.7.6.2.1.1)."""
    row, col = iop[:3], iop[3:]
    if (abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3
            or abs(row @ col) > 1e-3):
        raise _error("geometry", "NonOrthonormal", f"series {uid}: ImageOrientationPatient "
                     f"{iop.tolist()} is not two orthonormal cosines (corrupt header)", uid=uid)
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    return np.stack([row, col, np.cross(row, col)], axis=1)


def _slice_order(frames: list[_Frame], cfg: CropConfig, uid: str
                 ) -> tuple[list[_Frame], np.ndarray, np.ndarray]:
    """Frames sorted along the slice normal, their positions on it and the step per mm
    between slices (the normal itself unless the gantry is tilted)."""
    _same([f.orientation for f in frames], "ImageOrientationPatient", "export one orientation "
          "per series (localizers belong in their own series)", "MixedOrientation", uid)
    _same([f.pixel_spacing for f in frames], "PixelSpacing",
          "all slices of a volume need one in-plane spacing", "MixedSpacing", uid)
    _same([f.shape for f in frames], "matrix (Rows, Columns)",
          "all slices of a volume need one matrix", "MixedMatrix", uid)
    if len(frames) < MIN_SERIES_SLICES:
        raise _error("geometry", "TooFewSlices", f"series {uid}: {len(frames)} slice(s); a sagittal "
                     f"reformat needs {MIN_SERIES_SLICES} or more, pick the volume series", uid=uid)
    normal = _axes(frames[0].orientation, uid)[:, 2]
    t = np.array([f.position @ normal for f in frames])
    order = np.argsort(t, kind="stable")
    frames, t = [frames[i] for i in order], t[order]
    steps = np.diff(t)
    for i in np.flatnonzero(steps < 1e-2):
        raise _error("geometry", "DuplicatePosition", f"series {uid}: {frames[i].key} and "
                     f"{frames[i + 1].key} are at the same position ({t[i]:.2f} mm along the "
                     "normal); remove duplicate or overlapping copies", uid=uid)
    median = float(np.median(steps))
    for i in np.flatnonzero(steps > cfg.max_gap_factor * median):
        raise _error("geometry", "SliceGap", f"series {uid}: gap of {steps[i]:.2f} mm between "
                     f"slices at {t[i]:.2f} and {t[i + 1]:.2f} mm, over {cfg.max_gap_factor} x the "
                     f"median {median:.2f} mm; slices are missing, re-export the series", uid=uid)
    pos = np.stack([f.position for f in frames])
    step = np.linalg.lstsq(np.c_[np.ones_like(t), t - t[0]], pos, rcond=None)[0][1]
    off = np.abs(pos - (pos[0] + np.outer(t - t[0], step))).max()
    tilt = np.degrees(np.arccos(min(1.0, 1 / np.linalg.norm(step))))
    if off > 0.5 or tilt > MAX_TILT_DEG:
        raise _error("geometry", "NonCollinear", f"series {uid}: slice positions do not lie on "
                     f"one line (off by {off:.2f} mm, tilt {tilt:.1f} deg); not one volume", uid=uid)
    return frames, t, step


def _resample_uniform(hu: np.ndarray, t: np.ndarray, grid: np.ndarray, first: int = 0) -> np.ndarray:
    """Slices at ``grid`` (mm along the normal), linear between the slices at ``t``: ITK and the
    crops need a regular grid. ``hu`` holds the sorted slices ``first ..`` of ``t``."""
    upper = np.clip(np.searchsorted(t, grid, side="right"), 1, len(t) - 1)
    w = ((grid - t[upper - 1]) / (t[upper] - t[upper - 1])).astype(np.float32)
    out = np.empty((len(grid), *hu.shape[1:]), np.float32)
    for n, (u, wn) in enumerate(zip(upper - first, w, strict=True)):  # a slice at a time: low memory
        out[n] = (1 - wn) * hu[u - 1] + wn * hu[u]
    return out


def _hu_frame(stored: np.ndarray, ds: Dataset, frame: _Frame) -> np.ndarray:
    """HU = stored x RescaleSlope + RescaleIntercept (PS3.3 C.11.1.1.2), via pydicom's
    apply_rescale for classic images and the frame's Pixel Value Transformation (C.7.6.16.2.9)
    for Enhanced ones; Pixel Padding Value (range) pixels (C.7.5.1.1.2) become air."""
    if _is_enhanced(ds):
        hu = stored.astype(np.float32) * np.float32(frame.slope) + np.float32(frame.intercept)
    else:
        hu = np.asarray(apply_rescale(stored, ds), dtype=np.float32)
    if (pad := ds.get("PixelPaddingValue")) is not None:
        lo, hi = sorted((pad, ds.get("PixelPaddingRangeLimit", pad)))
        hu[(stored >= lo) & (stored <= hi)] = AIR_HU
    return hu


def _decode_file(data: bytes, ds: Dataset, key: str, wanted: dict[int, tuple[int, _Frame]], n_frames: int,
                 out: np.ndarray) -> None:
    """Decode one object frame by frame (iter_pixels); ``wanted``: frame number -> (slice of
    ``out``, its frame), for the frames needed (the others of a multi-frame object are skipped)."""
    count = 0
    try:
        check_codestreams(data, ds, key, n_frames)
        for count, stored in enumerate(iter_pixels(io.BytesIO(data)), start=1):
            if (slot := wanted.get(count - 1)) is None:
                continue
            if stored.shape != slot[1].shape:
                raise ValueError(f"decoded shape {stored.shape} != (Rows, Columns) {slot[1].shape}")
            out[slot[0]] = _hu_frame(stored, ds, slot[1])
        if count != n_frames:
            raise ValueError(f"{count} frames decoded, {n_frames} declared")
    except VfxError:
        raise
    except BaseException as exc:  # pydicom raises many types; Rust decoders panic
        if not is_decoder_failure(exc):
            raise
        name = UID(str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", "?"))).name
        raise _error("decode", "DecodeFailed", f"{key}: cannot decode pixel data ({name}): {exc}. "
                     "Check the file and the pylibjpeg-*/pyjpegls plugins", key) from exc


@dataclass
class SeriesLayout:
    """Where every slice of one series lies, known from its headers alone: which objects an
    ROI's slices need is decided before any pixel is read (or any object fetched whole).

    Slices are numbered on the volume's regular grid (the sorted slices themselves, or a
    resampling of unevenly spaced ones); ``origin``, ``spacing`` and ``direction`` are the
    whole volume's, as in :class:`Volume`.
    """

    keys: list[str]  # the series' objects, in the order given
    frames: list[_Frame]  # every frame, sorted along the normal
    t: np.ndarray  # their positions on it (mm)
    grid: np.ndarray  # the regular grid's positions on it (mm): the volume's slices
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    patient_id: str
    series_instance_uid: str
    uniform: bool  # the slices are the grid (else the grid is resampled from them)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.grid), *self.frames[0].shape)

    def sources(self, k0: int, k1: int) -> tuple[int, int]:
        """The sorted frames ``[f0, f1)`` that slices ``[k0, k1)`` are made of."""
        if k1 <= k0:
            return 0, 0
        if self.uniform:
            return k0, k1
        upper = np.clip(np.searchsorted(self.t, self.grid[k0:k1], side="right"), 1, len(self.t) - 1)
        return int(upper.min()) - 1, int(upper.max()) + 1

    def files(self, k0: int, k1: int) -> list[int]:
        """Indices (into ``keys``) of the objects holding slices ``[k0, k1)``."""
        f0, f1 = self.sources(k0, k1)
        return sorted({f.file_index for f in self.frames[f0:f1]})


def series_layout(keys: list[str], parsed: list[tuple], cfg: CropConfig | None = None, *,
                  max_voxels: int = MAX_VOXELS) -> SeriesLayout:
    """Check and place one series' frames from the objects' parses (a header prefix is enough:
    :func:`header_and_parse`), in the order of ``keys``."""
    cfg = cfg or CropConfig()
    if not keys:
        raise _error("decode", "EmptySeries", "no files given for the series")
    ids = []
    for key, (ds, _, _) in zip(keys, parsed, strict=True):
        with bad_values("decode", key):
            ids.append((_text(ds.get("SeriesInstanceUID")), _text(ds.get("PatientID"))))
    uids, patient = sorted({uid for uid, _ in ids}), ids[0][1]
    try:
        if len(uids) > 1:
            raise _error("geometry", "MixedSeries", f"files of {len(uids)} series were given "
                         f"together: {', '.join(uids)}; group files by SeriesInstanceUID first")
        frames: list[_Frame] = []
        for i, (key, (ds, has_pixels, _)) in enumerate(zip(keys, parsed, strict=True)):
            used = sum(f.shape[0] * f.shape[1] for f in frames[-1:]) * len(frames)  # one matrix
            with bad_values("decode", key):
                frames += _frames(ds, key, has_pixels, i, max_voxels - used)
        with bad_values("geometry", uid=uids[0]):  # backstop: values were checked by _frames
            return _layout(keys, frames, cfg, uids[0], patient)
    except VfxError as err:
        err.patient_id = err.patient_id or patient
        err.series_instance_uid = err.series_instance_uid or uids[0]
        raise


def _layout(keys: list[str], frames: list[_Frame], cfg: CropConfig, uid: str, patient: str) -> SeriesLayout:
    frames, t, step = _slice_order(frames, cfg, uid)
    axes = _axes(frames[0].orientation, uid)
    median = float(np.median(np.diff(t)))
    regular = (t[-1] - t[0]) / round((t[-1] - t[0]) / median)  # nearest step tiling the extent
    uniform = bool(np.abs(np.diff(t) - regular).max() <= 0.01 * regular)
    grid = t if uniform else t[0] + regular * np.arange(int(round((t[-1] - t[0]) / regular)) + 1)
    axes[:, 2] = step / np.linalg.norm(step)
    row_sp, col_sp = frames[0].pixel_spacing
    return SeriesLayout(keys, frames, t, grid, frames[0].position.copy(),
                        np.array([col_sp, row_sp, regular * np.linalg.norm(step)]), axes, patient, uid, uniform)


def decode_slices(layout: SeriesLayout, parsed: dict[int, tuple] | list[tuple], k0: int = 0,
                  k1: int | None = None) -> Volume:
    """Slices ``[k0, k1)`` of the volume (default: all) decoded to HU; ``parsed``: the whole
    objects' parses, at least those of ``layout.files(k0, k1)``, by index into ``layout.keys``."""
    k1 = len(layout.grid) if k1 is None else k1
    f0, f1 = layout.sources(k0, k1)
    hu = np.empty((f1 - f0, *layout.frames[0].shape), np.float32)
    per_file: dict[int, int] = {}
    for f in layout.frames:
        per_file[f.file_index] = per_file.get(f.file_index, 0) + 1
    wanted: dict[int, dict[int, tuple[int, _Frame]]] = {}
    for n, f in enumerate(layout.frames[f0:f1]):
        wanted.setdefault(f.file_index, {})[f.frame_index] = (n, f)
    try:
        for i, frames in sorted(wanted.items()):
            ds, _, data = parsed[i]
            _decode_file(data, ds, layout.keys[i], frames, per_file[i], hu)
    except VfxError as err:
        err.patient_id = err.patient_id or layout.patient_id
        err.series_instance_uid = err.series_instance_uid or layout.series_instance_uid
        raise
    if not layout.uniform and k1 > k0:
        hu = _resample_uniform(hu, layout.t, layout.grid[k0:k1], f0)
    return Volume(hu=hu, origin=layout.origin, spacing=layout.spacing, direction=layout.direction,
                  patient_id=layout.patient_id, series_instance_uid=layout.series_instance_uid,
                  first_slice=k0, series_slices=len(layout.grid))


def load_volume(files: list[tuple[str, bytes]], cfg: CropConfig | None = None, *,
                max_voxels: int = MAX_VOXELS, parsed: list[tuple] | None = None) -> Volume:
    """Decode one series (classic slices or Enhanced multi-frame) to an HU :class:`Volume`.

    Slices are ordered by ImagePositionPatient projected on the normal of
    ImageOrientationPatient, never by name or InstanceNumber (PS3.3 C.7.6.2.1.1).
    """
    cfg = cfg or CropConfig()
    if parsed is None:  # else: the files' parses from header_and_parse, in the same order
        parsed = [parse(data, key, "decode", cfg.max_file_bytes) for key, data in files]
    layout = series_layout([key for key, _ in files], parsed, cfg, max_voxels=max_voxels)
    return decode_slices(layout, parsed)
