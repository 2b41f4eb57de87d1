"""`vfx-ray score`: score an archive with a trained model (and send reports with --sr-out)."""

from __future__ import annotations

import argparse

from vfx_ray import config as config_mod
from vfx_ray.cli.common import (
    CliError,
    add_cluster_args,
    metrics_line,
    positive_int,
    prepare_cluster,
)
from vfx_ray.cli.reading import add_pseudonymize, add_reading, with_reading


def cmd_score(args: argparse.Namespace) -> int:
    from vfx_ray.stages.score import ScoreOptions, run_score

    cfg = with_reading(config_mod.profile(args.profile).crops, args)
    check_report_target(args)
    prepare_cluster(args, {"--archive": args.archive, "--annotations": args.annotations,
                           "--model": args.model, "--out": args.out})
    options = ScoreOptions(threshold=args.threshold, features=args.features, batch_size=args.batch_size,
                           commit_every=args.commit_every, progress=not args.quiet, pseudonymize=args.pseudonymize,
                           gpu=args.gpu, sr_out=args.sr_out, key_images=args.key_images)  # fmt: skip
    summary = run_score(args.archive, args.annotations, args.model, args.out, cfg, options)
    line = (
        f"{summary['rows']} patients scored ({summary['scored_now']} now, "
        f"{summary['skipped_already_scored']} already done) with model {summary['model_id']} "
        f"({summary['n_models']} models); {summary['errors']} error rows -> {args.out}/scores.parquet"
    )
    print(line)
    if summary["chunks"]:
        print(f"read once: {summary['patients_read_once']} patients, second pass: {summary['patients_second_pass']}; "
              f"{summary['chunks_reused']} of {summary['chunks']} chunks taken from an interrupted run")  # fmt: skip
    if args.sr_out:
        print(f"reports: {summary['sr_objects_sent']} objects sent, {summary['sr_objects_already_there']} already "
              f"there, {summary['sr_errors']} not sent (see errors.parquet, stage 'sr') -> {args.sr_out}")
    if "metrics" in summary:
        for level in ("per_slice", "per_patient"):
            print(f"{level:11s} {metrics_line(summary['metrics'][level])}")
    return 0


def check_report_target(args: argparse.Namespace) -> None:
    """--key-images needs --sr-out; a DICOMweb --sr-out must be a usable URI (before any work)."""
    from vfx_ray import dicomweb

    if args.key_images and not args.sr_out:
        raise CliError("--key-images needs --sr-out (the key images go where the reports go)")
    if args.sr_out and dicomweb.is_dicomweb(args.sr_out):
        try:
            dicomweb.service_url(args.sr_out)
        except ValueError as exc:
            raise CliError(f"--sr-out: {exc}") from None


def add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score a DICOM archive with a trained model -> per-patient Parquet",
        description=(
            "One Ray Data pipeline: index, decode and crop as `crops` does, then model actors "
            "(GPU when the cluster has them) give per-slice probabilities; the patient's "
            "probability is the max over its slices. --model takes a train-cv run (the fold "
            "models as an ensemble, mean probability) or one model.pt. Writes OUT/scores.parquet "
            "(one row per patient), OUT/errors.parquet and, when the annotations carry labels, "
            "OUT/metrics.json. Re-running with the same --out and model scores only patients "
            "not yet committed."
        ),
    )
    p.add_argument("--archive", required=True, help="URI of the DICOM archive prefix")
    p.add_argument("--annotations", required=True, help="URI of annotations (labels optional)")
    p.add_argument("--model", required=True, help="train-cv run URI or a model.pt URI")
    p.add_argument("--out", required=True, help="output URI")
    p.add_argument("--threshold", type=float, default=0.5, help="malignant when probability >= this")
    p.add_argument("--features", action="store_true", help="also write 2048-d pooled embeddings (features.parquet)")
    p.add_argument("--batch-size", type=positive_int,
                   help="crops per model call (default 1024 on GPUs, 64 on CPUs)")
    p.add_argument(
        "--commit-every", type=positive_int, default=25, help="patients per committed part (resume granularity)"
    )
    p.add_argument("--profile", default="paper", choices=config_mod.PROFILES)
    p.add_argument("--sr-out", metavar="URI",
                   help="also a DICOM Structured Report (TID 1500) per scored patient: a folder or s3:// prefix "
                        "(URI/<patient>/<SOP Instance UID>.dcm) or a PACS, dicomweb+http(s)://host/root (STOW-RS; "
                        "credentials from VFX_RAY_DICOMWEB_USER/_PASSWORD, see `vfx-ray pacs env`). Sent after the "
                        "scores are written; a re-run sends only what the target lacks")
    p.add_argument("--key-images", action="store_true",
                   help="with --sr-out: also a secondary capture per patient (the top slice, the ROI box and its "
                        "Grad-CAM heatmap), referenced by the SR")
    add_reading(p)
    add_pseudonymize(p)
    add_cluster_args(p, gpu=True)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_score)

