"""`vfx-ray crops`: DICOM archive + annotations -> ROI crops."""

from __future__ import annotations

import argparse

from vfx_ray import config as config_mod
from vfx_ray.cli.common import (
    add_cluster_args,
    config_flag,
    from_flags,
    positive_float,
    positive_int,
    prepare_cluster,
)
from vfx_ray.cli.reading import add_pseudonymize, add_reading, with_reading


def cmd_crops(args: argparse.Namespace) -> int:
    from vfx_ray.stages.crops import run_crops

    cfg = with_reading(from_flags(config_mod.profile(args.profile).crops, args), args)
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
    crops = config_mod.CropConfig
    config_flag(p, crops, "crop_size", type=positive_int)
    config_flag(p, crops, "sagittal_thickness_mm", "--thickness-mm", type=positive_float)
    config_flag(p, crops, "max_slices", type=positive_int)
    config_flag(p, crops, "max_file_bytes", type=positive_int)
    add_reading(p)
    add_pseudonymize(p)
    add_cluster_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_crops)

