"""`vfx-ray crops`: DICOM archive + annotations -> ROI crops."""

from __future__ import annotations

import argparse

from vfx_ray import config as config_mod
from vfx_ray.cli.common import (
    add_cluster_args,
    positive_int,
    prepare_cluster,
)
from vfx_ray.cli.reading import add_pseudonymize, add_reading, with_reading


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

