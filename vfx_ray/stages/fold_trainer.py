"""Training of one fold on Ray Train: the loop each worker runs, its resources, the trainer.

Laid out like torchvision's ``references/classification/train.py``: the epoch and the
evaluation are plain functions on tensors (``resident``, usable without Ray, e.g. by the
benchmarks), and ``train_loop_per_worker`` only adds Ray's data shards, checkpoints and
reporting. Each worker reads its shard of the fold's crops once, onto its device.

Recipe (Li et al. 2021): loss = mean BCE-with-logits + ``l2`` x sum of squared weights (conv
and linear weight tensors; biases and BatchNorm affine parameters are not penalised), applied
as Adam's coupled weight decay on exactly those weights, which gives the same gradient (see
``resident``; ``epochs.train_one_epoch`` is the literal form). Adam(lr, betas).
``batch_size`` is the global batch: each of N workers takes batch_size // N. Early stopping on
the lowest validation BCE (without the L2 term) with ``patience`` epochs; the best weights are
what the fold keeps. Every ``checkpoint_every`` epochs, and always at the last, rank 0 reports
a checkpoint (weights, optimizer, epoch, best val loss, epochs without improvement, best
weights), uploaded in the background while the next epoch trains; a restarted worker group
resumes after the last checkpointed epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import torch
from torch import nn

from vfx_ray import contracts, layout, storage
from vfx_ray.config import TrainConfig, train_config_from_dict, with_params
from vfx_ray.ml import model as vmodel
from vfx_ray.ml import resident
from vfx_ray.ml.epochs import FitState, seed_for
from vfx_ray.runtime import train_storage


def _save_checkpoint(path: str, net: nn.Module, opt: torch.optim.Optimizer, state: FitState, best: dict) -> None:
    torch.save({"model": vmodel.cpu_state(net), "optimizer": opt.state_dict(), "fit": dataclasses.asdict(state)},
               os.path.join(path, layout.CHECKPOINT_STATE))
    torch.save(best, os.path.join(path, layout.CHECKPOINT_BEST))


def _all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def checkpoint_due(state: FitState, cfg: TrainConfig, has_val: bool) -> bool:
    """Whether the epoch just counted in ``state`` reports a checkpoint: every
    ``checkpoint_every`` epochs, and the last one always (the fold keeps the best weights from
    the final checkpoint)."""
    return state.epoch % max(1, cfg.checkpoint_every) == 0 or state.finished(cfg, has_val)


def _report(metrics: dict[str, Any], state: FitState, net: nn.Module, opt: torch.optim.Optimizer,
            best: dict, with_checkpoint: bool) -> None:
    """Rank 0's report. The checkpoint is written to a fresh folder, which Ray uploads in the
    background (ASYNC) and then deletes: the next epoch trains meanwhile."""
    import ray.train

    if not with_checkpoint:
        ray.train.report(metrics)
        return
    folder = tempfile.mkdtemp(prefix="vfx-ckpt-")
    _save_checkpoint(folder, net, opt, state, best)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                     delete_local_checkpoint_after_upload=True)


def shard_data(shard: Any, opts: resident.DeviceOptions) -> resident.DeviceData:
    """A worker's whole Ray Data shard, read once, in the dataset's row order, on its device."""
    parts = list(shard.iter_torch_batches(batch_size=4096, dtypes={"row": torch.int64, "image": torch.float32,
                                                                    "label": torch.float32}))
    if not parts:
        return resident.DeviceData.put(torch.zeros(0, 3, 1, 1), torch.zeros(0), opts)
    row, images, labels = (torch.cat([b[k] for b in parts]) for k in ("row", "image", "label"))
    order = torch.argsort(row)  # blocks may arrive in any order: the fold must not depend on it
    return resident.DeviceData.put(images[order], labels[order], opts)


def _restore(config: dict[str, Any], cfg: TrainConfig) -> tuple[nn.Module, FitState, dict, dict | None]:
    """(model, fit state, best weights, optimizer state) from the run's checkpoint or the init."""
    import ray
    import ray.train

    net = vmodel.build_model(cfg.arch, pretrained="none")
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        net.load_state_dict(ray.get(config["init"]))
        return net, FitState(), vmodel.cpu_state(net), None
    with ckpt.as_directory() as d:
        saved = torch.load(os.path.join(d, layout.CHECKPOINT_STATE), map_location="cpu", weights_only=True)
        best = torch.load(os.path.join(d, layout.CHECKPOINT_BEST), map_location="cpu", weights_only=True)
    net.load_state_dict(saved["model"])
    state = FitState(**saved["fit"])
    state.resumed_from.append(state.epoch)
    return net, state, best, saved["optimizer"]


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train loop of one fold. ``config``: train (TrainConfig dict), fold, init (ObjectRef
    of the initial state dict), has_val. Data: ``train`` and ``val`` dataset shards, each
    read once onto the worker's device (``resident``)."""
    import ray.train
    import ray.train.torch

    cfg = train_config_from_dict(config["train"])
    vmodel.require_cuda(cfg.use_gpu, "this training worker")
    fold = int(config.get("fold", 0))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    opts = resident.DeviceOptions.for_device(ray.train.torch.get_device(), cfg.compile)

    net, state, best, opt_state = _restore(config, cfg)
    if opts.channels_last:
        net = net.to(memory_format=torch.channels_last)
    net = ray.train.torch.prepare_model(net)
    opt = resident.adam(net, cfg, opts)
    if opt_state is not None:
        try:
            opt.load_state_dict(opt_state)
        except ValueError:  # a checkpoint from before the two parameter groups (weights, the rest)
            print(f"fold {fold}: the checkpoint's optimizer state has another layout; Adam's moments restart",
                  flush=True)
    train = shard_data(ray.train.get_dataset_shard("train"), opts)
    val = shard_data(ray.train.get_dataset_shard("val"), opts) if config.get("has_val", True) else None
    trainer = resident.Trainer(net, opt, cfg, opts)
    per_worker_batch = max(1, cfg.batch_size // world)

    while not state.finished(cfg, val is not None):
        t0 = time.perf_counter()
        gen = resident.generator(opts.device, seed_for(cfg.seed, fold, state.epoch + 1, rank))
        stats = trainer.epoch(train, gen, per_worker_batch, max(1, cfg.augment_factor))
        val_loss = None
        if val is not None:
            loss_sum, n = _all_reduce_sums(list(map(float, resident.evaluate(net, val))), opts.device)
            val_loss = loss_sum / n if n else None
        if state.update(val_loss):
            best = vmodel.cpu_state(net)
        best_val = None if math.isinf(state.best_val_loss) else state.best_val_loss
        metrics = {"fold": fold, "epoch": state.epoch, "val_loss": val_loss, "best_val_loss": best_val,
                   "best_epoch": state.best_epoch, "epochs_without_improvement": state.epochs_without_improvement,
                   "lr": float(opt.param_groups[0]["lr"]),  # the optimizer's: what a fold's --params set
                   "epoch_seconds": time.perf_counter() - t0, "ended_at": time.time(),
                   "worker_pid": os.getpid(), **stats}  # the process, to find its log lines
        state.history.append(metrics)
        if rank == 0:
            print(f"fold {fold} epoch {state.epoch}/{cfg.max_epochs} train_loss {stats['train_loss']:.4f} "
                  f"val_loss {val_loss if val_loss is None else round(val_loss, 4)} "
                  f"{stats['images_per_s']:.0f} img/s/worker", flush=True)
            _report(metrics, state, net, opt, best, checkpoint_due(state, cfg, val is not None))
        else:
            ray.train.report(metrics)

    return {"epochs": state.epoch, "best_epoch": state.best_epoch,
            "best_val_loss": None if math.isinf(state.best_val_loss) else state.best_val_loss,
            "history": state.history, "resumed_from": state.resumed_from}


@dataclass
class FoldFit:
    best_state: dict[str, torch.Tensor]
    summary: dict[str, Any]


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """One training worker's request. A GPU worker also takes ``gpu_worker_cpus`` CPUs, so that
    decode tasks packed on the same node cannot starve the thread that feeds it; with
    ``folds_per_gpu`` K it takes 1/K of a GPU and of those CPUs (at least one), so K folds
    share a GPU: with its data on the device, a worker needs one host thread to launch kernels."""
    if not cfg.use_gpu:
        return {"CPU": 1}
    k = max(1, cfg.folds_per_gpu)
    # Ray counts resources in 1e-4 units: rounded down, K shares always fit one GPU (6 x 0.1667 would not)
    return {"CPU": max(1, cfg.gpu_worker_cpus // k), "GPU": math.floor(1e4 / k) / 1e4}


def to_dataset(table: pa.Table, block_rows: int = 256) -> Any:
    """A Ray dataset of (row, image, label) from an in-memory crops table, in small blocks;
    ``row`` restores the table's order once a worker has read its shard."""
    import ray.data

    t = table.select(["image", "label"])
    t = t.add_column(0, "row", pa.array(range(t.num_rows), pa.int64()))
    blocks = [t.slice(i, block_rows) for i in range(0, max(t.num_rows, 1), block_rows)]
    ds = ray.data.from_arrow(blocks)
    # read by every fold and trial: one progress bar each would flood the logs
    ds.context.enable_progress_bars = False
    ds.context.print_on_execution_start = False
    return ds


def fit_fold(
    train_table: pa.Table,
    val_table: pa.Table | None,
    cfg: TrainConfig,
    *,
    fold: int,
    storage_path: str,
    name: str,
    storage_filesystem: pafs.FileSystem | None = None,
    max_failures: int = 2,
    resources_per_worker: dict[str, float] | None = None,
    callbacks: list | None = None,
) -> FoldFit:
    """Train one fold as a TorchTrainer run ``name`` under ``storage_path`` (a local folder,
    or a path in ``storage_filesystem``: see ``train_storage.marker_free_filesystem`` for s3:// URIs).

    Re-running with the same name and storage resumes an unfinished run from its latest
    checkpoint (Ray Train V2 restores the run state); ``max_failures`` worker-group restarts
    are allowed within one call. Returns the best weights and the loop's summary.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    with torch.random.fork_rng():  # seeded head init per fold, without touching the caller's RNG
        torch.manual_seed(seed_for(cfg.seed, fold))
        init = vmodel.cpu_state(vmodel.build_model(cfg.arch, cfg.pretrained, cfg.pretrained_path))
    has_val = val_table is not None and val_table.num_rows > 0
    datasets = {"train": to_dataset(train_table)}
    if has_val:
        datasets["val"] = to_dataset(val_table)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": dataclasses.asdict(cfg),
            "fold": fold,
            "init": ray.put(init),
            "has_val": has_val,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=bool(cfg.use_gpu),
            resources_per_worker=resources_per_worker or worker_resources(cfg),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=callbacks,  # e.g. Tune's report callback when the fold runs as a trial
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        best = torch.load(os.path.join(d, layout.CHECKPOINT_BEST), map_location="cpu", weights_only=True)
    summary = dict(result.return_value or {})
    return FoldFit(best_state=best, summary=summary)


# ---------------------------------------------------------------- one fold of train-cv
def log(msg: str) -> None:
    """A line of the train-cv stage's log (the stage the user ran), from its driver or a fold's."""
    print(f"[vfx_ray.stages.train_cv] {msg}", file=sys.stderr, flush=True)


def patients_subset(crops: pa.Table, patient_ids: list[str]) -> pa.Table:
    return crops.filter(pc.is_in(crops["patient_id"], value_set=pa.array(patient_ids, pa.string())))


def score_test_slices(state: dict[str, Any], cfg: TrainConfig, test: pa.Table, k: int, mid: str) -> pa.Table:
    """Fold k's test slices scored by its best weights (the rows of ``layout.PREDICTIONS``)."""
    net = vmodel.build_model(cfg.arch, pretrained="none")
    net.load_state_dict(state)
    test = test.sort_by([("patient_id", "ascending"), ("slice_index", "ascending")])
    prob = vmodel.predict_proba(net, contracts.images_from_arrow(test["image"]))
    return pa.table(
        {
            "patient_id": test["patient_id"],
            "fold": pa.array(np.full(test.num_rows, k), pa.int32()),
            "slice_index": test["slice_index"],
            "probability": pa.array(prob.astype(np.float64)),
            "label": test["label"],
            "series_instance_uid": test["series_instance_uid"],
            "vertebra": test["vertebra"],
            "model_id": pa.array([mid] * test.num_rows, pa.string()),
        }
    )


def run_fold(
    k: int,
    crops: pa.Table,
    splits: dict[str, Any],
    cfg: TrainConfig,
    out_uri: str,
    *,
    max_failures: int = 2,
    keep_checkpoints: bool = False,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Train fold k, keep its best weights, score its test patients; done.json comes last.
    What a fold driver (:func:`fold_trial`) runs: it lives here, not in ``train_cv``, so that
    a fold's process imports what a fold needs and not the driver's splits and metrics
    (scikit-learn, SciPy: 2 s of CPU for each fold and search trial)."""
    part = splits["folds"][k]
    t0 = time.time()
    log(
        f"fold {k}: training on {len(part['train'])} patients, {len(part['val'])} validation, {len(part['test'])} test"
    )
    ray_path, ray_fs = train_storage.marker_free_filesystem(storage.join(out_uri, "ray_train"))
    fit = fit_fold(
        patients_subset(crops, part["train"]),
        patients_subset(crops, part["val"]),
        cfg,
        fold=k,
        storage_path=ray_path,
        storage_filesystem=ray_fs,
        name=f"fold_{k}",
        max_failures=max_failures,
        callbacks=callbacks,
    )
    d = layout.fold_dir(out_uri, k)
    summary = {key: v for key, v in fit.summary.items() if key != "history"}
    mid = vmodel.save_model(fit.best_state, storage.join(d, layout.MODEL), cfg.arch, meta={"fold": k, **summary})
    preds = score_test_slices(fit.best_state, cfg, patients_subset(crops, part["test"]), k, mid)
    storage.write_table(preds, storage.join(d, layout.PREDICTIONS))
    storage.write_text(storage.join(d, layout.HISTORY), json.dumps(fit.summary.get("history", []), indent=1))
    done = {"fold": k, "model_id": mid, **summary, "lr": cfg.lr, "l2": cfg.l2, "n_test_slices": preds.num_rows,
            "seconds": time.time() - t0}
    storage.write_text(storage.join(d, layout.DONE), json.dumps(done, indent=2))
    if not keep_checkpoints:
        storage.delete_tree(storage.join(out_uri, "ray_train", f"fold_{k}"))
    log(
        f"fold {k}: done in {done['seconds']:.0f} s, {summary.get('epochs')} epochs, "
        f"best {summary.get('best_epoch')}, model_id {mid}"
    )
    return done


def fold_trial(config: dict[str, Any], *, crops: pa.Table, splits: dict[str, Any], cfg: TrainConfig,
               out_uri: str, max_failures: int, keep_checkpoints: bool, fold_params: dict[str, Any]) -> None:
    """One Tune trial of the fold grid: drive fold ``config["fold"]`` (its epochs reach Tune)
    with its own tuned parameters when ``fold_params`` (a nested search's) has them."""
    from ray.tune.integration.ray_train import TuneReportCallback

    k = int(config["fold"])
    run_fold(k, crops, splits, with_params(cfg, fold_params.get(str(k))), out_uri, max_failures=max_failures,
             keep_checkpoints=keep_checkpoints, callbacks=[TuneReportCallback()])
