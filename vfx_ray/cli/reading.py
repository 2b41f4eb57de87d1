"""Flags of the commands that read an archive (crops, score): series rules, read plan, pseudonyms."""

from __future__ import annotations

import argparse
import dataclasses

from vfx_ray import config as config_mod
from vfx_ray.cli.common import config_flag, from_flags


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
    config_flag(p, config_mod.CropConfig, "read_plan", choices=config_mod.READ_PLANS)


def with_reading(cfg: config_mod.CropConfig, args: argparse.Namespace) -> config_mod.CropConfig:
    """The crop settings with the flags given (the read plan) and the rules file's series rules, read
    before any work starts."""
    cfg = from_flags(cfg, args)
    if not args.series_rules:
        return cfg
    from vfx_ray.imaging.series_select import load_rules

    return dataclasses.replace(cfg, series_rules=load_rules(args.series_rules))

