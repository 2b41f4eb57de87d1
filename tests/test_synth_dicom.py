"""The synthetic DICOM writer: real files that pydicom and SimpleITK read the same way."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from vfx_ray.synth.dicom_writer import (
    PatientInfo,
    SeriesGeometry,
    to_stored,
    voxel_lps,
    write_series,
)

PATIENT = PatientInfo("VFX9999", age=59, sex="F")
C, S = np.cos(np.radians(15)), np.sin(np.radians(15))
GEOMETRIES = {
    "hfs": SeriesGeometry((-20.0, -30.0, 100.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.7, 0.8), 3.0),
    "ffs_tilted": SeriesGeometry((25.0, -10.0, 40.0), (-1.0, 0.0, 0.0), (0.0, C, S), (0.65, 0.65), 3.0),
}


def _volume(shape=(6, 32, 40), seed=0) -> np.ndarray:
    """HU with structure and every value a distinct-ish integer, so reordering would show."""
    rng = np.random.default_rng(seed)
    k, i, j = np.indices(shape)
    return (k * 300 - 900 + i * 7 + j * 3 + rng.integers(-20, 20, shape)).astype(np.float64)


def _read(files) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(io.BytesIO(data)) for _, data in files]


def _pydicom_hu(files) -> tuple[np.ndarray, SeriesGeometry]:
    """HU volume in slice order (by position along the normal) and the geometry pydicom sees."""
    dss = _read(files)
    first = dss[0]
    if "PerFrameFunctionalGroupsSequence" in first:  # Enhanced CT
        shared = first.SharedFunctionalGroupsSequence[0]
        iop = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
        pm = shared.PixelMeasuresSequence[0]
        tr = shared.PixelValueTransformationSequence[0]
        positions = [np.array(f.PlanePositionSequence[0].ImagePositionPatient, float)
                     for f in first.PerFrameFunctionalGroupsSequence]
        frames = list(first.pixel_array)
        slope, intercept, spacing = float(tr.RescaleSlope), float(tr.RescaleIntercept), pm.PixelSpacing
        thickness = float(pm.SpacingBetweenSlices)
    else:
        iop = [float(v) for v in first.ImageOrientationPatient]
        positions = [np.array(d.ImagePositionPatient, float) for d in dss]
        frames = [d.pixel_array for d in dss]
        slope, intercept, spacing = float(first.RescaleSlope), float(first.RescaleIntercept), first.PixelSpacing
        thickness = float(first.SpacingBetweenSlices)
    normal = np.cross(iop[:3], iop[3:])
    order = np.argsort([p @ normal for p in positions])
    hu = np.stack([frames[i] for i in order]).astype(np.float64) * slope + intercept
    geometry = SeriesGeometry(tuple(positions[order[0]]), tuple(iop[:3]), tuple(iop[3:]),
                              (float(spacing[0]), float(spacing[1])), thickness)
    return hu, geometry


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_pydicom_and_simpleitk_agree_on_geometry(name, tmp_path):
    geometry, hu = GEOMETRIES[name], _volume()
    files = write_series(hu, geometry, PATIENT, seed=3)
    for fname, data in files:
        (tmp_path / fname).write_bytes(data)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    image = reader.Execute()
    pyd_hu, pyd_geo = _pydicom_hu(files)

    n, rows, cols = hu.shape
    assert image.GetSize() == (cols, rows, n)
    np.testing.assert_allclose(image.GetSpacing(), (geometry.pixel_spacing[1],
                                                    geometry.pixel_spacing[0], 3.0), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), geometry.origin, atol=1e-6)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), geometry.direction(),
                               atol=1e-6)
    np.testing.assert_allclose(pyd_geo.origin, image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(pyd_geo.row_cosine, geometry.row_cosine, atol=1e-9)
    np.testing.assert_allclose(pyd_geo.col_cosine, geometry.col_cosine, atol=1e-9)
    assert pyd_geo.pixel_spacing == geometry.pixel_spacing
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu)
    np.testing.assert_array_equal(pyd_hu, hu)
    # the last voxel sits where voxel_lps says it does, for both readers
    far = voxel_lps(geometry, hu.shape)[-1, -1, -1]
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((cols - 1, rows - 1, n - 1)),
                               far, atol=1e-5)


@pytest.mark.parametrize(("syntax", "enhanced"), [
    ("implicit", False), ("big_endian", False), ("jpeg2000", False), ("jpegls", False),
    ("rle", False), ("explicit", True), ("jpeg2000", True), ("jpegls", True), ("rle", True),
    ("big_endian", True),
])
def test_every_variant_decodes_to_the_same_hu(syntax, enhanced):
    geometry, hu = GEOMETRIES["ffs_tilted"], _volume(seed=1)
    hu[0, 0, :4] = [-3000, 40000, -1024, 2000]  # extremes clip to int16
    reference, _ = _pydicom_hu(write_series(hu, geometry, PATIENT))
    files = write_series(hu, geometry, PATIENT, transfer_syntax=syntax, enhanced=enhanced)
    assert len(files) == (1 if enhanced else hu.shape[0])
    decoded, geo = _pydicom_hu(files)
    np.testing.assert_array_equal(decoded, reference)
    np.testing.assert_allclose(geo.origin, geometry.origin, atol=1e-6)
    ds = _read(files)[0]
    assert ds.file_meta.TransferSyntaxUID == {
        "implicit": "1.2.840.10008.1.2", "big_endian": "1.2.840.10008.1.2.2",
        "jpeg2000": "1.2.840.10008.1.2.4.90", "jpegls": "1.2.840.10008.1.2.4.80",
        "rle": "1.2.840.10008.1.2.5", "explicit": "1.2.840.10008.1.2.1"}[syntax]
    assert ds.SOPClassUID == ("1.2.840.10008.5.1.4.1.1.2.1" if enhanced else "1.2.840.10008.5.1.4.1.1.2")


def test_reference_values_clip_and_round_to_int16():
    stored = to_stored(np.array([-3000.0, -1024.0, 0.4, 0.6, 40000.0]), 1.0, -1024.0)
    assert stored.dtype == np.int16
    assert stored.tolist() == [-1976, 0, 1024, 1025, 32767]
    assert to_stored(np.array([100.0]), 0.5, -1000.0).tolist() == [2200]


def test_header_tags_and_file_naming():
    hu = _volume()
    files = write_series(hu, GEOMETRIES["hfs"], PATIENT, slope=0.5, intercept=-1000.0, seed=5)
    names = [n for n, _ in files]
    dss = _read(files)
    assert all(data[128:132] == b"DICM" for _, data in files)  # Part 10 preamble + prefix
    assert names == [f"{d.SOPInstanceUID}.dcm" for d in dss]
    assert len(set(names)) == len(names)
    z = [float(d.ImagePositionPatient[2]) for d in dss]
    assert z != sorted(z) and z != sorted(z, reverse=True)  # shuffled, not slice order
    d = dss[0]
    assert (d.Modality, d.PatientID, d.PatientAge, d.PatientSex) == ("CT", "VFX9999", "059Y", "F")
    assert str(d.PatientName) == "SYNTH^VFX9999"
    assert (d.BitsAllocated, d.BitsStored, d.HighBit, d.PixelRepresentation) == (16, 16, 15, 1)
    assert (float(d.RescaleSlope), float(d.RescaleIntercept), d.RescaleType) == (0.5, -1000.0, "HU")
    assert float(d.SliceThickness) == float(d.SpacingBetweenSlices) == 3.0
    assert len({x.SeriesInstanceUID for x in dss}) == len({x.FrameOfReferenceUID for x in dss}) == 1
    assert sorted(int(x.InstanceNumber) for x in dss) == list(range(1, hu.shape[0] + 1))
    decoded, _ = _pydicom_hu(files)
    np.testing.assert_allclose(decoded, np.round((hu + 1000) * 2) / 2 - 1000)  # half-HU steps
    no_numbers = _read(write_series(hu, GEOMETRIES["hfs"], PATIENT, instance_numbers=False))
    assert all("InstanceNumber" not in x for x in no_numbers)


def test_uids_are_deterministic_in_patient_and_seed():
    hu = _volume()
    a = write_series(hu, GEOMETRIES["hfs"], PATIENT, seed=1)
    assert a == write_series(hu, GEOMETRIES["hfs"], PATIENT, seed=1)
    b = write_series(hu, GEOMETRIES["hfs"], PATIENT, seed=2)
    assert not {n for n, _ in a} & {n for n, _ in b}
    given = write_series(hu, GEOMETRIES["hfs"], PATIENT, study_uid="1.2.3", series_uid="1.2.3.4")
    assert {(d.StudyInstanceUID, d.SeriesInstanceUID) for d in _read(given)} == {("1.2.3", "1.2.3.4")}


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="transfer_syntax"):
        write_series(_volume(), GEOMETRIES["hfs"], PATIENT, transfer_syntax="jpeg")
    with pytest.raises(ValueError, match="orthonormal"):
        write_series(_volume(), SeriesGeometry((0, 0, 0), (1, 0, 0), (1, 0, 0), (1, 1), 3), PATIENT)
    with pytest.raises(ValueError, match="32"):
        write_series(np.zeros((2, 16, 16)), GEOMETRIES["hfs"], PATIENT, transfer_syntax="jpeg2000")
    with pytest.raises(ValueError, match="n_slices"):
        write_series(np.zeros((4, 4)), GEOMETRIES["hfs"], PATIENT)
