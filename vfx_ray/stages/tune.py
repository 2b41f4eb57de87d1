"""Ray Tune search of the learning rate and L2 weight, ASHA on validation loss, feeding train-cv.

The search makes the outer folds exactly as train-cv does (``folds.make_splits`` with the same
``n_folds``, ``val_fraction`` and ``seed``, written to ``splits.json``). A trial trains on one
outer fold's training patients and is judged - by ASHA and for the best parameters - only on
that fold's validation patients, drawn (stratified, by patient) from its training part; the
fold's test patients are never read by its trials. Two protocols (``tuned`` names them):

- single split (default): one search inside outer fold ``fold`` (0). Its training and
  validation patients are the other folds' test patients, and train-cv applies its choice to
  every fold, so folds 1..K-1's estimates are optimistic; metrics.json says so.
- nested (``nested=True``, ``tune --nested``): one search per outer fold k, each judged inside
  fold k's training part only; train-cv applies fold k's choice to fold k. K times the trials.

Nested, the folds' searches are one Tune run with the outer fold as a grid dimension (every fold
tries the same candidates, ``constant_grid_search``) and one ASHA per fold (``FoldASHA``: losses
on different validation patients are not comparable). One run rather than K in sequence: all K
x n trials are pending at once, so they pack onto the cluster and drive its autoscaler instead
of leaving it idle while one fold's last trials finish, and one experiment state resumes the
whole search (``Tuner.restore``). Trials are interleaved by sample, so the folds advance together.

Each trial is a Train V2 driver (``Tuner(driver_fn)``; ``Tuner(trainer)`` is deprecated): one
``train.fit_fold`` TorchTrainer whose ``TuneReportCallback`` passes every epoch's report to
Tune, so ASHA (``time_attr="epoch"``) can stop it. All trials are submitted at once (or
``max_concurrent``), their drivers on the head when it advertises ``placement.DRIVER_RESOURCE``.
The profile's own lr/l2 is the first trial (of every fold).

Search folder (local path or s3://)::

    search.json        settings and protocol (written once; --resume must match)
    splits.json        the outer folds, identical to train-cv's for the same settings
    trials.parquet     trial_id, fold, lr, l2, best_val_loss, best_epoch, epochs, status, stopped_early,
                       patients (hash of the patients the trial trained and was judged on: ``tuned``)
    best_params.json   ``train-cv --params`` / ``run_train_cv(params=)``: single, {"lr": ..., "l2": ...};
                       nested, {"protocol": "nested", "folds": {"k": {"lr", "l2"}}, "splits": ...}
    fold_k/best_params.json   nested: outer fold k's {"lr": ..., "l2": ...}
    tensorboard/<trial_id>/events.out.tfevents.*   per-epoch metrics and hparams
    ray_tune/<trial_id>/   Tune's experiment state (``Tuner.restore`` on ``resume=True``)
    ray_train/<trial_id>/  Train checkpoints of unfinished trials (deleted when a trial ends)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import TBXLoggerCallback

from vfx_ray import layout, storage
from vfx_ray.config import Config, TrainConfig, TuneConfig, train_config_from_dict
from vfx_ray.errors import VfxError
from vfx_ray.evaluation import tuned_params
from vfx_ray.runtime import placement, run_record, train_storage
from vfx_ray.runtime.orphans import ReleaseOrphanedWorkers
from vfx_ray.runtime.session import cluster_shape, ensure_ray, is_verbose
from vfx_ray.runtime.trial_progress import TrialProgress

# vfx_ray's torch-heavy modules are imported where used: Train controllers unpickle this
# module's callbacks, and importing torch there would add seconds to every trial.
REDUCTION_FACTOR = 4  # ASHA keeps the best quarter at each rung (Ray's default)
METRIC = "val_loss"
EXPERIMENT = "ray_tune"
Parts = dict[int, tuple[list[str], list[str]]]  # outer fold -> its (train, val) patients
SCALARS = ("val_loss", "train_loss", "train_bce", "best_val_loss", "images_per_s", "epoch_seconds")


def _log(msg: str) -> None:
    print(f"[vfx_ray.stages.tune] {msg}", file=sys.stderr, flush=True)


def tune_split(splits: dict[str, Any], fold: int) -> tuple[list[str], list[str]]:
    """(train, val) patients of outer fold ``fold``; its test patients are left out entirely."""
    part = splits["folds"][fold]
    if not part["val"]:
        raise VfxError("tune", "tuning needs validation patients: set val_fraction > 0")
    assert not set(part["test"]) & (set(part["train"]) | set(part["val"]))
    return part["train"], part["val"]


def trial_dirname(trial: Any) -> str:
    """One name per trial everywhere: ray_tune/<id>, ray_train/<id>, tensorboard/<id>."""
    return trial.trial_id


class PatientsReport(TuneReportCallback):
    """Tune's report callback that adds ``patients``, the hash of the patients the trial trains
    and is judged on, to every epoch's result: trials.parquet can then show which ones it saw."""

    def __init__(self, patients: str) -> None:
        super().__init__()
        self.patients = patients

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        super().after_report(run_context, [{**metrics[0], "patients": self.patients}, *metrics[1:]], checkpoint)


def tune_trial(config: dict[str, Any], *, crops: pa.Table, parts: Parts, base: dict[str, Any], out_uri: str) -> None:
    """One trial: a TorchTrainer fit on outer fold ``config["fold"]``'s (train, val) patients
    of ``parts``, whose epoch reports reach Tune (and ASHA).

    Named by the trial id, its Train run resumes from its last checkpoint when a restored
    search restarts the trial.
    """
    from vfx_ray.stages import fold_trainer as vtrain  # not train_cv: a trial needs no scikit-learn

    fold = int(config.get("fold", next(iter(parts))))  # a search begun before the fold was a dimension had one
    cfg = train_config_from_dict({**base, "lr": float(config["lr"]), "l2": float(config["l2"])})
    train, val = (vtrain.patients_subset(crops, ids) for ids in parts[fold])
    seen = tuned_params.patients_digest(train["patient_id"].to_pylist(), val["patient_id"].to_pylist())
    trial_id = ray.tune.get_context().get_trial_id()
    path, fs = train_storage.marker_free_filesystem(storage.join(out_uri, "ray_train"))
    vtrain.fit_fold(train, val, cfg, fold=fold, storage_path=path, storage_filesystem=fs, name=trial_id,
                    callbacks=[PatientsReport(seen)])


class FoldASHA(ray.tune.schedulers.FIFOScheduler):
    """ASHA within each outer fold (``trial.config["fold"]``): a trial is stopped only by the
    trials judged on its own validation patients. With one fold it is plain ASHA."""

    def __init__(self, **asha: Any) -> None:
        super().__init__()
        self.asha, self.folds = asha, {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        self.asha = {**self.asha, "metric": metric or self.asha.get("metric"), "mode": mode or self.asha.get("mode")}
        return super().set_search_properties(metric, mode, **spec)

    def _of(self, trial: Any) -> ray.tune.schedulers.ASHAScheduler:
        k = int(trial.config["fold"])
        if k not in self.folds:
            self.folds[k] = ray.tune.schedulers.ASHAScheduler(**self.asha)
        return self.folds[k]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"outer fold {k}: {a.debug_string()}" for k, a in sorted(self.folds.items()))


class ReleaseFinishedTrials(ray.tune.Callback):
    """Delete a finished trial's Train checkpoints (~0.4 GB for ResNet50): only unfinished and
    failed trials need theirs, to resume.

    A trial stopped by ASHA (or by an interrupted search) is a killed Train driver; its
    controller dies with it, but the workers' placement group is the job's. Ray Train's own
    detached PlacementGroupCleaner frees it: it watches the controller through the State API
    (``ray.util.state``), so the cluster needs its dashboard. It learns the group only once the
    workers have started, so ``orphans.ReleaseOrphanedWorkers`` sweeps what it misses.
    """

    def __init__(self, out_uri: str) -> None:
        self.out_uri = out_uri

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        storage.delete_tree(storage.join(self.out_uri, "ray_train", trial.trial_id))


class TensorBoardCallback(TBXLoggerCallback):
    """Event files in <out>/tensorboard/<trial_id>/ (tag = metric, step = epoch), hparams at the end.

    A TBXLoggerCallback so Tune adds no second copy of the events to its trial folders. On
    s3 the files are written to a local folder and uploaded when the trial ends (or the search
    is interrupted). Only ``out_uri`` is pickled (into tuner.pkl), so a restored search gets
    fresh writers.
    """

    def __init__(self, out_uri: str) -> None:
        self.out_uri = out_uri
        self._writers: dict[str, Any] = {}
        self._last: dict[str, dict[str, Any]] = {}
        self._staging: str | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.out_uri,))

    def _dir(self, trial_id: str) -> str:
        if not storage.is_s3(self.out_uri):
            return storage.join(self.out_uri, layout.TENSORBOARD, trial_id)
        self._staging = self._staging or tempfile.mkdtemp(prefix="vfx-tb-")
        return os.path.join(self._staging, trial_id)

    def log_trial_start(self, trial: Any) -> None:
        from tensorboardX import SummaryWriter

        if trial.trial_id not in self._writers:
            self._writers[trial.trial_id] = SummaryWriter(self._dir(trial.trial_id), flush_secs=10)

    def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
        self.log_trial_start(trial)
        writer, step = self._writers[trial.trial_id], int(result.get("epoch") or iteration)
        for key in SCALARS:
            value = result.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                writer.add_scalar(key, value, global_step=step)
        writer.flush()
        self._last[trial.trial_id] = result

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        writer = self._writers.pop(trial.trial_id, None)
        if writer is None:
            return
        last = self._last.pop(trial.trial_id, {})
        if last.get("best_val_loss") is not None:  # the HParams tab: lr, l2 -> best val loss
            from tensorboardX.summary import hparams

            best = {"hparam/best_val_loss": float(last["best_val_loss"])}
            for summary in hparams({k: float(trial.config[k]) for k in ("lr", "l2")}, best):
                writer.file_writer.add_summary(summary)
            writer.add_scalar("hparam/best_val_loss", best["hparam/best_val_loss"], int(last.get("epoch", 0)))
        writer.close()
        if storage.is_s3(self.out_uri):
            local = self._dir(trial.trial_id)
            for name in sorted(os.listdir(local)):
                with open(os.path.join(local, name), "rb") as f:
                    storage.write_bytes(storage.join(self.out_uri, layout.TENSORBOARD, trial.trial_id, name), f.read())

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        for trial in trials:  # an interrupted search: keep what the running trials wrote
            self.log_trial_end(trial)


def describe_trial(trial: Any) -> str:
    """The line printed when a trial ends."""
    m = trial.last_result or {}
    best = m.get("best_val_loss")
    return (f"trial {trial.trial_id} (outer fold {trial.config.get('fold', 0)}) lr {trial.config['lr']:.3g} "
            f"l2 {trial.config['l2']:.3g}: {m.get('epoch', 0)} "
            f"epochs, best val loss {'n/a' if best is None else f'{best:.4f}'}")


def search_space(tc: TuneConfig, outer: list[int] | None = None) -> dict[str, Any]:
    """lr and L2 weight, both log-uniform over the configured ranges, on each outer fold of ``outer``."""
    return {"fold": ray.tune.grid_search(outer or [0]), "lr": ray.tune.loguniform(*tc.lr_range),
            "l2": ray.tune.loguniform(*tc.l2_range)}


def _baseline(cfg: TrainConfig, tc: TuneConfig) -> list[dict[str, float]]:
    """The recipe's own lr/l2 as the first trial, when inside the search ranges."""
    inside = tc.lr_range[0] <= cfg.lr <= tc.lr_range[1] and tc.l2_range[0] <= cfg.l2 <= tc.l2_range[1]
    return [{"lr": cfg.lr, "l2": cfg.l2}] if inside else []


TRIALS_SCHEMA = pa.schema([
    ("trial_id", pa.string()), ("fold", pa.int32()), ("lr", pa.float64()), ("l2", pa.float64()),
    ("best_val_loss", pa.float64()), ("best_epoch", pa.int32()), ("epochs", pa.int32()),
    ("status", pa.string()), ("stopped_early", pa.bool_()), ("error", pa.string()), ("patients", pa.string()),
])  # fmt: skip


def trials_table(trials: list[Any], cfg: TrainConfig) -> pa.Table:
    """One row per Tune trial. ``status``: terminated, error, or unfinished (an interrupted
    search). ``stopped_early``: ended by ASHA, i.e. before max_epochs and not by patience. ``patients``:
    the hash its trainer reported of the patients it trained and was judged on (``tuned_params.patients_digest``)."""
    rows = []
    for t in trials:
        m = t.last_result or {}
        status = {"TERMINATED": "terminated", "ERROR": "error"}.get(t.status, "unfinished")
        epochs, patience_stop = int(m.get("epoch") or 0), (m.get("epochs_without_improvement") or 0) >= cfg.patience
        rows.append({
            "trial_id": t.trial_id, "fold": int(t.config.get("fold", 0)), "lr": float(t.config["lr"]),
            "l2": float(t.config["l2"]), "patients": m.get("patients"),
            "best_val_loss": m.get("best_val_loss"), "best_epoch": m.get("best_epoch"), "epochs": epochs,
            "status": status, "stopped_early": status == "terminated" and epochs < cfg.max_epochs and not patience_stop,
            "error": str(t.get_error())[:2000] if status == "error" else None,
        })  # fmt: skip
    return pa.Table.from_pylist(rows, schema=TRIALS_SCHEMA).sort_by([("fold", "ascending"), ("trial_id", "ascending")])


def best_params(trials: pa.Table) -> dict[str, float]:
    """lr and l2 of the trial with the lowest validation loss (flat: train-cv --params)."""
    done = trials.filter(pc.is_finite(trials["best_val_loss"]))
    if done.num_rows == 0:
        errors = [e for e in trials["error"].to_pylist() if e]
        raise VfxError("tune", f"no trial reported a validation loss; first error: {errors[:1]}")
    best = done.sort_by([("best_val_loss", "ascending"), ("epochs", "descending")]).slice(0, 1).to_pylist()[0]
    return {"lr": best["lr"], "l2": best["l2"]}


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    """What a resumed search must share with the first: all but versions and runtime fields
    (a record from before the protocols existed was a single-split search)."""
    return {"protocol": tuned_params.SINGLE, **{k: v for k, v in record.items() if k != "versions"},
            "train": run_record.without_runtime(record["train"])}


def _record(crops_uri: str, cfg: TrainConfig, tc: TuneConfig, parts: Parts, splits: dict[str, Any],
            nested: bool) -> dict[str, Any]:
    counts = {k: {"train": len(tr), "val": len(va), "test_left_out": len(splits["folds"][k]["test"])}
              for k, (tr, va) in parts.items()}
    record = {
        "crops_uri": crops_uri, "protocol": tuned_params.NESTED if nested else tuned_params.SINGLE,
        "train": dataclasses.asdict(cfg), "tune": dataclasses.asdict(tc),
        "asha": {"metric": METRIC, "mode": "min", "time_attr": "epoch", "max_t": cfg.max_epochs,
                 "grace_period": min(tc.grace_period, cfg.max_epochs), "reduction_factor": REDUCTION_FACTOR},
        "versions": {"ray": ray.__version__},
    }  # fmt: skip
    if nested:
        return {**record, "folds": sorted(parts), "patients": {str(k): c for k, c in counts.items()}}
    [(fold, count)] = counts.items()
    return {**record, "fold": fold, "patients": count}


def _outer_folds(crops_uri: str, out_uri: str, train_cfg: TrainConfig, tc: TuneConfig, fold: int,
                 nested: bool) -> tuple[pa.Table, dict[str, Any], Parts]:
    """(the crops of the patients some trial may read, the outer folds, each searched fold's
    (train, val) patients); pins search.json. Test patients of a searched fold are in no part."""
    from vfx_ray.evaluation import folds
    from vfx_ray.stages import train_cv
    from vfx_ray.stages.fold_trainer import patients_subset

    crops, _ = train_cv.read_labelled_crops(crops_uri)
    patients = folds.patient_labels(crops.select(["patient_id", "label"]).to_pandas())
    splits = train_cv.load_or_make_splits(out_uri, patients, train_cfg)
    outer = list(range(train_cfg.n_folds)) if nested else [fold]
    parts = {k: tune_split(splits, k) for k in outer}
    record = _record(crops_uri, train_cfg, tc, parts, splits, nested)
    run_record.pin(out_uri, layout.SEARCH, record, _comparable, "tune", "a search")
    for k, (train_ids, val_ids) in parts.items():
        _log(f"{tc.num_samples} trials on outer fold {k}: {len(train_ids)} training and {len(val_ids)} validation "
             f"patients; its {len(splits['folds'][k]['test'])} test patients are left out")
    used = sorted({p for train_ids, val_ids in parts.values() for p in train_ids + val_ids})
    return patients_subset(crops, used), splits, parts


def run_tune(
    crops_uri: str,
    out_uri: str,
    cfg: Config,
    *,
    num_samples: int | None = None,
    resume: bool = False,
    progress: bool = True,
    fold: int = 0,
    nested: bool = False,
    max_concurrent: int | None = None,
) -> dict[str, Any]:
    """Search lr and L2 on ``fold``'s validation patients, or with ``nested`` on each outer
    fold's own (see the module docstring); write the search folder; return {"best_params",
    "trials", "stopped_early", ...}.

    ``resume=True`` continues an interrupted search in ``out_uri`` (Tuner.restore): finished
    trials are kept, unfinished ones restart from their last Train checkpoint, pending ones
    run. ``num_samples`` (per outer fold) defaults to the profile's (or, on resume, to the
    recorded) count. All trials are submitted at once unless ``max_concurrent`` caps them (a
    cap is saved with the search, so a resumed search keeps it): their pending requests drive
    the autoscaler.
    """
    if not storage.is_s3(out_uri):
        out_uri = os.path.abspath(out_uri)  # trial actors run in their own working folders
    crops_uri = layout.crops_file(crops_uri)  # the crops job's output folder works too
    train_cfg, tc, started = _settings(out_uri, cfg, num_samples, resume)
    crops, splits, parts = _outer_folds(crops_uri, out_uri, train_cfg, tc, fold, nested)
    n = tc.num_samples * len(parts)

    ensure_ray()
    shape = cluster_shape()
    train_cfg = dataclasses.replace(train_cfg, use_gpu=placement.use_gpu(train_cfg.use_gpu, shape))
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(tune_trial, crops=crops, parts=parts, base=dataclasses.asdict(train_cfg),
                                 out_uri=out_uri),
        placement.driver_resources(shape),
    )  # fmt: skip
    root, fs = train_storage.marker_free_filesystem(out_uri)
    if started:
        _log(f"resuming the search in {out_uri}")
        tuner = restore_search(f"{root}/{EXPERIMENT}", trainable, fs, out_uri)
    else:
        parallel = min(n, max_concurrent or n)
        tuner = _new_tuner(trainable, out_uri, train_cfg, tc, sorted(parts), parallel, progress)
        _log(f"{n} trials, up to {parallel} at a time ({'GPU' if train_cfg.use_gpu else 'CPU'} workers, trial "
             f"drivers {'on the head node' if shape.driver_resource else 'anywhere'}); "
             f"TensorBoard: tensorboard --logdir {storage.join(out_uri, 'tensorboard')}")
    with storage.credentials_held_back():  # Tune would copy them into Ray's logs
        tuner.fit()
    return _write_results(out_uri, train_cfg, n, splits if nested else None)


def restore_search(path: str, trainable: Any, fs: Any, out_uri: str) -> ray.tune.Tuner:
    """``Tuner.restore``, or one line when the search was pickled under module paths that are gone
    (Tune pickles its callbacks and scheduler by module path; before issue 26 every module of
    vfx_ray sat at the top level)."""
    try:
        return ray.tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                      storage_filesystem=fs)
    except ModuleNotFoundError as exc:
        name = exc.name or ""
        if not name.startswith("vfx_ray."):
            raise
        raise VfxError("tune", f"{out_uri} holds a search written by an older vfx_ray (it names {name}, a module "
                       "that has moved): it cannot be resumed by this version; start the search again with a new "
                       "--out, or finish it with the version that started it") from None


def _settings(out_uri: str, cfg: Config, num_samples: int | None, resume: bool) -> tuple[TrainConfig, TuneConfig, bool]:
    """(training settings with ASHA's max_t, search settings with the trial count, whether a
    search was started in ``out_uri``); fails fast, before Ray, on what cannot work."""
    from vfx_ray.ml import model as vmodel

    tc = cfg.tune
    train_cfg = dataclasses.replace(cfg.train, max_epochs=min(cfg.train.max_epochs, tc.max_epochs))  # ASHA's max_t
    if train_cfg.pretrained == "imagenet":
        vmodel.find_imagenet_weights(train_cfg.arch, train_cfg.pretrained_path)
    started = storage.exists(storage.join(out_uri, EXPERIMENT, "tuner.pkl"))
    if started and not resume:
        raise VfxError("tune", f"{out_uri} already holds a search: pass --resume to continue it, or use a new --out")
    recorded = storage.join(out_uri, layout.SEARCH)
    if num_samples is None and resume and storage.exists(recorded):
        num_samples = json.loads(storage.read_text(recorded))["tune"]["num_samples"]
    return train_cfg, dataclasses.replace(tc, num_samples=num_samples or tc.num_samples), started


def _new_tuner(trainable: Any, out_uri: str, train_cfg: TrainConfig, tc: TuneConfig, outer: list[int],
               parallel: int, progress: bool) -> ray.tune.Tuner:
    """num_samples candidates, each tried on every outer fold of ``outer`` (the same lr/l2 on each)."""
    from vfx_ray.stages import fold_trainer as vtrain

    root, fs = train_storage.marker_free_filesystem(out_uri)
    n = tc.num_samples
    return ray.tune.Tuner(
        trainable,
        param_space=search_space(tc, outer),
        tune_config=ray.tune.TuneConfig(
            metric=METRIC, mode="min", num_samples=n,
            search_alg=ray.tune.search.BasicVariantGenerator(  # it, not TuneConfig, limits concurrency here
                points_to_evaluate=_baseline(train_cfg, tc), random_state=train_cfg.seed, max_concurrent=parallel,
                constant_grid_search=True),
            scheduler=FoldASHA(
                time_attr="epoch", max_t=train_cfg.max_epochs,
                grace_period=min(tc.grace_period, train_cfg.max_epochs),
                reduction_factor=REDUCTION_FACTOR, stop_last_trials=False),
            trial_dirname_creator=trial_dirname, reuse_actors=False,
        ),
        run_config=ray.tune.RunConfig(
            name=EXPERIMENT, storage_path=root, storage_filesystem=fs, verbose=1 if is_verbose() else 0,
            failure_config=ray.tune.FailureConfig(max_failures=1),  # a lost driver resumes its trial
            callbacks=[TensorBoardCallback(out_uri), ReleaseFinishedTrials(out_uri),
                       ReleaseOrphanedWorkers(vtrain.worker_resources(train_cfg)),
                       TrialProgress("tune: epochs", n * len(outer) * train_cfg.max_epochs, describe_trial,
                                     progress)],
        ),
    )  # fmt: skip


def _write_results(out_uri: str, train_cfg: TrainConfig, n: int, nested_splits: dict[str, Any] | None
                   ) -> dict[str, Any]:
    """trials.parquet and best_params.json from the finished experiment (of a nested search,
    given its outer folds, fold_k/best_params.json too); the summary."""
    root, fs = train_storage.marker_free_filesystem(out_uri)
    trials = ray.tune.ExperimentAnalysis(f"{root}/{EXPERIMENT}", storage_filesystem=fs).trials  # statuses
    table = trials_table(trials, train_cfg)
    storage.write_table(table, storage.join(out_uri, layout.TRIALS))
    for tid in table.filter(pc.equal(table["status"], "terminated"))["trial_id"].to_pylist():
        storage.delete_tree(storage.join(out_uri, "ray_train", tid))  # a killed run may write late
    finished = table.num_rows - table["status"].to_pylist().count("unfinished")
    if finished < n:
        raise VfxError("tune", f"the search was interrupted after {finished} of {n} trials; "
                               "run again with --resume to complete it")  # fmt: skip
    best = _write_best(out_uri, table, nested_splits)
    stopped = int(pc.sum(table["stopped_early"]).as_py() or 0)
    errors = table["status"].to_pylist().count("error")
    _log(f"{table.num_rows} trials, {stopped} stopped early by ASHA, {errors} failed; best {best.get('folds', best)}")
    return {"best_params": best, "trials": table.num_rows, "stopped_early": stopped, "errors": errors,
            "best_val_loss": float(pc.min(table["best_val_loss"]).as_py()), "out": out_uri}


def _write_best(out_uri: str, table: pa.Table, nested_splits: dict[str, Any] | None) -> dict[str, Any]:
    """best_params.json: the best trial's lr/l2, or in a nested search (given its outer folds)
    each fold's own best, also in fold_k/best_params.json."""
    if nested_splits is None:
        best = best_params(table)
    else:
        outer = range(nested_splits["n_folds"])
        per_fold = {k: best_params(table.filter(pc.equal(table["fold"], k))) for k in outer}
        for k, params in per_fold.items():
            uri = storage.join(layout.fold_dir(out_uri, k), layout.BEST_PARAMS)
            storage.write_text(uri, json.dumps(params, indent=2))
        best = tuned_params.nested(per_fold, nested_splits)
    storage.write_text(storage.join(out_uri, layout.BEST_PARAMS), json.dumps(best, indent=2))
    return best
