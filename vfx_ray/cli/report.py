"""`vfx-ray report`: the HTML and Markdown report of a run."""

from __future__ import annotations

import argparse
import sys


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

