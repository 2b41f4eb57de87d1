"""What a Ray task does, as plain functions over object keys and bytes (no Ray here).

Three task bodies, each a ``map_batches`` function that takes a pyarrow batch and returns
:mod:`wire` rows, and never raises for a bad study (every failure becomes an error row):
- :func:`index_batch`: headers only, from ranged reads (score's re-runs);
- :func:`chunk_batch`: a chunk of the listing read whole once, indexed, and every annotated
  series it holds cropped from the same bytes (the first pass of both jobs);
- :func:`patient_batch`: one patient's planned series read and cropped (the second pass).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pandas as pd
import pyarrow as pa

from vfx_ray import annotations as ann_mod
from vfx_ray import dicom, geometry, storage
from vfx_ray.config import CropConfig
from vfx_ray.errors import VfxError, error_row
from vfx_ray.pipeline import wire
from vfx_ray.pipeline.wire import CROP_WIRE, Kind, fingerprint, row
from vfx_ray.roi import RoiBox

# Headers are read from a ranged GET of the first bytes: a CT header is a few KiB, the pixel
# data that follows is 128 KiB (256²) to 512 KiB (512²). A longer header is retried whole.
HEADER_READ_BYTES = 16 * 1024
# A chunk (first pass) is a run of the listing read whole by one task, which holds its bytes
# while it decodes: cut at these limits (a bigger folder is cut, and its series take the
# second pass).
CHUNK_OBJECTS = 512
CHUNK_BYTES = 256 << 20


# ---------------------------------------------------------------- headers only
def read_one_header(uri: str, size: int, prefix: bytes | BaseException, cfg: CropConfig) -> dict[str, Any]:
    """Header of one object from its first bytes; the whole object when the header is longer."""
    if isinstance(prefix, BaseException):
        raise prefix
    if len(prefix) < size:
        try:
            return dicom.read_header(prefix, uri, object_size=size, max_file_bytes=cfg.max_file_bytes)
        except VfxError as exc:
            if exc.error_type != "HeaderBeyondPrefix":
                raise
        prefix = storage.read_bytes(uri)
    return dicom.read_header(prefix, uri, max_file_bytes=cfg.max_file_bytes)


def index_batch(batch: pa.Table, cfg: CropConfig) -> pa.Table:
    """A HEADERS row for the batch's readable objects, a HEADER_ERROR row for each other."""
    uris, sizes = batch["uri"].to_pylist(), batch["size"].to_pylist()
    rows, headers = [], []
    for uri, size, prefix in zip(uris, sizes, storage.read_many(uris, nbytes=HEADER_READ_BYTES), strict=True):
        try:
            headers.append(read_one_header(uri, size, prefix, cfg))
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error row
            rows.append(row("", Kind.HEADER_ERROR, error_row(exc, "header", object_key=uri)))
    if headers:
        rows.append(row("", Kind.HEADERS, headers))
    return pa.Table.from_pylist(rows, schema=CROP_WIRE)


# ---------------------------------------------------------------- one patient's crops
def crop_files(task: dict[str, Any], files: list[tuple[str, bytes]], cfg: CropConfig,
               parsed: list[tuple] | None = None) -> list[dict[str, Any]]:
    """Decode and crop one patient's objects (already read, maybe parsed) into wire rows."""
    stage = "decode"
    try:
        volume = dicom.load_volume(files, cfg, parsed=parsed)
        stage = "crop"
        records = geometry.crop_samples(volume, RoiBox(*task["roi"]), cfg)
    except Exception as exc:  # noqa: BLE001 - one bad study never stops the batch
        return [wire.error(exc, stage, task)]
    return wire.crops(task, records)


def crop_patient(task: dict[str, Any], cfg: CropConfig) -> list[dict[str, Any]]:
    """The crops of one patient read from the store, or its error row."""
    keys = task["object_keys"]
    files = []
    for key, data in zip(keys, storage.read_many(keys), strict=True):
        if isinstance(data, BaseException):
            exc = VfxError("read", f"{key}: {data}", object_key=key, error_type=type(data).__name__)
            return [wire.error(exc, "read", task)]
        files.append((key, data))
    return crop_files(task, files, cfg)


def task_item(task: ann_mod.PatientTask) -> dict[str, str]:
    """A planned task as a dataset item (JSON: it crosses to the workers as text)."""
    return {"task": json.dumps(dataclasses.asdict(task), default=str)}


def patient_batch(batch: pa.Table, cfg: CropConfig) -> pa.Table:
    rows: list[dict[str, Any]] = []
    for item in batch["task"].to_pylist():
        rows += crop_patient(json.loads(item), cfg)
    return pa.Table.from_pylist(rows, schema=CROP_WIRE)


# ---------------------------------------------------------------- a chunk: index and crop
def annotations_for(annotations: pd.DataFrame, headers: list[dict[str, Any]]) -> pd.DataFrame:
    """The annotation rows that can name a series of these headers (a cheap join per chunk)."""
    pids = {str(h.get("patient_id")) for h in headers}
    uids = {h["series_instance_uid"] for h in headers}
    keep = annotations["patient_id"].astype(str).isin(pids)
    if "series_instance_uid" in annotations.columns:
        keep |= annotations["series_instance_uid"].astype(str).isin(uids)
    return annotations[keep]


def read_and_parse(uris: list[str], cfg: CropConfig) -> tuple[list[dict], dict[str, tuple], list[dict]]:
    """(headers, key → (bytes, parse), HEADER_ERROR rows) of objects read whole once."""
    headers, by_key, errors = [], {}, []
    for uri, data in zip(uris, storage.read_many(uris), strict=True):
        try:
            if isinstance(data, BaseException):
                raise data
            h, parsed = dicom.header_and_parse(data, uri, max_file_bytes=cfg.max_file_bytes)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error row
            errors.append(row("", Kind.HEADER_ERROR, error_row(exc, "header", object_key=uri)))
            continue
        headers.append(h)
        by_key[uri] = (data, parsed)
    return headers, by_key, errors


def index_and_crop(uris: list[str], cfg: CropConfig, annotations: pd.DataFrame) -> list[dict[str, Any]]:
    """One chunk's rows: HEADER_ERROR rows, one HEADERS row, then for each series the chunk
    can crop a CANDIDATE row (its object keys' fingerprint) and its CROP or ERROR rows.

    The crops are candidates: the driver plans again on the whole archive's index and keeps
    them only when the chunk held the planned series complete (:meth:`ArchiveIndex.read_once`).
    """
    headers, by_key, rows = read_and_parse(uris, cfg)
    if not headers:
        return rows
    rows.append(row("", Kind.HEADERS, headers))  # one row: the rows that reach a model are crops
    tasks, _ = ann_mod.plan_tasks(annotations_for(annotations, headers), dicom.group_series(headers),
                                  rules=cfg.series_rules)
    for t in tasks:  # the chunk's own join errors do not matter: the driver plans globally
        meta = {"series_instance_uid": t.series_instance_uid, "keys": fingerprint(t.object_keys)}
        rows.append(row(t.patient_id, Kind.CANDIDATE, meta))
        task = json.loads(task_item(t)["task"])
        files = [(k, by_key[k][0]) for k in t.object_keys]
        rows += crop_files(task, files, cfg, parsed=[by_key[k][1] for k in t.object_keys])
    return rows


def chunk_batch(batch: pa.Table, cfg: CropConfig, annotations: pd.DataFrame) -> pa.Table:
    """Each chunk's rows closed by a CHUNK_END row naming it: with rows in order, a consumer
    knows when a chunk is complete (``score`` commits chunks for resuming)."""
    rows: list[dict[str, Any]] = []
    for uris, chunk in zip(batch["uris"].to_pylist(), batch["chunk"].to_pylist(), strict=True):
        rows += index_and_crop(uris, cfg, annotations)
        rows.append(row("", Kind.CHUNK_END, {"chunk": chunk}))
    return pa.Table.from_pylist(rows, schema=CROP_WIRE)
