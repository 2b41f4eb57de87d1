"""Training flags shared by `vfx-ray train-cv` and `vfx-ray tune`, and the checks they share."""

from __future__ import annotations

import argparse

from vfx_ray import config as config_mod
from vfx_ray.cli.common import (
    add_cluster_args,
    positive_int,
)


def train_config_from_args(args: argparse.Namespace) -> config_mod.TrainConfig:
    """The profile's TrainConfig with the flags that were given."""
    return config_mod.replace(
        config_mod.profile(args.profile).train,
        arch=args.arch,
        pretrained=args.pretrained,
        pretrained_path=args.pretrained_path,
        max_epochs=args.epochs,
        n_folds=args.folds,
        augment_factor=args.augment_factor,
        num_workers=args.workers,
        use_gpu=args.gpu,
        gpu_worker_cpus=args.gpu_worker_cpus,
        folds_per_gpu=args.folds_per_gpu,
        compile=args.compile,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )


def check_weights(cfg: config_mod.TrainConfig) -> None:
    """Usable ImageNet weights, or one line now: before any Ray work."""
    if cfg.pretrained == "imagenet":
        from vfx_ray.ml.model import find_imagenet_weights

        find_imagenet_weights(cfg.arch, cfg.pretrained_path)


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Training flags shared by train-cv and tune (unset: the profile's value)."""
    p.add_argument(
        "--profile", default="paper", choices=config_mod.PROFILES, help="paper (default) or demo (2 CPU cores)"
    )
    p.add_argument("--arch", choices=["resnet18", "resnet34", "resnet50"], help="default resnet50 (paper)")
    p.add_argument("--pretrained", choices=["imagenet", "none"], help="ImageNet initialisation (paper) or none")
    p.add_argument("--pretrained-path", metavar="URI",
                   help="ImageNet weights (s3:// or a local file) when not in the torchvision cache; "
                   "`vfx-ray weights put` uploads them")
    p.add_argument("--epochs", type=positive_int, help="most epochs per fold (paper 100; early stopping)")
    p.add_argument("--folds", type=positive_int, help="cross-validation folds (paper 10)")
    p.add_argument("--augment-factor", type=positive_int, help="augmented views per crop and epoch (paper 20)")
    p.add_argument("--workers", type=positive_int, help="Ray Train workers per fold")
    p.add_argument("--gpu-worker-cpus", type=positive_int, help="CPUs a GPU training worker also reserves (default 2)")
    p.add_argument("--folds-per-gpu", type=positive_int, metavar="K",
                   help="K folds (tune: trials) share one GPU, each worker asking for 1/K of it and of "
                   "--gpu-worker-cpus (at least 1 CPU): at batch 32 one fold cannot keep a large GPU busy "
                   "(default 1; see docs/benchmarks.md for measured K)")
    p.add_argument("--compile", choices=config_mod.COMPILE_MODES,
                   help="torch.compile the training forward: auto (default: on CUDA, not on CPU), off, on, "
                   "or cudagraphs (mode reduce-overhead); a failing compile falls back to eager")
    p.add_argument(
        "--checkpoint-every",
        type=positive_int,
        metavar="N",
        help="epochs between checkpoints, uploaded in the background (default 1): a restart redoes at most "
        "N epochs; the last epoch is always checkpointed, with the best weights",
    )
    p.add_argument("--max-concurrent", type=positive_int,
                   help="most folds/trials at once (default: all; their pending requests drive the autoscaler)")
    add_cluster_args(p, gpu=True)
    p.add_argument("--seed", type=int, help="folds and initialisation seed")

