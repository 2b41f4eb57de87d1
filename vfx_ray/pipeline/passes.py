"""The driver's side of the pipeline: list, chunk, first pass, plan, the ordered patient stream.

Both jobs run the same steps. The first pass reads the listing in chunks, each by its study
folders' read plan (:func:`chunk_items`; every object whole, or every header and then the
objects an ROI needs): it indexes headers and crops, as candidates, every annotated series
a chunk holds.
The driver then plans on the whole archive's index (:func:`plan`) and keeps a candidate
only when its chunk held the planned series complete; the other patients (a series spread
over folders, a second series elsewhere) take the second pass, one task per patient,
streamed back in plan order (:func:`patient_stream`). So the crops are the same for any
folder layout, and the usual layout (a series per folder) is read once.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import posixpath
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from vfx_ray import storage
from vfx_ray.config import CropConfig
from vfx_ray.errors import VfxError
from vfx_ray.imaging import annotations as ann_mod
from vfx_ray.imaging import dicom, masks, pseudonym
from vfx_ray.pipeline import datasets, tasks, wire
from vfx_ray.pipeline.wire import Kind

CHUNKS_PER_CPU = 4  # enough chunks that every CPU stays busy to the end


# ---------------------------------------------------------------- listing
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


def list_archive(archive_uri: str, cfg: CropConfig) -> tuple[list[storage.FileEntry], list[dict]]:
    """Every object under the archive prefix, minus those refused before reading (error rows)."""
    entries, errors = [], []
    for e in storage.list_files(archive_uri):
        if escapes_prefix(archive_uri, e.uri):
            message = f"object key {e.uri} escapes the archive prefix {archive_uri}; it is not read"
            errors.append(VfxError("list", message, object_key=e.uri, error_type="KeyEscapesPrefix").row())
        elif e.size > cfg.max_file_bytes:
            message = f"{e.size} bytes is above the limit of {cfg.max_file_bytes} (CropConfig.max_file_bytes); not read"
            errors.append(VfxError("list", message, object_key=e.uri, error_type="FileTooLarge").row())
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


def lost(stage: str, doing: str, **ids: str | None) -> dict[str, Any]:
    """The error row of a patient or object whose task Ray gave up on."""
    message = f"the task {doing} was lost (worker crash or out of memory) after Ray's retries"
    return VfxError(stage, message, error_type="TaskLost", **ids).row()


def read_annotations(uri: str) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """A job's annotations, each mask-only row given its mask's box (:mod:`masks`), and the
    error rows of masks that cannot be used."""
    return masks.resolve_masks(ann_mod.read_annotations(uri))


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
    """The listing (sorted) packed into chunks that keep each folder whole, unless one
    folder alone is above the limits (then it is cut, and its series take the second pass).

    Folders are packed up to ``target_objects`` per chunk (default: the limit): fewer
    objects per chunk, more chunks for the cluster's CPUs to share.
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


def chunk_items(entries: list[storage.FileEntry], cpus: int, cfg: CropConfig | None = None,
                root: str | None = None) -> list[dict[str, Any]]:
    """The listing in chunks (enough for every CPU), each named by a fingerprint of its object
    keys and sizes (the same archive and cluster give the same chunks again) and with its read
    plan: :func:`tasks.choose_plan` on the bytes of each folder under ``root`` (the archive
    URI; default: the listing's common prefix), so all series of a study share a plan, and a
    chunk holds folders of one plan."""
    cfg = cfg or CropConfig()
    if root is None:  # the folders every object shares ("s3://" kept as it is: no normalising)
        shared = itertools.takewhile(lambda p: len(set(p)) == 1, zip(*[e.uri.split("/")[:-1] for e in entries],
                                                                     strict=False))
        root = "/".join(p[0] for p in shared)
    if entries and storage.is_dicomweb(entries[0].uri):  # no ranged reads: a roi chunk would hold whole objects
        cfg = dataclasses.replace(cfg, read_plan="whole")
    target = -(-len(entries) // (CHUNKS_PER_CPU * cpus))
    studies = [list(run) for _, run in itertools.groupby(entries, key=lambda e: study_folder(e.uri, root))]
    items = []
    for plan, group in itertools.groupby(studies, key=lambda run: tasks.choose_plan(cfg, sum(e.size for e in run))):
        flat = [e for run in group for e in run]
        limits = (tasks.ROI_CHUNK_OBJECTS, 1 << 62) if plan == "roi" else (None, None)  # roi: headers held
        for c in chunk_entries(flat, *limits, target_objects=target):
            items.append({"uris": [e.uri for e in c], "sizes": [e.size for e in c], "plan": plan,
                          "chunk": wire.fingerprint([f"{e.uri}\t{e.size}" for e in c])})
    return items


def split_chunks(batches: Iterable[pa.Table]) -> Iterator[tuple[str | None, pa.Table]]:
    """(chunk name, its rows without the CHUNK_END row) from the first pass's ordered batches;
    rows after the last CHUNK_END (a chunk whose end was lost) come last, named None."""
    pending: list[pa.Table] = []
    for batch in batches:
        kinds = batch["kind"].to_numpy(zero_copy_only=False)
        start = 0
        for end in np.flatnonzero(kinds == Kind.CHUNK_END):
            pending.append(batch.slice(start, end - start))
            yield json.loads(batch["meta"][int(end)].as_py())["chunk"], pa.concat_tables(pending)
            pending, start = [], int(end) + 1
        pending.append(batch.slice(start))
    if pending and sum(t.num_rows for t in pending):
        yield None, pa.concat_tables(pending)


def clean_chunk(table: pa.Table, uris: list[str]) -> bool:
    """Whether a chunk's rows hold every object's header and no error (worth keeping)."""
    headers = wire.of_kind(table, (Kind.HEADERS,))
    keys = [h["object_key"] for hs in wire.metas(headers) for h in hs]
    return sorted(keys) == sorted(uris) and not wire.of_kind(table, (Kind.HEADER_ERROR, Kind.ERROR)).num_rows


# ---------------------------------------------------------------- the archive index
@dataclasses.dataclass
class ArchiveIndex:
    """What the driver learns from the index rows of a pass: every header, every object
    whose header failed, and the series each chunk cropped as candidates."""

    headers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    candidates: dict[str, set[tuple[str, str]]] = dataclasses.field(default_factory=dict)  # pid -> {(uid, keys)}
    seen: set[str] = dataclasses.field(default_factory=set)  # object keys with a header or error row

    def absorb(self, table: pa.Table) -> None:
        """Take a table's index rows (any wire schema); other rows are left to the caller."""
        index = wire.of_kind(table, wire.INDEX_KINDS)
        for pid, kind, meta in zip(index["patient_id"].to_pylist(), index["kind"].to_pylist(), wire.metas(index),
                                   strict=True):
            if kind == Kind.HEADERS:
                self.headers += meta
                self.seen.update(h["object_key"] for h in meta)
            elif kind == Kind.HEADER_ERROR:
                self.errors.append(meta)
                self.seen.add(meta["object_key"])
            else:
                self.candidates.setdefault(pid, set()).add((meta["series_instance_uid"], meta["keys"]))

    def report_lost(self, entries: list[storage.FileEntry]) -> None:
        """An error row for each object whose task never came back."""
        self.errors += [
            lost("header", "reading this object", object_key=e.uri) for e in entries if e.uri not in self.seen
        ]

    def read_once(self, planned: list[ann_mod.PatientTask]) -> set[str]:
        """Patients whose first-pass crops came from exactly their planned series, complete."""
        return {t.patient_id for t in planned
                if self.candidates.get(t.patient_id) == {(t.series_instance_uid, wire.fingerprint(t.object_keys))}}


def first_pass(chunks: Iterable[tuple[str | None, pa.Table]], entries: list[storage.FileEntry],
               keep: Callable[[str | None, pa.Table], None], desc: str, progress: bool) -> ArchiveIndex:
    """Index the chunks' rows as they come; ``keep`` gets each chunk's rows first (the job
    spills, commits or scores them). Fails at once when the store is down."""
    index = ArchiveIndex()
    with tqdm(total=len(entries), desc=desc, unit="obj", disable=not progress) as bar:
        for chunk, table in chunks:
            keep(chunk, table)
            n_seen, n_errors = len(index.seen), len(index.errors)
            index.absorb(table)
            bar.update(len(index.seen) - n_seen)
            raise_if_store_down(index.errors[n_errors:])
    index.report_lost(entries)
    return index


def first_pass_chunks(entries: list[storage.FileEntry], cfg: CropConfig, annotations: pd.DataFrame,
                      stage: Callable[[Any], Any] | None = None, num_cpus: float = 1,
                      items: list[dict[str, Any]] | None = None, root: str | None = None
                      ) -> Iterator[tuple[str | None, pa.Table]]:
    """The first pass on Ray Data, as (chunk, rows); ``stage`` maps the chunk dataset (the
    scoring actors); ``items``: the chunks to read (default: the whole listing under ``root``)."""
    items = chunk_items(entries, datasets.cluster_cpus(), cfg, root) if items is None else items
    if not items:
        return iter(())
    ds = datasets.chunks(items, cfg, annotations, num_cpus)
    return split_chunks((stage or (lambda d: d))(ds).iter_batches(batch_format="pyarrow", batch_size=None))


def index_headers(entries: list[storage.FileEntry], cfg: CropConfig) -> ArchiveIndex:
    """The archive index from headers alone (ranged reads), for a job that crops nothing now."""
    index = ArchiveIndex()
    if entries:
        for batch in datasets.header_index(entries, cfg).iter_batches(batch_format="pyarrow", batch_size=None):
            index.absorb(batch)
    index.report_lost(entries)
    raise_if_store_down(index.errors)
    return index


# ---------------------------------------------------------------- plan
@dataclasses.dataclass
class Plan:
    """The work of a job: the series index, the planned patients, the errors so far."""

    series: list[dict[str, Any]]
    tasks: list[ann_mod.PatientTask]
    errors: list[dict[str, Any]]
    read_once: set[str]  # patients whose first-pass result is theirs
    selection: dict[str, str] = dataclasses.field(default_factory=dict)  # series uid -> chosen, or why not
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)  # object key -> bytes

    def second_pass(self, skip: Callable[[str], bool] = lambda pid: False) -> list[ann_mod.PatientTask]:
        return [t for t in self.tasks if t.patient_id not in self.read_once and not skip(t.patient_id)]


def plan(annotations: pd.DataFrame, index: ArchiveIndex, cfg: CropConfig,
         pseudo: pseudonym.Pseudonymizer | None) -> Plan:
    """Join the annotations to the whole archive's index (the series rules choose where no
    series is named); the pseudonymiser learns every id."""
    series = dicom.group_series(index.headers)
    selection: dict[str, str] = {}
    planned, errors = ann_mod.plan_tasks(annotations, series, rules=cfg.series_rules, notes=selection)
    if pseudo:
        pseudo.know_patients([t.patient_id for t in planned] + [s.get("patient_id") for s in series])
    sizes = {h["object_key"]: h["size"] for h in index.headers}
    return Plan(series, planned, index.errors + errors, index.read_once(planned), selection, sizes)


# ---------------------------------------------------------------- the patient stream
@dataclasses.dataclass
class PatientRows:
    """One patient's second-pass result: its CROP and ERROR wire rows (None: its task was
    lost) and its error rows (a TaskLost row for a lost task)."""

    task: ann_mod.PatientTask
    rows: pa.Table | None
    errors: list[dict[str, Any]]


def _runs(batch: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    """(patient id, rows) for each run of equal ids in a batch."""
    pids = batch["patient_id"].to_numpy(zero_copy_only=False)
    cuts = [0, *(np.flatnonzero(pids[1:] != pids[:-1]) + 1).tolist(), len(pids)]
    for a, b in itertools.pairwise(cuts):
        if b > a:
            yield str(pids[a]), batch.slice(a, b - a)


def patient_stream(
    batches: Iterable[pa.Table], planned: list[ann_mod.PatientTask], stage: str
) -> Iterator[PatientRows]:
    """Each planned patient once, in plan order, as soon as its rows are complete (the
    datasets keep order: rows of a later patient close the earlier ones)."""
    position = {t.patient_id: i for i, t in enumerate(planned)}
    pieces: dict[str, list[pa.Table]] = {}
    next_open = 0

    def close(task: ann_mod.PatientTask) -> PatientRows:
        got = pieces.pop(task.patient_id, None)
        if got is None:
            ids = {"patient_id": task.patient_id, "series_instance_uid": task.series_instance_uid}
            return PatientRows(task, None, [lost(stage, "processing this patient", **ids)])
        rows = pa.concat_tables(got)
        errors = wire.metas(wire.of_kind(rows, (Kind.ERROR,)))
        raise_if_store_down(errors)
        return PatientRows(task, rows, errors)

    for batch in batches:
        for pid, rows in _runs(batch):
            if position[pid] < next_open:
                raise RuntimeError(f"rows of patient {pid} arrived after the patients that follow it")
            pieces.setdefault(pid, []).append(rows)
            while next_open < position[pid]:
                yield close(planned[next_open])
                next_open += 1
    for task in planned[next_open:]:
        yield close(task)


def patient_items(planned: list[ann_mod.PatientTask], cfg: CropConfig, sizes: dict[str, int]) -> list[dict[str, str]]:
    """The second pass's dataset items: each task with its series' read plan and object sizes."""
    items = []
    for t in planned:
        series_sizes = [sizes.get(k, 0) for k in t.object_keys]
        items.append(tasks.task_item(t, tasks.choose_plan(cfg, sum(series_sizes)), series_sizes))
    return items


def second_pass(planned: list[ann_mod.PatientTask], cfg: CropConfig, stage: str, sizes: dict[str, int],
                scoring: Callable[[Any], Any] | None = None, num_cpus: float = 1) -> Iterator[PatientRows]:
    """The second pass on Ray Data: one task per patient, ``scoring`` mapping its dataset;
    ``sizes``: the objects' sizes (:attr:`Plan.sizes`), which choose each series' read plan."""
    if not planned:
        return iter(())
    ds = (scoring or (lambda d: d))(datasets.patients(patient_items(planned, cfg, sizes), cfg, num_cpus))
    return patient_stream(ds.iter_batches(batch_format="pyarrow", batch_size=None), planned, stage)
