"""Annotations: one row per patient (DESIGN.md), validated and joined to the series index.

Pure pandas: every problem becomes an errors-table row naming the patient and the reason,
and the patient is left out of the work list — never silently dropped.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import pandas as pd

from vfx_ray import storage
from vfx_ray.config import DEFAULT_SERIES_RULES, SeriesRule
from vfx_ray.errors import VfxError
from vfx_ray.imaging import series_select
from vfx_ray.imaging.roi import ROI_COLUMNS, RoiBox

REQUIRED = ["patient_id"]
STRING_COLUMNS = ("patient_id", "series_instance_uid", "label", "vertebra", "sex")  # never parsed as numbers
DEFAULT_CLASSES = ("benign", "malignant")  # label 0, label 1


@dataclass(frozen=True)
class PatientTask:
    """One patient's work for the crops and scoring pipelines."""

    patient_id: str
    series_instance_uid: str
    object_keys: list[str]  # empty where the series index is a summary (the jobs add them when needed)
    roi: tuple[float, float, float, float, float, float] | None  # x/y/z min/max, LPS mm
    label: int | None = None
    vertebra: str | None = None
    roi_mask_uri: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_annotations(uri: str, *, lenient: bool = False) -> pd.DataFrame:
    """CSV or Parquet annotations, the identifier columns as strings.

    Strict (the jobs): a patient_id column and an ROI source (the six box columns or
    roi_mask_uri) are required. Lenient (the report, which reads only patient_id and optional
    columns such as sex and age): any table with patient_id, whose ids become strings.
    """
    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        df = pd.read_parquet(io.BytesIO(data))
    else:
        df = pd.read_csv(io.BytesIO(data), dtype=dict.fromkeys(STRING_COLUMNS, str), keep_default_na=True)
    stage = "report" if lenient else "annotations"
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise VfxError(stage, f"{uri} lacks the column(s) {', '.join(missing)}")
    if lenient:
        return df.assign(patient_id=df["patient_id"].astype(str))
    has_box = all(c in df.columns for c in ROI_COLUMNS)
    if not has_box and "roi_mask_uri" not in df.columns:
        raise VfxError(
            "annotations",
            f"{uri} has neither the ROI box columns ({', '.join(ROI_COLUMNS)}) nor roi_mask_uri",
        )
    return df


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def parse_label(value: Any, classes: tuple[str, str] = DEFAULT_CLASSES) -> int | None:
    text = _text(value)
    if text is None:
        return None
    lowered = text.lower()
    names = [c.lower() for c in classes]
    if lowered in names:
        return names.index(lowered)
    raise VfxError(
        "annotations",
        f"unknown label {text!r}; expected one of {', '.join(classes)} or empty",
        error_type="UnknownLabel",
    )


def parse_roi(row: pd.Series) -> tuple[float, ...] | None:
    """The ROI box's bounds from the six columns, validated (``roi.RoiBox``); None when the row
    gives a mask instead."""
    if not all(c in row.index for c in ROI_COLUMNS):
        return None
    raw = [row[c] for c in ROI_COLUMNS]
    if all(_text(v) is None for v in raw) and _text(row.get("roi_mask_uri")):
        return None
    return RoiBox.parse(raw).bounds


BOOKKEEPING_COLUMNS = {*ROI_COLUMNS, "patient_id", "series_instance_uid", "label", "vertebra", "roi_mask_uri"}


def plan_tasks(
    annotations: pd.DataFrame,
    series_index: list[dict[str, Any]] | SeriesCatalog,
    classes: tuple[str, str] = DEFAULT_CLASSES,
    require_roi: bool = True,
    rules: tuple[SeriesRule, ...] = DEFAULT_SERIES_RULES,
    notes: dict[str, str] | None = None,
) -> tuple[list[PatientTask], list[dict[str, Any]]]:
    """Join annotations to the series index: (tasks, error rows). A row that names no series
    gets the one ``rules`` choose (:mod:`series_select`); ``notes`` (when given) learns, for
    each series of an annotated patient, whether it was chosen and why not."""
    finder = SeriesFinder(series_index, rules, notes)
    tasks: list[PatientTask] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    extra_cols = [c for c in annotations.columns if c not in BOOKKEEPING_COLUMNS]
    for i, row in annotations.iterrows():
        pid = _text(row.get("patient_id"))
        uid = _text(row.get("series_instance_uid"))
        try:
            if pid is None:
                message = f"annotation row {i + 2} has no patient_id"
                raise VfxError("annotations", message, error_type="MissingPatientId")
            if pid in seen:
                message = f"patient {pid} is annotated more than once; keep one row per patient"
                raise VfxError("annotations", message, error_type="DuplicatePatient")
            seen.add(pid)
            label = parse_label(row.get("label"), classes)
            roi = parse_roi(row)
            mask = _text(row.get("roi_mask_uri"))
            if require_roi and roi is None and mask is None:
                message = "no ROI: give the six roi_*_mm columns or roi_mask_uri"
                raise VfxError("annotations", message, error_type="BadROI")
            series = finder.find(pid, uid, None if roi is None else RoiBox(*roi))
            tasks.append(PatientTask(
                patient_id=pid, series_instance_uid=series["series_instance_uid"],
                object_keys=list(series.get("object_keys") or []), roi=roi, label=label,
                vertebra=_text(row.get("vertebra")), roi_mask_uri=mask, extra={c: row[c] for c in extra_cols},
            ))  # fmt: skip
        except VfxError as exc:
            exc.patient_id = exc.patient_id or pid
            exc.series_instance_uid = exc.series_instance_uid or uid
            errors.append(exc.row())
    return tasks, errors


class SeriesCatalog(Protocol):
    """Where the planning looks series up: a list of records (:class:`ListCatalog`) or, in
    the jobs, the archive index, which keeps its summaries compact and decodes one on demand."""

    def lookup(self, uid: str) -> dict[str, Any] | None: ...

    def of_patient(self, pid: str) -> list[dict[str, Any]]: ...


class ListCatalog:
    """A list of series records, looked up by uid and by patient (in the list's order)."""

    def __init__(self, series_index: list[dict[str, Any]]) -> None:
        self.by_uid = {s["series_instance_uid"]: s for s in series_index}
        self.by_patient: dict[str, list[dict]] = {}
        for s in series_index:
            self.by_patient.setdefault(str(s.get("patient_id")), []).append(s)

    def lookup(self, uid: str) -> dict[str, Any] | None:
        return self.by_uid.get(uid)

    def of_patient(self, pid: str) -> list[dict[str, Any]]:
        return self.by_patient.get(pid, [])


class SeriesFinder:
    """The series an annotation row means: the one it names, or the one the series rules
    choose among the patient's series."""

    def __init__(self, series_index: list[dict[str, Any]] | SeriesCatalog, rules: tuple[SeriesRule, ...],
                 notes: dict[str, str] | None = None) -> None:
        self.catalog = ListCatalog(series_index) if isinstance(series_index, list) else series_index
        self.rules, self.notes = rules, notes if notes is not None else {}

    def find(self, pid: str, uid: str | None, roi: RoiBox | None) -> dict[str, Any]:
        if uid is not None:
            series = self.catalog.lookup(uid)
            if series is None:
                raise VfxError("annotations", f"series {uid} is not in the archive", error_type="SeriesNotFound")
            if str(series.get("patient_id")) != pid:
                message = f"series {uid} belongs to patient {series.get('patient_id')}, not {pid}"
                raise VfxError("annotations", message, error_type="PatientMismatch")
            self.notes[uid] = series_select.NAMED
            return series
        candidates = self.catalog.of_patient(pid)
        if not candidates:
            raise VfxError("annotations", f"no CT series of patient {pid} in the archive", error_type="SeriesNotFound")
        chosen = series_select.select(candidates, self.rules, roi, pid)
        self.notes.update(chosen.notes)
        if chosen.error is not None:
            raise chosen.error
        return chosen.series
