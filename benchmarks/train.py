"""Training throughput: Ray Train epoch vs a plain PyTorch loop on the same crops and model.

    .venv/bin/python benchmarks/train.py [--arch resnet18] [--size 64] [--patients 48]
        [--epochs 4] [--augment-factor 2] [--workers 1 2]

The plain loop runs the reference ``train_one_epoch`` + ``evaluate`` (vfx_ray.ml.epochs), the Ray
workers the device-resident loop (vfx_ray.ml.resident), with the same augmentation ranges, batch
size and 1 torch thread per worker (Ray gives a 1-CPU worker OMP_NUM_THREADS=1). The Ray
figure is the wall time between consecutive epoch reports, so it includes reading the shard
(once per fold), the per-epoch checkpoint and ``ray.train.report``; the first
epoch (start-up) is left out of both medians. Prints one line per measurement and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from crops_fixture import make_crops  # noqa: E402

from vfx_ray import contracts  # noqa: E402
from vfx_ray.config import TrainConfig  # noqa: E402
from vfx_ray.ml import epochs  # noqa: E402
from vfx_ray.ml import model as vmodel  # noqa: E402
from vfx_ray.ml.augment import AffineRanges, random_affine  # noqa: E402
from vfx_ray.stages import fold_trainer as vtrain  # noqa: E402


def plain_epochs(train, val, cfg: TrainConfig, n_epochs: int) -> list[float]:
    """Seconds per epoch of a plain in-memory loop (train + validation), 1 thread."""
    torch.set_num_threads(1)
    x = torch.from_numpy(contracts.images_from_arrow(train["image"]).copy())
    y = torch.tensor(train["label"].to_numpy(), dtype=torch.float32)
    xv = torch.from_numpy(contracts.images_from_arrow(val["image"]).copy())
    yv = torch.tensor(val["label"].to_numpy(), dtype=torch.float32)
    torch.manual_seed(0)
    net = vmodel.build_model(cfg.arch, pretrained="none")
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=cfg.betas)
    ranges, gen = AffineRanges.from_config(cfg), torch.Generator().manual_seed(0)
    times = []
    for _ in range(n_epochs):
        t0 = time.perf_counter()

        def views():
            for _ in range(cfg.augment_factor):
                perm = torch.randperm(len(x), generator=gen)
                for i in range(0, len(x), cfg.batch_size):
                    idx = perm[i : i + cfg.batch_size]
                    yield x[idx], y[idx]

        epochs.train_one_epoch(net, views(), opt, l2=cfg.l2, transform=lambda b: random_affine(b, ranges, gen))
        epochs.evaluate(net, [(xv[i : i + 256], yv[i : i + 256]) for i in range(0, len(xv), 256)])
        times.append(time.perf_counter() - t0)
    return times


def ray_epochs(train, val, cfg: TrainConfig, workers: int, storage: str) -> list[float]:
    """Wall seconds between consecutive epoch reports of the real train_loop_per_worker."""
    run_cfg = TrainConfig(**{**cfg.__dict__, "num_workers": workers})
    fit = vtrain.fit_fold(train, val, run_cfg, fold=0, storage_path=storage, name=f"bench_w{workers}_{time.time_ns()}")
    ends = [h["ended_at"] for h in fit.summary["history"]]
    return [b - a for a, b in zip(ends, ends[1:], strict=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--patients", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--augment-factor", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    import ray

    table = make_crops(n_patients=args.patients, slices=3, size=args.size)
    n_val = 3 * max(2, args.patients // 10)
    train, val = table.slice(0, table.num_rows - n_val), table.slice(table.num_rows - n_val)
    cfg = TrainConfig(arch=args.arch, pretrained="none", max_epochs=args.epochs, patience=args.epochs + 1,
                      augment_factor=args.augment_factor, batch_size=args.batch_size)
    images = train.num_rows * args.augment_factor
    print(f"# {args.arch}, {train.num_rows} train crops 3x{args.size}x{args.size} x{args.augment_factor} views "
          f"= {images} images/epoch, {val.num_rows} val crops, batch {args.batch_size}, {args.epochs} epochs")
    plain = statistics.median(plain_epochs(train, val, cfg, args.epochs)[1:])
    print(f"plain torch loop, 1 thread : {plain:7.2f} s/epoch  {images / plain:7.1f} images/s")
    ray.init(num_cpus=max(2, max(args.workers)), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as d:
        for w in args.workers:
            t = statistics.median(ray_epochs(train, val, cfg, w, d))
            print(f"Ray Train, {w} worker(s)     : {t:7.2f} s/epoch  {images / t:7.1f} images/s  "
                  f"ratio to plain {t / plain:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
