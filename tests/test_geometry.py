"""vfx_ray.imaging.geometry on phantoms: LPS mapping, ROI boxes, slice choice, the paper's crops."""

from __future__ import annotations

import math

import numpy as np
import pydicom
import pytest
from phantoms import GEOMETRIES, SHAPE, box_hu, centred_geometry, cube, edit, field_hu, series

from vfx_ray.config import CropConfig
from vfx_ray.contracts import crops_table
from vfx_ray.errors import VfxError
from vfx_ray.imaging.dicom import load_volume
from vfx_ray.imaging.geometry import (
    crop_samples,
    sagittal_reformat,
    select_slices,
    to_sitk,
    zscore,
)
from vfx_ray.imaging.roi import RoiBox
from vfx_ray.synth.dicom_writer import voxel_lps

CUBE_CENTRE = (3.0, 5.0, 10.0)
CFG = CropConfig()


def cube_volume(name: str, boxes=None):
    g = GEOMETRIES[name]
    return load_volume(series(box_hu(g, boxes or [cube(CUBE_CENTRE, 12)]), g))


def roi_around(centre, half_x: float, half_y: float, half_z: float, **kw) -> RoiBox:
    cx, cy, cz = centre
    return RoiBox(cx - half_x, cx + half_x, cy - half_y, cy + half_y, cz - half_z, cz + half_z,
                  **kw)


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


@pytest.fixture(scope="module", params=sorted(GEOMETRIES))
def volume(request):
    return request.param, cube_volume(request.param)


# ---------------------------------------------------------------- LPS mapping and ROI boxes


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_to_sitk_maps_voxels_to_their_lps_position(name):
    g = GEOMETRIES[name]
    image = to_sitk(load_volume(series(box_hu(g, []), g)))
    lps = voxel_lps(g, SHAPE)
    for k, i, j in [(0, 0, 0), (23, 0, 63), (5, 40, 7), (23, 63, 63)]:
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((j, i, k)), lps[k, i, j],
                                   atol=1e-6)


@pytest.mark.parametrize("bounds, words", [
    ((0, 1, 0, math.nan, 0, 1), "non-finite values in roi_y_max_mm"),
    ((0, 1, 5, 2, 0, 1), "roi_y_min_mm=5.0 > roi_y_max_mm=2.0; swap them"),
    ((0, 1, 3, 3, 7, 7), "no extent"),
])
def test_invalid_roi_boxes(bounds, words):
    with pytest.raises(VfxError) as info:
        RoiBox(*bounds, patient_id="P7")
    err = info.value
    assert (err.stage, err.error_type, err.patient_id) == ("annotations", "BadROI", "P7")
    assert words in err.message


def test_roi_from_record_and_square():
    rec = {"patient_id": "P1", "roi_x_min_mm": 0, "roi_x_max_mm": 6, "roi_y_min_mm": 10,
           "roi_y_max_mm": 20, "roi_z_min_mm": -30, "roi_z_max_mm": 0}
    roi = RoiBox.from_record(rec)
    assert roi.patient_id == "P1" and roi.square() == (0.0, 30.0, -30.0, 0.0)
    with pytest.raises(VfxError):
        RoiBox.from_record({**rec, "roi_z_max_mm": None})


@pytest.mark.parametrize("x_min, x_max, expected", [
    (-1.0, 7.0, [0, 1, 2]),  # centres 0, 3, 6 mm inside
    (3.5, 4.0, [1]),  # no centre inside: the nearest to 3.75 mm is 3 mm
    (-40.0, 40.0, [-2, -1, 0, 1, 2]),  # 27 inside, capped at 5 centred on 0
    (10.0, 40.0, [6, 7, 8, 9, 10]),  # capped, centred on 25 mm
])
def test_select_slices(x_min, x_max, expected):
    roi = RoiBox(x_min, x_max, 0, 1, 0, 1)
    assert select_slices(roi, CFG).tolist() == expected


# ---------------------------------------------------------------- the crops


def test_crops_match_the_contract(volume):
    _, v = volume
    rows = crop_samples(v, roi_around(CUBE_CENTRE, 6, 6, 6), CFG)
    assert [r["slice_index"] for r in rows] == [-1, 0, 1, 2, 3]  # centres -3..9 mm in [-3, 9]
    table = crops_table([{**r, "label": 1, "vertebra": "L1"} for r in rows])
    assert table.num_rows == 5
    for r in rows:
        assert r["image"].shape == (3, 64, 64) and r["image"].dtype == np.float32
        assert r["slice_x_mm"] == 3.0 * r["slice_index"]
        assert np.isclose(r["image"].mean(), 0, atol=1e-5)
        assert np.isclose(r["image"].std(), 1, atol=1e-4)
        assert (r["box_y_min_mm"], r["box_y_max_mm"]) == (-1.0, 11.0)
        assert (r["box_z_min_mm"], r["box_z_max_mm"]) == (4.0, 16.0)


def test_one_slice_alone_is_the_same_row_as_among_all(volume):
    _, v = volume
    roi = roi_around(CUBE_CENTRE, 6, 6, 6)
    for normalize in (True, False):
        rows = crop_samples(v, roi, CFG, normalize=normalize)
        for r in rows:
            (alone,) = crop_samples(v, roi, CFG, normalize=normalize, only=r["slice_index"])
            assert np.array_equal(alone["image"], r["image"]) and {**alone, "image": 0} == {**r, "image": 0}
    assert crop_samples(v, roi, CFG, only=4) == []  # not one of the ROI's slices


def test_cube_roi_fills_the_crop(volume):
    _, v = volume
    [row] = crop_samples(v, roi_around(CUBE_CENTRE, 1, 6, 6), CFG, normalize=False)
    assert (row["image"][1] > 0).mean() > 0.9


def test_cube_is_centred_and_fills_the_expected_fraction(volume):
    """A 12 x 24 mm (y x z) ROI: square side 24 mm, so the 12 mm cube is the central quarter."""
    _, v = volume
    for row in crop_samples(v, roi_around(CUBE_CENTRE, 4, 6, 12), CFG, normalize=False):
        bright = row["image"][1] > 0
        assert abs(bright.mean() - 0.25) < 0.03
        np.testing.assert_allclose(centroid(bright), [31.5, 31.5], atol=1.0)


def test_head_first_and_feet_first_give_the_same_crops():
    roi = roi_around(CUBE_CENTRE, 4, 6, 12)
    a = crop_samples(cube_volume("head_first"), roi, CFG)
    b = crop_samples(cube_volume("feet_first"), roi, CFG)
    for ra, rb in zip(a, b, strict=True):
        np.testing.assert_allclose(ra["image"], rb["image"], atol=1e-4)


def test_channels_are_the_neighbouring_slabs():
    """HU = 100 x (x mm): slab means are 100 x their centre, so channels step by 300 HU."""
    g = GEOMETRIES["oblique"]
    v = load_volume(series(field_hu(g, lambda p: 100.0 * p[..., 0]), g))
    for row in crop_samples(v, roi_around((0, 0, 0), 4, 8, 8), CFG, normalize=False):
        x = row["slice_x_mm"]
        means = row["image"].mean(axis=(1, 2))
        np.testing.assert_allclose(means, [100 * (x - 3), 100 * x, 100 * (x + 3)], atol=1.0)


def test_thin_cube_is_only_in_the_central_channel():
    g = GEOMETRIES["head_first"]
    plate = ((-1.5, -6, -6), (1.5, 6, 6), 1000.0)  # x extent = the slab of slice 0
    v = load_volume(series(box_hu(g, [plate]), g))
    [row] = crop_samples(v, RoiBox(-0.5, 0.5, -6, 6, -6, 6), CFG, normalize=False)
    bright = (row["image"] > 0).mean(axis=(1, 2))
    assert bright[1] > 0.9 and bright[0] < 0.1 and bright[2] < 0.1


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_superior_anterior_marker_is_top_left(name):
    marker = cube((0, -8, 8), 6)  # LPS: -y is anterior, +z superior
    v = cube_volume(name, [marker])
    [row] = crop_samples(v, RoiBox(-1, 1, -14, 14, -14, 14), CFG, normalize=False)
    r, c = centroid(row["image"][1] > 0)
    np.testing.assert_allclose([r, c], [(14 - 8) / 28 * 64 - 0.5, (14 - 8) / 28 * 64 - 0.5],
                               atol=1.0)


def test_slice_index_is_stable_across_acquisition_grids():
    shifted = centred_geometry((1, 0, 0), (0, 1, 0), centre=(0.37, -0.6, 1.1))
    roi = roi_around(CUBE_CENTRE, 5, 6, 12)
    a = crop_samples(cube_volume("head_first"), roi, CFG, normalize=False)
    b = crop_samples(load_volume(series(box_hu(shifted, [cube(CUBE_CENTRE, 12)]), shifted)),
                     roi, CFG, normalize=False)
    assert [r["slice_index"] for r in a] == [r["slice_index"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert abs((ra["image"][1] > 0).mean() - (rb["image"][1] > 0).mean()) < 0.02


def test_gantry_tilt_is_resampled_into_the_patient_frame():
    """Slices shifted 0.35 mm along the column cosine per 2 mm step (a 10 degree gantry tilt)."""
    g = GEOMETRIES["head_first"]
    shear = np.array(g.col_cosine) * 0.35
    k = np.arange(SHAPE[0])[:, None, None, None]
    lps = voxel_lps(g, SHAPE) + k * shear
    hu = np.where(np.all(np.abs(lps - CUBE_CENTRE) <= 6, axis=-1), 1000.0, -1000.0)
    z0 = g.origin[2]

    def tilt(ds: pydicom.Dataset, _: int) -> None:
        p = np.array(ds.ImagePositionPatient, float)
        ds.ImagePositionPatient = list(p + round((p[2] - z0) / 2.0) * shear)

    v = load_volume(edit(series(hu.astype(np.float32), g), tilt))
    assert not np.allclose(v.direction[:, 2], [0, 0, 1])
    for row in crop_samples(v, roi_around(CUBE_CENTRE, 4, 6, 12), CFG, normalize=False):
        bright = row["image"][1] > 0
        assert abs(bright.mean() - 0.25) < 0.03
        np.testing.assert_allclose(centroid(bright), [31.5, 31.5], atol=1.0)


def test_samples_outside_the_volume_are_air():
    g = GEOMETRIES["head_first"]
    v = load_volume(series(box_hu(g, [], background=0.0), g))  # water; volume z in [-24, 24]
    [row] = crop_samples(v, RoiBox(-1, 1, -10, 10, 10, 30), CFG, normalize=False)
    top, bottom = row["image"][:, :16], row["image"][:, -16:]  # z 30..25 vs 15..10 mm
    assert np.all(top == -1000.0) and np.allclose(bottom, 0.0, atol=1e-3)


def test_roi_outside_the_volume():
    v = cube_volume("head_first")
    with pytest.raises(VfxError) as info:
        crop_samples(v, RoiBox(100, 110, 0, 10, 0, 10, patient_id="P9"), CFG)
    err = info.value
    assert (err.stage, err.error_type, err.patient_id) == ("crop", "RoiOutside", "P9")
    assert "outside the volume" in err.message and err.series_instance_uid == v.series_instance_uid


def test_zscore_guards_a_constant_sample():
    np.testing.assert_array_equal(zscore(np.full((3, 4, 4), 7.0)), np.zeros((3, 4, 4)))


def test_sagittal_reformat_places_the_cube():
    v = cube_volume("oblique")
    stack, grid = sagittal_reformat(v, 3.0, 1.0)
    assert stack.shape == (len(grid.x_mm), len(grid.z_mm), len(grid.y_mm))
    assert np.all(np.diff(grid.z_mm) < 0) and np.all(np.diff(grid.y_mm) > 0)
    n = int(np.flatnonzero(grid.slice_index == 1)[0])  # x = 3 mm: the cube's centre
    rows, cols = np.nonzero(stack[n] > 0)
    assert abs(grid.z_mm[rows].mean() - CUBE_CENTRE[2]) < 1.0
    assert abs(grid.y_mm[cols].mean() - CUBE_CENTRE[1]) < 1.0
    assert (stack[int(np.flatnonzero(grid.slice_index == 5)[0])] > 0).sum() == 0  # x = 15 mm


def test_enhanced_and_compressed_series_give_the_same_crops():
    g = GEOMETRIES["oblique"]
    hu = box_hu(g, [cube(CUBE_CENTRE, 12)])
    roi = roi_around(CUBE_CENTRE, 4, 6, 12)
    ref = crop_samples(load_volume(series(hu, g)), roi, CFG)
    for kw in ({"enhanced": True}, {"transfer_syntax": "jpegls"}):
        got = crop_samples(load_volume(series(hu, g, **kw)), roi, CFG)
        for a, b in zip(ref, got, strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])


def test_crops_leave_the_volume_unchanged(volume):
    _, v = volume
    before = v.hu.copy()
    crop_samples(v, roi_around(CUBE_CENTRE, 4, 6, 12), CFG)
    np.testing.assert_array_equal(v.hu, before)
