"""Synthetic cohort: anatomy in HU, the six lesion features, ROI boxes, geometry, the archive."""

from __future__ import annotations

import io
import os
from dataclasses import replace

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk

from vfx_ray.config import EASY, SynthConfig
from vfx_ray.paper import FEATURES
from vfx_ray.synth.anatomy import AIR_HU, anatomy_hu, build_spine
from vfx_ray.synth.cohort import COLUMNS, generate_cohort, plan_cohort
from vfx_ray.synth.dicom_writer import PatientInfo, voxel_lps, write_series
from vfx_ray.synth.patient import make_patient, patient_files, patient_model, with_features

# The lesion and anatomy model at full strength, without texture or mimics (which would blur the
# point-by-point checks below); the paper preset's settings are tested in test_synth_difficulty.
SMALL = SynthConfig(patients=16, seed=11, matrix=96, pixel_spacing_mm=(0.8, 0.9), difficulty=EASY)
ALL_ON = dict.fromkeys(FEATURES, True)
ALL_OFF = dict.fromkeys(FEATURES, False)
CONTRACT = ["patient_id", "series_instance_uid", "label", "vertebra", "roi_x_min_mm",
            "roi_x_max_mm", "roi_y_min_mm", "roi_y_max_mm", "roi_z_min_mm", "roi_z_max_mm",
            "age", "sex", *FEATURES]


@pytest.fixture(scope="module")
def specs():
    return plan_cohort(SMALL)


def _hu(model, x, y, z):
    x, y, z = np.broadcast_arrays(*(np.asarray(a, np.float32) for a in (x, y, z)))
    return model.hu_at(x, y, z)


def _grid(box, pad=(20.0, 25.0, 45.0), step=0.75):
    axes = [np.arange(lo - p, hi + p, step, dtype=np.float32)
            for lo, hi, p in zip(box[0::2], box[1::2], pad, strict=True)]
    return np.meshgrid(*axes, indexing="ij")


def _in_box(pts, box, tol=1e-3):
    x, y, z = pts
    return ((x >= box[0] - tol) & (x <= box[1] + tol) & (y >= box[2] - tol) & (y <= box[3] + tol)
            & (z >= box[4] - tol) & (z <= box[5] + tol))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tissue_hu_at_known_points(seed):
    s = build_spine(np.random.default_rng(seed), 5)
    v, below = s.vertebrae[2], s.vertebrae[3]
    disc_z = (v.zc - v.height / 2 + below.zc + below.height / 2) / 2
    ax_max, ay_max = max(u.ax for u in s.vertebrae), max(u.ay for u in s.vertebrae)
    points = {  # name: ((x, y, z), (lo, hi))
        "cortex": ((0.0, s.cy - v.ay + s.cortex_mm / 2, v.zc), (700, 1000)),
        "endplate": ((0.0, s.cy, v.zc + v.height / 2 - s.endplate_mm / 2), (700, 1000)),
        "cancellous": ((0.0, s.cy, v.zc), (150, 300)),
        "disc": ((0.0, s.cy, disc_z), (70, 100)),
        "psoas": ((ax_max + 12.0, s.cy + 2.0, v.zc), (40, 60)),
        "erector": ((-23.0, s.canal_cy + 30.0, disc_z), (40, 60)),
        "fat": ((0.0, s.cy - ay_max - 20.0, v.zc), (-100, -80)),
        "canal": ((0.0, s.canal_cy, disc_z), (10, 35)),
        "spinous": ((0.0, s.canal_cy + s.canal_r + 12.0, v.zc - 3.0), (400, 650)),
        "air_front": ((0.0, s.outline_cy - s.outline_ay - 5.0, v.zc), (AIR_HU, AIR_HU)),
        "air_side": ((s.outline_ax + 5.0, s.outline_cy, v.zc), (AIR_HU, AIR_HU)),
    }
    for name, ((x, y, z), (lo, hi)) in points.items():
        hu = float(anatomy_hu(np.array([x]), np.array([y]), np.array([z]), s)[0])
        assert lo <= hu <= hi, (name, hu)


def test_anatomy_is_anterior_of_the_canal_and_along_z():
    s = build_spine(np.random.default_rng(5), 6)
    assert s.canal_cy > s.cy + max(v.ay for v in s.vertebrae)  # body anterior (smaller y)
    zs = [v.zc for v in s.vertebrae]
    assert zs == sorted(zs, reverse=True)  # superior to inferior
    assert len(s.named) == 6 and all(v.name[0] in "TLS" for v in s.named)


def test_volume_noise_and_tissue_in_the_written_grid(specs):
    spec = specs[0]
    clean, geometry, _ = make_patient(spec, noise=False)
    noisy, _, _ = make_patient(spec)
    assert 10.0 <= float(np.std(noisy - clean)) <= 20.0
    model = patient_model(spec)
    centres = voxel_lps(geometry, clean.shape)
    for v in model.spine.named:  # cancellous centre of each body, where the grid holds it
        if abs(v.zc - model.spine.vertebrae[model.lesion.target].zc) < 1:
            continue
        d = np.linalg.norm(centres - np.array([0.0, model.spine.cy, v.zc]), axis=-1)
        idx = np.unravel_index(np.argmin(d), d.shape)
        if d[idx] < 1.0:
            assert 150 <= clean[idx] <= 300, (v.name, clean[idx])


@pytest.mark.parametrize("index", range(6))
def test_roi_box_encloses_the_lesion_and_lies_in_the_volume(specs, index):
    spec = specs[index]
    if index % 2:
        spec = replace(spec, patient_position="FFS", oblique_deg=-12.0 if index == 3 else 0.0)
    on = patient_model(with_features(spec, **{**ALL_ON, "multiple_segments": False}))
    off = patient_model(with_features(spec, **ALL_OFF))
    box = on.box
    pts = _grid(box)
    changed = np.abs(_hu(on, *pts) - _hu(off, *pts)) > 1e-3
    assert changed.sum() > 500
    assert np.all(_in_box(pts, box)[changed])
    # tight: the lesion reaches every face of the box but one (posterior wall is optional)
    for axis, (lo, hi) in enumerate(zip(box[0::2], box[1::2], strict=True)):
        got = pts[axis][changed]
        assert got.max() - got.min() > 0.7 * (hi - lo), axis
    assert 9.0 <= box[1] - box[0] <= 15.0  # 3-5 sagittal 3 mm slices
    # inside the volume: every corner maps to voxel indices within the grid
    g, n = on.geometry, on.n_slices
    rel = np.array([[x, y, z] for x in box[:2] for y in box[2:4] for z in box[4:]]) - g.origin
    k = rel @ g.normal / g.slice_spacing
    i = rel @ np.asarray(g.col_cosine) / g.pixel_spacing[0]
    j = rel @ np.asarray(g.row_cosine) / g.pixel_spacing[1]
    assert k.min() >= 0 and k.max() <= n - 1
    assert i.min() >= 0 and i.max() <= spec.matrix - 1 and j.min() >= 0 and j.max() <= spec.matrix - 1


def test_multiple_segments_changes_a_neighbour_outside_the_box(specs):
    spec = specs[2]
    one = patient_model(with_features(spec, **{**ALL_OFF, "compression": True}))
    two = patient_model(with_features(spec, **{**ALL_OFF, "compression": True,
                                               "multiple_segments": True}))
    pts = _grid(two.box, pad=(5.0, 5.0, 60.0))
    changed = np.abs(_hu(two, *pts) - _hu(one, *pts)) > 1e-3
    assert changed.sum() > 200 and not np.any(_in_box(pts, two.box)[changed])
    neighbour = two.spine.vertebrae[two.lesion.neighbour]
    assert np.all(np.abs(pts[2][changed] - neighbour.zc) <= neighbour.height / 2 + 1e-3)


def _body_height(model, index, x):
    """Height (mm) of bone (> 120 HU) along a vertical line through the body centre at x."""
    v = model.spine.vertebrae[index]
    z = np.arange(v.zc - v.height / 2 - 4, v.zc + v.height / 2 + 4, 0.1, dtype=np.float32)
    return float((_hu(model, x, model.spine.cy, z) > 120).sum() * 0.1)


def test_compression_loses_over_20_percent_vs_neighbours_and_fades_laterally(specs):
    for spec in specs[:4]:
        m = patient_model(with_features(spec, **{**ALL_OFF, "compression": True}))
        t, lz = m.lesion.target, m.lesion
        xc = (lz.x_min + lz.x_max) / 2
        neighbours = (_body_height(m, t - 1, xc) + _body_height(m, t + 1, xc)) / 2
        assert _body_height(m, t, xc) < 0.8 * neighbours
        edge = _body_height(m, t, lz.x_min + 0.15 * lz.taper_mm)
        outside = _body_height(m, t, lz.x_min - 1.0)
        assert _body_height(m, t, xc) < edge < outside  # partial volume toward the edge
        assert outside == pytest.approx(m.spine.vertebrae[t].height, abs=0.3)


def test_each_feature_has_its_own_signature(specs):
    spec = specs[4]
    off = patient_model(with_features(spec, **ALL_OFF))
    m = patient_model(with_features(spec, **{**ALL_OFF, "soft_tissue_mass": True,
                                             "transverse_fracture_line": True,
                                             "cortex_interruption": True,
                                             "bone_destruction": True}))
    s, lz, v = m.spine, m.lesion, m.spine.vertebrae[m.lesion.target]
    xc = (lz.x_min + lz.x_max) / 2

    def both(x, y, z):
        return float(_hu(m, [x], [y], [z])[0]), float(_hu(off, [x], [y], [z])[0])

    mass, fat = both(xc, s.cy - v.ay - lz.mass_depth / 2, lz.mass_zc)
    assert 35 <= mass <= 55 and fat < -50
    line, bone = both(xc, s.cy + 0.5 * v.ay, lz.line_z)  # behind any destruction
    assert 650 <= line <= 850 and 150 <= bone <= 300
    wall_y = s.cy - v.ay + s.cortex_mm / 2 if lz.gap_wall == "anterior" else s.cy + v.ay - s.cortex_mm / 2
    gap, cortex = both(xc, wall_y, lz.gap_z)
    assert gap < 100 and cortex > 700
    dest, _ = both(xc, s.cy + lz.dest_dy, v.zc + lz.dest_dz)
    assert (dest < 60) if lz.destruction == "lytic" else (dest > 1000)


def _abnormal_fraction(model):
    """Share of the target body, on the ROI's central sagittal plane, at lytic/blastic HU."""
    s, lz, v = model.spine, model.lesion, model.spine.vertebrae[model.lesion.target]
    y, z = np.meshgrid(np.arange(s.cy - v.ay + 3, s.cy + v.ay - 3, 0.5),
                       np.arange(v.zc - v.height / 2 + 3, v.zc + v.height / 2 - 3, 0.5))
    hu = _hu(model, (lz.x_min + lz.x_max) / 2, y, z)
    return float(((hu < 60) | (hu > 1000)).mean())


def test_malignant_and_benign_differ_in_the_roi():
    plan = plan_cohort(SynthConfig(patients=24, seed=3, difficulty=EASY))  # full-strength lesions
    frac = {s.patient_id: _abnormal_fraction(patient_model(s)) for s in plan}
    for s in plan:
        if s.features.bone_destruction:
            assert frac[s.patient_id] > 0.2, s
        else:
            assert frac[s.patient_id] < 0.16, s
    assert sum(s.label == "benign" for s in plan) >= 5


@pytest.mark.parametrize(("position", "tilt"), [("HFS", 0.0), ("FFS", 0.0), ("HFS", 15.0),
                                                ("FFS", -10.0)])
def test_anatomy_lands_at_the_same_lps_whatever_the_acquisition(specs, tmp_path, position, tilt):
    spec = replace(specs[5], patient_position=position, oblique_deg=tilt)
    hu, geometry, row = make_patient(spec, noise=False)
    for name, data in write_series(hu, geometry, PatientInfo(spec.patient_id),
                                   patient_position=position):
        (tmp_path / name).write_bytes(data)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    image = reader.Execute()
    arr = sitk.GetArrayFromImage(image)
    direction = np.reshape(image.GetDirection(), (3, 3))
    assert np.sign(direction[2, 2]) == (1 if position == "HFS" else -1)
    assert direction[2, 1] == pytest.approx(np.sin(np.radians(tilt)), abs=1e-6)
    model = patient_model(spec)
    s, t = model.spine, model.lesion.target
    checked = 0
    for idx in range(1, len(s.vertebrae) - 1):
        if abs(idx - t) <= 1:
            continue
        v, below = s.vertebrae[idx], s.vertebrae[idx + 1]
        disc_z = (v.zc - v.height / 2 + below.zc + below.height / 2) / 2
        for p in ((0.0, s.cy, v.zc), (0.0, s.cy, disc_z)):
            ijk = image.TransformPhysicalPointToIndex(p)
            if all(0 <= c < n for c, n in zip(ijk, image.GetSize(), strict=True)):
                expected = float(_hu(model, [p[0]], [p[1]], [p[2]])[0])
                assert abs(arr[ijk[2], ijk[1], ijk[0]] - expected) <= 1.0, (p, expected)
                checked += 1
    assert checked >= 2
    box = [row[c] for c in ("roi_x_min_mm", "roi_x_max_mm", "roi_y_min_mm", "roi_y_max_mm",
                            "roi_z_min_mm", "roi_z_max_mm")]
    centre = image.TransformPhysicalPointToContinuousIndex(
        ((box[0] + box[1]) / 2, (box[2] + box[3]) / 2, (box[4] + box[5]) / 2))
    assert all(0 <= c <= n - 1 for c, n in zip(centre, image.GetSize(), strict=True))


def test_same_seed_same_bytes_other_seed_other_cohort(specs):
    a_files, a_row = patient_files(specs[0])
    b_files, b_row = patient_files(plan_cohort(SMALL)[0])
    assert a_files == b_files and a_row == b_row
    other = plan_cohort(replace(SMALL, seed=12))[0]
    c_files, c_row = patient_files(other)
    assert {n for n, _ in a_files}.isdisjoint({n for n, _ in c_files})
    pix = [pydicom.dcmread(io.BytesIO(f[0][1])).PixelData for f in (a_files, c_files)]
    assert pix[0] != pix[1]


@pytest.mark.slow
def test_generate_cohort_writes_archive_and_annotations(tmp_path, specs):
    cfg = replace(SMALL, patients=3, transfer_syntax="mixed", patient_position="mixed")
    frame = generate_cohort(str(tmp_path), cfg, workers=2, progress=False)
    on_disk = pd.read_csv(tmp_path / "annotations.csv", dtype={"series_instance_uid": str})
    assert list(on_disk.columns) == COLUMNS and set(CONTRACT) <= set(on_disk.columns)
    assert on_disk["patient_id"].tolist() == ["VFX0001", "VFX0002", "VFX0003"]
    assert on_disk["series_instance_uid"].tolist() == frame["series_instance_uid"].tolist()
    assert set(on_disk["label"]) <= {"benign", "malignant"}
    assert on_disk[list(FEATURES)].isin([0, 1]).all().all()
    files = sorted(p for p in (tmp_path / "dicom").rglob("*") if p.is_file())
    assert len(files) == int(frame["n_files"].sum())
    # identical to a serial, in-process render: the pool does not change the result
    for spec, row in zip(plan_cohort(cfg), frame.to_dict("records"), strict=True):
        expected, _ = patient_files(spec)
        folder = tmp_path / "dicom" / spec.patient_id / row["series_instance_uid"]
        assert sorted(os.listdir(folder)) == sorted(n for n, _ in expected)
        for name, data in expected:
            assert (folder / name).read_bytes() == data
        ds = pydicom.dcmread(folder / expected[0][0])
        assert ds.SeriesInstanceUID == row["series_instance_uid"] and ds.PatientID == spec.patient_id


@pytest.mark.slow
def test_generate_cohort_writes_to_s3(objectstore_server):
    """The archive goes through vfx_ray.storage, so s3:// works, from pool workers too."""
    from vfx_ray import storage

    uri = "s3://test/synth-cohort"
    cfg = replace(SMALL, patients=2, seed=21)
    frame = generate_cohort(uri, cfg, workers=2, progress=False)
    keys = storage.list_files(storage.join(uri, "dicom"), suffix=".dcm")
    assert len(keys) == int(frame["n_files"].sum())
    text = storage.read_text(storage.join(uri, "annotations.csv"))
    assert text.splitlines()[0].split(",") == COLUMNS
    ds = pydicom.dcmread(io.BytesIO(storage.read_bytes(keys[0].uri)))
    assert ds.PatientID in set(frame["patient_id"])
