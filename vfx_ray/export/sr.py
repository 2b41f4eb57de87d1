"""A scored patient as a DICOM Structured Report: TID 1500 (Measurement Report) with highdicom.

Pure: a ``scores.parquet`` row and what the source series says of itself in, a
Comprehensive 3D SR dataset out. The report holds, in one volumetric ROI group: the
malignancy probability (the per-patient maximum, DCM 111047 "Probability of cancer"), the
threshold, each sagittal slice's probability, the predicted class (SCT Benign/Malignant), the
ROI as two sagittal faces of its box in the source series' frame of reference, the vertebra
(SCT) when known, the model id and ensemble size (as the algorithm's identification), and a
caution that it is research output, not for diagnostic use (also in the Series Description).

Its SOP Instance UID is derived from patient, series and model id (:func:`report_uid`): a
re-sent report has the same UID, which a PACS stores once.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

SCHEME = "99VFXRAY"  # this project's private coding scheme (PS3.16 8.2: "99" prefix)
CAUTION = ("RESEARCH OUTPUT - NOT FOR DIAGNOSTIC USE. Automated classification of a vertebral fracture "
           "as benign or malignant (vfx_ray, after Li et al., Eur Radiol 2021); not reviewed by a physician.")
SERIES_DESCRIPTION = "vfx_ray research SR - not for diagnostic use"
MANUFACTURER = "vfx_ray"
SR_SERIES_NUMBER = 9901
FRACTURE = Code("125605004", "SCT", "Fracture of bone")
PROBABILITY = codes.DCM.ProbabilityOfCancer
THRESHOLD = Code("THRESHOLD", SCHEME, "Decision threshold on the probability of cancer")
ENSEMBLE_SIZE = Code("ENSEMBLE", SCHEME, "Number of models averaged")
PREDICTION = Code("PREDICTION", SCHEME, "Predicted fracture type")
CAUTION_CODE = Code("CAUTION", SCHEME, "Caution")
NO_UNITS = Code("1", "UCUM", "no units")
# what evidence[0] must carry: highdicom copies the Patient and General Study modules from it
STUDY_KEYWORDS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                  "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyInstanceUID")


@dataclasses.dataclass(frozen=True)
class SourceSeries:
    """What a report refers to: the study identity (a header of the series, already
    pseudonymised where the run is), the series' instances and its frame of reference."""

    study: Dataset  # at least STUDY_KEYWORDS (absent ones become empty)
    series_instance_uid: str
    instances: Sequence[tuple[str, str]]  # (SOP Class UID, SOP Instance UID)
    frame_of_reference_uid: str | None


def fixed_uid(*parts: str) -> str:
    """A UID under the 2.25 root from 128 hash bits of ``parts``: the same parts, the same UID
    (pydicom's ``generate_uid(prefix=None)`` is a random UUID whatever the entropy given)."""
    return "2.25." + str(int(hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32], 16))


def report_uid(patient_id: str, series_instance_uid: str, model_id: str, kind: str = "sr") -> str:
    """A UID fixed by patient, series and model id: the same report always has the same UID."""
    return fixed_uid(kind, patient_id, series_instance_uid, model_id)


def slice_code(index: int) -> Code:
    return Code(f"SLICE{index}", SCHEME, f"Probability of cancer, sagittal slice {index}")


def vertebra_code(vertebra: str | None) -> Code | None:
    """SCT code of a level such as ``T12`` or ``L1`` (None when unknown or not a level)."""
    if not vertebra:
        return None
    return getattr(codes.SCT, f"{vertebra.strip().upper()}Vertebra", None)


def box_faces(roi: Sequence[float]) -> list[np.ndarray]:
    """The ROI box (LPS x/y/z min/max, mm) as its two sagittal faces, closed polygons (N x 3)."""
    x0, x1, y0, y1, z0, z1 = (float(v) for v in roi)
    return [np.array([[x, y0, z0], [x, y1, z0], [x, y1, z1], [x, y0, z1], [x, y0, z0]]) for x in (x0, x1)]


def evidence(source: SourceSeries) -> list[Dataset]:
    """One minimal dataset per source instance; the first carries the patient and study."""
    out = []
    for i, (sop_class, sop_uid) in enumerate(source.instances):
        ds = Dataset()
        if i == 0:
            for kw in STUDY_KEYWORDS:
                setattr(ds, kw, source.study.get(kw, ""))
        ds.StudyInstanceUID = source.study.StudyInstanceUID
        ds.SeriesInstanceUID, ds.SOPClassUID, ds.SOPInstanceUID = source.series_instance_uid, sop_class, sop_uid
        out.append(ds)
    return out


def measurements(row: dict[str, Any]) -> list[hd.sr.Measurement]:
    """The patient's probability, threshold, ensemble size and each slice's probability."""
    out = [hd.sr.Measurement(PROBABILITY, float(row["probability"]), NO_UNITS),
           hd.sr.Measurement(THRESHOLD, float(row["threshold"]), NO_UNITS),
           hd.sr.Measurement(ENSEMBLE_SIZE, float(row["n_models"]), NO_UNITS)]
    for index, p in zip(row["slice_indices"], row["slice_probabilities"], strict=True):
        out.append(hd.sr.Measurement(slice_code(int(index)), float(p), NO_UNITS))
    return out


def roi_group(row: dict[str, Any], source: SourceSeries, roi: Sequence[float], malignant: bool
              ) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411: the ROI box, where it is, what was measured in it and the decision."""
    key = [row["patient_id"], source.series_instance_uid, row["model_id"]]
    surface = hd.sr.VolumeSurface(
        graphic_type=hd.sr.GraphicTypeValues3D.POLYGON, graphic_data=box_faces(roi),
        frame_of_reference_uid=source.frame_of_reference_uid,
        source_series=hd.sr.SourceSeriesForSegmentation(source.series_instance_uid))
    site = vertebra_code(row.get("vertebra"))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=fixed_uid("roi", *key),
                                                     identifier=f"vertebral fracture ROI {row.get('vertebra') or ''}"),
        referenced_volume_surface=surface,
        finding_type=FRACTURE,
        finding_sites=[hd.sr.FindingSite(site)] if site else None,
        algorithm_id=hd.sr.AlgorithmIdentification(name="vfx_ray ResNet50", version=str(row["model_id"])),
        measurements=measurements(row),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(PREDICTION, codes.SCT.Malignant if malignant
                                                             else codes.SCT.Benign)])


def structured_report(row: dict[str, Any], source: SourceSeries, roi: Sequence[float], malignant: bool,
                      key_images: Sequence[Dataset] = ()) -> hd.sr.Comprehensive3DSR:
    """The patient's SR. ``row``: its ``scores.parquet`` row (ids as written there)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=fixed_uid("device", str(row["model_id"])), name="vfx_ray",
        model_name=str(row["model_id"])[:64])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=codes.cid100.CTUnspecifiedBodyRegion,
        imaging_measurements=[roi_group(row, source, roi, malignant)],
        referenced_images=list(key_images) or None)
    report[0].ContentSequence.append(hd.sr.TextContentItem(
        name=CAUTION_CODE, value=CAUTION, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*evidence(source), *key_images], content=report[0],
        series_instance_uid=report_uid(row["patient_id"], source.study.StudyInstanceUID, row["model_id"], "series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=report_uid(row["patient_id"], source.series_instance_uid, row["model_id"]),
        instance_number=1, manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False)
    sr.SeriesDescription = SERIES_DESCRIPTION
    return sr
