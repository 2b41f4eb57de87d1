"""What every `vfx-ray` subcommand module shares: the user-error type and small formatters."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping


class CliError(Exception):
    """Wrong input from the user: printed as one line."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def metrics_line(m: dict) -> str:
    def f(key: str, digits: int = 2) -> str:
        return "n/a" if m.get(key) is None else f"{m[key]:.{digits}f}"

    return (
        f"sensitivity {f('sensitivity')}  specificity {f('specificity')}  accuracy {f('accuracy')}  "
        f"AUC {f('auc', 3)} [{f('auc_ci_low', 3)}, {f('auc_ci_high', 3)}]"
    )


def add_cluster_args(p: argparse.ArgumentParser, gpu: bool = False) -> None:
    """Flags of every job that runs on a Ray cluster (and --gpu/--no-gpu where a model runs)."""
    if gpu:
        p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                       help="use GPUs (default: yes when the cluster has GPU nodes or an autoscaler that can add them)")
    p.add_argument("--shared-fs", action="append", default=[], metavar="MOUNT",
                   help="a folder every node mounts (EFS/NFS): local paths under it are accepted on a "
                   "multi-node or autoscaling cluster, where other local paths are refused (repeatable)")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own logs and Tune's tables (VFX_RAY_DEBUG=1 too)")


def prepare_cluster(args: argparse.Namespace, paths: Mapping[str, str | None]) -> None:
    """Connect to Ray and refuse, in one line, local paths that other nodes could not see."""
    from vfx_ray.runtime.placement import check_shared_storage
    from vfx_ray.runtime.session import VERBOSE_ENV, cluster_shape

    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    check_shared_storage(paths, cluster_shape(), args.shared_fs)
