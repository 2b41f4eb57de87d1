"""Choosing a study's series when the annotations name none: the series rules, the index
fields they read (image type, kernel, plane, extent), rules files and the CLI's check."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pydicom
import pytest
from phantoms import GEOMETRIES, PATIENT, box_hu, centred_geometry, cube, edit, series

from vfx_ray.cli import main
from vfx_ray.config import DEFAULT_SERIES_RULES, SeriesRule
from vfx_ray.errors import VfxError
from vfx_ray.imaging import annotations as ann
from vfx_ray.imaging import dicom, series_select
from vfx_ray.imaging.roi import RoiBox

ROI = RoiBox(-5.0, 5.0, -5.0, 5.0, -5.0, 5.0)  # the middle of the phantoms


def study_series(uid: str, **fields) -> dict:
    """A series-index row of an axial original bone series at 3 mm around the origin."""
    return {"series_instance_uid": uid, "patient_id": "P1", "modality": "CT", "all_have_pixel_data": True,
            "image_type": "ORIGINAL\\PRIMARY\\AXIAL", "plane": "axial", "convolution_kernel": "BONE",
            "slice_thickness": 3.0, "extent_mm": [-100, 100, -100, 100, -200, 200], "object_keys": [f"{uid}/1"],
            **fields}


CLINICAL = [  # the series of a spine CT study, as the issue describes one
    study_series("scout", image_type="ORIGINAL\\PRIMARY\\LOCALIZER", plane="coronal", slice_thickness=None),
    study_series("soft", convolution_kernel="STANDARD", slice_thickness=1.25),
    study_series("bone", slice_thickness=1.25),
    study_series("sag", image_type="DERIVED\\SECONDARY\\REFORMATTED", plane="sagittal"),
    study_series("dose", modality="SR", all_have_pixel_data=False, image_type="", plane=None),
    study_series("neck", extent_mm=[-100, 100, -100, 100, 300, 500]),  # a cervical series: no ROI in it
]


def test_the_rules_choose_the_bone_kernel_axial_series_and_say_why_each_other_lost():
    chosen = series_select.select(CLINICAL, DEFAULT_SERIES_RULES, ROI, "P1")
    assert chosen.error is None and chosen.series["series_instance_uid"] == "bone"
    assert chosen.notes == {
        "scout": "a localizer", "soft": "a soft kernel (a bone or sharp one is preferred)", "bone": "selected",
        "sag": "derived or secondary (an ORIGINAL\\PRIMARY series is preferred)", "dose": "not CT",
        "neck": "the ROI lies outside the series",
    }


def test_thickness_nearest_3_mm_breaks_a_tie_and_a_true_tie_is_ambiguous():
    thin, thick = study_series("thin", slice_thickness=0.625), study_series("thick", slice_thickness=2.5)
    assert series_select.select([thin, thick], DEFAULT_SERIES_RULES, ROI, "P1").series["series_instance_uid"] == "thick"
    twins = series_select.select([study_series("a"), study_series("b")], DEFAULT_SERIES_RULES, ROI, "P1")
    assert twins.series is None and twins.error.error_type == "AmbiguousSeries"
    assert "a, b" in twins.error.message and set(twins.notes.values()) == {series_select.TIED}


def test_no_series_left_is_series_not_found_naming_each_reason():
    chosen = series_select.select(CLINICAL[:1] + CLINICAL[4:5], DEFAULT_SERIES_RULES, ROI, "P1")
    assert chosen.error.error_type == "SeriesNotFound"
    assert "scout: a localizer" in chosen.error.message and "dose: not CT" in chosen.error.message


def test_preferences_only_narrow_and_unknown_extents_pass():
    soft_only = [study_series("soft", convolution_kernel="STANDARD")]
    assert series_select.select(soft_only, DEFAULT_SERIES_RULES, ROI, "P1").notes == {"soft": "selected"}
    enhanced = study_series("enh", extent_mm=None)  # Enhanced CT: no per-object position in the index
    assert series_select.roi_inside(enhanced, ROI) == "unknown"
    assert series_select.select([enhanced], DEFAULT_SERIES_RULES, ROI, "P1").series is enhanced
    assert series_select.roi_inside(CLINICAL[5], ROI) == "no"
    assert series_select.roi_inside(CLINICAL[2], None) == "unknown"


def test_a_range_rule_and_a_custom_rule_order():
    rules = (SeriesRule("too thick", "slice_thickness", range=(0.5, 2.0), required=True),
             SeriesRule("not a soft kernel", "convolution_kernel", match="STANDARD"))
    assert series_select.select(CLINICAL, rules, ROI, "P1").series["series_instance_uid"] == "soft"


def test_plan_tasks_uses_the_rules_and_records_every_series():
    frame = pd.DataFrame([{"patient_id": "P1", **dict(zip(ann.ROI_COLUMNS, ROI.bounds, strict=True))}])
    notes: dict[str, str] = {}
    tasks, errors = ann.plan_tasks(frame, CLINICAL, notes=notes)
    assert errors == [] and [t.series_instance_uid for t in tasks] == ["bone"]
    assert set(notes) == {s["series_instance_uid"] for s in CLINICAL} and notes["bone"] == "selected"
    named = frame.assign(series_instance_uid="soft")
    notes = {}
    tasks, _ = ann.plan_tasks(named, CLINICAL, notes=notes)
    assert [t.series_instance_uid for t in tasks] == ["soft"] and notes == {"soft": series_select.NAMED}


# ---------------------------------------------------------------- the index fields, from real headers
def headers_of(files, prefix: str) -> list[dict]:
    return [dicom.read_header(data, f"{prefix}/{name}") for name, data in files]


def test_the_index_carries_image_type_kernel_plane_and_extent_so_a_localizer_is_never_chosen():
    """The bug of issue 15: series_record dropped image_type, so a localizer stayed a candidate."""
    g = GEOMETRIES["head_first"]
    axial = edit(series(box_hu(g, [cube((0, 0, 0), 8)]), g), lambda ds, n: setattr(ds, "ConvolutionKernel", "BONE"))
    scout_uid = pydicom.uid.generate_uid(entropy_srcs=["scout"])

    def as_scout(ds, n):
        ds.SeriesInstanceUID, ds.ImageType = scout_uid, ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["scout", str(n)])

    scout = edit(axial[:1], as_scout)
    index = dicom.group_series(headers_of(axial, "s3://a/ax") + headers_of(scout, "s3://a/scout"))
    by_uid = {s["series_instance_uid"]: s for s in index}
    assert by_uid[scout_uid]["image_type"] == "ORIGINAL\\PRIMARY\\LOCALIZER"
    (uid,) = set(by_uid) - {scout_uid}
    ax = by_uid[uid]
    assert (ax["convolution_kernel"], ax["plane"]) == ("BONE", "axial")
    np.testing.assert_allclose(ax["extent_mm"], [-31.5, 31.5, -31.5, 31.5, -23.0, 23.0])  # 64 px of 1 mm, 24 of 2
    frame = pd.DataFrame([{"patient_id": PATIENT.patient_id, **dict(zip(ann.ROI_COLUMNS, ROI.bounds, strict=True))}])
    tasks, errors = ann.plan_tasks(frame, index)
    assert errors == [] and [t.series_instance_uid for t in tasks] == [uid]


OBLIQUE = ((2**-0.5, 2**-0.5, 0.0), (-(6**-0.5), 6**-0.5, 2 * 6**-0.5))  # normal (1, -1, 1)/sqrt(3)


@pytest.mark.parametrize("row, col, plane", [((1, 0, 0), (0, 1, 0), "axial"), ((0, 1, 0), (0, 0, -1), "sagittal"),
                                             ((1, 0, 0), (0, 0, -1), "coronal"), ((1, 0, 0), (0, 0.6, 0.8), "coronal"),
                                             (*OBLIQUE, "oblique")])
def test_plane_of_an_orientation(row, col, plane):
    assert dicom.plane([*row, *col]) == plane
    g = centred_geometry(row, col, (3, 8, 8))
    files = series(np.zeros((3, 8, 8), np.float32), g)
    assert dicom.group_series(headers_of(files, "k"))[0]["plane"] == plane


# ---------------------------------------------------------------- rules files
def test_rules_files_in_json_and_yaml(tmp_path):
    rules = [{"name": "thin", "field": "slice_thickness", "range": [0.5, 2], "required": True},
             {"name": "bone", "field": "convolution_kernel", "match": "BONE"}]
    (tmp_path / "r.json").write_text(json.dumps(rules))
    (tmp_path / "r.yaml").write_text(
        "rules:\n  - {name: thin, field: slice_thickness, range: [0.5, 2], required: true}\n"
        "  - {name: bone, field: convolution_kernel, match: BONE}\n"
    )
    expected = (SeriesRule("thin", "slice_thickness", range=(0.5, 2.0), required=True),
                SeriesRule("bone", "convolution_kernel", match="BONE"))
    assert series_select.load_rules(str(tmp_path / "r.json")) == expected
    assert series_select.load_rules(str(tmp_path / "r.yaml")) == expected


@pytest.mark.parametrize("text, words", [
    ("[{name: a, field: modality}]", "exactly one of match, range, nearest"),
    ("[{name: a, field: modality, match: '('}]", "bad regular expression"),
    ("[{name: a, field: modality, match: CT, weight: 2}]", "only"),
    ("{}", "expected a list of rules"),
    ("[{name: a, field: x, range: [1]}]", "range needs [low, high]"),
])
def test_bad_rules_files_are_one_clear_error(tmp_path, text, words):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(VfxError, match="r.yaml") as info:
        series_select.load_rules(str(tmp_path / "r.yaml"))
    assert words in info.value.message


def test_the_cli_refuses_a_bad_rules_file_before_any_work(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("[{name: a, field: modality}]")
    rc = main(["crops", "--archive", str(tmp_path / "nowhere"), "--annotations", str(tmp_path / "a.csv"),
               "--out", str(tmp_path / "out"), "--series-rules", str(tmp_path / "r.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "exactly one of match, range, nearest" in err
    assert not (tmp_path / "out").exists()


def test_a_dicomdir_and_a_structured_report_are_indexed_as_such_and_never_chosen(tmp_path):
    from pydicom.fileset import FileSet

    g = GEOMETRIES["head_first"]
    axial = series(box_hu(g, [cube((0, 0, 0), 8)]), g, instance_numbers=True)  # a DICOMDIR record needs them
    fileset = FileSet()
    for _, data in axial:
        fileset.add(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)))
    fileset.write(tmp_path / "media")
    dicomdir = (tmp_path / "media" / "DICOMDIR").read_bytes()

    def as_report(ds, n):
        ds.Modality, ds.SeriesInstanceUID, ds.SOPInstanceUID = "SR", "1.2.3.4", "1.2.3.4.1"
        del ds.PixelData

    report = edit(axial[:1], as_report)
    headers = headers_of(axial, "s3://a/ax") + headers_of(report, "s3://a/sr")
    headers.append(dicom.read_header(dicomdir, "s3://a/DICOMDIR"))
    assert headers[-1]["object_kind"] == "directory" and headers[-1]["series_instance_uid"] is None
    index = dicom.group_series(headers)
    kinds = {s["series_instance_uid"]: s["object_kind"] for s in index}
    assert list(kinds.values()).count("image") == 1 and kinds["1.2.3.4"] == "non-image" and kinds[None] == "directory"
    assert index[-1]["object_keys"] == ["s3://a/DICOMDIR"]  # every object is in the index
    frame = pd.DataFrame([{"patient_id": PATIENT.patient_id, **dict(zip(ann.ROI_COLUMNS, ROI.bounds, strict=True))}])
    notes: dict[str, str] = {}
    tasks, errors = ann.plan_tasks(frame, index, notes=notes)
    assert errors == [] and len(tasks) == 1 and notes["1.2.3.4"] == "not CT"
