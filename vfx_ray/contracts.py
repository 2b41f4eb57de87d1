"""The data contracts of DESIGN.md as pyarrow schemas, the typed rows that cross module
boundaries (``TypedDict``s beside the schema each one is a row of), and converters.

Images are stored with pyarrow's canonical ``fixed_shape_tensor`` extension type so that
pyarrow, pandas and DuckDB read them without Ray (DuckDB sees the storage array).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, TypedDict

import numpy as np
import pyarrow as pa

LABELS = {"benign": 0, "malignant": 1}


def image_type(channels: int = 3, size: int = 64) -> pa.DataType:
    return pa.fixed_shape_tensor(pa.float32(), [channels, size, size])


def crops_schema(channels: int = 3, size: int = 64) -> pa.Schema:
    return pa.schema(
        [
            ("patient_id", pa.string()),
            ("series_instance_uid", pa.string()),
            ("vertebra", pa.string()),
            ("slice_index", pa.int32()),  # sagittal slice number in the patient-frame reformat
            ("slice_x_mm", pa.float64()),  # LPS x of that slice's centre
            ("label", pa.int8()),  # 1 malignant, 0 benign, null unknown
            ("image", image_type(channels, size)),
            ("box_y_min_mm", pa.float64()),
            ("box_y_max_mm", pa.float64()),
            ("box_z_min_mm", pa.float64()),
            ("box_z_max_mm", pa.float64()),
        ]
    )


SERIES_INDEX_SCHEMA = pa.schema(
    [  # one row per series (imaging.dicom.series_record), then how the job chose among them
        ("series_instance_uid", pa.string()),
        ("patient_id", pa.string()),
        ("study_instance_uid", pa.string()),
        ("modality", pa.string()),
        ("sop_class_uid", pa.string()),
        ("series_description", pa.string()),
        ("image_type", pa.string()),
        ("convolution_kernel", pa.string()),
        ("pixel_spacing", pa.list_(pa.float64())),
        ("slice_thickness", pa.float64()),
        ("rows", pa.int64()),
        ("columns", pa.int64()),
        ("orientation", pa.list_(pa.float64())),
        ("transfer_syntax_uid", pa.string()),
        ("object_keys", pa.list_(pa.string())),
        ("instance_count", pa.int64()),
        ("n_frames", pa.int64()),
        ("total_bytes", pa.int64()),
        ("all_have_pixel_data", pa.bool_()),
        ("object_kind", pa.string()),
        ("plane", pa.string()),
        ("extent_mm", pa.list_(pa.float64())),
        ("selected", pa.bool_()),  # the crops come from this series
        ("selection", pa.string()),  # selected, named, why the series rules passed it over, or null
    ]
)


ERRORS_SCHEMA = pa.schema(
    [
        ("patient_id", pa.string()),
        ("series_instance_uid", pa.string()),
        ("object_key", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)


def scores_schema() -> pa.Schema:
    """``scores.parquet``: one row per scored patient (DESIGN.md)."""
    return pa.schema(
        [
            ("patient_id", pa.string()),
            ("series_instance_uid", pa.string()),
            ("vertebra", pa.string()),
            ("n_slices", pa.int32()),
            ("slice_indices", pa.list_(pa.int32())),
            ("slice_probabilities", pa.list_(pa.float64())),
            ("probability", pa.float64()),
            ("prediction", pa.string()),
            ("threshold", pa.float64()),
            ("label", pa.string()),
            ("model_id", pa.string()),
            ("n_models", pa.int32()),
            ("scored_at", pa.timestamp("us", tz="UTC")),
        ]
    )


# Beside a score's row in its committed part (not in scores.parquet): the scorer's class
# activation maps of the patient's top slice (float32, models x h x w), which its key image draws.
KEY_CAM = "key_slice_cam"


class ErrorRow(TypedDict):
    """One row of ``errors.parquet`` (:data:`ERRORS_SCHEMA`): who, where, and why."""

    patient_id: str | None
    series_instance_uid: str | None
    object_key: str | None
    stage: str
    error_type: str
    message: str


class CropRecord(TypedDict):
    """One crop's row of ``crops.parquet`` without its pixels (:func:`crops_schema` less ``image``):
    what the pipeline's CROP rows carry as their ``meta``."""

    patient_id: str
    series_instance_uid: str
    vertebra: str | None
    slice_index: int
    slice_x_mm: float
    label: int | None
    box_y_min_mm: float
    box_y_max_mm: float
    box_z_min_mm: float
    box_z_max_mm: float


class SliceScore(CropRecord):
    """A scored crop: its record, the probability of malignancy, with ``--features`` its
    embedding and with key images its class activation maps (float32 bytes each)."""

    probability: float
    embedding: bytes | None
    cam: bytes | None


class ScoreRow(TypedDict):
    """One row of ``scores.parquet`` (:func:`scores_schema`): a patient and the maximum over its slices."""

    patient_id: str
    series_instance_uid: str
    vertebra: str | None
    n_slices: int
    slice_indices: list[int]
    slice_probabilities: list[float]
    probability: float
    prediction: str
    threshold: float
    label: str | None
    model_id: str
    n_models: int
    scored_at: datetime


def key_slice(row: Mapping[str, Any]) -> int:
    """The position, in a scores row's slice lists, of the slice its key image shows: the
    first of the highest probability (the slice the max rule scores the patient by)."""
    probs = row["slice_probabilities"]
    return max(range(len(probs)), key=probs.__getitem__)


class CropsSummary(TypedDict):
    """What the crops stage returns and writes as ``manifest.json``."""

    archive: str
    annotations: str
    patients_planned: int
    patients_with_crops: int
    crops: int
    errors: int
    series: int
    patients_read_once: int
    patients_second_pass: int
    reads: dict[str, Any]
    seconds: float
    config: dict[str, Any]
    pseudonymized: bool
    pseudonym_key_id: str | None


def crops_table(rows: Iterable[Mapping[str, Any]], channels: int = 3, size: int = 64) -> pa.Table:
    """Rows (dicts with an ``image`` ndarray of shape (C, S, S)) as a crops table."""
    rows = list(rows)
    schema = crops_schema(channels, size)
    cols: dict[str, Any] = {}
    for f in schema:
        if f.name == "image":
            continue
        cols[f.name] = pa.array([r.get(f.name) for r in rows], type=f.type)
    images = np.stack([np.asarray(r["image"], dtype=np.float32) for r in rows]) if rows else (
        np.zeros((0, channels, size, size), np.float32)
    )
    cols["image"] = images_to_arrow(images)
    return pa.table([cols[f.name] for f in schema], schema=schema)


def images_to_arrow(images: np.ndarray) -> pa.ExtensionArray:
    images = np.ascontiguousarray(images, dtype=np.float32)
    if len(images) == 0:  # pyarrow refuses an empty ndarray here
        shape = list(images.shape[1:])
        storage = pa.array([], pa.list_(pa.float32(), int(np.prod(shape))))
        return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), shape), storage)
    return pa.FixedShapeTensorArray.from_numpy_ndarray(images)


def images_from_arrow(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N, C, S, S) float32 from a fixed_shape_tensor column (or its list storage)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column.type, pa.FixedShapeTensorType):
        return column.to_numpy_ndarray().astype(np.float32, copy=False)
    raise TypeError(f"image column has type {column.type}, expected fixed_shape_tensor")


def errors_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    rows = list(rows)
    return pa.table(
        {f.name: pa.array([r.get(f.name) for r in rows], type=f.type) for f in ERRORS_SCHEMA},
        schema=ERRORS_SCHEMA,
    )
