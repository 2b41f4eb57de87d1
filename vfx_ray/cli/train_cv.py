"""`vfx-ray train-cv`: patient-level k-fold cross-validation on Ray Train."""

from __future__ import annotations

import argparse

from vfx_ray import config as config_mod
from vfx_ray.cli.common import (
    CliError,
    metrics_line,
    prepare_cluster,
)
from vfx_ray.cli.train_flags import add_train_args, check_weights, train_config_from_args


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

