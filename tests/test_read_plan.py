"""Reading and decoding only what an ROI needs (issue 16): the crops are those of the whole series.

Each case crops one phantom series three ways: the whole series decoded (the reference,
:func:`load_volume` + :func:`crop_samples`), the "whole" read plan (every object read, only the
ROI's slices decoded) and the "roi" plan (headers by ranged reads, only the ROI's objects read
whole). The pixels must be equal bit for bit, and the partial ways must really skip slices.
"""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from phantoms import GEOMETRIES, SHAPE, box_hu, cube, edit, series

from vfx_ray.config import CropConfig
from vfx_ray.imaging import geometry
from vfx_ray.imaging.dicom import load_volume, series_layout
from vfx_ray.imaging.guards import parse
from vfx_ray.imaging.roi import RoiBox
from vfx_ray.pipeline import shards, tasks
from vfx_ray.pipeline.wire import Kind
from vfx_ray.storage import FileEntry

CFG = CropConfig(crop_size=32)
CENTRE = (3.0, 5.0, 10.0)
ROI = RoiBox(-5.0, 11.0, -3.0, 13.0, 4.0, 16.0, patient_id="PHANTOM01")  # needs ~11 of 24 slices


def phantom(name: str) -> np.ndarray:
    return box_hu(GEOMETRIES[name], [cube(CENTRE, 12), cube((0, -10, 2), 6, 400)], background=-200.0)


def on_disk(files: list[tuple[str, bytes]], folder) -> tuple[list[str], list[int]]:
    keys = []
    for name, data in files:
        (folder / name).write_bytes(data)
        keys.append(str(folder / name))
    return keys, [len(d) for _, d in files]


def three_ways(files: list[tuple[str, bytes]], folder, roi: RoiBox = ROI) -> dict[str, object]:
    """Reference crops, both plans' wire rows and READS records, for one series on disk."""
    reference = geometry.crop_samples(load_volume(files, CFG), roi, CFG)
    keys, sizes = on_disk(files, folder)
    task = {"patient_id": "PHANTOM01", "series_instance_uid": "S", "object_keys": keys, "object_sizes": sizes,
            "roi": [roi.x_min, roi.x_max, roi.y_min, roi.y_max, roi.z_min, roi.z_max]}
    prefixes = sum(min(n, tasks.HEADER_PROBE_BYTES) for n in sizes)
    out = {"reference": reference, "total": sum(sizes), "prefixes": prefixes}
    for plan in ("whole", "roi"):
        rows = tasks.crop_patient({**task, "read_plan": plan}, CFG)
        out[plan] = [r for r in rows if r["kind"] == Kind.CROP]
        out[f"{plan}_reads"] = [json.loads(r["meta"]) for r in rows if r["kind"] == Kind.READS][0]
        assert not [r for r in rows if r["kind"] == Kind.ERROR], rows
    return out


def assert_same(got: dict[str, object]) -> None:
    ref = got["reference"]
    for plan in ("whole", "roi"):
        rows = got[plan]
        assert [json.loads(r["meta"])["slice_index"] for r in rows] == [c["slice_index"] for c in ref]
        for r, c in zip(rows, ref, strict=True):
            assert r["image"] == np.ascontiguousarray(c["image"], np.float32).tobytes(), plan


VARIANTS = [(g, "explicit", False) for g in sorted(GEOMETRIES)] + [
    ("oblique", codec, enhanced) for codec in ("implicit", "big_endian", "jpeg2000", "jpegls", "rle")
    for enhanced in (False, True)] + [("feet_first", "explicit", True)]


@pytest.mark.parametrize(("name", "codec", "enhanced"), VARIANTS)
def test_crops_equal_the_whole_series_crops(tmp_path, name, codec, enhanced):
    files = series(phantom(name), GEOMETRIES[name], transfer_syntax=codec, enhanced=enhanced)
    got = three_ways(files, tmp_path)
    assert_same(got)
    roi_reads, sizes = got["roi_reads"], [len(d) for _, d in files]
    assert got["whole_reads"]["bytes_read"] == got["total"] and got["whole_reads"]["objects_read_whole"] == len(files)
    if enhanced:  # one object holds every frame: it is read whole; only the ROI's frames are decoded
        assert roi_reads["objects_read_whole"] == 1
    elif min(sizes) > tasks.HEADER_PROBE_BYTES:  # a header prefix of each object, then the ROI's whole
        assert 11 <= roi_reads["objects_read_whole"] <= 13
        assert roi_reads["bytes_read"] == got["prefixes"] + roi_reads["bytes_needed"]
        assert roi_reads["bytes_needed"] <= 13 / 24 * got["total"]
    else:  # compressed objects shorter than the probe: the probe read them whole, once
        assert roi_reads["bytes_read"] == got["total"]

def test_only_the_rois_slices_are_decoded():
    files = series(phantom("head_first"), GEOMETRIES["head_first"])
    parsed = [parse(d, k, "decode", CFG.max_file_bytes) for k, d in files]
    layout = series_layout([k for k, _ in files], parsed, CFG)
    k0, k1 = geometry.slices_needed(layout, ROI, CFG)
    # the crop box is z 2..18 mm (the ROI's square); slices lie at z = -23 + 2k, so k 12.5..20.5,
    # and the sub-image the crops resample takes one slice more below and two above: k 11..22
    assert (k0, k1) == (11, 23)
    assert len(layout.files(k0, k1)) == k1 - k0


def test_uneven_spacing_and_gantry_tilt_give_the_same_crops(tmp_path):
    g = GEOMETRIES["head_first"]
    k = np.arange(SHAPE[0])
    t = g.origin[2] + 2.0 * k + np.where(k >= 12, 0.6, 0.0)  # one 2.6 mm step: resampled
    shear = np.array(g.col_cosine) * 0.35  # 10 degree gantry tilt

    def move(ds: pydicom.Dataset, _: int) -> None:
        p = np.array(ds.ImagePositionPatient, float)
        n = round((p[2] - g.origin[2]) / 2.0)
        ds.ImagePositionPatient = [*(p[:2] + n * shear[:2]), t[n] + n * shear[2]]

    files = edit(series(phantom("head_first"), g), move)
    (tmp_path / "a").mkdir()
    assert_same(three_ways(files, tmp_path / "a"))
    (tmp_path / "b").mkdir()
    edge = RoiBox(-5.0, 11.0, -3.0, 13.0, 16.0, 26.0, patient_id="PHANTOM01")  # beyond the last slice
    assert_same(three_ways(files, tmp_path / "b", edge))


def test_an_roi_outside_the_series_is_the_same_error_either_way(tmp_path):
    files = series(phantom("head_first"), GEOMETRIES["head_first"])
    keys, sizes = on_disk(files, tmp_path)
    far = [-5.0, 11.0, -3.0, 13.0, 200.0, 210.0]
    for plan in ("whole", "roi"):
        rows = tasks.crop_patient({"patient_id": "P", "series_instance_uid": "S", "object_keys": keys,
                                   "object_sizes": sizes, "roi": far, "read_plan": plan}, CFG)
        errors = [json.loads(r["meta"]) for r in rows if r["kind"] == Kind.ERROR]
        assert [e["error_type"] for e in errors] == ["RoiOutside"], plan


def test_a_corrupt_object_the_roi_needs_is_an_error_row_naming_it(tmp_path):
    files = series(phantom("head_first"), GEOMETRIES["head_first"])
    keys, sizes = on_disk(files, tmp_path)
    parsed = [parse(d, k, "decode", CFG.max_file_bytes) for k, d in zip(keys, [d for _, d in files], strict=True)]
    layout = series_layout(keys, parsed, CFG)
    needed = layout.keys[layout.files(*geometry.slices_needed(layout, ROI, CFG))[0]]
    with open(needed, "r+b") as f:  # cut the pixel data short
        f.truncate(sizes[keys.index(needed)] - 500)
    task = {"patient_id": "P", "series_instance_uid": "S", "object_keys": keys, "object_sizes": sizes,
            "roi": [ROI.x_min, ROI.x_max, ROI.y_min, ROI.y_max, ROI.z_min, ROI.z_max], "read_plan": "roi"}
    errors = [json.loads(r["meta"]) for r in tasks.crop_patient(task, CFG) if r["kind"] == Kind.ERROR]
    assert len(errors) == 1 and errors[0]["object_key"] == needed and errors[0]["patient_id"] == "P"


def test_the_plan_is_chosen_per_study_folder_by_its_bytes():
    small = [FileEntry(f"s3://b/arch/a/s1/{i}.dcm", 128 << 10) for i in range(40)]  # 5 MiB: one small series
    study = [FileEntry(f"s3://b/arch/b/s1/{i:03d}.dcm", 512 << 10) for i in range(200)]  # a clinical study:
    study += [FileEntry(f"s3://b/arch/b/s2/{i}.dcm", 512 << 10) for i in range(20)]  # its small reformat too
    items = shards.chunks_of(small + study, "s3://b/arch")
    plans: dict[str, set[str]] = {}
    for i in items:
        plans.setdefault(i["plan"], set()).update("/".join(u.split("/")[4:6]) for u in i["uris"])
    assert plans == {"whole": {"a/s1"}, "roi": {"b/s1", "b/s2"}}
    forced = shards.chunks_of(small + study, "s3://b/arch", cfg=CropConfig(read_plan="whole"))
    assert {i["plan"] for i in forced} == {"whole"}
    assert all(len(i["sizes"]) == len(i["uris"]) for i in items)


MEASURE = """
import json, sys
from vfx_ray.config import CropConfig
from vfx_ray.pipeline import tasks
rows = tasks.crop_patient(json.load(open(sys.argv[1])), CropConfig())
# VmHWM: this process's peak RSS (ru_maxrss would keep the forking parent's peak across exec)
peak = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")][0] / 1024
print(json.dumps({"kinds": [r["kind"] for r in rows], "peak_rss_mb": peak}))
"""


@pytest.mark.slow
def test_a_720_slice_512_series_crops_in_under_1_gb(tmp_path):
    """The issue's memory bound: one task cropping a 0.625 mm thoracolumbar series (720 x 512², 360 MiB)."""
    import subprocess
    import sys

    from phantoms import centred_geometry

    g = centred_geometry((1, 0, 0), (0, 1, 0), shape=(720, 512, 512), pixel_mm=0.7, slice_mm=0.625)
    hu = np.full((720, 512, 512), -1000, np.int16)
    hu[:, 180:330, 200:310] = 250  # a vertebral column
    files = series(hu, g)
    del hu
    keys, sizes = on_disk(files, tmp_path)
    del files
    roi = [-20.0, 20.0, -25.0, 15.0, -10.0, 25.0]
    peaks = {}
    for plan in ("roi", "whole"):
        task = tmp_path / f"{plan}.json"
        task.write_text(json.dumps({"patient_id": "P", "series_instance_uid": "S", "object_keys": keys,
                                    "object_sizes": sizes, "roi": roi, "read_plan": plan}))
        out = subprocess.run([sys.executable, "-c", MEASURE, str(task)], capture_output=True, text=True, check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["kinds"].count(Kind.CROP) >= 3 and Kind.ERROR not in got["kinds"], got
        peaks[plan] = got["peak_rss_mb"]
    print(f"peak RSS of one task: {peaks}")
    assert peaks["roi"] < 1024
