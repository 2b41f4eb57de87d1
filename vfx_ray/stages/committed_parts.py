"""What makes ``score`` resumable: committed parts, the first pass's chunk cache, the final files.

Finished patients are committed as numbered Parquet parts under ``OUT/_parts/`` (with their
features under ``_parts/features/``), and each finished first-pass chunk's scored rows
(headers, candidates, slice probabilities; no pixels) under ``_parts/chunks/<key>/``. A
re-run with the same ``--out`` and model takes both instead of redoing them; the last step
merges the parts into ``scores.parquet`` (one row per patient) and deletes the chunk cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from vfx_ray import layout, storage
from vfx_ray.config import CropConfig
from vfx_ray.contracts import KEY_CAM, scores_schema
from vfx_ray.pipeline.wire import SCORED_WIRE

PARTS = layout.PARTS
CHUNK_DIR = "chunks"
FEATURES_DIR = "features"
# A committed part's rows: the scores, and the scorer's maps of the top slice for the key
# images (not in scores.parquet: the reports read them here, :func:`committed_cams`).
PART_SCHEMA = scores_schema().append(pa.field(KEY_CAM, pa.binary()))
WIRE_VERSION = 3  # the chunk rows' format: 3 packs a series' objects, 2 listed them, 1 held every header


# ---------------------------------------------------------------- committed patients
def committed(out_uri: str, model_id: str) -> pa.Table | None:
    """Rows already committed for this model (final file and parts), one per patient."""
    tables = []
    final = storage.join(out_uri, layout.SCORES)
    if storage.exists(final):
        tables.append(storage.read_table(final))
    tables += [storage.read_table(uri) for uri in score_parts(out_uri)]
    tables = [t.select(scores_schema().names).cast(scores_schema()) for t in tables if t.num_rows]
    if not tables:
        return None
    table = pa.concat_tables(tables)
    table = table.filter(pc.equal(table["model_id"], model_id))
    _, first = np.unique(np.array(table["patient_id"].to_pylist(), dtype=object), return_index=True)
    return table.take(sorted(first))


def score_parts(out_uri: str) -> list[str]:
    """The committed score parts under ``OUT/_parts/`` (not features or chunks)."""
    parts = storage.join(out_uri, PARTS)
    found = storage.list_files(parts, suffix=".parquet") if storage.exists(parts) else []
    return [e.uri for e in found if "/" not in e.uri.rsplit(f"/{PARTS}/", 1)[1]]


def committed_cams(out_uri: str, model_id: str) -> dict[str, bytes]:
    """Patient -> the scorer's maps of its top slice, from the committed parts of this model
    (parts of a run without key images, or from before they were kept, have none)."""
    cams: dict[str, bytes] = {}
    for uri in score_parts(out_uri):
        table = storage.read_table(uri)
        if KEY_CAM not in table.column_names:
            continue
        table = table.filter(pc.and_(pc.equal(table["model_id"], model_id), pc.is_valid(table[KEY_CAM])))
        cams.update(zip(table["patient_id"].to_pylist(), table[KEY_CAM].to_pylist(), strict=True))
    return cams


class PartWriter:
    """Commits finished patients as numbered Parquet parts (atomic each)."""

    def __init__(self, out_uri: str, every: int = 25, seconds: float = 60.0) -> None:
        self.dir = storage.join(out_uri, PARTS)
        self.rows: list[dict] = []
        self.features: list[pa.Table] = []
        self.every, self.seconds, self.last = every, seconds, time.monotonic()
        self.stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        self.n = 0

    def add(self, row: dict, features: pa.Table | None) -> None:
        self.rows.append(row)
        if features is not None:
            self.features.append(features)
        if len(self.rows) >= self.every or time.monotonic() - self.last > self.seconds:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"part-{self.stamp}-{self.n:05d}"
        if self.features:  # features first: a committed score part implies its features
            storage.write_table(
                pa.concat_tables(self.features), storage.join(self.dir, FEATURES_DIR, name + ".parquet")
            )
        storage.write_table(
            pa.Table.from_pylist(self.rows, schema=PART_SCHEMA), storage.join(self.dir, name + ".parquet")
        )
        self.rows, self.features, self.n, self.last = [], [], self.n + 1, time.monotonic()


def features_table(pid: str, slices: list[dict]) -> pa.Table:
    emb = np.stack([np.frombuffer(s["embedding"], np.float32) for s in slices])
    return pa.table(
        {
            "patient_id": [pid] * len(slices),
            "slice_index": pa.array([int(s["slice_index"]) for s in slices], pa.int32()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1]),
        }
    )


# ---------------------------------------------------------------- the first pass's chunks
def cache_key(model_id: str, cfg: CropConfig, features: bool, annotations: pd.DataFrame) -> str:
    """What a chunk's scored rows depend on, besides its objects (named by the chunk)."""
    settings = {"model": model_id, "crops": dataclasses.asdict(cfg), "features": features, "wire": WIRE_VERSION}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(json.dumps(list(map(str, annotations.columns))).encode())
    h.update(pd.util.hash_pandas_object(annotations.astype(str), index=False).values.tobytes())
    return h.hexdigest()[:16]


class ChunkCache:
    """First-pass chunks committed under one key; a chunk holding an error row is not kept
    (a read that failed once is tried again)."""

    def __init__(self, out_uri: str, key: str) -> None:
        self.dir = storage.join(out_uri, PARTS, CHUNK_DIR, key)
        listed = storage.list_files(self.dir, suffix=".parquet") if storage.exists(self.dir) else []
        self.names = {e.uri.rsplit("/", 1)[1].removesuffix(".parquet") for e in listed}

    def _uri(self, chunk: str) -> str:
        return storage.join(self.dir, chunk + ".parquet")

    def read(self, chunk: str) -> pa.Table:
        return storage.read_table(self._uri(chunk)).cast(SCORED_WIRE)

    def commit(self, chunk: str, rows: pa.Table) -> None:
        """Commit a chunk that its task found clean (every header read, no error row)."""
        storage.write_table(rows, self._uri(chunk))


# ---------------------------------------------------------------- the final files
def write_final(out_uri: str, model_id: str, metadata: dict[str, str], features: bool) -> pa.Table:
    """``scores.parquet`` (and ``features.parquet``) from everything committed; the chunk
    cache is deleted (every patient is committed now: the first pass is not resumed)."""
    table = committed(out_uri, model_id)
    table = table.sort_by("patient_id") if table is not None else pa.Table.from_pylist([], schema=scores_schema())
    storage.write_table(table, storage.join(out_uri, layout.SCORES), metadata=metadata)
    if features:
        fdir = storage.join(out_uri, PARTS, FEATURES_DIR)
        parts = (
            [storage.read_table(e.uri) for e in storage.list_files(fdir, suffix=".parquet")]
            if storage.exists(fdir)
            else []
        )
        feats = pa.concat_tables(parts) if parts else pa.table({"patient_id": pa.array([], pa.string())})
        note = {"vfx_ray.features": "pooled ResNet features of the first ensemble member"}
        storage.write_table(feats, storage.join(out_uri, layout.FEATURES), metadata={**metadata, **note})
    chunks = storage.join(out_uri, PARTS, CHUNK_DIR)
    if storage.exists(chunks):
        storage.delete_tree(chunks)
    return table

