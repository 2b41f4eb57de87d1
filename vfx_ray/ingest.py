"""The paper's preprocessing as Ray Data pipelines: archive index, then per-patient crops.

Ray does the parallel work (header reads, decode, reformat, crops); the driver only plans
(lists the archive, joins annotations) and streams the results into Parquet. Rows cross the
pipeline in a small "wire" form (JSON metadata + raw image bytes) so that every block has
the same schema whatever a patient produced — crops or an error.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import posixpath
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from vfx_ray import annotations as ann_mod
from vfx_ray import contracts, dicom, geometry, layout, pseudonym, storage
from vfx_ray.config import CropConfig
from vfx_ray.errors import VfxError, error_row
from vfx_ray.roi import RoiBox

WIRE_SCHEMA = pa.schema(
    [("patient_id", pa.string()), ("kind", pa.string()), ("meta", pa.string()), ("image", pa.binary())]
)
# Headers are read from a ranged GET of the first bytes: a CT header is a few KiB, the pixel
# data that follows is 128 KiB (256²) to 512 KiB (512²). A longer header is retried whole.
HEADER_READ_BYTES = 16 * 1024
HEADER_WIRE = pa.schema([("object_key", pa.string()), ("header", pa.string()), ("error", pa.string())])
# What a decode task asks Ray for (``memory=``), see decode_memory.
DECODE_MEMORY_CAP = 4 << 30
DECODE_WORKER_BYTES = 512 << 20  # the worker itself: Python, numpy, pyarrow, pydicom, SimpleITK
SERIES_BYTES_PER_VOXEL = 2  # stored CT pixels are 16-bit; compressed ones are smaller


def decode_memory(input_bytes: int, max_voxels: int = dicom.MAX_VOXELS, cap: int = DECODE_MEMORY_CAP) -> int:
    """Bytes to reserve (Ray's ``memory=``) for a task that holds ``input_bytes`` of DICOM
    objects while it decodes a series from them, so that Ray schedules decode tasks by memory
    instead of its memory monitor killing them on a crowded node.

    Peak: the objects' bytes + the series as float32 (at most ``max_voxels``) + a second
    float32 copy (unevenly spaced slices are resampled into a new array) + the worker itself.
    Capped at ``cap``: the bound is a series at the refusal limit (2.4 GB a copy), while a CT
    series is typically 512 x 512 x 300-600 (0.3-0.6 GB); a request above a node's memory
    would never run, and 4 GiB still lets a 2-core 24 GiB machine (13 GiB of Ray memory)
    decode on both cores.
    """
    return int(min(cap, DECODE_WORKER_BYTES + input_bytes + 2 * 4 * max_voxels))


# ---------------------------------------------------------------- listing (driver)
def escapes_prefix(archive_uri: str, uri: str) -> bool:
    """Whether an object key lies outside the archive prefix once normalised.

    S3 keys may contain ``..`` segments that a later reader would resolve; a local archive
    may hold symbolic links to files elsewhere. Neither is read.
    """
    if not storage.is_s3(archive_uri):
        root = os.path.realpath(archive_uri)
        return os.path.commonpath([root, os.path.realpath(uri)]) != root
    base = archive_uri.rstrip("/")
    if not uri.startswith(base + "/"):
        return True
    rel = uri[len(base) + 1 :]
    return ".." in rel.split("/") or posixpath.normpath(rel).startswith("..")


def list_archive(archive_uri: str, cfg: CropConfig) -> tuple[list[storage.FileEntry], list[dict]]:
    """Every object under the archive prefix, minus those refused before reading."""
    entries, errors = [], []
    for e in storage.list_files(archive_uri):
        if escapes_prefix(archive_uri, e.uri):
            errors.append(VfxError("list", f"object key {e.uri} escapes the archive prefix {archive_uri}; it is not read", object_key=e.uri, error_type="KeyEscapesPrefix").row())
        elif e.size > cfg.max_file_bytes:
            errors.append(VfxError("list", f"{e.size} bytes is above the limit of {cfg.max_file_bytes} (CropConfig.max_file_bytes); not read", object_key=e.uri, error_type="FileTooLarge").row())
        else:
            entries.append(e)
    return entries, errors


def raise_if_store_down(errors: list[dict]) -> None:
    """An unreachable store fails the job: every later read would fail the same way, after
    a minute of retries each. Bad studies stay error rows."""
    for e in errors:
        if e.get("error_type") == storage.StoreUnavailable.__name__:
            key = e.get("object_key")  # the job's message must not name a patient's object
            raise storage.StoreUnavailable(e["message"].replace(key, "<key>") if key else e["message"])


# ---------------------------------------------------------------- headers (Ray tasks)
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


def read_headers_batch(batch: pa.Table, cfg: CropConfig) -> pa.Table:
    uris, sizes = batch["uri"].to_pylist(), batch["size"].to_pylist()
    prefixes = storage.read_many(uris, nbytes=HEADER_READ_BYTES)
    out: dict[str, list] = {"object_key": [], "header": [], "error": []}
    for uri, size, prefix in zip(uris, sizes, prefixes, strict=True):
        out["object_key"].append(uri)
        try:
            out["header"].append(json.dumps(read_one_header(uri, size, prefix, cfg)))
            out["error"].append(None)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error row
            out["header"].append(None)
            out["error"].append(json.dumps(error_row(exc, "header", object_key=uri)))
    return pa.table(out, schema=HEADER_WIRE)


def build_index(entries: list[storage.FileEntry], cfg: CropConfig) -> tuple[list[dict], list[dict]]:
    """(series index, header error rows): headers read in parallel by Ray Data."""
    import ray

    if not entries:
        return [], []
    items = [{"uri": e.uri, "size": e.size} for e in entries]
    batch = 256
    blocks = max(1, min(-(-len(items) // batch), 1000))
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        read_headers_batch, fn_kwargs={"cfg": cfg}, batch_format="pyarrow", batch_size=batch, num_cpus=1
    )
    headers, errors = [], []
    for row in ds.iter_rows():
        if row["error"] is not None:
            errors.append(json.loads(row["error"]))
        else:
            headers.append(json.loads(row["header"]))
    raise_if_store_down(errors)
    return dicom.group_series(headers), errors


# ---------------------------------------------------------------- crops (Ray tasks)
def task_to_item(task: ann_mod.PatientTask) -> dict[str, str]:
    return {"task": json.dumps(dataclasses.asdict(task), default=str)}


def crop_patient(task: dict[str, Any], cfg: CropConfig) -> list[dict[str, Any]]:
    """The crops of one patient read from the store, or its error rows; never raises."""
    keys = task["object_keys"]
    files = []
    for key, data in zip(keys, storage.read_many(keys), strict=True):
        if isinstance(data, BaseException):
            exc = VfxError("read", f"{key}: {data}", object_key=key, error_type=type(data).__name__)
            return [error_wire(exc, "read", task)]
        files.append((key, data))
    return crops_from_files(task, files, cfg)


def error_wire(exc: BaseException, stage: str, task: dict[str, Any]) -> dict[str, Any]:
    row = error_row(exc, stage, patient_id=task["patient_id"], series_instance_uid=task["series_instance_uid"])
    return {"patient_id": task["patient_id"], "kind": "error", "meta": json.dumps(row), "image": b""}


def crops_from_files(task: dict[str, Any], files: list[tuple[str, bytes]], cfg: CropConfig, parsed: list[tuple] | None = None) -> list[dict[str, Any]]:
    """Decode and crop one patient's objects (already read, maybe parsed) into wire rows; never raises."""
    pid, uid = task["patient_id"], task["series_instance_uid"]
    stage = "decode"
    try:
        volume = dicom.load_volume(files, cfg, parsed=parsed)
        stage = "crop"
        roi = RoiBox(*task["roi"])
        crops = geometry.crop_samples(volume, roi, cfg)
    except Exception as exc:  # noqa: BLE001 - one bad study never stops the batch
        return [error_wire(exc, stage, task)]
    rows = []
    for c in crops:
        meta = {k: v for k, v in c.items() if k != "image"}
        meta.update(patient_id=pid, series_instance_uid=uid, vertebra=task.get("vertebra"), label=task.get("label"))
        image = np.ascontiguousarray(c["image"], dtype=np.float32)
        rows.append({"patient_id": pid, "kind": "crop", "meta": json.dumps(meta, default=float), "image": image.tobytes()})
    return rows


def crop_batch(batch: pa.Table, cfg: CropConfig) -> pa.Table:
    rows: list[dict[str, Any]] = []
    for item in batch["task"].to_pylist():
        rows += crop_patient(json.loads(item), cfg)
    return pa.Table.from_pylist(rows, schema=WIRE_SCHEMA)


def crops_dataset(tasks: list[ann_mod.PatientTask], cfg: CropConfig, num_cpus: float = 1):
    """A Ray Dataset of wire rows (one block per patient, so patients decode in parallel)."""
    import ray

    items = [task_to_item(t) for t in tasks]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds.context.execution_options.preserve_order = True  # same archive, same output file
    ds.context.max_errored_blocks = -1  # a lost task is reported per patient below, not a failed job
    memory = decode_memory(SERIES_BYTES_PER_VOXEL * dicom.MAX_VOXELS)  # a whole series' objects
    return ds.map_batches(crop_batch, fn_kwargs={"cfg": cfg}, batch_format="pyarrow", batch_size=1,
                          num_cpus=num_cpus, memory=memory)


def wire_to_crops(batch: pa.Table, cfg: CropConfig) -> tuple[pa.Table, list[dict]]:
    """Split a wire batch into a contract crops table and error rows."""
    crops, errors = [], []
    shape = (cfg.channels, cfg.crop_size, cfg.crop_size)
    for kind, meta, image in zip(batch["kind"].to_pylist(), batch["meta"].to_pylist(), batch["image"].to_pylist(), strict=True):
        row = json.loads(meta)
        if kind == "error":
            errors.append(row)
        else:
            row["image"] = np.frombuffer(image, dtype=np.float32).reshape(shape)
            crops.append(row)
    return contracts.crops_table(crops, cfg.channels, cfg.crop_size), errors


# ---------------------------------------------------------------- the job
def index_table(index: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(index) if index else pa.table({"series_instance_uid": pa.array([], pa.string())})


def stream_crops(ds, tasks: list[ann_mod.PatientTask], cfg: CropConfig, progress: bool) -> Iterator[tuple[pa.Table, list[dict]]]:
    bar = tqdm(total=len(tasks), desc="crops: patients", unit="patient", disable=not progress)
    seen: set[str] = set()
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        table, errors = wire_to_crops(batch, cfg)
        raise_if_store_down(errors)
        new = set(batch["patient_id"].to_pylist()) - seen
        seen |= new
        bar.update(len(new))
        yield table, errors
    bar.close()
    lost = [t for t in tasks if t.patient_id not in seen]
    yield contracts.crops_table([], cfg.channels, cfg.crop_size), [
        VfxError("crop", "the task processing this patient was lost (worker crash or out of memory) after Ray's retries", patient_id=t.patient_id, series_instance_uid=t.series_instance_uid, error_type="TaskLost").row()
        for t in lost
    ]


def run_crops(archive_uri: str, annotations_uri: str, out_uri: str, cfg: CropConfig | None = None, *, progress: bool = True, pseudonymize: bool = False) -> dict[str, Any]:
    """The crops job: writes crops.parquet, errors.parquet, series_index.parquet, manifest.json.

    One pass reads each object once, indexes and crops speculatively (:mod:`onepass`); the
    patients it could not vouch for take a second pass. ``pseudonymize``: identifiers in
    every output replaced by keyed hashes (:mod:`pseudonym`).
    """
    from vfx_ray import onepass
    from vfx_ray.raysession import ensure_ray

    cfg = cfg or CropConfig()
    pseudo = pseudonym.maybe(pseudonymize, archive_uri)
    ensure_ray()
    t0 = time.monotonic()
    entries, errors = list_archive(archive_uri, cfg)
    annotations = ann_mod.read_annotations(annotations_uri)
    with tempfile.TemporaryDirectory(prefix="vfx-crops-") as tmp:
        spill = os.path.join(tmp, "speculative.parquet")
        first = onepass.first_pass(entries, annotations, cfg, spill, progress)
        index = dicom.group_series(first.headers)
        tasks, plan_errors = ann_mod.plan_tasks(annotations, index)
        errors += first.errors + plan_errors
        read_once = first.accepted(tasks)
        second = [t for t in tasks if t.patient_id not in read_once]
        if pseudo:
            pseudo.know_patients([t.patient_id for t in tasks] + [s.get("patient_id") for s in index])
        hide = pseudo.table if pseudo else (lambda t: t)
        storage.write_table(hide(index_table(index)), storage.join(out_uri, layout.SERIES_INDEX))
        n_crops = 0
        patients_with_crops: set[str] = set()
        metadata = {"vfx_ray.crop_config": json.dumps(dataclasses.asdict(cfg)), "vfx_ray.archive": archive_uri,
                    "vfx_ray.pseudonyms": json.dumps(pseudonym.metadata(pseudo))}
        schema = contracts.crops_schema(cfg.channels, cfg.crop_size).with_metadata(metadata)
        with storage.atomic_output(storage.join(out_uri, layout.CROPS)) as sink:
            with pq.ParquetWriter(sink, schema) as writer:
                results = onepass.accepted_rows(spill, read_once, cfg)
                if second:
                    results = itertools.chain(results, stream_crops(crops_dataset(second, cfg), second, cfg, progress))
                for table, errs in results:
                    errors += errs
                    if table.num_rows:
                        writer.write_table(hide(table).replace_schema_metadata(metadata))
                        n_crops += table.num_rows
                        patients_with_crops |= set(table["patient_id"].to_pylist())
    if pseudo:
        pseudo.know_patients(e.get("patient_id") for e in errors)
        errors = [pseudo.row(e) for e in errors]
    storage.write_table(contracts.errors_table(errors), storage.join(out_uri, layout.ERRORS))
    summary = {
        "archive": archive_uri,
        "annotations": annotations_uri,
        "patients_planned": len(tasks),
        "patients_with_crops": len(patients_with_crops),
        "crops": n_crops,
        "errors": len(errors),
        "series": len(index),
        "patients_read_once": len(read_once),
        "patients_second_pass": len(second),
        "seconds": round(time.monotonic() - t0, 1),
        "config": dataclasses.asdict(cfg),
        **pseudonym.metadata(pseudo),
    }
    storage.write_text(storage.join(out_uri, layout.MANIFEST), json.dumps(summary, indent=2))
    return summary
