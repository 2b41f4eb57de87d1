"""``vfx-ray``: one console script, a subcommand per stage; ``jobs/*.py`` call into it.

Heavy imports (torch, ray, pydicom) happen inside the subcommands so ``--help`` is instant.
Wrong input ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence

from vfx_ray import config as config_mod
from vfx_ray.cli.common import (
    CliError,
    add_cluster_args,
    metrics_line,
    positive_float,
    positive_int,
    prepare_cluster,
)
from vfx_ray.cli.services import add_objectstore, add_pacs
from vfx_ray.cli.train import add_train_cv, add_tune
from vfx_ray.cli.weights import add_weights
from vfx_ray.errors import VfxError

EPILOG = """\
URIs are local paths or s3://bucket/prefix. S3 settings come from the standard AWS
variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION).
Ray: a local cluster is started unless RAY_ADDRESS names one.
Errors are one line; VFX_RAY_DEBUG=1 shows the traceback instead.
"""


# ---------------------------------------------------------------- synth
def cmd_synth(args: argparse.Namespace) -> int:
    from vfx_ray.synth.cohort import generate_cohort

    base = config_mod.profile(args.profile).synth
    if args.clinical:
        base = config_mod.clinical_synth(patients=base.patients)
    cfg = config_mod.replace(
        base,
        patients=args.patients or base.patients,
        seed=args.seed,
        matrix=args.matrix or base.matrix,
        transfer_syntax=args.transfer_syntax,
        enhanced=args.enhanced or None,
        patient_position=args.patient_position,
        oblique_deg=args.oblique_deg,
        slice_thickness_mm=args.slice_thickness_mm,
        slice_spacing_mm=args.slice_spacing_mm,
        dicomdir=args.dicomdir or None,
        roi_masks=args.roi_masks or None,
        difficulty=config_mod.difficulty(args.difficulty, **({} if args.conspicuity is None
                                                             else {"conspicuity": args.conspicuity})),
    )
    if cfg.dicomdir and cfg.study != "clinical":
        raise CliError("--dicomdir writes a clinical study as DICOM media: add --clinical")
    ann = generate_cohort(args.out, cfg, workers=args.workers, progress=not args.quiet)
    counts = ann["label"].value_counts().to_dict()
    print(
        f"wrote {len(ann)} patients ({counts.get('malignant', 0)} malignant, "
        f"{counts.get('benign', 0)} benign) to {args.out}/dicom and {args.out}/annotations.csv"
    )
    return 0


def add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write the synthetic DICOM spine cohort (embedded default data)",
        description=(
            "Write a synthetic CT cohort: real DICOM series of a lumbar/thoracic segment whose "
            "target vertebra shows the paper's six visual features with Table 1's counts per "
            "class, plus annotations.csv (ROI boxes, labels). For demos and tests; it makes no "
            "claim about real patients."
        ),
    )
    p.add_argument("--out", required=True, help="output URI; writes OUT/dicom/ and OUT/annotations.csv")
    p.add_argument("--patients", type=positive_int, help="cohort size (default 433, ratio 296:137 kept)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    p.add_argument("--matrix", type=positive_int, choices=[128, 160, 256, 512], help="in-plane matrix (default 256)")
    p.add_argument(
        "--transfer-syntax",
        default="explicit",
        choices=["explicit", "implicit", "big_endian", "jpeg2000", "jpegls", "rle", "mixed"],
        help="pixel encoding (lossless variants round-trip exactly; mixed: one per patient)",
    )
    p.add_argument("--enhanced", action="store_true", help="one multi-frame Enhanced CT file per series")
    p.add_argument("--patient-position", default="HFS", choices=["HFS", "FFS", "mixed"])
    p.add_argument("--oblique-deg", type=float, default=0.0, help="gantry tilt about the x axis")
    p.add_argument(
        "--clinical", action="store_true",
        help="a hospital's spine CT export: 512x512 with a circular field of view, 1.25 mm slices over T1-S1, "
        "and per patient a localizer, bone and soft-kernel axial series, sagittal and coronal reformats, a dose "
        "report and a secondary capture; annotations name the bone series (docs/series.md)",
    )
    p.add_argument("--dicomdir", action="store_true", help="with --clinical: each study as DICOM media (DICOMDIR)")
    p.add_argument("--roi-masks", action="store_true",
                   help="also write each ROI as a mask (NIfTI for odd patients, DICOM SEG for even ones) under "
                   "OUT/masks/ and OUT/annotations_masks.csv, which gives the ROIs as roi_mask_uri only")
    p.add_argument("--slice-thickness-mm", type=positive_float,
                   help="axial slice thickness (default 3; clinical 1.25)")
    p.add_argument("--slice-spacing-mm", type=positive_float,
                   help="distance between axial slices (default: the thickness; smaller: overlapping slices)")
    p.add_argument("--difficulty", default="paper", choices=list(config_mod.DIFFICULTIES),
                   help="paper (default): ROI boxes drawn alike for both classes, lesions of varied conspicuity "
                   "(some subtle), osteoporotic bone, trabecular texture, kernel-correlated noise and mimics, "
                   "calibrated so the demo reaches a per-patient AUC of about 0.83; easy: the strong lesions and "
                   "lesion-shaped boxes of the first cohort (any model scores ~1.0: smoke tests only)")
    p.add_argument("--conspicuity", type=positive_float,
                   help="scale every lesion's contrast (default: the preset's, 1.0; subtle cases get 0.3-0.6 of it)")
    p.add_argument("--workers", type=positive_int, help="processes (default: all cores)")
    p.add_argument("--profile", default="paper", choices=config_mod.PROFILES)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)


# ---------------------------------------------------------------- crops
def add_pseudonymize(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pseudonymize", action="store_true",
        help="replace patient ids, DICOM UIDs and object keys in every output by HMAC-SHA256 "
        "pseudonyms keyed by $VFX_PSEUDONYM_KEY (required; same key, same pseudonyms)",
    )


def add_reading(p: argparse.ArgumentParser) -> None:
    """How a job reads the archive: which series of a study, and which objects of it."""
    p.add_argument(
        "--series-rules", metavar="FILE",
        help="JSON or YAML list of rules that choose a study's series when the annotations name none "
        "(each: name, field, one of match/range/nearest, optional negate/required; see docs/series.md). "
        "Default: CT, with pixels, not a localizer, ROI inside; then ORIGINAL\\PRIMARY, axial, a bone "
        "kernel, slices nearest 3 mm",
    )
    p.add_argument(
        "--read-plan", choices=config_mod.READ_PLANS, default="auto",
        help="whole: read every object once, whole; roi: read every header by a ranged GET, then only "
        "the objects that hold the ROI's slices; auto (default): roi for a folder (study) of 32 MiB or "
        "more, whole below. The crops are the same; OUT/reads.parquet records each patient's plan and bytes",
    )


def with_reading(cfg: config_mod.CropConfig, args: argparse.Namespace) -> config_mod.CropConfig:
    """The crop settings with the read plan and the rules file's series rules, read before any work starts."""
    cfg = dataclasses.replace(cfg, read_plan=args.read_plan)
    if not args.series_rules:
        return cfg
    from vfx_ray.imaging.series_select import load_rules

    return dataclasses.replace(cfg, series_rules=load_rules(args.series_rules))


def cmd_crops(args: argparse.Namespace) -> int:
    from vfx_ray.stages.crops import run_crops

    cfg = config_mod.replace(
        config_mod.profile(args.profile).crops,
        crop_size=args.crop_size,
        sagittal_thickness_mm=args.thickness_mm,
        max_slices=args.max_slices,
        max_file_bytes=args.max_file_bytes,
    )
    cfg = with_reading(cfg, args)
    prepare_cluster(args, {"--archive": args.archive, "--annotations": args.annotations, "--out": args.out})
    summary = run_crops(
        args.archive, args.annotations, args.out, cfg, progress=not args.quiet, pseudonymize=args.pseudonymize
    )
    print(
        f"{summary['crops']} crops of {summary['patients_with_crops']}/{summary['patients_planned']} "
        f"patients from {summary['series']} series in {summary['seconds']} s; "
        f"{summary['errors']} error rows -> {args.out}/crops.parquet, {args.out}/errors.parquet"
    )
    return 0


def add_crops(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "crops",
        help="DICOM archive + annotations -> 3x64x64 sagittal ROI crops (Ray Data)",
        description=(
            "The paper's preprocessing on Ray Data: list the archive (any layout), read headers "
            "in parallel, group series by SeriesInstanceUID, decode to HU, reformat to sagittal "
            "3 mm slabs in the patient frame and cut the smallest square box around each ROI, "
            "3 channels (slice and neighbours), 64x64, z-scored. Writes OUT/crops.parquet, "
            "OUT/errors.parquet (every object or patient that failed, with stage and reason), "
            "OUT/series_index.parquet, OUT/reads.parquet (how each patient's series was read) and "
            "OUT/manifest.json."
        ),
    )
    p.add_argument("--archive", required=True, help="URI of the DICOM archive prefix")
    p.add_argument("--annotations", required=True, help="URI of annotations.csv or .parquet")
    p.add_argument("--out", required=True, help="output URI (folder or s3 prefix)")
    p.add_argument("--profile", default="paper", choices=config_mod.PROFILES)
    p.add_argument("--crop-size", type=positive_int, help="crop side in pixels (default 64)")
    p.add_argument("--thickness-mm", type=float, help="sagittal slab thickness (default 3)")
    p.add_argument("--max-slices", type=positive_int, help="most sagittal slices per patient (default 5)")
    p.add_argument("--max-file-bytes", type=positive_int, help="objects above this are refused")
    add_reading(p)
    add_pseudonymize(p)
    add_cluster_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_crops)


# ---------------------------------------------------------------- score
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


# ---------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> int:
    from vfx_ray.report.render import render_report

    result = render_report(args.run, args.out, crops_uri=args.crops, annotations_uri=args.annotations,
                           compare_uri=args.compare)
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"report: {result['html']}\nsummary: {result['markdown']}")
    return 0


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="HTML + Markdown report of a train-cv run (or of scores with labels)",
        description=(
            "A self-contained HTML page (images embedded) and a Markdown summary: the paper's "
            "result table per slice and per patient with 95 % CIs (Wilson for the rates, DeLong for the "
            "per-patient AUC, a patient-level bootstrap for the per-slice AUC), per fold and pooled; the "
            "patient aggregation rules (max, mean, centre slice) with paired DeLong tests against max; "
            "with --compare, run A against run B on their shared patients (paired DeLong); "
            "ROC curves, confusion matrices, calibration and decision curves; slice probability by "
            "distance from the ROI centre (edge vs centre); per-slice probability plots in the style of "
            "the paper's Fig. 3 (true positives the max rule rescued) with their crops and Grad-CAM "
            "heatmaps by the fold model that held each patient out; and the cohort as the "
            "paper's Table 1 when the annotations carry its columns."
        ),
    )
    p.add_argument("--run", required=True, help="train-cv run folder or scores folder URI")
    p.add_argument("--out", required=True, help="output folder (local or s3://)")
    p.add_argument("--crops", help="crops dataset (default: from the run's config.json)")
    p.add_argument("--annotations", help="annotations (default: from the crops manifest)")
    p.add_argument("--compare", metavar="URI",
                   help="a second run (B: train-cv or labelled scores) to compare with --run (A) on shared patients")
    p.set_defaults(func=cmd_report)


def cmd_demo(args: argparse.Namespace) -> int:
    from vfx_ray.stages.demo import run_demo

    run_demo(args.workdir, patients=args.patients, seed=args.seed)
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole flow on the embedded default (synthetic cohort in the embedded S3 store)",
        description="Start the embedded S3 store, write a small synthetic cohort into it and run "
        "every stage that exists on it with the demo profile, then print where the outputs are.",
    )
    p.add_argument("--workdir", default="out/demo", help="local folder for the store and logs")
    p.add_argument("--patients", type=positive_int, default=None, help="cohort size (demo profile default)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


ADDERS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_objectstore,
    add_pacs,
    add_synth,
    add_crops,
    add_train_cv,
    add_tune,
    add_score,
    add_report,
    add_weights,
    add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfx-ray",
        description="Benign vs malignant vertebral fracture classification on CT "
        "(Li et al., Eur Radiol 2021) as Ray batch jobs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in ADDERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, VfxError, FileNotFoundError, PermissionError, ValueError, ConnectionError) as exc:
        if os.environ.get("VFX_RAY_DEBUG"):
            raise
        print(f"vfx-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vfx-ray {args.command}: interrupted", file=sys.stderr)
        return 130
