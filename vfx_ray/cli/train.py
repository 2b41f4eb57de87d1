"""`vfx-ray train-cv` and `vfx-ray tune`: the training subcommands and their shared flags."""

from __future__ import annotations

import argparse
import dataclasses

from vfx_ray import config as config_mod
from vfx_ray.cli.common import (
    CliError,
    add_cluster_args,
    metrics_line,
    positive_int,
    prepare_cluster,
)


# ---------------------------------------------------------------- train-cv
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


def read_params(uri: str | None, n_folds: int | None = None) -> dict | None:
    """A flat JSON object of TrainConfig fields, e.g. Tune's best_params.json (or its folder), or a
    nested search's per-fold parameters, checked against ``n_folds`` before any work."""
    if not uri:
        return None
    import json

    from vfx_ray import layout, storage

    uri = layout.params_file(uri)
    try:
        params = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as exc:
        raise CliError(f"--params {uri} is not JSON: {exc}") from None
    if not isinstance(params, dict):
        raise CliError(f"--params {uri} must hold a JSON object such as {{\"lr\": 1e-4, \"l2\": 1e-4}}")
    if n_folds is not None:
        from vfx_ray.evaluation import tuned_params

        try:
            tuned_params.check(params, n_folds)
        except ValueError as exc:
            raise CliError(f"{exc} ({uri})") from None
    return params


def check_weights(cfg: config_mod.TrainConfig) -> None:
    """Usable ImageNet weights, or one line now: before any Ray work."""
    if cfg.pretrained == "imagenet":
        from vfx_ray.ml.model import find_imagenet_weights

        find_imagenet_weights(cfg.arch, cfg.pretrained_path)


def cmd_train_cv(args: argparse.Namespace) -> int:
    from vfx_ray.evaluation import tuned_params

    cfg = train_config_from_args(args)
    params = read_params(args.params, cfg.n_folds)
    resolved = config_mod.with_params(cfg, tuned_params.shared(params))
    check_weights(resolved)
    prepare_cluster(args, {"--crops": args.crops, "--out": args.out, "--params": args.params,
                           "--pretrained-path": resolved.pretrained_path})
    from vfx_ray.stages.train_cv import run_train_cv

    result = run_train_cv(
        args.crops, args.out, cfg, params=params, max_failures=args.max_failures,
        keep_checkpoints=args.keep_checkpoints, max_concurrent=args.max_concurrent,
    )
    for level in ("per_slice", "per_patient"):
        print(f"{level:11s} {metrics_line(result['pooled'][level])}")
    print(f"run folder: {args.out} (metrics.json, oof_predictions.parquet, fold_k/model.pt)")
    return 0


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


def add_train_cv(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-cv",
        help="the paper's ResNet recipe, patient-level k-fold CV on Ray Train",
        description=(
            "Cross-validate the classifier on a crops dataset: stratified patient folds (written "
            "once as splits.json), each fold a Ray Train TorchTrainer run driven by one trial of a "
            "Ray Tune grid (all folds submitted at once, so an autoscaler adds the nodes they ask "
            "for; --max-concurrent caps them), early stopping on validation patients from the training folds, "
            "out-of-fold predictions and the paper's metrics per slice and per patient (max over "
            "slices). Re-running with the same --out skips finished folds and resumes the others."
        ),
    )
    p.add_argument("--crops", required=True, help="the output folder of `vfx-ray crops` (or its crops.parquet)")
    p.add_argument("--out", required=True, help="run folder URI")
    p.add_argument("--params", help="JSON of TrainConfig fields: the output folder of `vfx-ray tune` (its "
                   "best_params.json) or any such file. A single search's lr/L2 go to every fold (the "
                   "estimate is then optimistic: metrics.json's params_protocol says why); a `tune --nested` "
                   "search's go fold by fold, fold k's to fold k (same --folds and --seed as the search)")
    add_train_args(p)
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts per fold")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep Ray Train checkpoints of finished folds")
    p.set_defaults(func=cmd_train_cv)


# ---------------------------------------------------------------- tune
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
