"""vfx_ray.imaging.dicom on phantom series: headers, series index, slice order, HU, codecs, bad input."""

from __future__ import annotations

import io
import json

import numpy as np
import pydicom
import pytest
from phantoms import (
    GEOMETRIES,
    PATIENT,
    SHAPE,
    box_hu,
    cube,
    edit,
    series,
    to_jpeg_baseline,
    to_jpeg_lossless,
)

from vfx_ray.config import CropConfig
from vfx_ray.errors import VfxError
from vfx_ray.imaging.dicom import HEADER_PREFIX_BYTES, group_series, load_volume, read_header
from vfx_ray.synth.dicom_writer import PatientInfo

HEADER_KEYS = {
    "object_key", "size", "patient_id", "study_instance_uid", "series_instance_uid",
    "sop_instance_uid", "sop_class_uid", "modality", "transfer_syntax_uid", "rows", "columns",
    "number_of_frames", "image_orientation", "image_position", "pixel_spacing",
    "slice_thickness", "image_type", "series_description", "convolution_kernel", "has_pixel_data",
    "object_kind",
}


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, list[tuple[str, bytes]]]:
    g = GEOMETRIES["oblique"]
    hu = box_hu(g, [cube((3, 5, 10), 12)])
    return hu, series(hu, g)


def raises(stage: str, error_type: str, fn, *args, words: str = "", **kwargs) -> VfxError:
    """Call ``fn`` and check it raised the expected VfxError, whose message names the problem."""
    with pytest.raises(VfxError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert (err.stage, err.error_type) == (stage, error_type), err.message
    assert words.lower() in err.message.lower(), err.message
    return err


# ---------------------------------------------------------------- headers and index


def test_read_header_classic(phantom):
    _, files = phantom
    key, data = files[0]
    h = read_header(data, key)
    assert set(h) == HEADER_KEYS
    assert (h["object_key"], h["size"], h["modality"], h["patient_id"]) == (key, len(data), "CT",
                                                                          PATIENT.patient_id)
    assert (h["rows"], h["columns"], h["number_of_frames"]) == (64, 64, 1)
    assert np.allclose(h["image_orientation"], [1, 0, 0, 0, np.cos(np.radians(10)),
                                                np.sin(np.radians(10))])
    assert len(h["image_position"]) == 3 and h["pixel_spacing"] == [1.0, 1.0]
    assert h["slice_thickness"] == 2.0 and h["has_pixel_data"] is True
    assert h["transfer_syntax_uid"] == pydicom.uid.ExplicitVRLittleEndian
    assert h["image_type"] == "ORIGINAL\\PRIMARY\\AXIAL"
    assert json.loads(json.dumps(h)) == h  # plain Python values, ready for Arrow/JSON


def test_read_header_enhanced_uses_functional_groups(phantom):
    hu, _ = phantom
    [(key, data)] = series(hu, GEOMETRIES["oblique"], enhanced=True, transfer_syntax="jpeg2000")
    h = read_header(data, key)
    assert h["number_of_frames"] == SHAPE[0] and h["image_position"] is None
    assert h["sop_class_uid"] == pydicom.uid.EnhancedCTImageStorage
    assert np.isclose(h["image_orientation"][5], np.sin(np.radians(10)))
    assert h["pixel_spacing"] == [1.0, 1.0] and h["slice_thickness"] == 2.0
    assert h["transfer_syntax_uid"] == pydicom.uid.JPEG2000Lossless and h["has_pixel_data"]


def test_read_header_from_a_prefix(phantom):
    _, files = phantom
    key, data = files[0]
    full = read_header(data, key)
    assert read_header(data[:2048], key, object_size=len(data)) == full
    assert len(data) < HEADER_PREFIX_BYTES
    raises("header", "HeaderBeyondPrefix", read_header, data[:300], key, object_size=len(data),
           words="whole object")


def test_group_series_by_uid_not_folder(phantom):
    hu, files = phantom
    other = series(hu, GEOMETRIES["head_first"], patient=PatientInfo("P2"), seed=3)
    keyed = [(f"a/{k}" if n % 2 else f"b/{k}", d) for n, (k, d) in enumerate(files + other)]
    index = group_series([read_header(d, k) for k, d in keyed])
    assert len(index) == 2
    by_patient = {r["patient_id"]: r for r in index}
    assert set(by_patient) == {PATIENT.patient_id, "P2"}
    for r in index:
        assert r["instance_count"] == r["n_frames"] == SHAPE[0] == len(r["object_keys"])
        assert r["modality"] == "CT" and r["all_have_pixel_data"]
        assert r["total_bytes"] == sum(len(d) for k, d in keyed if k in r["object_keys"])
    assert {k for r in index for k in r["object_keys"]} == {k for k, _ in keyed}


# ---------------------------------------------------------------- volumes


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_slices_ordered_by_position_not_name_or_number(name):
    g = GEOMETRIES[name]
    hu = box_hu(g, [cube((3, 5, 10), 12), cube((0, -10, -15), 6, 400)])
    files = series(hu, g, instance_numbers=True)
    rng = np.random.default_rng(0)
    files = edit(files, lambda ds, n: setattr(ds, "InstanceNumber", int(rng.integers(1, 99))))
    files = [(f"{n:03d}.dcm", d) for n, (_, d) in enumerate(files)]  # names unrelated to order
    v = load_volume(files)
    np.testing.assert_array_equal(v.hu, hu)
    assert np.allclose(v.origin, g.origin, atol=1e-6)
    assert np.allclose(v.direction, g.direction(), atol=1e-6)
    assert np.allclose(v.spacing, [1.0, 1.0, 2.0])
    assert v.patient_id == PATIENT.patient_id and v.hu.dtype == np.float32


CODECS = ["implicit", "big_endian", "jpeg2000", "jpegls", "rle"]


@pytest.mark.parametrize("enhanced", [False, True])
@pytest.mark.parametrize("codec", ["explicit", *CODECS])
def test_every_transfer_syntax_gives_the_same_volume(phantom, codec, enhanced):
    hu, files = phantom
    ref = load_volume(files)
    v = load_volume(series(hu, GEOMETRIES["oblique"], transfer_syntax=codec, enhanced=enhanced))
    np.testing.assert_array_equal(v.hu, ref.hu)
    np.testing.assert_allclose(v.origin, ref.origin, atol=1e-6)
    np.testing.assert_allclose(v.direction, ref.direction, atol=1e-9)


def test_jpeg_lossless_from_gdcm_encoder(phantom):
    """JPEG Lossless SV1 (1.2.840.10008.1.2.4.70), encoded by GDCM inside SimpleITK."""
    hu, files = phantom
    jl = to_jpeg_lossless(files)
    assert read_header(jl[0][1], "k")["transfer_syntax_uid"] == pydicom.uid.JPEGLosslessSV1
    np.testing.assert_array_equal(load_volume(jl).hu, hu)


def test_jpeg_baseline_8bit_from_pillow(phantom):
    """JPEG Baseline (1.2.840.10008.1.2.4.50) is 8-bit lossy: HU within one 8-HU step."""
    pytest.importorskip("PIL")
    hu, files = phantom
    jb = to_jpeg_baseline(files)
    assert read_header(jb[0][1], "k")["transfer_syntax_uid"] == pydicom.uid.JPEGBaseline8Bit
    assert np.abs(load_volume(jb).hu - hu).max() <= 8.0 + 1e-3


def test_rescale_slope_and_intercept_give_hu(phantom):
    hu, _ = phantom
    files = series(hu, GEOMETRIES["oblique"], slope=2.0, intercept=-2048.0)
    stored = pydicom.dcmread(io.BytesIO(files[0][1])).pixel_array
    assert set(np.unique(stored)) <= {524, 1524}  # (HU + 2048) / 2: not HU themselves
    np.testing.assert_array_equal(load_volume(files).hu, hu)


def test_pixel_padding_becomes_air():
    g = GEOMETRIES["head_first"]
    hu = box_hu(g, [cube((0, 0, 0), 20, 0.0)], background=-3024.0)  # outside the FOV disc
    files = edit(series(hu, g), lambda ds, _: ds.add_new(0x00280120, "SS", -2000))  # padding
    v = load_volume(files)
    assert set(np.unique(v.hu)) == {-1000.0, 0.0}


def test_uneven_spacing_is_resampled_onto_a_regular_grid():
    g = GEOMETRIES["head_first"]
    k = np.arange(SHAPE[0])
    t = g.origin[2] + 2.0 * k + np.where(k >= 12, 0.6, 0.0)  # one 2.6 mm step among 2.0 mm
    hu = np.broadcast_to((10.0 * t)[:, None, None], SHAPE).astype(np.float32)
    files = series(hu, g)
    files = edit(files, lambda ds, _: setattr(
        ds, "ImagePositionPatient", [*ds.ImagePositionPatient[:2],
                                     t[round((float(ds.ImagePositionPatient[2]) - t[0]) / 2)]]))
    v = load_volume(files)
    assert v.hu.shape[0] == SHAPE[0] and np.isclose(v.spacing[2], (t[-1] - t[0]) / 23)
    z = v.origin[2] + v.spacing[2] * np.arange(v.hu.shape[0])
    np.testing.assert_allclose(v.hu[:, 5, 5], 10.0 * z, atol=0.05)


# ---------------------------------------------------------------- bad input


def test_non_dicom_bytes():
    raises("header", "NotDicom", read_header, b"%PDF-1.4 hello" * 50, "x.dcm", words="not a")


def test_truncated_file(phantom):
    _, files = phantom
    key, data = files[0]
    raises("header", "Truncated", read_header, data[:-100], key, words="truncated")
    raises("decode", "Truncated", load_volume, [(key, data[:-100]), *files[1:]], words="truncated")
    raises("header", "Truncated", read_header, data[:900], key, words="truncated")


def test_missing_required_tag(phantom):
    _, files = phantom
    [(key, data)] = edit(files[:1], lambda ds, _: delattr(ds, "SeriesInstanceUID"))
    raises("header", "MissingTag", read_header, data, key, words="SeriesInstanceUID")


def test_missing_pixel_data(phantom):
    _, files = phantom
    bad = edit(files, lambda ds, _: delattr(ds, "PixelData"), only=[3])
    assert read_header(bad[3][1], "k")["has_pixel_data"] is False
    raises("decode", "NoPixelData", load_volume, bad, words="no pixel data")


def test_non_ct_modality(phantom):
    _, files = phantom
    raises("decode", "NotCT", load_volume,
           edit(files, lambda ds, _: setattr(ds, "Modality", "MR")), words="'MR'")


def test_single_slice_series(phantom):
    _, files = phantom
    raises("geometry", "TooFewSlices", load_volume, files[:1], words="1 slice")


def test_mixed_orientation(phantom):
    _, files = phantom
    bad = edit(files, lambda ds, _: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1]),
               only=[5])
    raises("geometry", "MixedOrientation", load_volume, bad, words="ImageOrientationPatient")


def test_non_orthonormal_orientation(phantom):
    _, files = phantom
    bad = edit(files, lambda ds, _: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0.3, 1, 0]))
    raises("geometry", "NonOrthonormal", load_volume, bad, words="orthonormal")


def test_mixed_pixel_spacing(phantom):
    _, files = phantom
    bad = edit(files, lambda ds, _: setattr(ds, "PixelSpacing", [0.8, 0.8]), only=[2])
    raises("geometry", "MixedSpacing", load_volume, bad, words="PixelSpacing")


def test_duplicate_positions(phantom):
    _, files = phantom
    raises("geometry", "DuplicatePosition", load_volume, [*files, files[4]], words="same position")


def test_gap_above_factor_is_an_error_and_below_is_not(phantom):
    hu, _ = phantom
    g = GEOMETRIES["head_first"]
    files = series(box_hu(g, []), g)
    z = {n: float(pydicom.dcmread(io.BytesIO(d)).ImagePositionPatient[2])
         for n, (_, d) in enumerate(files)}
    middle = sorted(z, key=z.get)[SHAPE[0] // 2]
    gap = [f for n, f in enumerate(files) if n != middle]  # one missing slice: 2 x spacing
    raises("geometry", "SliceGap", load_volume, gap, words="gap of 4.00 mm")
    assert load_volume(gap, CropConfig(max_gap_factor=2.5)).hu.shape[0] == SHAPE[0]


def test_file_over_the_size_limit(phantom):
    _, files = phantom
    key, data = files[0]
    raises("header", "FileTooLarge", read_header, data, key, max_file_bytes=1000, words="limit")
    raises("decode", "FileTooLarge", load_volume, files, CropConfig(max_file_bytes=1000))


def test_decompression_bomb_is_refused_before_decoding(phantom):
    _, files = phantom
    bomb = edit(files, lambda ds, _: setattr(ds, "Rows", 60000), only=[0])
    raises("decode", "TooManyVoxels", load_volume, bomb, words="60000")
    raises("decode", "TooManyVoxels", load_volume, files, max_voxels=64 * 64 * 10)


def test_undecodable_pixel_data(phantom):
    hu, _ = phantom
    files = series(hu, GEOMETRIES["oblique"], transfer_syntax="jpeg2000")

    def corrupt(ds: pydicom.Dataset, _: int) -> None:
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])

    raises("decode", "DecodeFailed", load_volume, edit(files, corrupt, only=[0]),
           words="cannot decode")


def test_files_of_two_series(phantom):
    hu, files = phantom
    other = series(hu, GEOMETRIES["oblique"], seed=9)
    raises("geometry", "MixedSeries", load_volume, files + other[:3], words="SeriesInstanceUID")


def test_enhanced_frames_are_placed_by_their_own_position_and_rescale(phantom):
    """Frames stored in reverse order; frame 0 carries its own Pixel Value Transformation."""
    hu, _ = phantom
    [(key, data)] = series(hu, GEOMETRIES["oblique"], enhanced=True)

    def shuffle(ds: pydicom.Dataset, _: int) -> None:
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1]).tobytes()
        ds.PerFrameFunctionalGroupsSequence = ds.PerFrameFunctionalGroupsSequence[::-1]
        group = ds.PerFrameFunctionalGroupsSequence[0]
        item = pydicom.Dataset()
        item.RescaleSlope, item.RescaleIntercept, item.RescaleType = 1, -1014, "HU"
        group.PixelValueTransformationSequence = [item]

    v = load_volume(edit([(key, data)], shuffle))
    expected = hu.copy()
    expected[-1] += 10.0  # the last slice, now frame 0, is read with intercept -1014
    np.testing.assert_array_equal(v.hu, expected)
