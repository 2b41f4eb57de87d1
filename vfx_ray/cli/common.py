"""What every `vfx-ray` subcommand module shares: the user-error type and small formatters."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from typing import Any, TypeVar

from vfx_ray import config

C = TypeVar("C")


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


def config_flag(p: argparse.ArgumentParser, cls: type, name: str, flag: str | None = None, **kwargs: Any) -> None:
    """A flag for the config field ``cls.name``: its help text from the field's metadata with the
    paper profile's default appended; unset, it leaves the chosen profile's value (see
    :func:`from_flags`). ``kwargs`` go to ``add_argument`` (type, choices, metavar)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    shown = "none" if default is None else default
    flag = flag or "--" + name.replace("_", "-")
    if "choices" not in kwargs:
        kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    p.add_argument(flag, dest=name, default=None,
                   help=f"{f.metadata['help']} (paper: {shown})", **kwargs)


def from_flags(base: C, args: argparse.Namespace, **changes: Any) -> C:
    """``base`` (a config dataclass) with every field whose flag was given, then ``changes``."""
    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(base)}
    return config.replace(config.replace(base, **flags), **changes)  # unset (None) keeps the profile's value


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
