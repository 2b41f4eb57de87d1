"""Which series of a study the crops come from when the annotations name none.

A spine CT study holds localizers, bone and soft-kernel axial reconstructions, sagittal and
coronal reformats, dose reports and secondary captures. The rules of ``CropConfig.series_rules``
(:class:`~vfx_ray.config.SeriesRule`, defaults in ``config.DEFAULT_SERIES_RULES``, or a rules
file: :func:`load_rules`) are applied in order to a patient's series; what is left must be
one series, else the patient is an ``AmbiguousSeries`` error naming the candidates. Every
series learns why it lost (:func:`select`'s notes), for the series index. Pure: no I/O but
reading a rules file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from vfx_ray import storage
from vfx_ray.config import SeriesRule
from vfx_ray.errors import VfxError
from vfx_ray.imaging.roi import RoiBox

SELECTED = "selected"
NAMED = "named in the annotations"
TIED = "tied with another series: name one in series_instance_uid"
ROI_TOLERANCE_MM = 1.0  # the ROI's centre may lie this far outside a series' extent


def roi_inside(series: dict[str, Any], roi: RoiBox | None) -> str:
    """``yes`` when the ROI's centre lies within the series' extent, ``no`` when it does not,
    ``unknown`` without an extent (Enhanced CT headers) or an ROI box."""
    extent = series.get("extent_mm")
    if roi is None or extent is None:
        return "unknown"
    lo, hi = np.asarray(extent[0::2], float), np.asarray(extent[1::2], float)
    inside = np.all(roi.centre >= lo - ROI_TOLERANCE_MM) and np.all(roi.centre <= hi + ROI_TOLERANCE_MM)
    return "yes" if inside else "no"


def _value(series: dict[str, Any], field: str, roi: RoiBox | None) -> Any:
    return roi_inside(series, roi) if field == "roi_inside" else series.get(field)


def holds(rule: SeriesRule, series: dict[str, Any], roi: RoiBox | None) -> bool:
    """Whether a ``match`` or ``range`` rule holds for a series (a missing number never does)."""
    value = _value(series, rule.field, roi)
    if rule.range is not None:
        return value is not None and rule.range[0] <= float(value) <= rule.range[1]
    text = "" if value is None else str(value)
    return (re.search(rule.match or "", text, re.IGNORECASE) is not None) != rule.negate


def _apply(rule: SeriesRule, pool: list[dict[str, Any]], roi: RoiBox | None) -> list[dict[str, Any]]:
    """The series of ``pool`` that survive ``rule``."""
    if not pool:
        return pool
    if rule.nearest is not None:
        dist = [abs(float(v) - rule.nearest) if (v := _value(s, rule.field, roi)) is not None else np.inf
                for s in pool]
        best = min(dist)
        return [s for s, d in zip(pool, dist, strict=True) if d <= best + 1e-6]
    kept = [s for s in pool if holds(rule, s, roi)]
    return kept if kept or rule.required else pool


@dataclass
class Selection:
    """The outcome for one patient: the chosen series or the error, and for every series of
    the patient why it lost (or ``selected``, or ``TIED``)."""

    series: dict[str, Any] | None
    notes: dict[str, str]
    error: VfxError | None = None


def select(candidates: list[dict[str, Any]], rules: tuple[SeriesRule, ...], roi: RoiBox | None,
           pid: str) -> Selection:
    """Apply ``rules`` in order to one patient's series; none left is SeriesNotFound, several
    AmbiguousSeries (both name what each series lost on)."""
    notes: dict[str, str] = {}
    pool = list(candidates)
    for rule in rules:
        kept = _apply(rule, pool, roi)
        notes.update({s["series_instance_uid"]: rule.name for s in pool if s not in kept})
        pool = kept
    if len(pool) == 1:
        notes[pool[0]["series_instance_uid"]] = SELECTED
        return Selection(pool[0], notes)
    if not pool:
        why = "; ".join(f"{uid}: {note}" for uid, note in sorted(notes.items()))
        message = f"no CT series of patient {pid} in the archive passes the series rules ({why})"
        return Selection(None, notes, VfxError("annotations", message, error_type="SeriesNotFound"))
    uids = sorted(s["series_instance_uid"] for s in pool)
    notes.update(dict.fromkeys(uids, TIED))
    message = (f"patient {pid} has {len(pool)} CT series ({', '.join(uids)}) that the series rules cannot tell "
               "apart; name one in series_instance_uid")
    return Selection(None, notes, VfxError("annotations", message, error_type="AmbiguousSeries"))


def load_rules(uri: str) -> tuple[SeriesRule, ...]:
    """Rules from a JSON or YAML file: a list of :class:`SeriesRule` fields, in preference order."""
    import yaml

    text = storage.read_text(uri)
    try:
        data = json.loads(text) if uri.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise VfxError("config", f"{uri} is not valid {'JSON' if uri.endswith('.json') else 'YAML'}: {exc}") from exc
    items = data.get("rules") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise VfxError("config", f"{uri}: expected a list of rules (or {{rules: [...]}}), each with name and field")
    return tuple(_rule(item, i, uri) for i, item in enumerate(items))


def _rule(item: Any, i: int, uri: str) -> SeriesRule:
    fields = set(SeriesRule.__dataclass_fields__)
    if not isinstance(item, dict) or not {"name", "field"} <= set(item) or set(item) - fields:
        message = f"{uri}: rule {i + 1} must be a mapping with name and field, and only {sorted(fields)}"
        raise VfxError("config", message)
    tests = [k for k in ("match", "range", "nearest") if item.get(k) is not None]
    if len(tests) != 1:
        raise VfxError("config", f"{uri}: rule {i + 1} ({item['name']}) needs exactly one of match, range, nearest")
    if item.get("match") is not None:
        try:
            re.compile(item["match"])
        except re.error as exc:
            raise VfxError("config", f"{uri}: rule {i + 1} ({item['name']}): bad regular expression: {exc}") from exc
    if item.get("range") is not None:
        item = {**item, "range": tuple(float(v) for v in item["range"])}
        if len(item["range"]) != 2:
            raise VfxError("config", f"{uri}: rule {i + 1} ({item['name']}): range needs [low, high]")
    return SeriesRule(**item)
