"""The archive in shards: no process lists it whole.

The driver lists one level under the archive root (:func:`shards`: its folders, which are the
patients' or studies' in the usual export layouts, or a PACS's studies) and hands groups of
folders to Ray tasks. Each task lists its folders whole, refuses what must not be read
(:func:`refusal`), cuts its listing into chunks by read plan (:func:`chunks_of`: a study's
objects share a plan, a folder stays whole unless it alone is above a chunk's limits) and
runs each chunk (:func:`shard_batch`). So the listing runs in parallel, streams into the
first pass, and the driver holds one entry per top-level folder, not one per object.
Objects directly under the root are the exception: the driver lists those itself.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import posixpath
from collections.abc import Iterable, Iterator
from typing import Any

import pandas as pd
import pyarrow as pa

from vfx_ray import storage
from vfx_ray.config import CropConfig
from vfx_ray.errors import VfxError, error_row
from vfx_ray.pipeline import tasks, wire
from vfx_ray.pipeline.wire import CROP_WIRE, Kind, row

SHARDS_PER_CPU = 4  # enough shards that every CPU stays busy to the end


# ---------------------------------------------------------------- the driver's listing
def shards(archive_uri: str, cpus: int) -> list[dict[str, Any]]:
    """The archive's top-level folders in up to ``SHARDS_PER_CPU`` groups per CPU (runs of the
    sorted listing), then the objects directly under the root, ``ROI_CHUNK_OBJECTS`` a shard."""
    folders, files = storage.list_top(archive_uri)
    n = max(1, min(len(folders), SHARDS_PER_CPU * cpus))
    cuts = [len(folders) * i // n for i in range(n + 1)]
    groups: list[dict[str, Any]] = [{"folders": folders[a:b], "files": []}
                                    for a, b in itertools.pairwise(cuts) if b > a]
    step = tasks.ROI_CHUNK_OBJECTS
    groups += [{"folders": [], "files": [[e.uri, e.size] for e in files[i:i + step]]}
               for i in range(0, len(files), step)]
    return [{"shard": i, **g} for i, g in enumerate(groups)]


# ---------------------------------------------------------------- a task's listing
def escapes_prefix(archive_uri: str, uri: str) -> bool:
    """Whether an object key lies outside the archive prefix once normalised.

    S3 keys may contain ``..`` segments that a later reader would resolve; a local archive
    may hold symbolic links to files elsewhere. Neither is read. A PACS's URIs are checked
    as S3 keys are (a UID that would resolve to ``..``).
    """
    if not (storage.is_s3(archive_uri) or storage.is_dicomweb(archive_uri)):
        root = os.path.realpath(archive_uri)
        return os.path.commonpath([root, os.path.realpath(uri)]) != root
    base = archive_uri.rstrip("/")
    if not uri.startswith(base + "/"):
        return True
    rel = uri[len(base) + 1 :]
    return ".." in rel.split("/") or posixpath.normpath(rel).startswith("..")


def refusal(archive_uri: str, e: storage.FileEntry, cfg: CropConfig) -> dict[str, Any] | None:
    """The error row of an object refused before reading, or None."""
    if escapes_prefix(archive_uri, e.uri):
        message = f"object key {e.uri} escapes the archive prefix {archive_uri}; it is not read"
        return VfxError("list", message, object_key=e.uri, error_type="KeyEscapesPrefix").row()
    if e.size > cfg.max_file_bytes:
        message = f"{e.size} bytes is above the limit of {cfg.max_file_bytes} (CropConfig.max_file_bytes); not read"
        return VfxError("list", message, object_key=e.uri, error_type="FileTooLarge").row()
    return None


def list_shard(shard: dict[str, Any], archive_uri: str, cfg: CropConfig
               ) -> tuple[list[storage.FileEntry], list[dict[str, Any]]]:
    """A shard's objects to read, and the error rows of those refused and of folders that
    could not be listed (named by the folder)."""
    found = [storage.FileEntry(u, s) for u, s in shard["files"]]
    errors: list[dict[str, Any]] = []
    for f in shard["folders"]:
        try:
            found += storage.list_files(f)
        except Exception as exc:  # noqa: BLE001 - a folder that cannot be listed is an error row
            errors.append(error_row(exc, "list", object_key=f))
    entries = []
    for e in found:
        refused = refusal(archive_uri, e, cfg)
        if refused:
            errors.append(refused)
        else:
            entries.append(e)
    return entries, errors


# ---------------------------------------------------------------- chunks
def folder(uri: str) -> str:
    return uri.rsplit("/", 1)[0]


def _cut_folder(run: Iterable[storage.FileEntry], max_objects: int, max_bytes: int) -> list[list[storage.FileEntry]]:
    pieces: list[list[storage.FileEntry]] = [[]]
    piece_bytes = 0
    for e in run:
        if pieces[-1] and (len(pieces[-1]) >= max_objects or piece_bytes + e.size > max_bytes):
            pieces.append([])
            piece_bytes = 0
        pieces[-1].append(e)
        piece_bytes += e.size
    return pieces


def chunk_entries(entries: list[storage.FileEntry], max_objects: int | None = None, max_bytes: int | None = None,
                  target_objects: int | None = None) -> list[list[storage.FileEntry]]:
    """A listing (sorted) packed into chunks that keep each folder whole, unless one folder
    alone is above the limits (then it is cut, and its series take the second pass).

    Folders are packed up to ``target_objects`` per chunk (default: the limit).
    """
    max_objects, max_bytes = max_objects or tasks.CHUNK_OBJECTS, max_bytes or tasks.CHUNK_BYTES
    target = min(target_objects or max_objects, max_objects)
    chunks: list[list[storage.FileEntry]] = []
    cur: list[storage.FileEntry] = []
    cur_bytes = 0
    for _, run in itertools.groupby(entries, key=lambda e: folder(e.uri)):
        for piece in _cut_folder(run, max_objects, max_bytes):
            size = sum(e.size for e in piece)
            if cur and (len(cur) + len(piece) > target or cur_bytes + size > max_bytes):
                chunks.append(cur)
                cur, cur_bytes = [], 0
            cur += piece
            cur_bytes += size
    if cur:
        chunks.append(cur)
    return chunks


def study_folder(uri: str, root: str) -> str:
    """The first folder under the archive root that holds ``uri`` (a patient's or a study's in
    the usual export layouts; on a PACS ``studies/{uid}``); the root itself for an object directly in it."""
    rel = uri[len(root):].lstrip("/") if uri.startswith(root) else uri
    if storage.is_dicomweb(uri) and rel.startswith("studies/"):
        return "/".join(rel.split("/", 2)[:2])
    return rel.split("/", 1)[0] if "/" in rel else ""


def chunks_of(entries: list[storage.FileEntry], root: str, cfg: CropConfig | None = None,
              target_objects: int | None = None, limits: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """A listing in chunks, each named by a fingerprint of its object keys and sizes (the same
    objects give the same chunk again: ``score`` resumes by it) and with its read plan:
    :func:`tasks.choose_plan` on the bytes of each study folder under ``root``, so all series of
    a study share a plan, and a chunk holds folders of one plan. ``limits``: objects per chunk
    of the whole and of the roi plan (default: :mod:`tasks`' limits)."""
    cfg = cfg or CropConfig()
    if entries and storage.is_dicomweb(entries[0].uri):  # no ranged reads: a roi chunk would hold whole objects
        cfg = dataclasses.replace(cfg, read_plan="whole")
    studies = [list(run) for _, run in itertools.groupby(entries, key=lambda e: study_folder(e.uri, root))]
    whole_objects, roi_objects = limits or (tasks.CHUNK_OBJECTS, tasks.ROI_CHUNK_OBJECTS)
    items = []
    for plan, group in itertools.groupby(studies, key=lambda run: tasks.choose_plan(cfg, sum(e.size for e in run))):
        flat = [e for run in group for e in run]
        cut = (roi_objects, 1 << 62) if plan == "roi" else (whole_objects, None)  # roi: headers held, no byte cap
        for c in chunk_entries(flat, *cut, target_objects=target_objects):
            items.append({"uris": [e.uri for e in c], "sizes": [e.size for e in c], "plan": plan,
                          "chunk": wire.fingerprint([f"{e.uri}\t{e.size}" for e in c])})
    return items


# ---------------------------------------------------------------- a shard's task
@dataclasses.dataclass(frozen=True)
class ShardJob:
    """What every shard task of a pass does: crop (or only index headers: ``headers_only``),
    and which chunks it skips because the output already holds their scored rows."""

    cfg: CropConfig
    annotations: pd.DataFrame
    root: str
    headers_only: bool = False
    cached: frozenset[str] = frozenset()
    # objects per chunk of the whole and the roi plan, read on the driver (tests make them small)
    limits: tuple[int, int] = dataclasses.field(default_factory=lambda: (tasks.CHUNK_OBJECTS,
                                                                         tasks.ROI_CHUNK_OBJECTS))
    parts: tasks.CropParts | None = None  # the crops job: tasks write their crops (None: they travel in the rows)


def chunk_rows(chunk: dict[str, Any], shard: int, job: ShardJob) -> list[dict[str, Any]]:
    """One chunk's wire rows, closed by a CHUNK_END row that names the chunk and its shard and
    says whether it is clean (every header read, no error: worth committing for a re-run)."""
    name = chunk["chunk"]
    if name in job.cached:
        rows = [row("", Kind.CACHED, {"chunk": name})]
    elif job.headers_only:
        rows = tasks.index_only(chunk["uris"], chunk["sizes"], job.cfg)
    else:
        rows = tasks.index_and_crop(chunk["uris"], chunk["sizes"], chunk["plan"], job.cfg, job.annotations)
        rows = job.parts.put(rows, "chunk-" + name, job.cfg) if job.parts else rows
    clean = not any(r["kind"] in (Kind.HEADER_ERROR, Kind.ERROR) for r in rows)
    end = {"chunk": name, "shard": shard, "clean": clean, "cached": name in job.cached, "objects": len(chunk["uris"])}
    return [*rows, row("", Kind.CHUNK_END, end)]


def shard_batch(batch: pa.Table, job: ShardJob) -> Iterator[pa.Table]:
    """Each shard listed and run chunk by chunk, a table per chunk (Ray Data streams them),
    then its listing's error rows and a CHUNK_END row with no chunk that closes the shard."""
    for shard in batch.to_pylist():
        entries, errors = list_shard(shard, job.root, job.cfg)
        for chunk in chunks_of(entries, job.root, job.cfg, limits=job.limits):
            yield pa.Table.from_pylist(chunk_rows(chunk, shard["shard"], job), schema=CROP_WIRE)
        end = {"chunk": None, "shard": shard["shard"], "objects": len(errors)}
        rows = [*(row("", Kind.HEADER_ERROR, e) for e in errors), row("", Kind.CHUNK_END, end)]
        yield pa.Table.from_pylist(rows, schema=CROP_WIRE)
