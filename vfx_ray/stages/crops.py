"""The crops job: an archive and its annotations in, the paper's crops out.

Writes ``crops.parquet``, ``errors.parquet``, ``series_index.parquet``, ``reads.parquet`` and
``manifest.json`` (names in :mod:`layout`). The reading is :mod:`vfx_ray.pipeline`'s: a first pass reads each
object once, indexes and crops; the patients it could not vouch for take a second pass. The
tasks write their crops as Parquet parts under ``OUT/_parts/crops/`` and a worker joins them
into ``crops.parquet`` (:func:`join_parts`): the driver handles part names, never pixels.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import os
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from vfx_ray import contracts, layout, storage
from vfx_ray.config import CropConfig
from vfx_ray.contracts import CropsSummary
from vfx_ray.imaging import pseudonym
from vfx_ray.pipeline import index as index_mod
from vfx_ray.pipeline import passes, tasks, wire
from vfx_ray.pipeline.shards import ShardJob


def run_crops(archive_uri: str, annotations_uri: str, out_uri: str, cfg: CropConfig | None = None, *,
              progress: bool = True, pseudonymize: bool = False) -> CropsSummary:
    """The crops job (see the module's docstring). ``pseudonymize``: identifiers in every
    output replaced by keyed hashes (:mod:`pseudonym`). Returns the manifest."""
    import ray

    from vfx_ray.runtime.session import ensure_ray

    cfg = cfg or CropConfig()
    pseudo = pseudonym.maybe(pseudonymize, archive_uri)
    ensure_ray()
    t0 = time.monotonic()
    annotations, errors = passes.read_annotations(annotations_uri)
    reads = ReadLog()
    parts = tasks.CropParts(storage.join(out_uri, layout.CROP_PARTS), pseudo)
    clear(parts.prefix)  # a killed run's parts
    with tempfile.TemporaryDirectory(prefix="vfx-crops-") as tmp:
        spill = os.path.join(tmp, "first_pass.parquet")  # candidates' part names and errors on disk
        index = first_pass(archive_uri, annotations, ShardJob(cfg, annotations, archive_uri, parts=parts), spill,
                           reads, progress)
        plan = passes.plan(annotations, index, cfg, pseudo)
        series_index = start_series_index(index, plan, storage.join(out_uri, layout.SERIES_INDEX), pseudo)
        second = plan.second_pass()
        stream = tqdm(passes.second_pass(second, cfg, "crop", index, parts=parts), total=len(second),
                      desc="crops: patients", unit="patient", disable=not progress)
        pieces = Pieces()
        pieces.take_first(spill, plan.read_once)
        pieces.take_second(stream, reads)
        ray.get(series_index)  # before the parts file goes with the folder
        passes.release_arrow_memory()
    shown = pseudo.patient if pseudo else str
    written = join_parts(pieces.uris, [shown(p) for p in plan.read_once], storage.join(out_uri, layout.CROPS),
                         crops_metadata(cfg, archive_uri, pseudo), cfg)
    clear(parts.prefix)
    errors += plan.errors + pieces.errors
    errors = pseudo.rows(errors) if pseudo else errors
    storage.write_table(contracts.errors_table(errors), storage.join(out_uri, layout.ERRORS))
    storage.write_table(pseudonym.hide(pseudo, reads.table(plan)), storage.join(out_uri, layout.READS))
    summary: CropsSummary = {
        "archive": archive_uri,
        "annotations": annotations_uri,
        "patients_planned": len(plan.tasks),
        "patients_with_crops": written.patients,
        "crops": written.crops,
        "errors": len(errors),
        "series": plan.n_series,
        "patients_read_once": len(plan.read_once),
        "patients_second_pass": len(second),
        "reads": reads.summary(plan),
        "seconds": round(time.monotonic() - t0, 1),
        "config": dataclasses.asdict(cfg),
        **pseudonym.metadata(pseudo),
    }
    storage.write_text(storage.join(out_uri, layout.MANIFEST), json.dumps(summary, indent=2))
    return summary


def clear(prefix: str) -> None:
    """Delete the crops' parts (and a local ``_parts`` folder left empty)."""
    if storage.exists(prefix):
        storage.delete_tree(prefix)
    if not storage.is_s3(prefix):
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(prefix))


def first_pass(archive_uri: str, annotations: pd.DataFrame, job: ShardJob, spill: str, reads: ReadLog,
               progress: bool) -> index_mod.ArchiveIndex:
    """The first pass: the archive index; candidates' PART and ERROR rows spilled to ``spill``; reads logged."""
    with pq.ParquetWriter(spill, wire.CROP_WIRE) as spill_writer:
        def keep(_end: dict | None, rows: pa.Table) -> pa.Table:
            results = wire.of_kind(rows, wire.RESULT_KINDS)
            passes.raise_if_store_down(wire.metas(wire.of_kind(results, (wire.Kind.ERROR,))))  # a part not written
            spill_writer.write_table(results)
            reads.take(rows, first=True)
            return rows

        run = passes.FirstPass(archive_uri, job, "crops: objects read", progress)
        return passes.first_pass(run, os.path.dirname(spill), keep)


def start_series_index(index: index_mod.ArchiveIndex, plan: passes.Plan, uri: str,
                       pseudo: pseudonym.Pseudonymizer | None) -> Any:
    """:func:`write_series_index` as a Ray task on the driver's node (the index's parts are
    a local file there; no CPU asked: a cluster's head has none to give), while the second
    pass runs. Streaming every series' objects through the driver left it 23-57 MB larger
    after the step, growing with the series (docs/benchmarks.md "scale"). Returns its ref."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    job = ray.remote(num_cpus=0)(write_series_index).options(name="crops: series index", scheduling_strategy=here)
    return job.remote(index.parts(), {t.series_instance_uid for t in plan.tasks}, plan.selection, uri, pseudo)


def write_series_index(parts: index_mod.SeriesParts, chosen: set[str], selection: dict[str, str], uri: str,
                       pseudo: pseudonym.Pseudonymizer | None, batch: int = 512, build: int = 64) -> None:
    """The series index streamed from the index's parts: each series marked ``selected`` (in
    ``chosen``: the crops come from it) and with ``selection``: ``selected``, named in the
    annotations, why the series rules passed it over, or empty for a series of a patient not
    annotated. Row groups of ``batch`` series, built ``build`` at a time (a series' objects
    as Python objects take ~30 KB)."""
    schema = contracts.SERIES_INDEX_SCHEMA

    def table(rows: list[dict]) -> pa.Table:
        return pa.Table.from_pylist([{**s, "selected": s["series_instance_uid"] in chosen,
                                      "selection": selection.get(s["series_instance_uid"])} for s in rows],
                                    schema=schema)

    with storage.atomic_output(uri) as sink, pq.ParquetWriter(sink, schema) as writer:
        series, group = iter(parts.objects()), []
        while rows := list(itertools.islice(series, build)):
            group.append(table(rows))
            if len(group) * build >= batch:
                writer.write_table(pseudonym.hide(pseudo, pa.concat_tables(group)))
                group = []
        if group:
            writer.write_table(pseudonym.hide(pseudo, pa.concat_tables(group)))
    passes.release_arrow_memory()


@dataclasses.dataclass
class Pieces:
    """What ``crops.parquet`` is made of, in order: the first pass's parts (their rows of the
    patients it vouched for), then the second pass's, one per patient; and the error rows."""

    uris: list[tuple[str, bool]] = dataclasses.field(default_factory=list)  # (part, only read-once patients)
    errors: list[dict] = dataclasses.field(default_factory=list)

    def take_first(self, spill: str, read_once: set[str]) -> None:
        keep = pa.array(sorted(read_once), pa.string())
        for batch in pq.ParquetFile(spill).iter_batches(batch_size=512):
            table = pa.Table.from_batches([batch])
            self.uris += [(m["uri"], True) for m in wire.metas(wire.of_kind(table, (wire.Kind.PART,)))]
            errors = wire.of_kind(table, (wire.Kind.ERROR,))
            self.errors += wire.metas(errors.filter(pc.is_in(errors["patient_id"], keep)))

    def take_second(self, stream: Iterable[passes.PatientRows], reads: ReadLog) -> None:
        for patient in stream:  # a lost task has no rows, and a TaskLost error row
            if patient.rows is not None:
                reads.take(patient.rows, first=False)
                self.uris += [(m["uri"], False) for m in wire.metas(wire.of_kind(patient.rows, (wire.Kind.PART,)))]
            self.errors += patient.errors


@dataclasses.dataclass
class ReadLog:
    """How each planned patient's series was read (the tasks' READS rows): the first pass's
    where the driver kept its crops, else the second pass's."""

    first: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    second: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    bytes_read_total: int = 0  # every byte read, for whichever patient, in both passes

    def take(self, rows: pa.Table, first: bool) -> None:
        for meta in wire.metas(wire.of_kind(rows, (wire.Kind.READS,))):
            if not meta["patient_id"] or not first:  # a chunk's total, or a second-pass patient's
                self.bytes_read_total += meta["bytes_read"]
            if meta["patient_id"]:
                (self.first if first else self.second)[meta["patient_id"]] = {**meta, "pass": 1 if first else 2}

    def records(self, plan: passes.Plan) -> list[dict[str, Any]]:
        got = ((self.first if t.patient_id in plan.read_once else self.second).get(t.patient_id) for t in plan.tasks)
        return [r for r in got if r]

    def table(self, plan: passes.Plan) -> pa.Table:
        return pa.Table.from_pylist(self.records(plan), schema=READS_SCHEMA)

    def summary(self, plan: passes.Plan) -> dict[str, Any]:
        """Patients per plan; their bytes read against the bytes of the objects their crops needed;
        and every byte the job read (other series and unannotated patients included)."""
        records = self.records(plan)
        read, needed = sum(r["bytes_read"] for r in records), sum(r["bytes_needed"] for r in records)
        return {"patients_per_plan": dict(collections.Counter(r["plan"] for r in records)), "bytes_read": read,
                "bytes_needed": needed, "read_per_needed": round(read / needed, 2) if needed else None,
                "bytes_read_total": self.bytes_read_total}


READS_SCHEMA = pa.schema([("patient_id", pa.string()), ("series_instance_uid", pa.string()), ("plan", pa.string()),
                          ("pass", pa.int8()), ("objects_read_whole", pa.int64()), ("bytes_read", pa.int64()),
                          ("bytes_needed", pa.int64())])


@dataclasses.dataclass(frozen=True)
class Written:
    crops: int = 0
    patients: int = 0


def crops_metadata(cfg: CropConfig, archive_uri: str, pseudo: pseudonym.Pseudonymizer | None) -> dict[str, str]:
    """What ``crops.parquet`` says of how it was made (train-cv checks the crop settings)."""
    return {"vfx_ray.crop_config": json.dumps(dataclasses.asdict(cfg)), "vfx_ray.archive": archive_uri,
            "vfx_ray.pseudonyms": json.dumps(pseudonym.metadata(pseudo))}


def join_parts(uris: list[tuple[str, bool]], read_once: list[str], uri: str, metadata: dict[str, str],
               cfg: CropConfig) -> Written:
    """``crops.parquet`` joined from the tasks' parts by a Ray task: the crops pass through a
    worker, never the driver."""
    import ray

    job = ray.remote(num_cpus=1)(write_crops).options(name="crops: join parts")
    return ray.get(job.remote(uris, read_once, uri, metadata, cfg))


def write_crops(uris: list[tuple[str, bool]], read_once: list[str], uri: str, metadata: dict[str, str],
                cfg: CropConfig) -> Written:
    """Stream the parts into one Parquet file (atomic), in order, a first-pass part's rows
    kept for the ``read_once`` patients only; its settings in the file's metadata."""
    schema = contracts.crops_schema(cfg.channels, cfg.crop_size).with_metadata(metadata)
    keep = pa.array(sorted(read_once), pa.string())
    crops, patients = 0, set()
    with storage.atomic_output(uri) as sink, pq.ParquetWriter(sink, schema) as writer:
        for part, filtered in uris:
            table = storage.read_table(part)
            table = table.filter(pc.is_in(table["patient_id"], keep)) if filtered else table
            if table.num_rows:
                writer.write_table(table.cast(schema))
                crops += table.num_rows
                patients |= set(table["patient_id"].to_pylist())
    return Written(crops, len(patients))
