"""``score``'s first pass: each object read once, indexed, cropped and scored in one pipeline.

The chunks of :mod:`onepass` feed the model actors directly, so a patient whose series lies
whole in one chunk (the usual layout) is read, decoded and scored once. As in ``crops``, these
results are speculative until the driver has planned on the whole archive's index.

A long first pass must survive a killed run, so every chunk's scored rows (headers, specs,
slice probabilities; no pixels) are committed as one Parquet file under
``OUT/_parts/onepass/<key>/`` as soon as the chunk is complete. A re-run with the same
archive, annotations, model and crop settings (``key``) takes those chunks from there and
reads only the others. Chunks holding an error row are not committed: a read that failed
once is tried again. ``score`` deletes the folder when it finishes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from vfx_ray import ingest, onepass, storage
from vfx_ray.config import CropConfig

CHUNK_DIR = "onepass"


def cache_key(model_id: str, cfg: CropConfig, features: bool, annotations: pd.DataFrame) -> str:
    """What a chunk's scored rows depend on, besides its objects (named by the chunk)."""
    h = hashlib.sha256(json.dumps({"model": model_id, "crops": dataclasses.asdict(cfg), "features": features}, sort_keys=True, default=str).encode())
    h.update(json.dumps(list(map(str, annotations.columns))).encode())
    h.update(pd.util.hash_pandas_object(annotations.astype(str), index=False).values.tobytes())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class Speculative:
    """The first pass: the archive index (``first``) and each patient's scored slices."""

    first: onepass.FirstPass = dataclasses.field(default_factory=lambda: onepass.FirstPass([], [], {}))
    slices: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    errors: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)  # decode/crop rows
    chunks: int = 0
    chunks_reused: int = 0

    def take(self, rows: list[tuple]) -> list[dict[str, Any]]:
        """Absorb wire rows (``SLICE_WIRE`` order); returns their error rows."""
        n_errors, new = len(self.first.errors), []
        for pid, kind, meta, prob, emb in rows:
            if self.first.absorb(pid, kind, meta):
                continue
            if kind == "crop":
                self.slices.setdefault(pid, []).append({**json.loads(meta), "probability": prob, "embedding": emb})
            elif kind == "error":
                new.append(json.loads(meta))
                self.errors.setdefault(pid, []).append(new[-1])
        return self.first.errors[n_errors:] + new


def _rows(table: pa.Table, names: list[str]) -> list[tuple]:
    return list(zip(*(table[c].to_pylist() for c in names), strict=True))


def _whole(rows: list[tuple], uris: list[str]) -> bool:
    """Whether buffered rows are exactly one chunk's, without an error (worth committing)."""
    keys = [h["object_key"] for _, kind, meta, _, _ in rows if kind == "headers" for h in json.loads(meta)]
    return sorted(keys) == sorted(uris) and not any(kind in ("header_error", "error") for _, kind, _, _, _ in rows)


def first_pass(
    entries: list[storage.FileEntry],
    annotations: pd.DataFrame,
    cfg: CropConfig,
    score_stage: Callable[[Any], Any],
    schema: pa.Schema,
    cpus: int,
    cache_dir: str | None,
    progress: bool,
    num_cpus: float = 1,
) -> Speculative:
    """Index, crop and score every chunk (``score_stage`` maps wire rows to ``schema`` rows;
    a chunk task asks for ``num_cpus``); chunks found in ``cache_dir`` are not read, new ones
    are committed there (None: no cache)."""
    result = Speculative()
    items = onepass.chunk_items(entries, cpus)
    result.chunks = len(items)
    cached = set()
    if cache_dir and storage.exists(cache_dir):
        cached = {e.uri.rsplit("/", 1)[1].removesuffix(".parquet") for e in storage.list_files(cache_dir, suffix=".parquet")}
    fresh = []
    for item in items:
        if item["chunk"] in cached:
            result.take(_rows(storage.read_table(storage.join(cache_dir, item["chunk"] + ".parquet")), schema.names))
            result.chunks_reused += 1
        else:
            fresh.append(item)
    bar = tqdm(total=len(entries), initial=len(result.first.seen), desc="score: objects read", unit="obj", disable=not progress)
    uris = {item["chunk"]: item["uris"] for item in fresh}
    buffer: list[tuple] = []
    if fresh:
        ds = score_stage(onepass.chunks_dataset(fresh, cfg, annotations, num_cpus))
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in _rows(batch, schema.names):
                if row[1] != "chunk_end":
                    buffer.append(row)
                    continue
                chunk = json.loads(row[2])["chunk"]
                if cache_dir and _whole(buffer, uris[chunk]):
                    storage.write_table(pa.Table.from_pylist([dict(zip(schema.names, r, strict=True)) for r in buffer], schema=schema), storage.join(cache_dir, chunk + ".parquet"))
                n_seen = len(result.first.seen)
                ingest.raise_if_store_down(result.take(buffer))
                bar.update(len(result.first.seen) - n_seen)
                buffer = []
    ingest.raise_if_store_down(result.take(buffer))  # rows of a chunk whose end was lost
    bar.close()
    result.first.report_lost(entries)
    return result
