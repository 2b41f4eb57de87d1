"""Batch scoring of a DICOM archive: ingestion streams into model actors, per-patient max.

One Ray Data pipeline: decode tasks (the one-pass chunks of :mod:`scorepass`, or the
per-patient crops of ``ingest``) feed ``map_batches`` on an actor pool that loads the
model(s) once per actor (a GPU each when the cluster has GPUs). The driver groups slice
probabilities per patient and commits Parquet parts (and first-pass chunks) as it goes, so
a killed run re-run with the same ``--out`` and model redoes only what was not committed;
the final ``scores.parquet`` holds exactly one row per patient.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from vfx_ray import annotations as ann_mod
from vfx_ray import contracts, dicom, ingest, layout, metrics, pseudonym, scorepass, storage
from vfx_ray.annotations import DEFAULT_CLASSES
from vfx_ray.config import CropConfig
from vfx_ray.errors import VfxError
from vfx_ray.scorer import SLICE_WIRE, SliceScorer

PARTS = "_parts"
DECODE_CPUS, SCORER_CPUS = 0.95, 0.05  # per decode task and per CPU scoring actor (see run_score)
GPU_BATCH, CPU_BATCH = 1024, 64  # crops per model call: a GPU needs big batches, a CPU gains nothing



def scores_schema() -> pa.Schema:
    return pa.schema(
        [
            ("patient_id", pa.string()),
            ("series_instance_uid", pa.string()),
            ("vertebra", pa.string()),
            ("n_slices", pa.int32()),
            ("slice_indices", pa.list_(pa.int32())),
            ("slice_probabilities", pa.list_(pa.float64())),
            ("probability", pa.float64()),
            ("prediction", pa.string()),
            ("threshold", pa.float64()),
            ("label", pa.string()),
            ("model_id", pa.string()),
            ("n_models", pa.int32()),
            ("scored_at", pa.timestamp("us", tz="UTC")),
        ]
    )


# ---------------------------------------------------------------- models
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


# ---------------------------------------------------------------- per patient
def patient_row(pid: str, slices: list[dict], model: dict, threshold: float, classes: tuple[str, str]) -> dict:
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


def committed(out_uri: str, model_id: str) -> pa.Table | None:
    """Rows already committed for this model (final file and parts), one per patient."""
    tables = []
    final = storage.join(out_uri, layout.SCORES)
    if storage.exists(final):
        tables.append(storage.read_table(final))
    parts = storage.join(out_uri, PARTS)
    if storage.exists(parts):
        found = storage.list_files(parts, suffix=".parquet")  # score parts, not features or chunks
        tables += [storage.read_table(e.uri) for e in found if "/" not in e.uri.rsplit(f"/{PARTS}/", 1)[1]]
    tables = [t.select(scores_schema().names).cast(scores_schema()) for t in tables if t.num_rows]
    if not tables:
        return None
    table = pa.concat_tables(tables)
    table = table.filter(pc.equal(table["model_id"], model_id))
    _, first = np.unique(np.array(table["patient_id"].to_pylist(), dtype=object), return_index=True)
    return table.take(sorted(first))


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
            storage.write_table(pa.concat_tables(self.features), storage.join(self.dir, "features", name + ".parquet"))
        storage.write_table(pa.Table.from_pylist(self.rows, schema=scores_schema()), storage.join(self.dir, name + ".parquet"))
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


def run_score(
    archive_uri: str,
    annotations_uri: str,
    model_uri: str,
    out_uri: str,
    cfg: CropConfig | None = None,
    *,
    threshold: float = 0.5,
    features: bool = False,
    batch_size: int | None = None,
    classes: tuple[str, str] = DEFAULT_CLASSES,
    commit_every: int = 25,
    progress: bool = True,
    pseudonymize: bool = False,
    gpu: bool | None = None,
) -> dict[str, Any]:
    """Score every annotated patient of an archive; write scores.parquet + errors.parquet.

    A fresh ``--out`` is read in one pass (:mod:`scorepass`, resumable by chunk); a re-run
    over committed patients indexes headers only and scores the rest. Finished patients are
    committed every ``commit_every`` patients (or minute): that much work at most is redone.
    ``gpu=None`` scores on GPUs when the cluster has or can get them. ``batch_size`` rows per
    model call: default ``GPU_BATCH`` on GPUs (a big batch keeps one busy), ``CPU_BATCH`` on CPUs.
    """
    import ray

    from vfx_ray.model import model_record
    from vfx_ray.placement import use_gpu
    from vfx_ray.raysession import cluster_shape, ensure_ray

    cfg = cfg or CropConfig()
    pseudo = pseudonym.maybe(pseudonymize, archive_uri)
    files = model_files(model_uri)
    ids = [model_record(f)["model_id"] for f in files]
    model = {"model_id": ensemble_id(ids), "n_models": len(files), "members": ids, "files": files}
    ensure_ray()
    t0 = time.monotonic()
    entries, errors = ingest.list_archive(archive_uri, cfg)
    annotations = ann_mod.read_annotations(annotations_uri)
    done = committed(out_uri, model["model_id"])
    done_ids = set(done["patient_id"].to_pylist()) if done is not None else set()
    shape = cluster_shape()
    gpus = max(1, shape.max_gpus) if use_gpu(gpu, shape) else 0  # the most GPU actors it may use
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    batch_size = batch_size or (GPU_BATCH if gpus else CPU_BATCH)

    def score_stage(ds):
        # Decoding (CPU tasks in already-running workers) starts at once and streams into a
        # small actor pool that scores: from 1 up to one actor per GPU the cluster can have
        # (it starts with what it gets: no waiting for GPU nodes), or on CPU one per 8 cores
        # (ResNet50 on 64x64 crops scores ~8x faster than a core decodes) asking for
        # SCORER_CPUS, so that it fits beside a decode task on any node (DECODE_CPUS) and
        # its start (torch, the models) overlaps the decoding instead of delaying it.
        if gpus:
            pool, resources = ray.data.ActorPoolStrategy(min_size=1, max_size=gpus), {"num_gpus": 1, "num_cpus": 1}
        else:
            pool, resources = ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cpus // 8)), {"num_cpus": SCORER_CPUS}
        return ds.map_batches(
            SliceScorer,
            fn_constructor_kwargs={"files": files, "cfg": cfg, "features": features, "use_gpu": gpus > 0},
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=pool,
            **resources,
        )

    speculative = scorepass.Speculative()
    if done_ids:  # most of the archive is done: ranged header reads, not whole objects
        index, header_errors = ingest.build_index(entries, cfg)
    else:  # pseudonymised runs keep real ids out of the output store: no chunk commits
        cache = None if pseudo else storage.join(out_uri, PARTS, scorepass.CHUNK_DIR, scorepass.cache_key(model["model_id"], cfg, features, annotations))
        speculative = scorepass.first_pass(entries, annotations, cfg, score_stage, SLICE_WIRE, cpus, cache, progress, DECODE_CPUS)
        index, header_errors = dicom.group_series(speculative.first.headers), speculative.first.errors
    tasks, plan_errors = ann_mod.plan_tasks(annotations, index)
    errors += header_errors + plan_errors
    read_once = speculative.first.accepted(tasks)
    if pseudo:
        pseudo.know_patients([t.patient_id for t in tasks] + [s.get("patient_id") for s in index])
    shown = pseudo.patient if pseudo else (lambda pid: pid)  # the id as written out
    todo = [t for t in tasks if shown(t.patient_id) not in done_ids]
    second = [t for t in todo if t.patient_id not in read_once]
    writer = PartWriter(out_uri, every=commit_every)
    bar = tqdm(total=len(todo), desc="score: patients", unit="patient", disable=not progress)
    scored = 0

    def finish(pid: str, rows: list[dict]) -> None:
        nonlocal scored
        if rows:
            row, feats = patient_row(pid, rows, model, threshold, classes), features_table(pid, rows) if features else None
            if pseudo:
                row, feats = pseudo.row(row), feats if feats is None else pseudo.table(feats)
            writer.add(row, feats)
            scored += 1
        bar.update(1)

    try:
        for t in todo:
            if t.patient_id in read_once:
                errors += speculative.errors.get(t.patient_id, [])
                finish(t.patient_id, speculative.slices.get(t.patient_id, []))
        if second:
            errors += score_tasks(score_stage(ingest.crops_dataset(second, cfg, DECODE_CPUS)), second, finish)
    except BaseException:
        with contextlib.suppress(Exception):  # keep what is finished, if the output takes it
            writer.flush()
        raise
    bar.close()
    writer.flush()
    if pseudo:
        pseudo.know_patients(e.get("patient_id") for e in errors)
        errors = [pseudo.row(e) for e in errors]
    passes = {"patients_read_once": len(read_once & {t.patient_id for t in todo}), "patients_second_pass": len(second), "chunks": speculative.chunks, "chunks_reused": speculative.chunks_reused}
    return finalize(out_uri, model, errors, cfg, threshold=threshold, features=features, classes=classes, archive_uri=archive_uri, planned=len(tasks), scored=scored, skipped=len(done_ids), seconds=time.monotonic() - t0, pseudonyms=pseudonym.metadata(pseudo), passes=passes)


def score_tasks(ds, tasks: list[ann_mod.PatientTask], finish: Callable[[str, list[dict]], None]) -> list[dict]:
    """Stream scored rows of whole patients (rows arrive in task order) into ``finish``;
    returns the error rows, one per patient whose task was lost."""
    order = [t.patient_id for t in tasks]
    position = {pid: i for i, pid in enumerate(order)}
    slices: dict[str, list[dict]] = {}
    errors: list[dict] = []
    next_open, seen = 0, set()
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for pid, kind, meta, prob, emb in zip(*(batch[c].to_pylist() for c in SLICE_WIRE.names), strict=True):
            seen.add(pid)
            row = json.loads(meta)
            if kind == "error":
                errors.append(row)
                ingest.raise_if_store_down([row])
            else:
                slices.setdefault(pid, []).append({**row, "probability": prob, "embedding": emb})
            while next_open < position[pid]:  # (preserve_order): earlier patients are complete
                finish(order[next_open], slices.pop(order[next_open], []))
                next_open += 1
    while next_open < len(order):
        finish(order[next_open], slices.pop(order[next_open], []))
        next_open += 1
    return errors + [
        VfxError("score", "the task scoring this patient was lost after Ray's retries", patient_id=t.patient_id, series_instance_uid=t.series_instance_uid, error_type="TaskLost").row()
        for t in tasks if t.patient_id not in seen
    ]


def finalize(out_uri, model, errors, cfg, *, threshold, features, classes, archive_uri, planned, scored, skipped, seconds, pseudonyms, passes) -> dict[str, Any]:
    table = committed(out_uri, model["model_id"])
    table = table.sort_by("patient_id") if table is not None else pa.Table.from_pylist([], schema=scores_schema())
    run_config = {"crops": dataclasses.asdict(cfg), "threshold": threshold, "classes": list(classes), "model": model, "archive": archive_uri, **pseudonyms}
    meta = {"vfx_ray.config": json.dumps(run_config), "vfx_ray.model_id": model["model_id"]}
    storage.write_table(table, storage.join(out_uri, layout.SCORES), metadata=meta)
    if features:
        fdir = storage.join(out_uri, PARTS, "features")
        parts = [storage.read_table(e.uri) for e in storage.list_files(fdir, suffix=".parquet")] if storage.exists(fdir) else []
        feats = pa.concat_tables(parts) if parts else pa.table({"patient_id": pa.array([], pa.string())})
        storage.write_table(feats, storage.join(out_uri, layout.FEATURES), metadata={**meta, "vfx_ray.features": "pooled ResNet features of the first ensemble member"})
    chunks = storage.join(out_uri, PARTS, scorepass.CHUNK_DIR)
    if storage.exists(chunks):  # every patient is committed now: the first pass is not resumed
        storage.delete_tree(chunks)
    scored_ids = set(table["patient_id"].to_pylist())
    errors = [e for e in errors if e.get("patient_id") not in scored_ids]  # a re-run healed them
    storage.write_table(contracts.errors_table(errors), storage.join(out_uri, layout.ERRORS))
    summary = {"patients_planned": planned, "scored_now": scored, "skipped_already_scored": skipped, "rows": table.num_rows, "errors": len(errors), "model_id": model["model_id"], "n_models": model["n_models"], "seconds": round(seconds, 1), **passes, **pseudonyms}
    labelled = table.filter(pc.is_valid(table["label"]))
    if labelled.num_rows:
        summary["metrics"] = label_metrics(labelled, threshold, classes)
        storage.write_text(storage.join(out_uri, layout.METRICS), json.dumps(summary["metrics"], indent=2))
    return summary


def label_metrics(table: pa.Table, threshold: float, classes: tuple[str, str]) -> dict[str, Any]:
    """The paper's per-slice and per-patient metrics when the annotations carry labels."""
    rows = []
    for pid, label, probs in zip(table["patient_id"].to_pylist(), table["label"].to_pylist(), table["slice_probabilities"].to_pylist(), strict=True):
        y = classes.index(label)
        rows += [{"patient_id": pid, "label": y, "probability": p} for p in probs]
    return {"threshold": threshold, **metrics.level_metrics(pd.DataFrame(rows), threshold)}
