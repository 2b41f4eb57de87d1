"""The rows that cross the pipeline: one schema whatever a task produced, a kind per row.

A task's output mixes crops, error rows and index rows; giving every row the same four
columns (JSON metadata + raw image bytes) keeps every block's schema equal, so Ray Data
never has to unify schemas, and a consumer dispatches on :class:`Kind`. No Ray here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from enum import StrEnum
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vfx_ray import contracts
from vfx_ray.config import CropConfig
from vfx_ray.errors import error_row


class Kind(StrEnum):
    """What a wire row holds (its ``meta`` column is the JSON named here)."""

    CROP = "crop"  # one crop's record; ``image`` is its float32 pixels
    ERROR = "error"  # an errors-table row of one patient (read, decode, crop)
    SERIES = "series"  # one series' objects in one chunk: its record, its objects packed (tasks.series_rows)
    HEADER_ERROR = "header_error"  # an errors-table row of one object whose header failed
    CANDIDATE = "candidate"  # a series a chunk cropped: its uid and object keys' fingerprint
    CHUNK_END = "chunk_end"  # closes a chunk's rows: {"chunk", "shard", "clean", "cached"} or a shard's end
    CACHED = "cached"  # a chunk whose scored rows the output already holds: the driver reads them there
    READS = "reads"  # how one patient's series was read: plan, objects and bytes (see tasks.Reads)
    PART = "part"  # crops a task wrote itself (the crops job): {"uri"} of its Parquet part (tasks.CropParts)


INDEX_KINDS = (Kind.SERIES, Kind.HEADER_ERROR, Kind.CANDIDATE)  # what the driver plans on
RESULT_KINDS = (Kind.CROP, Kind.PART, Kind.ERROR)  # what a patient's result is made of

CROP_WIRE = pa.schema(
    [("patient_id", pa.string()), ("kind", pa.string()), ("meta", pa.string()), ("image", pa.binary())]
)
# The scoring actor's output: the crop pixels replaced by a probability (and an embedding,
# and for key images the models' class activation maps: float32 bytes, models x h x w).
SCORED_WIRE = pa.schema(
    [
        ("patient_id", pa.string()),
        ("kind", pa.string()),
        ("meta", pa.string()),
        ("probability", pa.float64()),
        ("embedding", pa.binary()),
        ("cam", pa.binary()),
    ]
)


def row(pid: str, kind: Kind, meta: Any, image: bytes = b"") -> dict[str, Any]:
    return {"patient_id": pid, "kind": str(kind), "meta": json.dumps(meta, default=str), "image": image}


def error(exc: BaseException, stage: str, task: dict[str, Any]) -> dict[str, Any]:
    """An ERROR row naming the task's patient and series."""
    meta = error_row(exc, stage, patient_id=task["patient_id"], series_instance_uid=task["series_instance_uid"])
    return row(task["patient_id"], Kind.ERROR, meta)


def crops(task: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CROP rows of one patient from :func:`geometry.crop_samples` records."""
    pid = task["patient_id"]
    out = []
    for c in records:
        meta = {k: v for k, v in c.items() if k != "image"}
        meta.update(patient_id=pid, series_instance_uid=task["series_instance_uid"],
                    vertebra=task.get("vertebra"), label=task.get("label"))
        image = np.ascontiguousarray(c["image"], dtype=np.float32).tobytes()
        out.append({"patient_id": pid, "kind": str(Kind.CROP), "meta": json.dumps(meta, default=float), "image": image})
    return out


def fingerprint(keys: list[str]) -> str:
    """A short name for a set of object keys (order does not matter)."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:24]


KEYS_HASH_BYTES = 12


def keys_hash(keys: list[str]) -> str:
    """A set of object keys as a hash that merges (:func:`merge_hashes`): the XOR of each key's
    hash. A series spread over chunks gets its hash from its parts' hashes, without its keys."""
    acc = 0
    for k in keys:
        acc ^= int.from_bytes(hashlib.sha256(k.encode()).digest()[:KEYS_HASH_BYTES], "big")
    return f"{acc:0{2 * KEYS_HASH_BYTES}x}"


def merge_hashes(a: str, b: str) -> str:
    """The :func:`keys_hash` of the union of two disjoint key sets."""
    return f"{int(a, 16) ^ int(b, 16):0{2 * KEYS_HASH_BYTES}x}"


def pack_objects(keys: list[str], sizes: list[int], sops: list[list[str]]) -> str:
    """A series' object keys, sizes and SOP references as one compressed string (a sixth of
    their JSON: keys and UIDs repeat their prefixes). A SERIES row carries them so, and the
    driver stores them unread: only what needs a series' objects unpacks them."""
    text = json.dumps({"object_keys": keys, "sizes": sizes, "sops": sops}, separators=(",", ":"))
    return base64.b64encode(zlib.compress(text.encode(), 6)).decode()


def unpack_objects(packed: str) -> dict[str, list]:
    """:func:`pack_objects`' lists: ``object_keys``, ``sizes``, ``sops``."""
    return json.loads(zlib.decompress(base64.b64decode(packed)))


def of_kind(table: pa.Table, kinds: tuple[Kind, ...]) -> pa.Table:
    return table.filter(pc.is_in(table["kind"], pa.array([str(k) for k in kinds])))


def metas(table: pa.Table) -> list[Any]:
    return [json.loads(m) for m in table["meta"].to_pylist()]


def images(column: pa.Array | pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    """(N, *shape) float32 from a binary column of equal-sized crops: one view of its data
    buffer, no Python object per crop (the crops of one batch lie back to back)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n, size = len(arr), int(np.prod(shape)) * 4
    if n == 0:
        return np.zeros((0, *shape), np.float32)
    width = 8 if pa.types.is_large_binary(arr.type) else 4
    offsets = np.frombuffer(arr.buffers()[1], f"<i{width}", count=n + 1, offset=width * arr.offset)
    if np.any(np.diff(offsets) != size):
        raise ValueError(f"crop rows of {sorted(set(np.diff(offsets).tolist()))} bytes, expected {size}")
    return np.frombuffer(arr.buffers()[2], np.float32, count=n * size // 4, offset=int(offsets[0])).reshape(n, *shape)


def to_crops(table: pa.Table, cfg: CropConfig) -> tuple[pa.Table, list[dict[str, Any]]]:
    """A wire table's CROP rows as a contract crops table, and its ERROR rows."""
    shape = (cfg.channels, cfg.crop_size, cfg.crop_size)
    crop_rows = of_kind(table, (Kind.CROP,))
    records = metas(crop_rows)
    for record, image in zip(records, images(crop_rows["image"], shape), strict=True):
        record["image"] = image
    return contracts.crops_table(records, cfg.channels, cfg.crop_size), metas(of_kind(table, (Kind.ERROR,)))
