"""`vfx-ray synth`: the synthetic DICOM cohort."""

from __future__ import annotations

import argparse

from vfx_ray import config as config_mod
from vfx_ray.cli.common import (
    CliError,
    positive_float,
    positive_int,
)


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

