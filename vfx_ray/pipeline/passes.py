"""The driver's side of the pipeline: shards, first pass, plan, the ordered patient stream.

Both jobs run the same steps. The first pass (:func:`first_pass`) hands the archive to Ray
tasks in shards (:mod:`shards`: each task lists its folders and reads them chunk by chunk,
each chunk by its study folders' read plan: every object whole, or every header and then the
objects an ROI needs): it indexes headers and crops, as candidates, every annotated series a
chunk holds. The driver keeps a summary per series (:mod:`index`), then plans on the whole
archive's index (:func:`plan`) and keeps a candidate only when its chunk held the planned
series complete; the other patients (a series spread over folders, a second series
elsewhere) take the second pass, one task per patient, streamed back in plan order
(:func:`patient_stream`). So the crops are the same for any folder layout, the usual layout
(a series per folder) is read once, and no process holds a record per object.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from vfx_ray import storage
from vfx_ray.config import CropConfig
from vfx_ray.imaging import annotations as ann_mod
from vfx_ray.imaging import masks, pseudonym
from vfx_ray.pipeline import datasets, shards, tasks, wire
from vfx_ray.pipeline.index import ArchiveIndex, lost
from vfx_ray.pipeline.wire import Kind


def raise_if_store_down(errors: list[dict]) -> None:
    """An unreachable store fails the job: every later read would fail the same way, after
    a minute of retries each. Bad studies stay error rows."""
    for e in errors:
        if e.get("error_type") == storage.StoreUnavailable.__name__:
            key = e.get("object_key")  # the job's message must not name a patient's object
            raise storage.StoreUnavailable(e["message"].replace(key, "<key>") if key else e["message"])


def read_annotations(uri: str) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """A job's annotations, each mask-only row given its mask's box (:mod:`masks`), and the
    error rows of masks that cannot be used."""
    return masks.resolve_masks(ann_mod.read_annotations(uri))


# ---------------------------------------------------------------- the first pass
def split_chunks(batches: Iterable[pa.Table]) -> Iterator[tuple[dict[str, Any] | None, pa.Table]]:
    """(its CHUNK_END row's meta, its rows without it) for each chunk of the first pass's
    ordered batches; rows after the last CHUNK_END (a chunk whose end was lost) come last, with None."""
    pending: list[pa.Table] = []
    for batch in batches:
        kinds = batch["kind"].to_numpy(zero_copy_only=False)
        start = 0
        for end in np.flatnonzero(kinds == Kind.CHUNK_END):
            pending.append(batch.slice(start, end - start))
            yield json.loads(batch["meta"][int(end)].as_py()), pa.concat_tables(pending)
            pending, start = [], int(end) + 1
        pending.append(batch.slice(start))
    if pending and sum(t.num_rows for t in pending):
        yield None, pa.concat_tables(pending)


Keep = Callable[[dict[str, Any] | None, pa.Table], pa.Table]


def index_chunks(chunks: Iterable[tuple[dict[str, Any] | None, pa.Table]], index: ArchiveIndex, keep: Keep,
                 desc: str, progress: bool) -> ArchiveIndex:
    """Index the chunks' rows as they come; ``keep`` gets each chunk's rows first (the job
    spills, commits or scores them) and returns those to index (a cached chunk's, read back).
    Fails at once when the store is down."""
    with tqdm(desc=desc, unit="obj", disable=not progress) as bar:
        for end, rows in chunks:
            table = keep(end, rows)
            n_errors, n_objects = len(index.errors), index.objects
            index.absorb(table, end["shard"] if end else None)
            if end and end["chunk"] is None:
                index.shards_done.add(end["shard"])
            bar.update(index.objects - n_objects)
            raise_if_store_down(index.errors[n_errors:])
    return index


@dataclasses.dataclass(frozen=True)
class FirstPass:
    """How a job runs its first pass: ``stage`` maps the shards' dataset (the scoring actors);
    ``job`` says whether chunks are cropped or only indexed, and which are cached."""

    archive_uri: str
    job: shards.ShardJob
    desc: str
    progress: bool = True
    stage: Callable[[Any], Any] | None = None
    num_cpus: float = 1


def first_pass(run: FirstPass, folder: str, keep: Keep | None = None) -> ArchiveIndex:
    """The first pass on Ray Data: the archive listed in shards, every chunk indexed (its
    series' parts written under ``folder``) and, unless ``headers_only``, cropped."""
    parts = shards.shards(run.archive_uri, datasets.cluster_cpus())
    index = ArchiveIndex(folder)
    if parts:
        ds = (run.stage or (lambda d: d))(datasets.shards(parts, run.job, run.num_cpus))
        chunks = split_chunks(ds.iter_batches(batch_format="pyarrow", batch_size=None))
        index_chunks(chunks, index, keep or (lambda _end, rows: rows), run.desc, run.progress)
    index.finish(parts, run.archive_uri, run.job.cfg)
    raise_if_store_down(index.errors)
    release_arrow_memory()
    return index


def release_arrow_memory() -> None:
    """Give back what pyarrow's allocator kept of a step's tables: it holds freed memory in
    proportion to the rows that passed (+52 MB after the series index of 40,000 objects)."""
    pa.default_memory_pool().release_unused()


# ---------------------------------------------------------------- plan
@dataclasses.dataclass
class Plan:
    """The work of a job: the planned patients, the errors so far."""

    n_series: int  # in the archive (their summaries stay in the index)
    tasks: list[ann_mod.PatientTask]
    errors: list[dict[str, Any]]
    read_once: set[str]  # patients whose first-pass result is theirs
    selection: dict[str, str] = dataclasses.field(default_factory=dict)  # series uid -> chosen, or why not

    def second_pass(self, skip: Callable[[str], bool] = lambda pid: False) -> list[ann_mod.PatientTask]:
        return [t for t in self.tasks if t.patient_id not in self.read_once and not skip(t.patient_id)]


def plan(annotations: pd.DataFrame, index: ArchiveIndex, cfg: CropConfig,
         pseudo: pseudonym.Pseudonymizer | None) -> Plan:
    """Join the annotations to the whole archive's series (the series rules choose where no
    series is named); the pseudonymiser learns every id. The tasks carry no object keys yet
    (:func:`with_objects` adds them where they are needed)."""
    selection: dict[str, str] = {}
    planned, errors = ann_mod.plan_tasks(annotations, index, rules=cfg.series_rules, notes=selection)
    if pseudo:
        pseudo.know_patients([t.patient_id for t in planned] + [p for p, keys in index.patients.items() if keys])
    return Plan(len(index.series), planned, index.errors + errors, index.read_once(planned), selection)


def with_objects(planned: list[ann_mod.PatientTask], index: ArchiveIndex
                 ) -> tuple[list[ann_mod.PatientTask], list[list[int]]]:
    """The tasks with their series' object keys, and those objects' sizes (from the index's parts)."""
    found = {s["series_instance_uid"]: s for s in index.series_objects({t.series_instance_uid for t in planned})}
    filled = [dataclasses.replace(t, object_keys=found[t.series_instance_uid]["object_keys"]) for t in planned]
    return filled, [found[t.series_instance_uid]["object_sizes"] for t in planned]


# ---------------------------------------------------------------- the patient stream
@dataclasses.dataclass
class PatientRows:
    """One patient's second-pass result: its CROP and ERROR wire rows (None: its task was
    lost) and its error rows (a TaskLost row for a lost task)."""

    task: ann_mod.PatientTask
    rows: pa.Table | None
    errors: list[dict[str, Any]]


def runs(batch: pa.Table) -> Iterator[tuple[str, pa.Table]]:
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
        for pid, rows in runs(batch):
            if position[pid] < next_open:
                raise RuntimeError(f"rows of patient {pid} arrived after the patients that follow it")
            pieces.setdefault(pid, []).append(rows)
            while next_open < position[pid]:
                yield close(planned[next_open])
                next_open += 1
    for task in planned[next_open:]:
        yield close(task)


def patient_items(planned: list[ann_mod.PatientTask], cfg: CropConfig, sizes: list[list[int]]
                  ) -> list[dict[str, str]]:
    """The second pass's dataset items: each task with its series' read plan and object sizes."""
    return [tasks.task_item(t, tasks.choose_plan(cfg, sum(s)), s) for t, s in zip(planned, sizes, strict=True)]


def second_pass(planned: list[ann_mod.PatientTask], cfg: CropConfig, stage: str, index: ArchiveIndex,
                scoring: Callable[[Any], Any] | None = None, num_cpus: float = 1,
                parts: tasks.CropParts | None = None) -> Iterator[PatientRows]:
    """The second pass on Ray Data: one task per patient, ``scoring`` mapping its dataset (or
    its crops written to ``parts``). The driver holds these patients' object keys (from
    ``index``), which choose their read plans."""
    if not planned:
        return iter(())
    planned, sizes = with_objects(planned, index)
    ds = (scoring or (lambda d: d))(datasets.patients(patient_items(planned, cfg, sizes), cfg, num_cpus, parts))
    return patient_stream(ds.iter_batches(batch_format="pyarrow", batch_size=None), planned, stage)
