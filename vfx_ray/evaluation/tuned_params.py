"""Tuned parameters: what ``tune`` writes, what ``train-cv --params`` applies to each fold, and
which protocol chose them (metrics.json's ``params_protocol``), so a CV estimate says how honest it is.

Pure: dicts in, dicts out, no I/O. Two shapes of a parameters file:

- flat, ``{"lr": ..., "l2": ...}`` (any TrainConfig fields): a single search's choice, applied
  to every fold. ``tune`` without ``--nested`` searches inside outer fold 0 only, so the test
  patients of the other folds were among its training and validation patients;
- nested, ``{"protocol": "nested", "folds": {"0": {"lr": ..., "l2": ...}, ...}, "splits": {...}}``:
  fold k's parameters were chosen inside fold k's training part only; ``splits`` names the outer
  folds they belong to, and train-cv refuses them for other folds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

NESTED = "nested"
SINGLE = "single-split"
NONE = "none"
TUNED = ("lr", "l2")  # what a search chooses


def digest(value: Any) -> str:
    """A short content hash of JSON-able data: same patients, same digest."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def patients_digest(train: Iterable[str], val: Iterable[str]) -> str:
    """The patients a trial trained and was judged on, as one hash (reported with every epoch)."""
    return digest([sorted(set(train)), sorted(set(val))])


def splits_key(splits: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a set of outer folds: their settings and a hash of every fold's patients."""
    parts = [[f["train"], f["val"], f["test"]] for f in splits["folds"]]
    return {"n_folds": splits["n_folds"], "val_fraction": splits["val_fraction"], "seed": splits["seed"],
            "folds_digest": digest(parts)}


def nested(per_fold: Mapping[int, Mapping[str, Any]], splits: Mapping[str, Any]) -> dict[str, Any]:
    """The nested parameters file: fold -> its own search's best parameters."""
    return {"protocol": NESTED, "folds": {str(k): dict(p) for k, p in sorted(per_fold.items())},
            "splits": splits_key(splits)}


def is_nested(params: Mapping[str, Any] | None) -> bool:
    return bool(params) and params.get("protocol") == NESTED


def check(params: Mapping[str, Any] | None, n_folds: int) -> None:
    """Raise ValueError, before any work, on a nested file that cannot fit ``n_folds`` folds."""
    if not is_nested(params):
        if params and "protocol" in params:
            raise ValueError(f"--params: unknown protocol {params['protocol']!r} (a flat JSON object of "
                             f"training fields, or the best_params.json of `vfx-ray tune --nested`)")
        return
    folds, key = params.get("folds"), params.get("splits") or {}
    if not isinstance(folds, dict) or not all(isinstance(p, dict) for p in folds.values()):
        raise ValueError("--params: a nested parameters file needs \"folds\": {\"0\": {...}, ...}")
    if key.get("n_folds") != n_folds or set(folds) != {str(k) for k in range(n_folds)}:
        raise ValueError(f"--params holds per-fold parameters of a search over {key.get('n_folds')} outer folds "
                         f"(folds {sorted(folds)}); this run has {n_folds}: use the search's --folds and --seed")


def check_splits(params: Mapping[str, Any] | None, splits: Mapping[str, Any]) -> None:
    """Refuse nested parameters tuned on other outer folds: fold k's would then have seen its test patients."""
    if is_nested(params) and params["splits"] != splits_key(splits):
        raise ValueError(f"--params were tuned on other outer folds ({params['splits']}) than this run's "
                         f"({splits_key(splits)}): same crops, --folds and --seed, or tune again")


def shared(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The parameters every fold shares (all of a flat file, none of a nested one)."""
    return None if is_nested(params) else (dict(params) if params else None)


def for_fold(params: Mapping[str, Any] | None, k: int) -> dict[str, Any] | None:
    """Fold k's parameters: its own when nested, else the shared ones."""
    return dict(params["folds"][str(k)]) if is_nested(params) else shared(params)


def per_fold(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The per-fold part of a run's settings (empty unless nested): a resumed run must keep it."""
    return dict(params["folds"]) if is_nested(params) else {}


def _others(n_folds: int) -> str:
    return "fold 1" if n_folds == 2 else f"folds 1–{n_folds - 1}"


def protocol(params: Mapping[str, Any] | None, n_folds: int) -> dict[str, Any]:
    """metrics.json's ``params_protocol``: which protocol chose lr/l2, and what that means for the estimate."""
    if is_nested(params):
        return {"protocol": NESTED, "params": per_fold(params), "description": (
            "nested: each outer fold k used the lr/L2 of its own search, trained and judged only on fold k's "
            "training patients (an inner validation split); no test patient took part in choosing its own "
            "fold's parameters, so the cross-validation estimate is not biased by tuning.")}
    tuned = {k: v for k, v in (params or {}).items() if k in TUNED}
    if not tuned:
        return {"protocol": NONE, "params": dict(params or {}), "description": (
            "none: every fold used the profile's lr/L2, fixed before seeing the data; no tuning on this cohort.")}
    return {"protocol": SINGLE, "params": dict(params), "description": (
        f"single-split: one lr/L2 (--params) for all {n_folds} folds. A 'vfx-ray tune' search without --nested "
        f"chooses them on outer fold 0's split, where the test patients of {_others(n_folds)} were training and "
        "validation patients: they took part in tuning, so the cross-validation estimate is optimistic (only "
        "fold 0's test patients are untouched). 'vfx-ray tune --nested' tunes inside each fold.")}
