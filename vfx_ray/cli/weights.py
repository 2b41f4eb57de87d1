"""`vfx-ray weights put`: ImageNet weights from this machine to a URI every cluster node reads."""

from __future__ import annotations

import argparse
import sys

from vfx_ray.cli.common import CliError

ARCHS = ("resnet18", "resnet34", "resnet50")  # model.ARCHS, without importing torch for --help


def cmd_weights_put(args: argparse.Namespace) -> int:
    from vfx_ray.ml import weights

    try:
        result = weights.put(args.arch, args.to, args.source)
    except weights.WeightsError as exc:
        raise CliError(exc.message) from None
    check = (
        f"SHA-256 {result.sha256[:8]}... matches the name"
        if result.hash_checked
        else f"SHA-256 {result.sha256[:16]}..."
    )
    print(
        f"copied {args.arch} weights ({result.nbytes / 1e6:.1f} MB, {check}, loads into {args.arch}) "
        f"from {result.source} to {result.dest}; pass this to train-cv and tune:",
        file=sys.stderr,
    )
    print(f"--pretrained-path {result.dest}")
    return 0


def add_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "weights",
        help="copy ImageNet weights to object storage for a cluster (weights put)",
        description=(
            "Cluster nodes have no torchvision cache and vfx_ray never downloads weights, so the "
            "paper profile's ImageNet initialisation needs a copy every node can read. `weights put` "
            "makes it from a machine that has the weights."
        ),
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    put = actions.add_parser(
        "put",
        help="check and copy an arch's ImageNet weights to a URI; prints the --pretrained-path flag",
        description=(
            "Copy the ImageNet weights of --arch from the torchvision cache ($TORCH_HOME/hub/"
            "checkpoints, e.g. resnet50-0676ba61.pth) or from --from to --to (s3:// or a local "
            "path). Before copying: when the file name carries torchvision's SHA-256 prefix "
            "(NAME-<hex>.pth) the bytes must match it, and the state dict must load into the arch "
            "(every layer but the classifier head). Prints `--pretrained-path URI` on stdout for "
            "train-cv and tune; the summary goes to stderr."
        ),
        epilog="example: vfx-ray weights put --arch resnet50 --to s3://my-bucket/weights/",
    )
    put.add_argument("--arch", required=True, choices=ARCHS, help="architecture the weights are for (paper: resnet50)")
    put.add_argument(
        "--to", required=True, metavar="URI",
        help="destination URI; ending with / (or an existing local folder) keeps the source's file name",
    )
    put.add_argument(
        "--from", dest="source", metavar="FILE",
        help="weights file (local or s3://) instead of the torchvision cache",
    )
    put.set_defaults(func=cmd_weights_put)
