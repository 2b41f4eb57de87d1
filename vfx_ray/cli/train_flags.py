"""Training flags shared by `vfx-ray train-cv` and `vfx-ray tune`, and the checks they share."""

from __future__ import annotations

import argparse

from vfx_ray import config as config_mod
from vfx_ray.cli.common import (
    add_cluster_args,
    config_flag,
    from_flags,
    positive_int,
)


def train_config_from_args(args: argparse.Namespace) -> config_mod.TrainConfig:
    """The profile's TrainConfig with the flags that were given."""
    return from_flags(config_mod.profile(args.profile).train, args, use_gpu=args.gpu)


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
    train = config_mod.TrainConfig
    config_flag(p, train, "arch", choices=["resnet18", "resnet34", "resnet50"])
    config_flag(p, train, "pretrained", choices=["imagenet", "none"])
    config_flag(p, train, "pretrained_path", metavar="URI")
    config_flag(p, train, "max_epochs", "--epochs", type=positive_int)
    config_flag(p, train, "n_folds", "--folds", type=positive_int)
    config_flag(p, train, "augment_factor", type=positive_int)
    config_flag(p, train, "num_workers", "--workers", type=positive_int)
    config_flag(p, train, "gpu_worker_cpus", type=positive_int)
    config_flag(p, train, "folds_per_gpu", type=positive_int, metavar="K")
    config_flag(p, train, "compile", choices=config_mod.COMPILE_MODES)
    config_flag(p, train, "checkpoint_every", type=positive_int, metavar="N")
    p.add_argument("--max-concurrent", type=positive_int,
                   help="most folds/trials at once (default: all; their pending requests drive the autoscaler)")
    add_cluster_args(p, gpu=True)
    config_flag(p, train, "seed", type=int)

