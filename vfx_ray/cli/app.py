"""``vfx-ray``: the parser (one subcommand per module of this folder) and every command's error handling.

Heavy imports (torch, ray, pydicom) happen inside the subcommands so ``--help`` is instant.
Wrong input ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from vfx_ray.cli.common import CliError
from vfx_ray.cli.crops import add_crops
from vfx_ray.cli.demo import add_demo
from vfx_ray.cli.objectstore import add_objectstore
from vfx_ray.cli.pacs import add_pacs
from vfx_ray.cli.report import add_report
from vfx_ray.cli.score import add_score
from vfx_ray.cli.synth import add_synth
from vfx_ray.cli.train_cv import add_train_cv
from vfx_ray.cli.tune import add_tune
from vfx_ray.cli.weights import add_weights
from vfx_ray.errors import VfxError

EPILOG = """\
URIs are local paths or s3://bucket/prefix. S3 settings come from the standard AWS
variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION).
Ray: a local cluster is started unless RAY_ADDRESS names one.
Errors are one line; VFX_RAY_DEBUG=1 shows the traceback instead.
"""


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
