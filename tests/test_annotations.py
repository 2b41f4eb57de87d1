"""Annotation validation and the join to the series index: every problem is an error row."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from vfx_ray.errors import VfxError
from vfx_ray.imaging import annotations as ann

BOX = dict(
    roi_x_min_mm=-6.0, roi_x_max_mm=6.0, roi_y_min_mm=10.0, roi_y_max_mm=40.0, roi_z_min_mm=-20.0, roi_z_max_mm=10.0
)


def series(uid: str, pid: str, modality: str = "CT") -> dict:
    return {
        "series_instance_uid": uid,
        "patient_id": pid,
        "modality": modality,
        "object_keys": [f"{uid}/a.dcm", f"{uid}/b.dcm"],
    }


INDEX = [
    series("1.1", "P1"),
    {**series("1.9", "P1"), "image_type": "ORIGINAL\\PRIMARY\\LOCALIZER"},  # scout: never a candidate
    series("2.1", "P2"),
    series("3.1", "P3"),
    series("3.2", "P3"),
    series("4.1", "P4", "MR"),
]


def frame(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame([{**BOX, "series_instance_uid": None, "label": "benign", **r} for r in rows])


def test_good_rows_become_tasks_with_series_resolved():
    tasks, errors = ann.plan_tasks(
        frame({"patient_id": "P1", "label": "Malignant"}, {"patient_id": "P3", "series_instance_uid": "3.2"}), INDEX
    )
    assert errors == []
    assert [(t.patient_id, t.series_instance_uid, t.label) for t in tasks] == [("P1", "1.1", 1), ("P3", "3.2", 0)]
    assert tasks[0].object_keys == ["1.1/a.dcm", "1.1/b.dcm"]
    assert tasks[0].roi == (-6.0, 6.0, 10.0, 40.0, -20.0, 10.0)


@pytest.mark.parametrize(
    "row, error_type, words",
    [
        ({"patient_id": "P9"}, "SeriesNotFound", "no CT series of patient P9"),
        ({"patient_id": "P1", "series_instance_uid": "9.9"}, "SeriesNotFound", "series 9.9 is not in the archive"),
        ({"patient_id": "P1", "series_instance_uid": "2.1"}, "PatientMismatch", "belongs to patient P2"),
        ({"patient_id": "P3"}, "AmbiguousSeries", "has 2 CT series"),
        ({"patient_id": "P4"}, "SeriesNotFound", "no CT series"),  # only an MR series
        ({"patient_id": "P1", "roi_x_min_mm": math.nan}, "BadROI", "roi_x_min_mm"),
        ({"patient_id": "P1", "roi_z_min_mm": 30.0}, "BadROI", "roi_z_min_mm=30.0 > roi_z_max_mm=10.0"),
        ({"patient_id": "P1", "roi_y_max_mm": "abc"}, "BadROI", "not numbers"),
        ({"patient_id": "P1", "label": "maybe"}, "UnknownLabel", "unknown label 'maybe'"),
        ({"patient_id": None}, "MissingPatientId", "no patient_id"),
    ],
)
def test_each_bad_row_is_one_error_and_the_rest_survive(row, error_type, words):
    tasks, errors = ann.plan_tasks(frame(row, {"patient_id": "P2"}), INDEX)
    assert [t.patient_id for t in tasks] == ["P2"]
    assert len(errors) == 1
    err = errors[0]
    assert err["stage"] == "annotations" and err["error_type"] == error_type
    assert words in err["message"]
    assert err["patient_id"] == row["patient_id"]


def test_duplicate_patient_rows_keep_the_first():
    tasks, errors = ann.plan_tasks(frame({"patient_id": "P1"}, {"patient_id": "P1", "label": "malignant"}), INDEX)
    assert [(t.patient_id, t.label) for t in tasks] == [("P1", 0)]
    assert errors[0]["error_type"] == "DuplicatePatient"


def test_empty_label_is_allowed_for_scoring_and_custom_class_names():
    tasks, errors = ann.plan_tasks(
        frame({"patient_id": "P1", "label": None}, {"patient_id": "P2", "label": "osteoporotic"}),
        INDEX,
        classes=("osteoporotic", "metastatic"),
    )
    assert errors == [] and [t.label for t in tasks] == [None, 0]


def test_read_annotations_needs_a_roi_source(tmp_path):
    path = tmp_path / "a.csv"
    pd.DataFrame({"patient_id": ["P1"], "label": ["benign"]}).to_csv(path, index=False)
    with pytest.raises(VfxError, match="neither the ROI box columns"):
        ann.read_annotations(str(path))
    frame({"patient_id": "007"}).to_csv(path, index=False)
    df = ann.read_annotations(str(path))
    assert df["patient_id"].tolist() == ["007"]  # identifiers stay strings (leading zeros kept)


def test_the_reports_lenient_read_needs_only_patient_ids(tmp_path):
    """One reader for jobs and report: the report's tables carry no ROI, and ids become strings."""
    path = tmp_path / "a.parquet"
    pd.DataFrame({"patient_id": [7, 8], "sex": ["M", "F"], "age": [61, 70]}).to_parquet(path)
    with pytest.raises(VfxError, match="neither the ROI box columns"):
        ann.read_annotations(str(path))
    df = ann.read_annotations(str(path), lenient=True)
    assert df["patient_id"].tolist() == ["7", "8"] and df["age"].tolist() == [61, 70]
    pd.DataFrame({"label": ["benign"]}).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(VfxError, match="lacks the column") as err:
        ann.read_annotations(str(tmp_path / "b.csv"), lenient=True)
    assert err.value.stage == "report"
