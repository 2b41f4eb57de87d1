"""Training of one fold: pure-torch ``train_one_epoch``/``evaluate``, the Ray Train loop, the trainer.

Laid out like torchvision's ``references/classification/train.py``: the epoch and the
evaluation are plain functions on tensors (usable without Ray, e.g. by the benchmark), and
``train_loop_per_worker`` only adds Ray's data shards, checkpoints and reporting.

Recipe (Li et al. 2021): loss = mean BCE-with-logits + ``l2`` x sum of squared weights (conv
and linear weight tensors; biases and BatchNorm affine parameters are not penalised) - an
explicit term in the loss, as the paper describes, not Adam's weight_decay. Adam(lr, betas).
``batch_size`` is the global batch: each of N workers takes batch_size // N. Early stopping on
the lowest validation BCE (without the L2 term) with ``patience`` epochs; the best weights are
what the fold keeps. Every ``checkpoint_every`` epochs, and always at the last, rank 0 reports
a checkpoint (weights, optimizer, epoch, best val loss, epochs without improvement, best
weights), uploaded in the background while the next epoch trains; a restarted worker group
resumes after the last checkpointed epoch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import torch
import torch.nn.functional as F
from torch import nn

from vfx_ray import model as vmodel
from vfx_ray.augment import AffineRanges, random_affine
from vfx_ray.config import TrainConfig, train_config_from_dict

Batch = tuple[torch.Tensor, torch.Tensor]
FAULT_MARKER_ENV = "VFX_RAY_FAULT_MARKER"  # test hook, see _maybe_inject_fault
SHUFFLE_BUFFER = 2048


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of squared conv/linear weights (parameters with more than one dimension)."""
    return torch.stack([p.pow(2).sum() for p in model.parameters() if p.ndim > 1]).sum()


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    l2: float,
    device: torch.device | str = "cpu",
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """One pass over ``batches`` of (images, labels); returns mean loss/BCE and images/s."""
    model.train()
    plain = vmodel.unwrap(model)
    bce_sum, loss_sum, n = 0.0, 0.0, 0
    start = time.perf_counter()
    for x, y in batches:
        x = x.to(device, torch.float32, non_blocking=True)
        y = y.to(device, torch.float32, non_blocking=True)
        if transform is not None:
            x = transform(x)
        bce = F.binary_cross_entropy_with_logits(model(x).flatten(), y)
        loss = bce + l2 * l2_penalty(plain) if l2 else bce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bce_sum += bce.item() * len(y)
        loss_sum += loss.item() * len(y)
        n += len(y)
    seconds = time.perf_counter() - start
    return {
        "train_loss": loss_sum / max(n, 1),
        "train_bce": bce_sum / max(n, 1),
        "train_images": n,
        "train_seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else 0.0,
    }


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], device: torch.device | str = "cpu") -> dict[str, float]:
    """Summed BCE and count over ``batches`` in eval mode (sums so workers can all-reduce)."""
    model = vmodel.unwrap(model).eval()
    loss_sum, n = 0.0, 0
    for x, y in batches:
        x, y = x.to(device, torch.float32), y.to(device, torch.float32)
        loss_sum += F.binary_cross_entropy_with_logits(model(x).flatten(), y, reduction="sum").item()
        n += len(y)
    return {"loss_sum": loss_sum, "n": n}


@dataclass
class FitState:
    """Everything besides tensors that a resumed fold needs; stored in every checkpoint."""

    epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)

    def finished(self, cfg: TrainConfig, has_val: bool) -> bool:
        stopped = has_val and self.epochs_without_improvement >= cfg.patience
        return self.epoch >= cfg.max_epochs or stopped

    def update(self, val_loss: float | None) -> bool:
        """Count one more epoch; True when it is the new best (always, without validation)."""
        self.epoch += 1
        if val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss = val_loss if val_loss is not None else math.inf
            self.best_epoch = self.epoch
            self.epochs_without_improvement = 0
            return True
        self.epochs_without_improvement += 1
        return False


def seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (seed, fold, epoch, pass, rank), stable across runs."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def shard_batches(shard: Any, batch_size: int, seed: int | None) -> Iterator[Batch]:
    """(images, labels) batches from a Ray Data shard; locally shuffled when seeded."""
    kwargs: dict[str, Any] = {"batch_size": batch_size, "dtypes": {"image": torch.float32, "label": torch.float32}}
    if seed is not None:
        kwargs.update(local_shuffle_buffer_size=SHUFFLE_BUFFER, local_shuffle_seed=seed % (1 << 31))
    for b in shard.iter_torch_batches(**kwargs):
        yield b["image"], b["label"]


def _save_checkpoint(path: str, net: nn.Module, opt: torch.optim.Optimizer, state: FitState, best: dict) -> None:
    torch.save({"model": vmodel.cpu_state(net), "optimizer": opt.state_dict(), "fit": dataclasses.asdict(state)},
               os.path.join(path, "state.pt"))
    torch.save(best, os.path.join(path, "best.pt"))


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


def _maybe_inject_fault(marker: str | None, epoch: int, rank: int) -> None:
    """Test hook: with a marker path set, rank 0 dies once (os._exit) after reporting epoch 2.

    It first waits until the controller has committed every checkpoint reported so far (they
    upload in the background), so the restarted group must resume from a checkpoint.
    """
    if marker and rank == 0 and epoch == 2 and not os.path.exists(marker):
        import ray.train

        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=300)
        with open(marker, "w") as f:
            f.write(f"killed after epoch {epoch} pid {os.getpid()}\n")
        os._exit(1)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train loop of one fold. ``config``: train (TrainConfig dict), fold, init (ObjectRef
    of the initial state dict), fault_marker. Data: ``train`` and ``val`` dataset shards."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = train_config_from_dict(config["train"])
    vmodel.require_cuda(cfg.use_gpu, "this training worker")
    fold = int(config.get("fold", 0))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    net = vmodel.build_model(cfg.arch, pretrained="none")
    state, best, opt_state = FitState(), None, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            saved = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
            best = torch.load(os.path.join(d, "best.pt"), map_location="cpu", weights_only=True)
        net.load_state_dict(saved["model"])
        opt_state, state = saved["optimizer"], FitState(**saved["fit"])
        state.resumed_from.append(state.epoch)
    else:
        net.load_state_dict(ray.get(config["init"]))
    if best is None:
        best = vmodel.cpu_state(net)
    net = ray.train.torch.prepare_model(net)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    if opt_state is not None:
        opt.load_state_dict(opt_state)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config.get("has_val", True) else None
    ranges = AffineRanges.from_config(cfg)
    per_worker_batch = max(1, cfg.batch_size // world)

    while not state.finished(cfg, val_shard is not None):
        epoch = state.epoch + 1
        gen = torch.Generator().manual_seed(seed_for(cfg.seed, fold, epoch, rank))

        def views(epoch: int = epoch) -> Iterator[Batch]:
            for p in range(max(1, cfg.augment_factor)):
                yield from shard_batches(train_shard, per_worker_batch, seed_for(cfg.seed, fold, epoch, p, rank))

        t0 = time.perf_counter()
        stats = train_one_epoch(net, views(), opt, l2=cfg.l2, device=device,
                                transform=lambda x, g=gen: random_affine(x, ranges, g))
        val_loss = None
        if val_shard is not None:
            ev = evaluate(net, shard_batches(val_shard, 256, None), device)
            loss_sum, n = _all_reduce_sums([ev["loss_sum"], float(ev["n"])], device)
            val_loss = loss_sum / n if n else None
        improved = state.update(val_loss)
        if improved:
            best = vmodel.cpu_state(net)
        best_val = None if math.isinf(state.best_val_loss) else state.best_val_loss
        metrics = {"fold": fold, "epoch": state.epoch, "val_loss": val_loss, "best_val_loss": best_val,
                   "best_epoch": state.best_epoch, "epochs_without_improvement": state.epochs_without_improvement,
                   "epoch_seconds": time.perf_counter() - t0, "ended_at": time.time(), **stats}
        state.history.append(metrics)
        if rank == 0:
            print(f"fold {fold} epoch {state.epoch}/{cfg.max_epochs} train_loss {stats['train_loss']:.4f} "
                  f"val_loss {val_loss if val_loss is None else round(val_loss, 4)} "
                  f"{stats['images_per_s']:.0f} img/s/worker", flush=True)
            _report(metrics, state, net, opt, best, checkpoint_due(state, cfg, val_shard is not None))
        else:
            ray.train.report(metrics)
        _maybe_inject_fault(config.get("fault_marker"), state.epoch, rank)

    return {"epochs": state.epoch, "best_epoch": state.best_epoch,
            "best_val_loss": None if math.isinf(state.best_val_loss) else state.best_val_loss,
            "history": state.history, "resumed_from": state.resumed_from}


@dataclass
class FoldFit:
    best_state: dict[str, torch.Tensor]
    summary: dict[str, Any]


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """One training worker's request: a GPU also takes ``gpu_worker_cpus`` CPUs, so that decode
    tasks packed on the same node cannot starve the thread that feeds it."""
    return {"CPU": cfg.gpu_worker_cpus, "GPU": 1} if cfg.use_gpu else {"CPU": 1}


def to_dataset(table: pa.Table, block_rows: int = 256) -> Any:
    """A Ray dataset of just (image, label) from an in-memory crops table, in small blocks."""
    import ray.data

    t = table.select(["image", "label"])
    blocks = [t.slice(i, block_rows) for i in range(0, max(t.num_rows, 1), block_rows)]
    ds = ray.data.from_arrow(blocks)
    # iterated augment_factor times per epoch: one progress bar per pass would flood the logs
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
    or a path in ``storage_filesystem``: see ``storage.marker_free_filesystem`` for s3:// URIs).

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
            "fault_marker": os.environ.get(FAULT_MARKER_ENV),
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
        best = torch.load(os.path.join(d, "best.pt"), map_location="cpu", weights_only=True)
    summary = dict(result.return_value or {})
    return FoldFit(best_state=best, summary=summary)
