"""`vfx-ray tune`: the Ray Tune search of lr and L2 that feeds train-cv."""

from __future__ import annotations

import argparse
import dataclasses

from vfx_ray import config as config_mod
from vfx_ray.cli.common import (
    CliError,
    positive_int,
    prepare_cluster,
)
from vfx_ray.cli.train_flags import add_train_args, check_weights, train_config_from_args


def cmd_tune(args: argparse.Namespace) -> int:
    base = config_mod.profile(args.profile)
    cfg = dataclasses.replace(base, train=train_config_from_args(args))
    check_weights(cfg.train)
    if cfg.train.n_folds < 2:
        raise CliError(f"--folds {cfg.train.n_folds}: the search makes train-cv's outer folds, at least 2")
    prepare_cluster(args, {"--crops": args.crops, "--out": args.out, "--pretrained-path": cfg.train.pretrained_path})
    from vfx_ray.stages.tune import run_tune

    summary = run_tune(args.crops, args.out, cfg, num_samples=args.num_samples, resume=args.resume,
                       progress=not args.quiet, nested=args.nested, max_concurrent=args.max_concurrent)
    best = summary["best_params"]
    per_fold = best["folds"] if args.nested else {"all": best}
    print(f"{summary['trials']} trials ({summary['stopped_early']} stopped early by ASHA)")
    for fold, p in per_fold.items():
        print(f"  best for fold {fold}: lr {p['lr']:.3g}, l2 {p['l2']:.3g}")
    print(f"-> {args.out}/best_params.json (use with train-cv --params"
          f"{', same --folds and --seed' if args.nested else ''}); "
          f"TensorBoard: tensorboard --logdir {args.out}/tensorboard")
    return 0


def add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="Ray Tune search of learning rate and L2 weight (ASHA), feeding train-cv",
        description=(
            "Search lr (log-uniform 1e-5..1e-3) and the L2 weight (log-uniform 1e-6..1e-2) with "
            "ASHA on validation loss, on train-cv's outer folds (same --folds and --seed). Each "
            "trial trains on one outer fold's training patients and is judged on validation patients "
            "drawn from them, never on that fold's test patients. Without --nested the search runs "
            "inside outer fold 0 only: its training and validation patients are the other folds' test "
            "patients, so a train-cv run that applies its choice to every fold is optimistically "
            "biased (its metrics.json says so). --nested searches inside every outer fold (K times "
            "the trials) and train-cv applies fold k's choice to fold k. Writes OUT/trials.parquet, "
            "OUT/best_params.json (nested: also OUT/fold_k/best_params.json) and TensorBoard event "
            "files under OUT/tensorboard."
        ),
    )
    p.add_argument("--crops", required=True, help="the output folder of `vfx-ray crops` (or its crops.parquet)")
    p.add_argument("--out", required=True, help="search folder URI")
    p.add_argument("--num-samples", type=positive_int, help="trials (per outer fold with --nested; profile default)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in --out")
    p.add_argument("--nested", action="store_true",
                   help="nested CV: one search per outer fold, judged inside that fold's training patients only, "
                   "so no fold's test patients take part in choosing its parameters (--num-samples trials per "
                   "fold, all in one Tune run)")
    add_train_args(p)
    p.add_argument("--quiet", action="store_true", help="less output")
    p.set_defaults(func=cmd_tune)

