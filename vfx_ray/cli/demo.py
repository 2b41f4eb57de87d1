"""`vfx-ray demo`: the whole flow on the embedded services."""

from __future__ import annotations

import argparse

from vfx_ray.cli.common import (
    positive_int,
)


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

