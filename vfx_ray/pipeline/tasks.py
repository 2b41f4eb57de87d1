"""What a Ray task does, as plain functions over object keys and bytes (no Ray here).

What a task does with its objects, as :mod:`wire` rows; nothing here raises for a bad study
(every failure becomes an error row):
- :func:`index_only`: a chunk's headers only, from ranged reads (score's re-runs);
- :func:`index_and_crop`: a chunk indexed, and every annotated series it holds cropped (the
  first pass of both jobs; :mod:`shards` lists and cuts the chunks);
- :func:`patient_batch`: one patient's planned series read and cropped (the second pass);
- :class:`CropParts`: the crops job's tasks write their crops themselves, a Parquet part each.

Both crop steps read by a plan (:func:`choose_plan`): "whole" reads each object once and
decodes the crops from the same bytes; "roi" reads every header by a ranged GET, then only
the objects that hold the slices the ROI needs. Either way only those slices are decoded
(:func:`crop_series`), and the crops are the same.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pandas as pd
import pyarrow as pa

from vfx_ray import storage
from vfx_ray.config import CropConfig
from vfx_ray.errors import VfxError, error_row
from vfx_ray.imaging import annotations as ann_mod
from vfx_ray.imaging import dicom, geometry, pseudonym
from vfx_ray.imaging.guards import parse
from vfx_ray.imaging.roi import RoiBox
from vfx_ray.pipeline import wire
from vfx_ray.pipeline.wire import CROP_WIRE, Kind, keys_hash, row

# Headers are read from a ranged GET of the first bytes: a CT header is a few KiB, the pixel
# data that follows is 128 KiB (256²) to 512 KiB (512²). A longer header is retried whole.
HEADER_READ_BYTES = 16 * 1024
# The roi plan reads every header of a clinical study (~1,000 objects of 512 KiB) to find the
# few dozen the ROI needs: a shorter probe keeps that index small beside them (a synthetic
# CT header is ~2 KiB; a vendor's with private tags 4-10 KiB). Longer headers are read whole.
HEADER_PROBE_BYTES = 8 * 1024
# A whole-plan chunk (first pass) is a run of the listing read whole by one task, which holds
# its bytes while it decodes: cut at these limits (a bigger folder is cut, and its series take the
# second pass).
CHUNK_OBJECTS = 512
CHUNK_BYTES = 256 << 20
# A roi-plan chunk holds headers, and the few objects an ROI needs while it decodes them.
ROI_CHUNK_OBJECTS = 4096


def choose_plan(cfg: CropConfig, folder_bytes: int) -> str:
    """The read plan for a folder (a study) of ``folder_bytes``: ``cfg.read_plan``, where
    "auto" is "roi" for a folder of at least ``cfg.roi_read_min_bytes``. Below that a header
    read costs about what the rest of a small object does (docs/benchmarks.md)."""
    if cfg.read_plan != "auto":
        return cfg.read_plan
    return "roi" if folder_bytes >= cfg.roi_read_min_bytes else "whole"


# ---------------------------------------------------------------- headers only
def read_one_header_parse(uri: str, size: int, prefix: bytes | BaseException, cfg: CropConfig
                          ) -> tuple[dict[str, Any], tuple, int]:
    """(header record, its parse, bytes read) of one object from its first bytes, or from the
    whole object when the header is longer than the prefix."""
    if isinstance(prefix, BaseException):
        raise prefix
    if len(prefix) < size:
        try:
            h, parsed = dicom.header_and_parse(prefix, uri, object_size=size, max_file_bytes=cfg.max_file_bytes)
            return h, parsed, len(prefix)
        except VfxError as exc:
            if exc.error_type != "HeaderBeyondPrefix":
                raise
        data = storage.read_bytes(uri)
        h, parsed = dicom.header_and_parse(data, uri, max_file_bytes=cfg.max_file_bytes)
        return h, parsed, len(prefix) + len(data)
    h, parsed = dicom.header_and_parse(prefix, uri, max_file_bytes=cfg.max_file_bytes)
    return h, parsed, len(prefix)


def read_one_header(uri: str, size: int, prefix: bytes | BaseException, cfg: CropConfig) -> dict[str, Any]:
    """Header of one object from its first bytes; the whole object when the header is longer."""
    return read_one_header_parse(uri, size, prefix, cfg)[0]


def series_rows(headers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One SERIES row per series of these headers: its record (:func:`dicom.series_record` of
    these objects) with only its first object key, its keys' mergeable hash, and every key
    with its object's size and SOP class and instance UIDs, in key order, packed
    (:func:`wire.pack_objects`). A series spread over chunks comes as one row per chunk (the
    driver merges)."""
    by_key = {h["object_key"]: h for h in headers}
    rows = []
    for record in dicom.group_series(headers):
        keys = record["object_keys"]
        hs = [by_key[k] for k in keys]
        packed = wire.pack_objects(keys, [h["size"] for h in hs], [[h["sop_class_uid"], h["sop_instance_uid"]]
                                                                     for h in hs])
        meta = {"record": {**record, "object_keys": keys[:1]}, "keys": keys_hash(keys), "objects": packed}
        rows.append(row("", Kind.SERIES, meta))
    return rows


def index_only(uris: list[str], sizes: list[int], cfg: CropConfig) -> list[dict[str, Any]]:
    """SERIES rows of the objects' headers (ranged reads), a HEADER_ERROR row for each other."""
    rows, headers = [], []
    for uri, size, prefix in zip(uris, sizes, storage.read_many(uris, nbytes=HEADER_READ_BYTES), strict=True):
        try:
            headers.append(read_one_header(uri, size, prefix, cfg))
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error row
            rows.append(row("", Kind.HEADER_ERROR, error_row(exc, "header", object_key=uri)))
    return rows + series_rows(headers)


# ---------------------------------------------------------------- one patient's crops
@dataclasses.dataclass
class Reads:
    """How one patient's series was read: the plan, and the bytes read of the patient's objects
    (whole or a header prefix) against the bytes of the objects its crops needed."""

    patient_id: str
    series_instance_uid: str
    plan: str
    objects_read_whole: int = 0
    bytes_read: int = 0
    bytes_needed: int = 0

    def row(self) -> dict[str, Any]:
        return row(self.patient_id, Kind.READS, dataclasses.asdict(self))


@dataclasses.dataclass
class ObjectsRead:
    """Objects as a read plan read them: header records, parses (of the whole object or of a
    header prefix), HEADER_ERROR rows, bytes read per object and the objects held whole."""

    cfg: CropConfig
    headers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    parsed: dict[str, tuple] = dataclasses.field(default_factory=dict)
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    read: dict[str, int] = dataclasses.field(default_factory=dict)
    whole: set[str] = dataclasses.field(default_factory=set)

    @classmethod
    def by_plan(cls, uris: list[str], sizes: list[int], plan: str, cfg: CropConfig) -> ObjectsRead:
        """"whole": every object read whole; "roi": the first ``HEADER_PROBE_BYTES`` of each."""
        got = cls(cfg)
        probe = HEADER_PROBE_BYTES if plan == "roi" else None
        for uri, size, data in zip(uris, sizes, storage.read_many(uris, nbytes=probe), strict=True):
            try:
                h, parsed, n = read_one_header_parse(uri, size, data, cfg)
            except Exception as exc:  # noqa: BLE001 - every failure becomes an error row
                stage = "read" if isinstance(data, BaseException) else "header"
                got.errors.append(row("", Kind.HEADER_ERROR, error_row(exc, stage, object_key=uri)))
                continue
            got.headers.append(h)
            got.parsed[uri], got.read[uri] = parsed, n
            if n >= h["size"]:
                got.whole.add(uri)
        return got

    def fetch(self, keys: list[str]) -> dict[str, tuple]:
        """The objects' parses, whole: those held as a header prefix are read whole first."""
        missing = [k for k in keys if k not in self.whole]
        for key, data in zip(missing, storage.read_many(missing), strict=True):
            if isinstance(data, BaseException):
                raise VfxError("read", f"{key}: {data}", object_key=key, error_type=type(data).__name__)
            self.parsed[key] = parse(data, key, "decode", self.cfg.max_file_bytes)
            self.read[key] += len(data)
            self.whole.add(key)
        return {k: self.parsed[k] for k in keys}

    def reads(self, plan: str, task: dict[str, Any], needed: list[str], keys: list[str] | None = None) -> Reads:
        """The READS record of a task: ``keys`` (default: every object of the task's patient)."""
        pid = task["patient_id"]
        mine = keys if keys is not None else [h["object_key"] for h in self.headers
                                              if str(h.get("patient_id")) == pid]
        size = {h["object_key"]: h["size"] for h in self.headers}
        return Reads(pid, task["series_instance_uid"], plan, sum(k in self.whole for k in mine),
                     sum(self.read.get(k, 0) for k in mine), sum(size[k] for k in needed))

    def total(self, plan: str) -> Reads:
        """The READS record of everything read (patient id empty): a chunk's bytes, whoever they were for."""
        return Reads("", "", plan, len(self.whole), sum(self.read.values()))

    def first_error(self) -> VfxError:
        e = json.loads(self.errors[0]["meta"])
        return VfxError(e["stage"], e["message"], object_key=e["object_key"], error_type=e["error_type"])


def crop_series(task: dict[str, Any], parsed: dict[str, tuple], cfg: CropConfig,
                fetch: Callable[[list[str]], dict[str, tuple]] | None = None) -> tuple[list[dict], list[str]]:
    """One patient's CROP rows (or its ERROR row) and the objects its crops needed.

    ``parsed`` holds the series' objects parsed, whole or from a header prefix; the slices the
    ROI needs are found from the headers (:func:`geometry.slices_needed`) and only their objects
    are decoded, read whole first by ``fetch`` where ``parsed`` holds a prefix.
    """
    keys, needed, stage = task["object_keys"], [], "decode"
    try:
        roi = RoiBox(*task["roi"])
        layout = dicom.series_layout(keys, [parsed[k] for k in keys], cfg)
        k0, k1 = geometry.slices_needed(layout, roi, cfg)
        files = layout.files(k0, k1)
        needed = [keys[i] for i in files]
        stage = "read"
        whole = fetch(needed) if fetch else parsed
        stage = "decode"
        volume = dicom.decode_slices(layout, {i: whole[keys[i]] for i in files}, k0, k1)
        stage = "crop"
        records = geometry.crop_samples(volume, roi, cfg)
    except Exception as exc:  # noqa: BLE001 - one bad study never stops the batch
        return [wire.error(exc, stage, task)], needed
    return wire.crops(task, records), needed


def decode_box(keys: list[str], sizes: list[int], box: RoiBox, cfg: CropConfig) -> dicom.Volume:
    """The slices of a series that ``box`` needs, decoded (``Volume.first_slice`` says where
    they start): the objects read by their series' plan (:func:`choose_plan`), and only those
    holding the slices decoded. Raises on the first object that cannot be read."""
    objs = ObjectsRead.by_plan(keys, sizes, choose_plan(cfg, sum(sizes)), cfg)
    if objs.errors:
        raise objs.first_error()
    layout = dicom.series_layout(keys, [objs.parsed[k] for k in keys], cfg)
    k0, k1 = geometry.slices_needed(layout, box, cfg)
    files = layout.files(k0, k1)
    whole = objs.fetch([keys[i] for i in files])
    return dicom.decode_slices(layout, {i: whole[keys[i]] for i in files}, k0, k1)


def crop_patient(task: dict[str, Any], cfg: CropConfig) -> list[dict[str, Any]]:
    """One patient's series read by its plan and cropped: CROP rows or an ERROR row, and a READS row."""
    keys, sizes = task["object_keys"], task.get("object_sizes")
    plan = (task.get("read_plan") or "whole") if sizes else "whole"  # a header probe needs the object's size
    objs = ObjectsRead.by_plan(keys, sizes or [0] * len(keys), plan, cfg)
    if objs.errors:  # a series with an unreadable object: the patient's error row
        return [wire.error(objs.first_error(), "read", task), objs.reads(plan, task, [], keys).row()]
    rows, needed = crop_series(task, objs.parsed, cfg, objs.fetch)
    return [*rows, objs.reads(plan, task, needed, keys).row()]


def task_item(task: ann_mod.PatientTask, read_plan: str = "whole", sizes: list[int] | None = None) -> dict[str, str]:
    """A planned task as a dataset item (JSON: it crosses to the workers as text)."""
    item = {**dataclasses.asdict(task), "read_plan": read_plan, "object_sizes": sizes}
    return {"task": json.dumps(item, default=str)}


@dataclasses.dataclass(frozen=True)
class CropParts:
    """Where the crops job's tasks write their crops: a Parquet part (a contract crops table,
    identifiers already pseudonymised when the job is) per first-pass chunk or second-pass
    patient, under ``prefix``. A PART row tells the driver the part's name, so no crop passes
    through the driver; a worker joins the parts into ``crops.parquet`` at the end."""

    prefix: str
    pseudo: pseudonym.Pseudonymizer | None = None

    def put(self, rows: list[dict[str, Any]], name: str, cfg: CropConfig, pid: str = "") -> list[dict[str, Any]]:
        """The rows with their CROP rows written to part ``name`` and replaced by its PART row."""
        crops = [r for r in rows if r["kind"] == Kind.CROP]
        if not crops:
            return rows
        table = wire.to_crops(pa.Table.from_pylist(crops, schema=CROP_WIRE), cfg)[0]
        uri = storage.join(self.prefix, name + ".parquet")
        rest = [r for r in rows if r["kind"] != Kind.CROP]
        try:
            storage.write_table(pseudonym.hide(self.pseudo, table), uri)
        except Exception as exc:  # noqa: BLE001 - each patient's error row (a store that is down fails the job)
            ids = dict.fromkeys(zip(table["patient_id"].to_pylist(), table["series_instance_uid"].to_pylist(),
                                    strict=True))
            return [*rest, *(wire.error(exc, "crop", {"patient_id": p, "series_instance_uid": u}) for p, u in ids)]
        return [*rest, row(pid, Kind.PART, {"uri": uri})]


def patient_batch(batch: pa.Table, cfg: CropConfig, parts: CropParts | None = None) -> pa.Table:
    rows: list[dict[str, Any]] = []
    for item in batch["task"].to_pylist():
        task = json.loads(item)
        got = crop_patient(task, cfg)
        if parts:
            name = "patient-" + wire.fingerprint([task["patient_id"], task["series_instance_uid"]])
            got = parts.put(got, name, cfg, task["patient_id"])
        rows += got
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


def index_and_crop(uris: list[str], sizes: list[int], plan: str, cfg: CropConfig,
                   annotations: pd.DataFrame) -> list[dict[str, Any]]:
    """One chunk's rows: HEADER_ERROR rows, its SERIES rows, then for each series the chunk
    can crop a CANDIDATE row (its object keys' hash), its CROP or ERROR rows and a
    READS row; last a READS row of the whole chunk (no patient id).

    ``plan`` (:class:`ObjectsRead`) "whole": every object read whole once and the crops decoded
    from those bytes; "roi": every header by a ranged GET, then only the objects holding the
    slices an ROI needs read whole. The crops are candidates: the driver plans again on the
    whole archive's index and keeps them only when the chunk held the planned series complete
    (:meth:`index.ArchiveIndex.read_once`).
    """
    objs = ObjectsRead.by_plan(uris, sizes, plan, cfg)
    rows = list(objs.errors)
    if not objs.headers:
        return [*rows, objs.total(plan).row()]
    rows += series_rows(objs.headers)
    tasks, _ = ann_mod.plan_tasks(annotations_for(annotations, objs.headers), dicom.group_series(objs.headers),
                                  rules=cfg.series_rules)
    for t in tasks:  # the chunk's own join errors do not matter: the driver plans globally
        meta = {"series_instance_uid": t.series_instance_uid, "keys": keys_hash(t.object_keys)}
        rows.append(row(t.patient_id, Kind.CANDIDATE, meta))
        task = json.loads(task_item(t)["task"])
        crops, needed = crop_series(task, objs.parsed, cfg, objs.fetch)
        rows += [*crops, objs.reads(plan, task, needed).row()]
    return [*rows, objs.total(plan).row()]
