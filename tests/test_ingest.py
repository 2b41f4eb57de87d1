"""The crops job on Ray Data: a corpus of good and bad studies, S3 vs local, codecs.

One archive holds good patients, lossless re-encodings of one of them, and one patient or
object per bad-input case. The job must finish, give each bad case its error row, and give
the good patients exactly the crops the pure functions give in-process.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import typing
import uuid

import numpy as np
import pandas as pd
import pydicom
import pytest
from phantoms import edit

from vfx_ray import contracts, storage
from vfx_ray.config import CropConfig, SynthConfig
from vfx_ray.imaging import dicom, geometry
from vfx_ray.imaging.roi import RoiBox
from vfx_ray.pipeline import tasks
from vfx_ray.stages.crops import run_crops
from vfx_ray.synth.cohort import plan_cohort
from vfx_ray.synth.patient import patient_files

CFG = CropConfig(max_file_bytes=4 * 1024 * 1024)
SPECS = plan_cohort(SynthConfig(patients=3, matrix=128, seed=7))


def variant(files, row, pid, fn=None, only=None, **row_changes):
    """The same study as another patient (new PatientID / UIDs), optionally edited."""
    uid = pydicom.uid.generate_uid(entropy_srcs=[pid])

    def change(ds, n):
        ds.PatientID = pid
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[pid, str(n)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if fn is not None and (only is None or n in only):
            fn(ds, n)

    return edit(files, change), {**row, "patient_id": pid, "series_instance_uid": uid, **row_changes}


def middle_sorted(files):
    """Indices of the files in slice order (files are stored shuffled)."""
    z = [float(pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True).ImagePositionPatient[2]) for _, d in files]
    return list(np.argsort(z))


def write_archive(root: str, studies: dict[str, list[tuple[str, bytes]]]) -> None:
    for pid, files in studies.items():
        for name, data in files:
            storage.write_bytes(storage.join(root, pid, name), data)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    archive, outside = str(base / "archive"), base / "outside.dcm"
    studies, rows, expected_errors = {}, [], {}
    good = []
    for spec in SPECS:
        files, row = patient_files(spec)
        studies[spec.patient_id] = files
        rows.append(row)
        good.append((files, row))
    g_files, g_row = good[0]
    for codec in ("jpeg2000", "jpegls", "rle"):
        spec = dataclasses.replace(SPECS[0], patient_id=f"ENC_{codec}", transfer_syntax=codec)
        files, row = patient_files(spec)
        studies[spec.patient_id] = files
        rows.append({**g_row, "patient_id": spec.patient_id, "series_instance_uid": row["series_instance_uid"]})
    order = middle_sorted(g_files)
    mid = order[len(order) // 2]

    def bad(pid, error_type, stage, fn=None, only=None, keep=None, **row_changes):
        files, row = variant(g_files, g_row, pid, fn, only, **row_changes)
        if keep is not None:
            files = [f for i, f in enumerate(files) if i in keep]
        studies[pid] = files
        rows.append(row)
        expected_errors[pid] = (stage, error_type)
        return files

    def drop_pixels(ds, n):
        del ds.PixelData

    def set_(attr, value):
        return lambda ds, n: setattr(ds, attr, value)

    bad("BAD_NOPIX", "NoPixelData", "decode", drop_pixels)
    bad("BAD_MR", "NotCT", "decode", set_("Modality", "MR"))
    bad("BAD_SINGLE", "TooFewSlices", "geometry", keep={mid})
    bad("BAD_ORIENT", "MixedOrientation", "geometry", set_("ImageOrientationPatient", [1, 0, 0, 0, 0, -1]), only={mid})
    bad("BAD_SPACING", "MixedSpacing", "geometry", set_("PixelSpacing", [1.5, 1.5]), only={mid})
    twin = order[len(order) // 2 + 1]
    dup_pos = pydicom.dcmread(io.BytesIO(g_files[twin][1]), stop_before_pixels=True).ImagePositionPatient
    bad("BAD_DUP", "DuplicatePosition", "geometry", set_("ImagePositionPatient", dup_pos), only={mid})
    bad("BAD_GAP", "SliceGap", "geometry", keep=set(range(len(g_files))) - {mid, twin})
    bad("BAD_ROI", "RoiOutside", "crop", roi_x_min_mm=900.0, roi_x_max_mm=910.0)
    # a truncated object: its header row names the object, its patient fails on the gap
    trunc = bad("BAD_TRUNC", "SliceGap", "geometry")
    name, data = trunc[mid]
    trunc[mid] = (name, data[: len(data) // 2])
    # annotation-only problems
    for pid, etype, changes in [
        ("BAD_NAN", "BadROI", {"roi_y_min_mm": float("nan")}),
        ("BAD_MINMAX", "BadROI", {"roi_z_min_mm": 1e4}),
        ("BAD_LABEL", "UnknownLabel", {"label": "metastatic?"}),
        ("BAD_NOSERIES", "SeriesNotFound", {"series_instance_uid": "1.2.3.999"}),
    ]:
        bad(pid, etype, "annotations", **changes)
    # two CT series, no series given
    files_a, _ = variant(g_files, g_row, "BAD_TWO")
    files_b, _ = variant(g_files, g_row, "BAD_TWO_B", set_("PatientID", "BAD_TWO"))
    studies["BAD_TWO"] = files_a + [(f"b_{n}", d) for n, d in files_b]
    rows.append({**g_row, "patient_id": "BAD_TWO", "series_instance_uid": None})
    expected_errors["BAD_TWO"] = ("annotations", "AmbiguousSeries")
    write_archive(archive, studies)
    # objects that fail before any patient is known
    storage.write_bytes(storage.join(archive, "notes", "README.txt"), b"not a DICOM file")
    storage.write_bytes(storage.join(archive, "junk", "huge.dcm"), b"\0" * (CFG.max_file_bytes + 1))
    outside.write_bytes(g_files[0][1])
    os.symlink(outside, os.path.join(archive, "junk", "link.dcm"))
    ann_uri = str(base / "annotations.csv")
    pd.DataFrame(rows).to_csv(ann_uri, index=False)
    return {
        "archive": archive,
        "annotations": ann_uri,
        "expected": expected_errors,
        "good": good,
        "trunc": f"{archive}/BAD_TRUNC/{name}",
        "base": base,
    }


@pytest.fixture(scope="module")
def crops_run(corpus, ray_session):
    out = str(corpus["base"] / "out")
    summary = run_crops(corpus["archive"], corpus["annotations"], out, CFG, progress=False)
    crops = storage.read_table(storage.join(out, "crops.parquet"))
    errors = storage.read_table(storage.join(out, "errors.parquet")).to_pandas()
    return summary, crops, errors, out


def expected_crops(files, row):
    volume = dicom.load_volume(files, CFG)
    return geometry.crop_samples(volume, RoiBox.from_record(row), CFG)


def assert_same_output(crops, errors, out: str) -> None:
    """The crops (pixels too) and error rows of the run in ``out`` are those given."""
    other = storage.read_table(storage.join(out, "crops.parquet"))
    key = ["patient_id", "slice_index"]
    a = crops.to_pandas().sort_values(key).reset_index(drop=True)
    b = other.to_pandas().sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a.drop(columns=["image"]), b.drop(columns=["image"]))
    np.testing.assert_array_equal(np.stack(a["image"].map(np.asarray)), np.stack(b["image"].map(np.asarray)))
    cols = ["patient_id", "object_key", "stage", "error_type"]
    e2 = storage.read_table(storage.join(out, "errors.parquet")).to_pandas()
    assert sorted(map(tuple, errors[cols].fillna("").values)) == sorted(map(tuple, e2[cols].fillna("").values))


@pytest.mark.slow
def test_every_bad_case_has_its_error_row(corpus, crops_run):
    _, crops, errors, _ = crops_run
    by_patient = errors.dropna(subset=["patient_id"]).set_index("patient_id")
    for pid, (stage, etype) in corpus["expected"].items():
        assert pid in by_patient.index, f"{pid}: no error row"
        got = by_patient.loc[[pid]]
        assert (got["stage"] == stage).any() and (got["error_type"] == etype).any(), (pid, got.to_dict("records"))
        assert got["message"].str.len().min() > 10
    assert not set(corpus["expected"]) & set(crops["patient_id"].to_pylist()), "a bad patient produced crops"
    objects = errors.set_index("object_key")
    assert objects.loc[corpus["trunc"], "error_type"] == "Truncated"
    assert objects.loc[f"{corpus['archive']}/notes/README.txt", "error_type"] == "NotDicom"
    assert objects.loc[f"{corpus['archive']}/junk/huge.dcm", "error_type"] == "FileTooLarge"
    assert objects.loc[f"{corpus['archive']}/junk/link.dcm", "error_type"] == "KeyEscapesPrefix"


@pytest.mark.slow
def test_good_patients_get_exactly_the_pure_crops(corpus, crops_run):
    summary, crops, _, out = crops_run
    images = contracts.images_from_arrow(crops["image"])
    meta = crops.drop(["image"]).to_pandas()
    for files, row in corpus["good"]:
        want = expected_crops(files, row)
        mine = meta.index[meta["patient_id"] == row["patient_id"]]
        assert 3 <= len(mine) <= 5
        assert meta.loc[mine, "slice_index"].tolist() == [w["slice_index"] for w in want]
        np.testing.assert_array_equal(images[mine], np.stack([w["image"] for w in want]))
        assert set(meta.loc[mine, "label"]) == {1 if row["label"] == "malignant" else 0}
    assert summary["patients_with_crops"] == len(corpus["good"]) + 3
    assert json.loads(storage.read_text(storage.join(out, "manifest.json"))).keys() == summary.keys()
    assert list(summary) == list(typing.get_type_hints(contracts.CropsSummary))  # the manifest's typed row
    index = storage.read_table(storage.join(out, "series_index.parquet")).to_pandas()
    assert {
        "series_instance_uid",
        "patient_id",
        "modality",
        "object_keys",
        "instance_count",
        "transfer_syntax_uid",
    } <= set(index.columns)


@pytest.mark.slow
def test_lossless_codecs_give_the_same_crops(crops_run):
    _, crops, _, _ = crops_run
    images = contracts.images_from_arrow(crops["image"])
    pids = np.array(crops["patient_id"].to_pylist())
    ref = images[pids == SPECS[0].patient_id]
    for codec in ("jpeg2000", "jpegls", "rle"):
        np.testing.assert_array_equal(images[pids == f"ENC_{codec}"], ref, err_msg=codec)


@pytest.mark.slow
def test_s3_archive_gives_identical_crops(corpus, crops_run, objectstore_server):
    """The good patients uploaded to the embedded S3 store, crops written back to S3."""
    _, local_crops, _, _ = crops_run
    prefix = f"s3://vfx/{uuid.uuid4().hex}"
    rows = []
    for files, row in corpus["good"]:
        write_archive(f"{prefix}/dicom", {row["patient_id"]: files})
        rows.append(row)
    ann_uri = f"{prefix}/annotations.csv"
    storage.write_text(ann_uri, pd.DataFrame(rows).to_csv(index=False))
    summary = run_crops(f"{prefix}/dicom", ann_uri, f"{prefix}/crops", CFG, progress=False)
    assert summary["errors"] == 0
    s3_crops = storage.read_table(f"{prefix}/crops/crops.parquet")
    good = {r["patient_id"] for _, r in corpus["good"]}
    local = local_crops.filter(pd.Series(local_crops["patient_id"].to_pylist()).isin(good).to_numpy())
    assert s3_crops.drop(["image"]).equals(local.drop(["image"]))
    np.testing.assert_array_equal(
        contracts.images_from_arrow(s3_crops["image"]), contracts.images_from_arrow(local["image"])
    )


@pytest.mark.slow
def test_one_pass_reads_good_patients_once_and_the_second_pass_agrees(corpus, crops_run, monkeypatch):
    """Series found whole in a chunk are cropped from the first read; cut every folder into
    chunks of 5 objects and every patient takes the second pass: same crops, same errors."""
    summary, crops, errors, _ = crops_run
    assert summary["patients_read_once"] >= len(corpus["good"]) + 3, summary
    monkeypatch.setattr(tasks, "CHUNK_OBJECTS", 5)
    out = str(corpus["base"] / "out-second-pass")
    again = run_crops(corpus["archive"], corpus["annotations"], out, CFG, progress=False)
    # only tiny bad series (a handful of objects) still fit a chunk; every good one is cut
    assert again["patients_second_pass"] >= summary["patients_with_crops"], again
    assert again["patients_read_once"] + again["patients_second_pass"] == summary["patients_planned"], again
    assert_same_output(crops, errors, out)




@pytest.mark.slow
def test_the_roi_read_plan_gives_the_same_crops_and_errors(corpus, crops_run):
    """Every header by a ranged read, then only the objects the ROIs need: the same crops and
    error rows as reading every object whole, and reads.parquet says so patient by patient."""
    summary, crops, errors, out_whole = crops_run
    out = str(corpus["base"] / "out-roi")
    again = run_crops(corpus["archive"], corpus["annotations"], out, dataclasses.replace(CFG, read_plan="roi"),
                      progress=False)
    assert_same_output(crops, errors, out)
    whole = storage.read_table(storage.join(out_whole, "reads.parquet")).to_pandas().set_index("patient_id")
    roi = storage.read_table(storage.join(out, "reads.parquet")).to_pandas().set_index("patient_id")
    good = [row["patient_id"] for _, row in corpus["good"]]
    assert set(whole.loc[good, "plan"]) == {"whole"} and set(roi.loc[good, "plan"]) == {"roi"}
    assert (roi.loc[good, "bytes_read"] < whole.loc[good, "bytes_read"]).all()
    assert (roi.loc[good, "bytes_needed"] == whole.loc[good, "bytes_needed"]).all()
    assert (roi.loc[good, "objects_read_whole"] < whole.loc[good, "objects_read_whole"]).all()
    assert again["reads"]["patients_per_plan"] == {"roi": len(roi)}
    assert again["reads"]["bytes_read"] == int(roi["bytes_read"].sum())
