"""One read per object for the crops job: index headers and crop in the same Ray task.

The plain plan reads the archive twice: every header (to find the series, which any
folder layout may scatter), then every annotated series whole to decode it. On a few cores
the second round of GETs, header parses and store work costs as much as the decoding.

Here each task takes a chunk of the listing cut at folder boundaries, reads its objects
whole once, indexes their headers and, for every annotated series found in the chunk,
decodes and crops at once from the same bytes. These results are speculative: the driver
plans on the global index exactly as before and accepts a patient's result only when the
chunk held the series' complete object list (same keys). Any other patient (a series spread
over folders, a patient with a second series elsewhere) goes through the second pass
(:func:`ingest.crops_dataset`), so the crops are the same for any layout and the usual
layout (a series per folder) is read once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from vfx_ray import annotations as ann_mod
from vfx_ray import dicom, ingest, storage
from vfx_ray.config import CropConfig
from vfx_ray.errors import VfxError, error_row

CHUNK_OBJECTS = 512
CHUNK_BYTES = 256 << 20  # a task holds its chunk's bytes while it decodes
CHUNKS_PER_CPU = 4  # enough chunks that every CPU stays busy to the end


def folder(uri: str) -> str:
    return uri.rsplit("/", 1)[0]


def chunk_entries(entries: list[storage.FileEntry], max_objects: int | None = None, max_bytes: int | None = None, target_objects: int | None = None) -> list[list[storage.FileEntry]]:
    """The listing (sorted) packed into chunks that keep each folder whole, unless one
    folder alone is above the limits (then it is cut, and its series take the second pass).

    Folders are packed up to ``target_objects`` per chunk (default: the limit): fewer
    objects per chunk, more chunks for the cluster's CPUs to share.
    """
    max_objects, max_bytes = max_objects or CHUNK_OBJECTS, max_bytes or CHUNK_BYTES
    target = min(target_objects or max_objects, max_objects)
    chunks: list[list[storage.FileEntry]] = []
    cur: list[storage.FileEntry] = []
    cur_bytes = 0
    for _, run in itertools.groupby(entries, key=lambda e: folder(e.uri)):
        pieces: list[list[storage.FileEntry]] = [[]]
        piece_bytes = 0
        for e in run:
            if pieces[-1] and (len(pieces[-1]) >= max_objects or piece_bytes + e.size > max_bytes):
                pieces.append([])
                piece_bytes = 0
            pieces[-1].append(e)
            piece_bytes += e.size
        for piece in pieces:
            size = sum(e.size for e in piece)
            if cur and (len(cur) + len(piece) > target or cur_bytes + size > max_bytes):
                chunks.append(cur)
                cur, cur_bytes = [], 0
            cur += piece
            cur_bytes += size
    if cur:
        chunks.append(cur)
    return chunks


def keys_fingerprint(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:24]


def _wire(pid: str, kind: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {"patient_id": pid, "kind": kind, "meta": json.dumps(meta, default=str), "image": b""}


def relevant(annotations: pd.DataFrame, headers: list[dict[str, Any]]) -> pd.DataFrame:
    """The annotation rows that can name a series of these headers (keeps the join per chunk cheap)."""
    pids = {str(h.get("patient_id")) for h in headers}
    uids = {h["series_instance_uid"] for h in headers}
    keep = annotations["patient_id"].astype(str).isin(pids)
    if "series_instance_uid" in annotations.columns:
        keep |= annotations["series_instance_uid"].astype(str).isin(uids)
    return annotations[keep]


def index_and_crop_chunk(uris: list[str], cfg: CropConfig, annotations: pd.DataFrame) -> list[dict[str, Any]]:
    """Wire rows of one chunk: an error row per object whose header failed, one row holding
    the others' headers, then for each series the chunk can crop a ``spec`` row (its object
    keys' fingerprint) and its crop or error rows."""
    rows, headers, by_key = [], [], {}
    for uri, data in zip(uris, storage.read_many(uris), strict=True):
        try:
            if isinstance(data, BaseException):
                raise data
            h, parsed = dicom.header_and_parse(data, uri, max_file_bytes=cfg.max_file_bytes)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error row
            rows.append(_wire("", "header_error", error_row(exc, "header", object_key=uri)))
            continue
        headers.append(h)
        by_key[uri] = (data, parsed)
    if headers:  # one row for the chunk's headers: the rows that reach the model are mostly crops
        rows.append(_wire("", "headers", headers))
        tasks, _ = ann_mod.plan_tasks(relevant(annotations, headers), dicom.group_series(headers))
        for t in tasks:  # the driver re-plans globally; the chunk's own join errors do not matter
            rows.append(_wire(t.patient_id, "spec", {"series_instance_uid": t.series_instance_uid, "keys": keys_fingerprint(t.object_keys)}))
            task = json.loads(json.dumps(dataclasses.asdict(t), default=str))
            files = [(k, by_key[k][0]) for k in t.object_keys]
            rows += ingest.crops_from_files(task, files, cfg, parsed=[by_key[k][1] for k in t.object_keys])
    return rows


def index_and_crop_batch(batch: pa.Table, cfg: CropConfig, annotations: pd.DataFrame) -> pa.Table:
    """Each chunk's rows, closed by a ``chunk_end`` row naming the chunk: with rows in order,
    a consumer knows when a chunk is complete (``score`` commits chunks for resuming)."""
    rows: list[dict[str, Any]] = []
    for uris, chunk in zip(batch["uris"].to_pylist(), batch["chunk"].to_pylist(), strict=True):
        rows += index_and_crop_chunk(uris, cfg, annotations)
        rows.append(_wire("", "chunk_end", {"chunk": chunk}))
    return pa.Table.from_pylist(rows, schema=ingest.WIRE_SCHEMA)


def chunk_items(entries: list[storage.FileEntry], cpus: int) -> list[dict[str, Any]]:
    """The listing in chunks (enough for every CPU), each named by a fingerprint of its
    object keys and sizes: the same archive and cluster give the same chunks again."""
    chunks = chunk_entries(entries, target_objects=-(-len(entries) // (CHUNKS_PER_CPU * cpus)))
    return [{"uris": [e.uri for e in c], "chunk": keys_fingerprint([f"{e.uri}\t{e.size}" for e in c])} for c in chunks]


def chunks_dataset(items: list[dict[str, Any]], cfg: CropConfig, annotations: pd.DataFrame, num_cpus: float = 1):
    """A Ray Dataset of wire rows, one task per chunk (in order, a lost chunk no failed job)."""
    import ray

    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds.context.execution_options.preserve_order = True  # same archive, same output file
    ds.context.max_errored_blocks = -1  # a lost chunk is reported per object
    memory = ingest.decode_memory(max(CHUNK_BYTES, cfg.max_file_bytes))  # a chunk's objects, read whole
    return ds.map_batches(index_and_crop_batch, fn_kwargs={"cfg": cfg, "annotations": annotations}, batch_format="pyarrow",
                          batch_size=1, num_cpus=num_cpus, memory=memory)


@dataclasses.dataclass
class FirstPass:
    headers: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    specs: dict[str, set[tuple[str, str]]]  # patient id -> {(series uid, keys fingerprint)}

    seen: set[str] = dataclasses.field(default_factory=set)  # object keys with a header row

    def accepted(self, tasks: list[ann_mod.PatientTask]) -> set[str]:
        """Patients whose speculative result used exactly their planned series, complete."""
        return {t.patient_id for t in tasks if self.specs.get(t.patient_id) == {(t.series_instance_uid, keys_fingerprint(t.object_keys))}}

    def absorb(self, pid: str, kind: str, meta: str) -> bool:
        """Take an index row (a chunk's headers, header error, spec); False for any other kind."""
        if kind == "headers":
            headers = json.loads(meta)
            self.headers += headers
            self.seen.update(h["object_key"] for h in headers)
        elif kind == "header_error":
            e = json.loads(meta)
            self.errors.append(e)
            self.seen.add(e["object_key"])
        elif kind == "spec":
            s = json.loads(meta)
            self.specs.setdefault(pid, set()).add((s["series_instance_uid"], s["keys"]))
        else:
            return False
        return True

    def report_lost(self, entries: list[storage.FileEntry]) -> None:
        """An error row for each object whose chunk never came back."""
        self.errors += [
            VfxError("header", "the task reading this object was lost (worker crash or out of memory) after Ray's retries", object_key=e.uri, error_type="TaskLost").row()
            for e in entries if e.uri not in self.seen
        ]


def first_pass(entries: list[storage.FileEntry], annotations: pd.DataFrame, cfg: CropConfig, spill_path: str, progress: bool) -> FirstPass:
    """Run the chunks on Ray Data; headers to memory, speculative rows to a local spill file
    (Parquet, so memory does not grow with the archive)."""
    import ray

    result = FirstPass([], [], {})
    items = chunk_items(entries, max(1, int(ray.cluster_resources().get("CPU", 1))))
    bar = tqdm(total=len(entries), desc="crops: objects read", unit="obj", disable=not progress)
    with pq.ParquetWriter(spill_path, ingest.WIRE_SCHEMA) as spill:
        if items:
            for batch in chunks_dataset(items, cfg, annotations).iter_batches(batch_format="pyarrow", batch_size=None):
                n_before, n_errors = len(result.seen), len(result.errors)
                for pid, kind, meta in zip(batch["patient_id"].to_pylist(), batch["kind"].to_pylist(), batch["meta"].to_pylist(), strict=True):
                    result.absorb(pid, kind, meta)
                spill.write_table(batch.filter(pc.is_in(batch["kind"], pa.array(["crop", "error"]))))
                bar.update(len(result.seen) - n_before)
                ingest.raise_if_store_down(result.errors[n_errors:])
    bar.close()
    result.report_lost(entries)
    return result


def accepted_rows(spill_path: str, accepted: set[str], cfg: CropConfig) -> Iterator[tuple[pa.Table, list[dict]]]:
    """The spill file's rows of accepted patients, as (contract crops table, error rows)."""
    keep = pa.array(sorted(accepted), pa.string())
    for batch in pq.ParquetFile(spill_path).iter_batches(batch_size=512):
        table = pa.Table.from_batches([batch])
        yield ingest.wire_to_crops(table.filter(pc.is_in(table["patient_id"], keep)), cfg)
