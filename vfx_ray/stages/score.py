"""Batch scoring of a DICOM archive: the pipeline's crops stream into model actors.

One Ray Data pipeline: the decode tasks of :mod:`vfx_ray.pipeline` (first-pass chunks, then
second-pass patients) feed ``map_batches`` on a small actor pool that loads the model(s)
once per actor (:mod:`score_actor`; a GPU each when the cluster has GPUs). The driver takes each
patient's slice probabilities, keeps the maximum (the paper's rule) and commits Parquet
parts as it goes (:mod:`score_resume`), so a killed run re-run with the same ``--out`` and
model redoes only what was not committed; ``scores.parquet`` holds one row per patient.

The job in steps: :meth:`ScoreJob.score_chunks` (the first pass: index, crop and score every
chunk; a re-run over committed patients indexes headers only), plan (:func:`passes.plan`),
:meth:`ScoreJob.score_rest` (the patients the first pass could not vouch for) and
:meth:`ScoreJob.write` (the final files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from vfx_ray import contracts, layout, storage
from vfx_ray.config import CropConfig
from vfx_ray.contracts import ErrorRow, ScoreRow, SliceScore
from vfx_ray.errors import VfxError
from vfx_ray.evaluation import metrics
from vfx_ray.export import delivery
from vfx_ray.imaging import pseudonym
from vfx_ray.imaging.annotations import DEFAULT_CLASSES, PatientTask
from vfx_ray.pipeline import index as index_mod
from vfx_ray.pipeline import passes, wire
from vfx_ray.pipeline.shards import ShardJob
from vfx_ray.pipeline.wire import Kind
from vfx_ray.stages import committed_parts

DECODE_CPUS, SCORER_CPUS = 0.95, 0.05  # per decode task and per CPU scoring actor (see ScoreJob.scoring)
GPU_BATCH, CPU_BATCH = 1024, 64  # crops per model call: a GPU needs big batches, a CPU gains nothing


@dataclasses.dataclass(frozen=True)
class ScoreOptions:
    """How to score: threshold and classes of the decision, outputs, resources."""

    threshold: float = 0.5
    features: bool = False  # also write each slice's pooled ResNet features
    batch_size: int | None = None  # rows per model call: GPU_BATCH on GPUs, CPU_BATCH on CPUs
    classes: tuple[str, str] = DEFAULT_CLASSES
    commit_every: int = 25  # patients per committed part (or a minute): at most this is redone
    progress: bool = True
    pseudonymize: bool = False
    gpu: bool | None = None  # None: on GPUs when the cluster has or can get them
    sr_out: str | None = None  # a DICOM SR per scored patient: folder/prefix or dicomweb+http(s)://
    key_images: bool = False  # with sr_out: a secondary capture of the top slice, referenced by the SR


@dataclasses.dataclass(frozen=True)
class Models:
    """One checkpoint or a train-cv run's fold ensemble, with the id its scores carry."""

    files: list[str]
    ids: list[str]

    @classmethod
    def load(cls, model_uri: str) -> Models:
        from vfx_ray.ml.model import model_record

        files = model_files(model_uri)
        return cls(files, [model_record(f)["model_id"] for f in files])

    @property
    def model_id(self) -> str:
        return ensemble_id(self.ids)

    def record(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "n_models": len(self.files), "members": self.ids, "files": self.files}


def model_files(model_uri: str) -> list[str]:
    """One checkpoint, or every ``fold_*/model.pt`` of a train-cv run (the fold ensemble)."""
    if model_uri.endswith(".pt"):
        if not storage.exists(model_uri):
            raise FileNotFoundError(f"no model file at {model_uri}")
        return [model_uri]
    found = [e.uri for e in storage.list_files(model_uri) if e.uri.endswith("/model.pt") and "/fold_" in e.uri]
    if not found:
        raise VfxError("score", f"{model_uri} holds no fold_*/model.pt: give a train-cv run or a model.pt file")
    return sorted(found)


def ensemble_id(ids: list[str]) -> str:
    """A single model's id, or a content hash of the sorted member ids for an ensemble."""
    if len(ids) == 1:
        return ids[0]
    return hashlib.sha256(",".join(sorted(ids)).encode()).hexdigest()[:16]


def run_score(archive_uri: str, annotations_uri: str, model_uri: str, out_uri: str, cfg: CropConfig | None = None,
              options: ScoreOptions | None = None, **overrides: Any) -> dict[str, Any]:
    """Score every annotated patient of an archive; write scores.parquet + errors.parquet.

    ``overrides``: fields of :class:`ScoreOptions` (``threshold=0.4``). Returns the summary.
    """
    options = dataclasses.replace(options or ScoreOptions(), **overrides)
    return ScoreJob(archive_uri, out_uri, cfg or CropConfig(), options, Models.load(model_uri)).run(annotations_uri)


def patient_row(pid: str, slices: list[SliceScore], model: dict, threshold: float, classes: tuple[str, str]
                ) -> ScoreRow:
    """One ``scores.parquet`` row: the slices in order and their maximum (the paper's rule)."""
    slices = sorted(slices, key=lambda s: s["slice_index"])
    probs = [float(s["probability"]) for s in slices]
    p = max(probs)
    label = slices[0].get("label")
    return {
        "patient_id": pid,
        "series_instance_uid": slices[0]["series_instance_uid"],
        "vertebra": slices[0].get("vertebra"),
        "n_slices": len(slices),
        "slice_indices": [int(s["slice_index"]) for s in slices],
        "slice_probabilities": probs,
        "probability": p,
        "prediction": classes[1] if p >= threshold else classes[0],
        "threshold": threshold,
        "label": None if label is None else classes[int(label)],
        "model_id": model["model_id"],
        "n_models": model["n_models"],
        "scored_at": datetime.now(UTC),
    }


def scored_slices(rows: pa.Table) -> list[SliceScore]:
    """A patient's scored CROP rows as slice records with their probability (and embedding)."""
    crops = wire.of_kind(rows, (Kind.CROP,))
    return [{**meta, "probability": p, "embedding": e, "cam": c} for meta, p, e, c in
            zip(wire.metas(crops), crops["probability"].to_pylist(), crops["embedding"].to_pylist(),
                crops["cam"].to_pylist(), strict=True)]


def key_slice_cam(slices: list[SliceScore], row: ScoreRow) -> bytes | None:
    """The scorer's maps of the slice the patient's key image shows (:func:`contracts.key_slice`
    of its scores row, whose lists are the slices in slice order)."""
    return sorted(slices, key=lambda s: s["slice_index"])[contracts.key_slice(row)].get("cam")


@dataclasses.dataclass
class FirstPassResults:
    """The first pass's scored slices, spilled to a local Parquet file as they come (the
    driver holds none until the plan asks), and its error rows per patient (few)."""

    spill: str
    errors: dict[str, list[ErrorRow]] = dataclasses.field(default_factory=dict)
    chunks: int = 0
    chunks_reused: int = 0
    _writer: pq.ParquetWriter | None = None

    def take(self, rows: pa.Table) -> None:
        crops = wire.of_kind(rows, (Kind.CROP,))
        if crops.num_rows:
            self._writer = self._writer or pq.ParquetWriter(self.spill, wire.SCORED_WIRE)
            self._writer.write_table(crops.cast(wire.SCORED_WIRE))
        for e in wire.metas(wire.of_kind(rows, (Kind.ERROR,))):
            self.errors.setdefault(e["patient_id"], []).append(e)

    def patients(self, wanted: set[str]) -> Iterator[tuple[str, list[SliceScore]]]:
        """(patient, its scored slices) for those of ``wanted`` that have any, in the order
        the archive was read: a patient the plan vouches for was cropped in one chunk, so its
        rows lie together."""
        if self._writer is not None:
            self._writer.close()
        if not os.path.exists(self.spill):
            return
        keep, done = pa.array(sorted(wanted), pa.string()), set()
        current, slices = None, []
        for batch in pq.ParquetFile(self.spill).iter_batches(batch_size=1024):
            table = pa.Table.from_batches([batch])
            for pid, rows in passes.runs(table.filter(pc.is_in(table["patient_id"], keep))):
                if pid != current:
                    if current is not None:
                        yield current, slices
                    if pid in done:
                        raise RuntimeError(f"the first pass's rows of patient {pid} are not together")
                    current, slices = pid, []
                    done.add(pid)
                slices += scored_slices(rows)
        if current is not None:
            yield current, slices


class PatientSink:
    """Turns each finished patient's slices into its scores row and commits it in parts."""

    def __init__(self, job: ScoreJob, total: int) -> None:
        self.job, self.model, self.scored = job, job.models.record(), 0
        self.writer = committed_parts.PartWriter(job.out_uri, every=job.options.commit_every)
        self.bar = tqdm(total=total, desc="score: patients", unit="patient", disable=not job.options.progress)

    def add(self, pid: str, slices: list[SliceScore]) -> None:
        o, pseudo = self.job.options, self.job.pseudo
        if slices:
            row = patient_row(pid, slices, self.model, o.threshold, o.classes)
            cam = key_slice_cam(slices, row)
            feats = committed_parts.features_table(pid, slices) if o.features else None
            if pseudo:
                row, feats = pseudo.row(row), feats if feats is None else pseudo.table(feats)
            self.writer.add({**row, contracts.KEY_CAM: cam}, feats)
            self.scored += 1
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        self.writer.flush()


class ScoreJob:
    """One ``score`` run; :meth:`run` reads top-down through its steps."""

    def __init__(self, archive_uri: str, out_uri: str, cfg: CropConfig, options: ScoreOptions, models: Models) -> None:
        self.archive_uri, self.out_uri, self.cfg, self.options, self.models = archive_uri, out_uri, cfg, options, models
        self.pseudo = pseudonym.maybe(options.pseudonymize, archive_uri)

    def run(self, annotations_uri: str) -> dict[str, Any]:
        from vfx_ray.runtime.session import ensure_ray

        ensure_ray()
        t0 = time.monotonic()
        self._place()
        annotations, errors = passes.read_annotations(annotations_uri)
        done = committed_parts.committed(self.out_uri, self.models.model_id)
        done_ids = set(done["patient_id"].to_pylist()) if done is not None else set()
        with tempfile.TemporaryDirectory(prefix="vfx-score-") as tmp:
            self.index, first = self.score_chunks(annotations, bool(done_ids), tmp)
            plan = passes.plan(annotations, self.index, self.cfg, self.pseudo)
            shown = self.pseudo.patient if self.pseudo else (lambda pid: pid)  # the id as written out
            todo = [t for t in plan.tasks if shown(t.patient_id) not in done_ids]
            errors += plan.errors
            self.plan = plan  # the reports refer to the planned series
            sink = PatientSink(self, len(todo))
            second = plan.second_pass(skip=lambda pid: shown(pid) in done_ids)
            try:
                errors += self.score_rest(todo, plan, first, second, sink)
            except BaseException:
                with contextlib.suppress(Exception):  # keep what is finished, if the output takes it
                    sink.writer.flush()
                raise
            sink.close()
            passes.release_arrow_memory()
            head = {"patients_planned": len(plan.tasks), "scored_now": sink.scored,
                    "skipped_already_scored": len(done_ids)}
            reads = {"patients_read_once": len(plan.read_once & {t.patient_id for t in todo}),
                     "patients_second_pass": len(second), "chunks": first.chunks, "chunks_reused": first.chunks_reused}
            return self.write(errors, head, reads, time.monotonic() - t0)

    def _place(self) -> None:
        """Where the model runs: up to one actor per GPU the cluster can have, or CPU actors."""
        import ray

        from vfx_ray.runtime.placement import use_gpu
        from vfx_ray.runtime.session import cluster_shape

        shape = cluster_shape()
        self.gpus = max(1, shape.max_gpus) if use_gpu(self.options.gpu, shape) else 0
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.batch_size = self.options.batch_size or (GPU_BATCH if self.gpus else CPU_BATCH)

    def scoring(self, ds: Any) -> Any:
        """The scoring stage on a dataset of wire rows.

        Decoding (CPU tasks in already-running workers) starts at once and streams into a
        small actor pool that scores: from 1 up to one actor per GPU the cluster can have
        (it starts with what it gets: no waiting for GPU nodes), or on CPU one per 8 cores
        (ResNet50 on 64x64 crops scores ~8x faster than a core decodes) asking for
        SCORER_CPUS, so that it fits beside a decode task on any node (DECODE_CPUS) and its
        start (torch, the models) overlaps the decoding instead of delaying it.
        """
        import ray

        from vfx_ray.stages.slice_scorer import SliceScorer

        if self.gpus:
            pool, resources = ray.data.ActorPoolStrategy(min_size=1, max_size=self.gpus), {"num_gpus": 1, "num_cpus": 1}
        else:
            pool = ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, self.cpus // 8))
            resources = {"num_cpus": SCORER_CPUS}
        kwargs = {
            "files": self.models.files,
            "cfg": self.cfg,
            "features": self.options.features,
            "use_gpu": self.gpus > 0,
            "cams": bool(self.options.sr_out and self.options.key_images),  # the key images' maps
        }
        return ds.map_batches(SliceScorer, fn_constructor_kwargs=kwargs, batch_size=self.batch_size,
                              batch_format="pyarrow", compute=pool, **resources)

    def score_chunks(self, annotations: pd.DataFrame, resumed: bool, folder: str
                     ) -> tuple[index_mod.ArchiveIndex, FirstPassResults]:
        """A fresh ``--out``: index, crop and score each chunk, committing finished chunks
        (resumable by chunk: a committed chunk is read back, not run). A re-run over committed
        patients: ranged header reads only. The index's parts go to ``folder``."""
        first = FirstPassResults(os.path.join(folder, "first_pass_scores.parquet"))
        if resumed:
            job = ShardJob(self.cfg, annotations, self.archive_uri, headers_only=True)
            return passes.first_pass(passes.FirstPass(self.archive_uri, job, "score: headers read",
                                                      self.options.progress), folder), first
        cache = None  # pseudonymised runs keep real ids out of the output store: no chunk commits
        if not self.pseudo:
            key = committed_parts.cache_key(self.models.model_id, self.cfg, self.options.features, annotations)
            cache = committed_parts.ChunkCache(self.out_uri, key)

        def keep(end: dict[str, Any] | None, rows: pa.Table) -> pa.Table:
            if end and end["chunk"] and cache:
                if end["cached"]:
                    rows = cache.read(end["chunk"])
                elif end["clean"]:
                    cache.commit(end["chunk"], rows)
            if end and end["chunk"]:
                first.chunks += 1
                first.chunks_reused += bool(end["cached"])
            first.take(rows)
            return rows

        job = ShardJob(self.cfg, annotations, self.archive_uri, cached=frozenset(cache.names if cache else ()))
        run = passes.FirstPass(self.archive_uri, job, "score: objects read", self.options.progress, self.scoring,
                               DECODE_CPUS)
        return passes.first_pass(run, folder, keep), first

    def score_rest(self, todo: list[PatientTask], plan: passes.Plan, first: FirstPassResults,
                   second: list[PatientTask], sink: PatientSink) -> list[dict[str, Any]]:
        """Every patient to do into ``sink``: first-pass results, then the second pass."""
        errors: list[dict[str, Any]] = []
        read_once = [t.patient_id for t in todo if t.patient_id in plan.read_once]
        for pid in read_once:
            errors += first.errors.get(pid, [])
        without = set(read_once)  # left: the patients with no scored slice (their error rows above)
        for pid, slices in first.patients(set(read_once)):
            sink.add(pid, slices)
            without.discard(pid)
        for pid in (p for p in read_once if p in without):
            sink.add(pid, [])
        for patient in passes.second_pass(second, self.cfg, "score", self.index, self.scoring, DECODE_CPUS):
            errors += patient.errors
            sink.add(patient.task.patient_id, scored_slices(patient.rows) if patient.rows is not None else [])
        return errors

    def write(self, errors: list[dict[str, Any]], head: dict[str, int], reads: dict[str, int],
              seconds: float) -> dict[str, Any]:
        """The final files (scores, features, errors, metrics with labels) and the summary."""
        o, model, pseudonyms = self.options, self.models.record(), pseudonym.metadata(self.pseudo)
        run_config = {"crops": dataclasses.asdict(self.cfg), "threshold": o.threshold, "classes": list(o.classes),
                      "model": model, "archive": self.archive_uri, **pseudonyms}
        meta = {"vfx_ray.config": json.dumps(run_config), "vfx_ray.model_id": model["model_id"]}
        table = committed_parts.write_final(self.out_uri, model["model_id"], meta, o.features)
        scored_ids = set(table["patient_id"].to_pylist())
        errors = [e for e in (self.pseudo.rows(errors) if self.pseudo else errors)
                  if e.get("patient_id") not in scored_ids]  # a re-run healed them
        reports = self.send_reports(table) if o.sr_out else None
        if reports:
            errors += self.pseudo.rows(reports.errors) if self.pseudo else reports.errors
            head = {**head, **reports.summary()}
        storage.write_table(contracts.errors_table(errors), storage.join(self.out_uri, layout.ERRORS))
        summary = {**head, "rows": table.num_rows, "errors": len(errors), "model_id": model["model_id"],
                   "n_models": model["n_models"], "seconds": round(seconds, 1), **reads, **pseudonyms}
        labelled = table.filter(pc.is_valid(table["label"]))
        if labelled.num_rows:
            summary["metrics"] = label_metrics(labelled, o.threshold, o.classes)
            storage.write_text(storage.join(self.out_uri, layout.METRICS), json.dumps(summary["metrics"], indent=2))
        return summary

    def send_reports(self, table: pa.Table) -> delivery.Outcome:
        """An SR (and key image) per scored patient, after the scores are safely written, built
        and sent on the workers (:mod:`outbox`), one actor per CPU at most."""
        from vfx_ray.export import patient_reports
        from vfx_ray.stages import outbox

        o = self.options
        tasks = self.plan.tasks
        cams = committed_parts.committed_cams(self.out_uri, self.models.model_id) if o.key_images else {}
        table = table.append_column(contracts.KEY_CAM, pa.array(
            [cams.get(p) for p in table["patient_id"].to_pylist()], pa.binary()))
        series = self.index.series_objects({t.series_instance_uid for t in tasks})
        job = outbox.ReportJob(o.sr_out, self.models.files, self.cfg, self.pseudo, o.key_images)
        bar = tqdm(total=table.num_rows, desc="score: reports", unit="patient", disable=not o.progress)
        with bar:
            return outbox.push(job, patient_reports.reports(table, tasks, series, self.pseudo), self.cpus, bar.update)


def label_metrics(table: pa.Table, threshold: float, classes: tuple[str, str]) -> dict[str, Any]:
    """The paper's per-slice and per-patient metrics when the annotations carry labels (a
    slice's columns from the patients' lists by pyarrow: no Python object per slice)."""
    lists = table["slice_probabilities"].combine_chunks()
    parent = pc.list_parent_indices(lists)
    y = np.array([classes.index(label) for label in table["label"].to_pylist()])
    slices = pd.DataFrame({"patient_id": table["patient_id"].take(parent).to_numpy(zero_copy_only=False),
                           "label": y[parent.to_numpy()], "probability": pc.list_flatten(lists).to_numpy()})
    return {"threshold": threshold, **metrics.level_metrics(slices, threshold)}
