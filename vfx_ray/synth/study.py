"""A clinical spine CT study: the series a hospital's export holds besides the one the crops need.

For one patient (``SynthConfig(study="clinical")``, preset :func:`~vfx_ray.config.clinical_synth`):
- a localizer (``ORIGINAL\\PRIMARY\\LOCALIZER``, one coronal image);
- the axial series twice from one acquisition: a bone kernel (the truth the annotations name)
  and a soft kernel (smoother, less noise), both with the circular field of view;
- sagittal and coronal 3 mm reformats (``DERIVED\\SECONDARY\\REFORMATTED``);
- a dose report (a Comprehensive SR document) and a secondary capture of a dose screen;
- optionally (``dicomdir``) the whole study as DICOM media: ``DICOMDIR`` and ``PT*/ST*/SE*/IM*``.

Everything derives from the patient's spec and seed, like the default cohort's single series.
"""

from __future__ import annotations

import dataclasses
import io
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from scipy.ndimage import gaussian_filter

from vfx_ray.synth.anatomy import sample_volume
from vfx_ray.synth.dicom_writer import PatientInfo, SeriesGeometry, SeriesStyle, write_series
from vfx_ray.synth.patient import FOV_PADDING_HU, PatientSpec, fov_disc, make_patient, patient_model

REFORMAT_MM = 3.0
REFORMAT_PIXEL_MM = 0.8
SAGITTAL_HALF_WIDTH_MM = 36.0  # reformat slices cover the spine's width
CORONAL_HALF_DEPTH_MM = 30.0


@dataclasses.dataclass(frozen=True)
class StudyUids:
    study: str
    frame: str
    bone: str
    soft: str
    sagittal: str
    coronal: str
    localizer: str
    report: str
    capture: str

    @classmethod
    def of(cls, spec: PatientSpec, study: str, bone: str) -> StudyUids:
        def uid(name: str) -> str:
            return generate_uid(entropy_srcs=[spec.patient_id, str(spec.seed), study, name])

        others = ("frame", "soft", "sagittal", "coronal", "localizer", "report", "capture")
        return cls(study=study, bone=bone, **{name: uid(name) for name in others})


def clinical_study(spec: PatientSpec) -> tuple[list[tuple[str, bytes]], dict]:
    """(relative path, bytes) of every object of the patient's study, and its annotation row
    (which names the bone-kernel axial series)."""
    hu, geometry, row = make_patient(spec, noise=False)
    uids = StudyUids.of(spec, row["study_instance_uid"], row["series_instance_uid"])
    patient = PatientInfo(spec.patient_id, spec.age, spec.sex)
    common = dict(patient=patient, study_uid=uids.study, seed=spec.seed, frame_uid=uids.frame,
                  patient_position=spec.patient_position, transfer_syntax=spec.transfer_syntax)
    series = {uids.bone: write_series(_kernel(hu, spec, sharp=True), geometry, series_uid=uids.bone,
                                      style=_axial_style(spec, "BONE", 3), **common),
              uids.soft: write_series(_kernel(hu, spec, sharp=False), geometry, series_uid=uids.soft,
                                      style=_axial_style(spec, "STANDARD", 2), **common)}
    del hu
    model = patient_model(spec)
    for name, plane, number in (("sagittal", "SAG", 4), ("coronal", "COR", 5)):
        volume, geo = _reformat(model, geometry, name, spec)
        style = SeriesStyle(f"{plane} BONE {REFORMAT_MM:g}mm", number, ("DERIVED", "SECONDARY", "REFORMATTED"),
                            "BONE")
        uid = getattr(uids, name)
        series[uid] = write_series(volume, geo, series_uid=uid, style=style, **common)
    localizer, geo = _localizer(model, geometry, spec)
    scout = SeriesStyle("Scout", 1, ("ORIGINAL", "PRIMARY", "LOCALIZER"), "STANDARD")
    series[uids.localizer] = write_series(localizer, geo, series_uid=uids.localizer, style=scout, **common)
    series[uids.report] = [_dose_report(spec, uids, patient)]
    series[uids.capture] = [_dose_capture(spec, uids, patient)]
    n_objects = sum(len(f) for f in series.values())
    row = {**row, "n_files": n_objects}
    if spec.dicomdir:
        return _as_media(series), row
    return [(f"{uid}/{name}", data) for uid, files in series.items() for name, data in files], row


def _axial_style(spec: PatientSpec, kernel: str, number: int) -> SeriesStyle:
    label = "BONE" if kernel == "BONE" else "STND"
    return SeriesStyle(f"{spec.slice_thickness_mm:g}mm {label}", number, ("ORIGINAL", "PRIMARY", "AXIAL"), kernel,
                       thickness_mm=spec.slice_thickness_mm, padding_hu=FOV_PADDING_HU if spec.fov_mask else None)


def _kernel(hu: np.ndarray, spec: PatientSpec, sharp: bool) -> np.ndarray:
    """One reconstruction of the same acquisition: the bone kernel keeps the edges and has
    more noise, the soft one is smoother with less; the field of view is masked in both."""
    rng = np.random.default_rng([spec.seed, 3 if sharp else 4])
    out = hu.copy() if sharp else gaussian_filter(hu, sigma=(0.0, 0.8, 0.8))
    sigma = rng.uniform(18.0, 28.0) if sharp else rng.uniform(6.0, 10.0)
    out += rng.normal(0.0, sigma, out.shape).astype(np.float32)
    if spec.fov_mask:
        out[:, ~fov_disc(spec.matrix)] = FOV_PADDING_HU
    return out


def _reformat(model, axial: SeriesGeometry, plane: str, spec: PatientSpec) -> tuple[np.ndarray, SeriesGeometry]:
    """A 3 mm reformat of the anatomy over the axial series' z range (sampled from the model,
    as a scanner's console would resample the bone series)."""
    n_axial = model.n_slices
    z = sorted(float(axial.slice_position(k)[2]) for k in (0, n_axial - 1))
    cx, cy = 0.0, model.spine.cy
    px = REFORMAT_PIXEL_MM
    rows = int((z[1] - z[0]) / px) + 1
    if plane == "sagittal":  # rows run inferior (-z), columns posterior (+y); slices across x
        row_c, col_c, cols = (0.0, 1.0, 0.0), (0.0, 0.0, -1.0), int(160 / px)
        n = int(2 * SAGITTAL_HALF_WIDTH_MM / REFORMAT_MM)
        origin = (cx + SAGITTAL_HALF_WIDTH_MM, cy - 80.0, z[1])  # normal is -x: slices run right to left
    else:  # coronal: columns to the patient's left (+x); slices across y
        row_c, col_c, cols = (1.0, 0.0, 0.0), (0.0, 0.0, -1.0), int(200 / px)
        n = int(2 * CORONAL_HALF_DEPTH_MM / REFORMAT_MM)
        origin = (cx - 100.0, cy - CORONAL_HALF_DEPTH_MM, z[1])
    geo = SeriesGeometry(origin, row_c, col_c, (px, px), REFORMAT_MM)
    volume = sample_volume(model.hu_at, geo, (n, rows, cols), REFORMAT_MM)
    rng = np.random.default_rng([spec.seed, 5 if plane == "sagittal" else 6])
    return volume + rng.normal(0.0, 10.0, volume.shape).astype(np.float32), geo


def _localizer(model, axial: SeriesGeometry, spec: PatientSpec) -> tuple[np.ndarray, SeriesGeometry]:
    """One coronal image through the spine, 1 mm pixels, covering the axial range and more."""
    z_top = max(float(axial.slice_position(k)[2]) for k in (0, model.n_slices - 1)) + 40.0
    geo = SeriesGeometry((-255.5, model.spine.cy, z_top), (1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (1.0, 1.0), 1.0)
    return sample_volume(model.hu_at, geo, (1, 512, 512), 10.0), geo


def _base(spec: PatientSpec, uids: StudyUids, patient: PatientInfo, sop_class: str, series: str,
          number: int, modality: str, description: str) -> Dataset:
    """The Patient, Study, Series and SOP Common attributes of a non-CT-image object."""
    sop = generate_uid(entropy_srcs=[series, "sop"])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.PatientName, ds.PatientID = patient.name or f"SYNTH^{patient.patient_id}", patient.patient_id
    ds.PatientBirthDate, ds.PatientSex = "", patient.sex or ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids.study, series
    day = 1 + spec.seed % 28
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = f"202001{day:02d}"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.StudyDescription = "SYNTH SPINE CT"
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = modality, number, description, 1
    ds.Manufacturer = "vfx_ray synthetic"
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _dose_report(spec: PatientSpec, uids: StudyUids, patient: PatientInfo) -> tuple[str, bytes]:
    """A dose summary as a Comprehensive SR document: a container with the total DLP."""
    ds = _base(spec, uids, patient, ComprehensiveSRStorage, uids.report, 997, "SR", "Dose Report")
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("113701", "DCM", "X-Ray Radiation Dose Report")])
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    dlp = Dataset()
    dlp.RelationshipType, dlp.ValueType = "CONTAINS", "NUM"
    dlp.ConceptNameCodeSequence = Sequence([_code("113813", "DCM", "CT Dose Length Product Total")])
    value = Dataset()
    value.NumericValue = f"{np.random.default_rng([spec.seed, 7]).uniform(600, 1200):.1f}"
    value.MeasurementUnitsCodeSequence = Sequence([_code("mGy.cm", "UCUM", "mGy.cm")])
    dlp.MeasuredValueSequence = Sequence([value])
    ds.ContentSequence = Sequence([dlp])
    return f"{ds.SOPInstanceUID}.dcm", _encode(ds)


def _dose_capture(spec: PatientSpec, uids: StudyUids, patient: PatientInfo) -> tuple[str, bytes]:
    """A screenshot of a dose page: an 8-bit Secondary Capture image, no patient geometry."""
    ds = _base(spec, uids, patient, SecondaryCaptureImageStorage, uids.capture, 999, "CT", "Dose Info")
    ds.ImageType, ds.ConversionType = ["DERIVED", "SECONDARY", "OTHER"], "WSD"
    ds.PatientOrientation = ""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 256
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    page = np.zeros((256, 256), np.uint8)
    page[20:236:12, 16:240] = 200  # lines of "text"
    ds.PixelData = page.tobytes()
    return f"{ds.SOPInstanceUID}.dcm", _encode(ds)


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _as_media(series: dict[str, list[tuple[str, bytes]]]) -> list[tuple[str, bytes]]:
    """The study as DICOM media (PS3.10): a DICOMDIR indexing PT*/ST*/SE*/IM* files, by pydicom's
    FileSet (which names the files itself)."""
    from pydicom.fileset import FileSet

    fileset = FileSet()
    for files in series.values():
        for _, data in files:
            fileset.add(pydicom.dcmread(io.BytesIO(data)))
    with tempfile.TemporaryDirectory(prefix="vfx-media-") as tmp:
        fileset.write(tmp)
        root = Path(tmp)
        return [(p.relative_to(root).as_posix(), p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()]
