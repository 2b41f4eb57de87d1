"""Write an HU volume as a real DICOM CT series (classic per-slice files or one Enhanced CT file).

The geometry tags are the truth: voxel ``[k, i, j]`` (slice, row, column) lies at
``origin + k * slice_spacing * normal + i * row_spacing * col_cosine + j * col_spacing * row_cosine``
in DICOM patient coordinates (LPS, mm), ``normal = row_cosine x col_cosine`` (PS3.3 C.7.6.2.1.1).
Files come back shuffled so that readers cannot rely on name or list order.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "big_endian": ExplicitVRBigEndian,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
    "rle": RLELossless,
}
# pydicom 3 encoder plugin per compressed syntax (all lossless here).
_PLUGINS = {"jpeg2000": "pylibjpeg", "jpegls": "pyjpegls", "rle": "pydicom"}
_INT16 = np.iinfo(np.int16)


@dataclass(frozen=True)
class SeriesGeometry:
    origin: tuple[float, float, float]  # LPS mm of voxel [0,0,0] (first slice, first row, first column)
    row_cosine: tuple[float, float, float]  # ImageOrientationPatient[:3]: direction of increasing column index
    col_cosine: tuple[float, float, float]  # ImageOrientationPatient[3:]: direction of increasing row index
    pixel_spacing: tuple[float, float]  # (row spacing = between rows, column spacing = between columns), mm
    slice_spacing: float  # mm between consecutive slices along normal = cross(row_cosine, col_cosine)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(np.asarray(self.row_cosine, float), np.asarray(self.col_cosine, float))

    def slice_position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k``."""
        return np.asarray(self.origin, float) + k * self.slice_spacing * self.normal

    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are row_cosine, col_cosine, normal (ITK's direction)."""
        return np.stack([np.asarray(self.row_cosine, float), np.asarray(self.col_cosine, float),
                         self.normal], axis=1)


@dataclass(frozen=True)
class SeriesStyle:
    """What a scanner writes about a series besides its pixels and geometry (the fields a
    series selector reads); the defaults are the single series of the default cohort."""

    description: str = "AXIAL 3MM BONE"
    number: int = 2
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    kernel: str = "BONE"
    thickness_mm: float | None = None  # SliceThickness; None: the slice spacing (no overlap)
    padding_hu: float | None = None  # voxels at exactly this HU are PixelPaddingValue (outside the FOV)


@dataclass(frozen=True)
class PatientInfo:
    patient_id: str
    age: int | None = None
    sex: str | None = None  # "M" / "F"
    name: str | None = None  # default: "SYNTH^" + patient_id


def voxel_lps(geometry: SeriesGeometry, shape: tuple[int, int, int]) -> np.ndarray:
    """LPS mm of every voxel centre, shape ``(*shape, 3)``: the anatomy is sampled here."""
    n, rows, cols = shape
    k = np.arange(n, dtype=float)[:, None, None, None]
    i = np.arange(rows, dtype=float)[None, :, None, None]
    j = np.arange(cols, dtype=float)[None, None, :, None]
    row_sp, col_sp = geometry.pixel_spacing
    return (np.asarray(geometry.origin, float)
            + k * geometry.slice_spacing * geometry.normal
            + i * row_sp * np.asarray(geometry.col_cosine, float)
            + j * col_sp * np.asarray(geometry.row_cosine, float))


def to_stored(hu: np.ndarray, slope: float = 1.0, intercept: float = -1024.0) -> np.ndarray:
    """Stored int16 values so that HU = stored * slope + intercept (PS3.3 C.11.1.1.2)."""
    raw = np.rint((np.asarray(hu, dtype=np.float64) - intercept) / slope)
    return np.clip(raw, _INT16.min, _INT16.max).astype(np.int16)


def _ds(x: float) -> str:
    """A DS value (max 16 chars) that round-trips the float as closely as DS allows."""
    for digits in range(15, 5, -1):
        s = f"{float(x):.{digits}g}"
        if len(s) <= 16:
            return s
    return f"{float(x):.6g}"


def _uids(patient: PatientInfo, seed: int, study_uid: str | None,
          series_uid: str | None) -> tuple[str, str, str]:
    base = [patient.patient_id, str(seed)]
    study = study_uid or generate_uid(entropy_srcs=[*base, "study"])
    series = series_uid or generate_uid(entropy_srcs=[*base, study, "series"])
    frame = generate_uid(entropy_srcs=[*base, series, "frame-of-reference"])
    return study, series, frame


def _patient_study_series(ds: Dataset, patient: PatientInfo, seed: int, study: str,
                          series: str, frame: str, patient_position: str,
                          style: SeriesStyle = SeriesStyle()) -> None:
    """Patient, General Study, General Series, Frame of Reference, General Equipment modules."""
    ds.PatientName = patient.name or f"SYNTH^{patient.patient_id}"
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = patient.sex or ""
    if patient.age is not None:
        ds.PatientAge = f"{int(patient.age):03d}Y"
    day = 1 + seed % 28
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = f"202001{day:02d}"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "101500"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.StudyInstanceUID = study
    ds.StudyDescription = "SYNTH SPINE CT"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series
    ds.SeriesNumber = style.number
    ds.SeriesDescription = style.description
    ds.PatientPosition = patient_position
    ds.BodyPartExamined = "SPINE"
    ds.FrameOfReferenceUID = frame
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "vfx_ray synthetic"
    ds.ManufacturerModelName = "synth"
    ds.KVP = "120"
    ds.ConvolutionKernel = style.kernel


def _image_pixel(ds: Dataset, rows: int, cols: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1


def _file_meta(sop_class: str, sop_uid: str, ts_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts_uid
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "VFX_RAY_SYNTH"
    return meta


def _set_pixels(ds: Dataset, arr: np.ndarray, transfer_syntax: str) -> None:
    """Native pixel data in the syntax's byte order, or compressed losslessly by pydicom 3."""
    if transfer_syntax in _PLUGINS:
        ds.compress(TRANSFER_SYNTAXES[transfer_syntax], arr,
                    encoding_plugin=_PLUGINS[transfer_syntax], generate_instance_uid=False)
        return
    order = ">" if transfer_syntax == "big_endian" else "<"
    ds.PixelData = np.ascontiguousarray(arr, dtype=f"{order}i2").tobytes()
    ds["PixelData"].VR = "OW"


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _check(hu: np.ndarray, geometry: SeriesGeometry, transfer_syntax: str) -> None:
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise ValueError(f"hu must be (n_slices, rows, cols), got shape {hu.shape}")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"unknown transfer_syntax {transfer_syntax!r}; "
                         f"choose one of {', '.join(TRANSFER_SYNTAXES)}")
    if transfer_syntax == "jpeg2000" and min(hu.shape[1:]) < 32:
        raise ValueError("jpeg2000 needs rows and columns >= 32 (openjpeg encodes 6 DWT levels)")
    r, c = np.asarray(geometry.row_cosine, float), np.asarray(geometry.col_cosine, float)
    if not (np.isclose(r @ r, 1, atol=1e-6) and np.isclose(c @ c, 1, atol=1e-6)
            and abs(r @ c) < 1e-6):
        raise ValueError("row_cosine and col_cosine must be orthonormal")


def write_series(hu: np.ndarray, geometry: SeriesGeometry, patient: PatientInfo, *,
                 transfer_syntax: str = "explicit",
                 enhanced: bool = False,
                 patient_position: str = "HFS",
                 instance_numbers: bool = True,
                 study_uid: str | None = None, series_uid: str | None = None,
                 slope: float = 1.0, intercept: float = -1024.0,
                 seed: int = 0, style: SeriesStyle = SeriesStyle(),
                 frame_uid: str | None = None) -> list[tuple[str, bytes]]:
    """hu: (n_slices, rows, cols) float/int HU array; slice k lies at origin + k*slice_spacing*normal.

    Returns [(file name = SOPInstanceUID + '.dcm', Part 10 file bytes)], in a shuffled (seeded)
    order, not slice order. UIDs are deterministic in (patient_id, seed).
    """
    hu = np.asarray(hu)
    _check(hu, geometry, transfer_syntax)
    stored = to_stored(hu, slope, intercept)
    study, series, frame = _uids(patient, seed, study_uid, series_uid)
    frame = frame_uid or frame  # the series of one study share their frame of reference
    ts_uid = TRANSFER_SYNTAXES[transfer_syntax]
    kwargs = dict(patient=patient, seed=seed, study=study, series=series, frame=frame,
                  patient_position=patient_position, ts_uid=ts_uid,
                  transfer_syntax=transfer_syntax, slope=slope, intercept=intercept, style=style)
    if enhanced:
        files = [_enhanced_file(stored, geometry, instance_numbers=instance_numbers, **kwargs)]
    else:
        files = [_classic_file(stored[k], k, geometry, instance_numbers=instance_numbers,
                               **kwargs) for k in range(stored.shape[0])]
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(files))
    return [files[i] for i in order]


def _orientation(geometry: SeriesGeometry) -> list[str]:
    return [_ds(v) for v in (*geometry.row_cosine, *geometry.col_cosine)]


def _window(ds: Dataset) -> None:
    ds.WindowCenter = "400"
    ds.WindowWidth = "1800"
    ds.WindowCenterWidthExplanation = "BONE"


def _classic_file(frame_arr: np.ndarray, k: int, geometry: SeriesGeometry, *,
                  patient: PatientInfo, seed: int, study: str, series: str, frame: str,
                  patient_position: str, ts_uid: str, transfer_syntax: str, slope: float,
                  intercept: float, instance_numbers: bool, style: SeriesStyle) -> tuple[str, bytes]:
    """One CT Image Storage instance (PS3.3 A.3) for slice ``k``."""
    sop = generate_uid(entropy_srcs=[series, "sop", str(k)])
    ds = Dataset()
    ds.file_meta = _file_meta(CTImageStorage, sop, ts_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(style.image_type)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    _patient_study_series(ds, patient, seed, study, series, frame, patient_position, style)
    if instance_numbers:
        ds.InstanceNumber = k + 1
    ds.AcquisitionNumber = 1
    pos = geometry.slice_position(k)
    ds.ImagePositionPatient = [_ds(v) for v in pos]
    ds.ImageOrientationPatient = _orientation(geometry)
    ds.SliceLocation = _ds(float(pos @ geometry.normal))
    ds.PixelSpacing = [_ds(v) for v in geometry.pixel_spacing]
    ds.SliceThickness = _ds(style.thickness_mm or geometry.slice_spacing)
    ds.SpacingBetweenSlices = _ds(geometry.slice_spacing)
    _image_pixel(ds, *frame_arr.shape)
    if style.padding_hu is not None:
        ds.PixelPaddingValue = int(to_stored(np.array([style.padding_hu]), slope, intercept)[0])
    ds.RescaleIntercept = _ds(intercept)
    ds.RescaleSlope = _ds(slope)
    ds.RescaleType = "HU"
    _window(ds)
    _set_pixels(ds, frame_arr, transfer_syntax)
    return f"{sop}.dcm", _encode(ds)


def _item(**elements: object) -> Dataset:
    item = Dataset()
    for key, value in elements.items():
        setattr(item, key, value)
    return item


def _enhanced_file(stored: np.ndarray, geometry: SeriesGeometry, *, patient: PatientInfo,
                   seed: int, study: str, series: str, frame: str, patient_position: str,
                   ts_uid: str, transfer_syntax: str, slope: float, intercept: float,
                   instance_numbers: bool, style: SeriesStyle) -> tuple[str, bytes]:
    """One Enhanced CT Image Storage instance (PS3.3 A.38) holding every slice as a frame."""
    sop = generate_uid(entropy_srcs=[series, "sop", "enhanced"])
    n = stored.shape[0]
    ds = Dataset()
    ds.file_meta = _file_meta(EnhancedCTImageStorage, sop, ts_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = sop
    _patient_study_series(ds, patient, seed, study, series, frame, patient_position, style)
    if instance_numbers:
        ds.InstanceNumber = 1
    ds.ContentQualification = "PRODUCT"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = Sequence()
    ds.NumberOfFrames = n
    _image_pixel(ds, *stored.shape[1:])
    dim_org = generate_uid(entropy_srcs=[series, "dimension-organization"])
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=dim_org)])
    ds.DimensionIndexSequence = Sequence([
        _item(DimensionOrganizationUID=dim_org, DimensionIndexPointer=0x00209057,
              FunctionalGroupPointer=0x00209111, DimensionDescriptionLabel="In-Stack Position"),
    ])
    ds.DimensionOrganizationType = "3D"
    ds.SharedFunctionalGroupsSequence = Sequence([_item(
        PixelMeasuresSequence=Sequence([_item(
            PixelSpacing=[_ds(v) for v in geometry.pixel_spacing],
            SliceThickness=_ds(geometry.slice_spacing),
            SpacingBetweenSlices=_ds(geometry.slice_spacing))]),
        PlaneOrientationSequence=Sequence([_item(
            ImageOrientationPatient=_orientation(geometry))]),
        PixelValueTransformationSequence=Sequence([_item(
            RescaleIntercept=_ds(intercept), RescaleSlope=_ds(slope), RescaleType="HU")]),
        FrameVOILUTSequence=Sequence([_item(
            WindowCenter="400", WindowWidth="1800", WindowCenterWidthExplanation="BONE")]),
        CTImageFrameTypeSequence=Sequence([_item(
            FrameType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"], PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE")]),
    )])
    per_frame = []
    for k in range(n):
        per_frame.append(_item(
            FrameContentSequence=Sequence([_item(
                StackID="1", InStackPositionNumber=k + 1, DimensionIndexValues=[k + 1])]),
            PlanePositionSequence=Sequence([_item(
                ImagePositionPatient=[_ds(v) for v in geometry.slice_position(k)])]),
        ))
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    _set_pixels(ds, stored, transfer_syntax)
    return f"{sop}.dcm", _encode(ds)
