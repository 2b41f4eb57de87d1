"""10-fold patient cross-validation as Ray Train runs: folds side by side, resumable, scored.

Run folder (local path or s3://)::

    config.json               resolved TrainConfig + inputs (written once)
    splits.json               patient folds (written once, reused: see folds.py)
    fold_k/model.pt           best weights of fold k (model_id inside and in done.json)
    fold_k/predictions.parquet  the fold's test slices
    fold_k/history.json       per-epoch metrics
    fold_k/done.json          written last: a fold with it is skipped on re-runs
    ray_train/fold_k/         Ray Train run (checkpoints) while the fold is unfinished
    oof_predictions.parquet   one row per test slice over all folds
    metrics.json              per slice / per patient, per fold and pooled (metrics.py)

    ray_cv/                   Tune's experiment state of the fold grid (trial states)

Re-running with the same ``out_uri`` skips finished folds and resumes unfinished ones from
their latest checkpoint. The folds are a Ray Tune grid over the fold index: each trial is a
fold driver (on the head when it advertises ``placement.DRIVER_RESOURCE``) that runs one
TorchTrainer. All pending folds are submitted at once (or ``max_concurrent``), so their
pending resource requests drive the autoscaler, and the dashboard shows each fold's state.
A fresh grid over the folds without ``done.json`` replaces ``Tuner.restore``: a fold's
progress lives in its Train checkpoints and ``done.json``, which a restored grid would not
know better.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from vfx_ray import layout, paper, storage
from vfx_ray.config import TrainConfig, with_params
from vfx_ray.errors import VfxError
from vfx_ray.evaluation import folds, metrics, tuned_params
from vfx_ray.ml import model as vmodel
from vfx_ray.runtime import placement, run_record, train_storage
from vfx_ray.runtime.session import cluster_shape, ensure_ray, is_verbose
from vfx_ray.stages import fold_trainer as vtrain

CV_EXPERIMENT = "ray_cv"
PREDICTION_COLUMNS = ("patient_id", "fold", "slice_index", "probability", "label")


def load_or_make_splits(out_uri: str, patients: pd.DataFrame, cfg: TrainConfig) -> dict[str, Any]:
    """``splits.json`` of the run folder, made (and written) only when it is not there yet."""
    uri = storage.join(out_uri, layout.SPLITS)
    if storage.exists(uri):
        splits = folds.splits_from_json(storage.read_text(uri))
        same = (splits["n_folds"], splits["val_fraction"], splits["seed"]) == (cfg.n_folds, cfg.val_fraction, cfg.seed)
        if not (same and folds.same_cohort(splits, patients)):
            raise VfxError("train", f"{uri} was made for other patients or settings; use a new --out")
        return splits
    splits = folds.make_splits(patients, cfg.n_folds, cfg.val_fraction, cfg.seed)
    storage.write_text(uri, folds.splits_to_json(splits))
    return splits


def read_labelled_crops(crops_uri: str) -> tuple[pa.Table, list[str]]:
    """Labelled crops and the ids of patients left out for having no label."""
    crops = storage.read_table(crops_uri)
    missing = [c for c in ("patient_id", "slice_index", "label", "image") if c not in crops.column_names]
    if missing:
        raise VfxError("train", f"{crops_uri} is not a crops dataset (missing columns {missing})")
    unlabelled = pc.is_null(crops["label"])
    dropped = sorted(set(crops.filter(unlabelled)["patient_id"].to_pylist()))
    if dropped:
        vtrain.log(f"{len(dropped)} patients without a label are left out of training (listed in metrics.json)")
    return crops.filter(pc.invert(unlabelled)), dropped


def run_train_cv(
    crops_uri: str,
    out_uri: str,
    cfg: TrainConfig,
    *,
    params: dict[str, Any] | None = None,
    max_failures: int = 2,
    keep_checkpoints: bool = False,
    max_concurrent: int | None = None,
) -> dict[str, Any]:
    """Cross-validate the model on a crops dataset (its file, or the crops job's output folder);
    write the run folder; return metrics.json.

    ``params`` overrides TrainConfig fields: a flat dict (e.g. ``{"lr": 3e-4, "l2": 1e-5}``) for
    every fold, or the best_params.json of a nested search (``tuned``): fold k's for fold k, refused
    unless its outer folds are this run's. metrics.json's ``params_protocol`` says which it was.
    Uses the connected Ray cluster, or starts a local one (``RAY_ADDRESS`` is honoured).
    ``cfg.use_gpu=None`` uses GPUs when the cluster has or can get them.
    """
    import ray

    tuned_params.check(params, cfg.n_folds)
    cfg, crops_uri = with_params(cfg, tuned_params.shared(params)), layout.crops_file(crops_uri)
    if cfg.pretrained == "imagenet":
        vmodel.find_imagenet_weights(cfg.arch, cfg.pretrained_path)  # fail fast, before Ray
    if cfg.use_gpu is None:
        cfg = dataclasses.replace(cfg, use_gpu=placement.use_gpu(None, cluster_shape()))
    crops, unlabelled = read_labelled_crops(crops_uri)
    patients = folds.patient_labels(crops.select(["patient_id", "label"]).to_pandas())
    record = {"train": dataclasses.asdict(cfg), "crops_uri": crops_uri, "params": params or {},
              "versions": {"ray": ray.__version__, "torch": torch.__version__}}
    run_record.pin(out_uri, layout.CONFIG, record, _comparable, "train", "a run")
    splits = load_or_make_splits(out_uri, patients, cfg)
    tuned_params.check_splits(params, splits)  # fold k's parameters must never have seen fold k's test patients
    pending = [
        k for k in range(cfg.n_folds) if not storage.exists(storage.join(layout.fold_dir(out_uri, k), layout.DONE))
    ]
    if pending:
        run_folds(pending, crops, splits, cfg, out_uri, max_failures=max_failures, keep_checkpoints=keep_checkpoints,
                  max_concurrent=max_concurrent, fold_params=tuned_params.per_fold(params))
    return finalize(out_uri, cfg, unlabelled, params=params)


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    """What a re-run must share with the run folder's first settings: the training recipe and
    any per-fold (nested) parameters."""
    return {"train": run_record.without_runtime(record.get("train", {})),
            "fold_params": tuned_params.per_fold(record.get("params"))}


def fold_dirname(trial: Any) -> str:
    return f"fold_{trial.config['fold']}"


def describe_fold(trial: Any) -> str:
    """The line printed when a fold ends."""
    m = trial.last_result or {}
    best = m.get("best_val_loss")
    return (f"fold {trial.config.get('fold')}: {m.get('epoch', 0)} epochs, best epoch {m.get('best_epoch')}, "
            f"best val loss {'n/a' if best is None else f'{best:.4f}'}")


def run_folds(pending: list[int], crops: pa.Table, splits: dict[str, Any], cfg: TrainConfig, out_uri: str, *,
              max_failures: int, keep_checkpoints: bool, max_concurrent: int | None,
              fold_params: dict[str, Any] | None = None) -> None:
    """The pending folds as one Tune grid (fold k with ``fold_params[str(k)]`` applied, when
    given); raises VfxError naming every fold that failed."""
    import ray.tune

    from vfx_ray.runtime.orphans import ReleaseOrphanedWorkers
    from vfx_ray.runtime.trial_progress import TrialProgress

    ensure_ray()
    shape = cluster_shape()
    cap = min(len(pending), max_concurrent or len(pending))
    where = "on the head node" if shape.driver_resource else "anywhere"
    vtrain.log(f"{len(pending)} of {cfg.n_folds} folds to train, up to {cap} at a time "
         f"({'GPU' if cfg.use_gpu else 'CPU'} workers; fold drivers {where})")
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(vtrain.fold_trial, crops=crops, splits=splits, cfg=cfg, out_uri=out_uri,
                                 max_failures=max_failures, keep_checkpoints=keep_checkpoints,
                                 fold_params=fold_params or {}),
        placement.driver_resources(shape),
    )
    root, fs = train_storage.marker_free_filesystem(out_uri)
    tuner = ray.tune.Tuner(
        trainable,
        param_space={"fold": ray.tune.grid_search(pending)},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=cap, reuse_actors=False,
                                        trial_dirname_creator=fold_dirname),
        run_config=ray.tune.RunConfig(
            name=CV_EXPERIMENT, storage_path=root, storage_filesystem=fs, verbose=1 if is_verbose() else 0,
            failure_config=ray.tune.FailureConfig(max_failures=1),  # a lost driver resumes its fold
            callbacks=[TrialProgress("train-cv: epochs", len(pending) * cfg.max_epochs, describe_fold),
                       ReleaseOrphanedWorkers(vtrain.worker_resources(cfg))],
        ),
    )
    with storage.credentials_held_back():  # Tune would copy them into Ray's logs
        grid = tuner.fit()
    failed = {int(r.config["fold"]): r.error for r in grid if r.error is not None}
    if failed:
        detail = "; ".join(f"fold {k}: {_short(e)}" for k, e in sorted(failed.items()))
        raise VfxError("train", f"{len(failed)} folds failed (re-run the same command to resume): {detail}")


def _short(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:500]


def finalize(out_uri: str, cfg: TrainConfig, unlabelled: list[str] | None = None, *,
             params: dict[str, Any] | None = None) -> dict[str, Any]:
    """oof_predictions.parquet and metrics.json from the finished folds' predictions; ``params``
    (train-cv's --params) says which tuning protocol chose lr/l2 (``params_protocol``)."""
    parts = [
        storage.read_table(storage.join(layout.fold_dir(out_uri, k), layout.PREDICTIONS)) for k in range(cfg.n_folds)
    ]
    oof = pa.concat_tables(parts)
    storage.write_table(oof, storage.join(out_uri, layout.OOF_PREDICTIONS))
    result = metrics.summarize(oof.select(list(PREDICTION_COLUMNS)).to_pandas(), cfg.threshold)
    done = [
        json.loads(storage.read_text(storage.join(layout.fold_dir(out_uri, k), layout.DONE)))
        for k in range(cfg.n_folds)
    ]
    result["fold_runs"] = [
        {key: d.get(key) for key in ("fold", "model_id", "lr", "l2", "epochs", "best_epoch", "best_val_loss",
                                     "resumed_from")}
        for d in done
    ]
    result["unlabelled_patients_excluded"] = unlabelled or []
    result["params_protocol"] = tuned_params.protocol(params, cfg.n_folds)
    result["paper"] = paper.RESULTS
    storage.write_text(storage.join(out_uri, layout.METRICS), json.dumps(result, indent=2))
    return result
