"""DICOM SRs of scored patients: built by highdicom, parsed by dcmtk, sent to a real Orthanc.

The PACS tests score a small cohort with ``--sr-out dicomweb+http://…`` into the session's
Orthanc (``pacs_server``) and read the reports back through Orthanc's own REST API, not our
client; dcmtk's ``dsrdump`` (an independent reader) must parse every one.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
import requests
import torch
from pydicom import Dataset
from pydicom.uid import generate_uid

from vfx_ray import storage
from vfx_ray.config import CropConfig
from vfx_ray.export import delivery, sr
from vfx_ray.ml.model import build_model, save_model
from vfx_ray.services import object_store
from vfx_ray.stages import committed_parts, score

CFG = CropConfig()
CT = "1.2.840.10008.5.1.4.1.1.2"
needs_dsrdump = pytest.mark.skipif(shutil.which("dsrdump") is None,
                                   reason="dcmtk not installed (make test installs it)")


def nums(ds: Dataset) -> dict[str, float]:
    """Every NUM content item of an SR, by concept code value."""
    out: dict[str, float] = {}
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "NUM":
            out[item.ConceptNameCodeSequence[0].CodeValue] = float(item.MeasuredValueSequence[0].NumericValue)
        out.update(nums(item))
    return out


def codes_of(ds: Dataset) -> dict[str, str]:
    """Every CODE content item: concept code value -> coded value's meaning."""
    out: dict[str, str] = {}
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "CODE":
            out[item.ConceptNameCodeSequence[0].CodeMeaning] = item.ConceptCodeSequence[0].CodeMeaning
        out.update(codes_of(item))
    return out


def referenced_series(ds: Dataset) -> set[str]:
    return {s.SeriesInstanceUID for st in ds.CurrentRequestedProcedureEvidenceSequence
            for s in st.ReferencedSeriesSequence}


def dsrdump_ok(data: bytes, tmp_path) -> str:
    path = tmp_path / f"{generate_uid()}.dcm"
    path.write_bytes(data)
    # strict (no -Ee): a content item error aborts the dump
    run = subprocess.run(["dsrdump", "+Pl", str(path)], capture_output=True, text=True)
    assert run.returncode == 0 and "E:" not in run.stderr, run.stderr
    return run.stdout


def source(n: int = 3) -> sr.SourceSeries:
    study = Dataset()
    study.PatientID, study.PatientName, study.StudyInstanceUID = "P7", "Doe^Jane", generate_uid()
    return sr.SourceSeries(study, generate_uid(), [(CT, generate_uid()) for _ in range(n)], generate_uid())


ROW = {"patient_id": "P7", "probability": 0.8125, "threshold": 0.5, "n_models": 10, "slice_indices": [4, 5, 6],
       "slice_probabilities": [0.25, 0.8125, 0.5], "model_id": "m1", "vertebra": "L1"}


def as_file(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@needs_dsrdump
def test_report_says_what_was_scored_and_dcmtk_parses_it(tmp_path):
    src = source()
    ds = sr.structured_report(ROW, src, (1, 11, -5, 15, 20, 50), malignant=True)
    text = dsrdump_ok(as_file(ds), tmp_path)
    back = pydicom.dcmread(io.BytesIO(as_file(ds)))
    assert back.PatientID == "P7" and back.StudyInstanceUID == src.study.StudyInstanceUID
    assert referenced_series(back) == {src.series_instance_uid}
    assert nums(back)["111047"] == 0.8125 and nums(back)["THRESHOLD"] == 0.5 and nums(back)["ENSEMBLE"] == 10
    assert [nums(back)[f"SLICE{k}"] for k in (4, 5, 6)] == [0.25, 0.8125, 0.5]
    assert codes_of(back)["Predicted fracture type"] == "Malignant" and codes_of(back)["Finding Site"] == "L1 vertebra"
    assert "NOT FOR DIAGNOSTIC USE" in text and "not for diagnostic use" in back.SeriesDescription
    faces = [i for i in back.ContentSequence[-2].ContentSequence[0].ContentSequence if i.ValueType == "SCOORD3D"]
    assert [list(f.GraphicData[:3]) for f in faces] == [[1, -5, 20], [11, -5, 20]]  # x = the box's two faces
    assert {f.ReferencedFrameOfReferenceUID for f in faces} == {src.frame_of_reference_uid}


def test_report_uid_is_fixed_by_patient_series_and_model():
    src = source()
    one = sr.structured_report(ROW, src, (0, 1, 0, 1, 0, 1), malignant=False)
    again = sr.structured_report(ROW, src, (0, 1, 0, 1, 0, 1), malignant=False)
    other = sr.structured_report({**ROW, "model_id": "m2"}, src, (0, 1, 0, 1, 0, 1), malignant=False)
    assert one.SOPInstanceUID == again.SOPInstanceUID != other.SOPInstanceUID
    assert codes_of(one)["Predicted fracture type"] == "Benign"


def test_folder_target_is_idempotent(tmp_path):
    ds = sr.structured_report(ROW, source(), (0, 1, 0, 1, 0, 1), malignant=True)
    work = [("P7", "s", lambda: [ds])]
    first, second = delivery.push(str(tmp_path), work), delivery.push(str(tmp_path), work)
    assert (first.sent, first.already_there, second.sent, second.already_there) == (1, 0, 0, 1)
    assert (tmp_path / "P7" / f"{ds.SOPInstanceUID}.dcm").exists()


def test_pacs_down_gives_an_error_row_per_patient_and_gives_up_after_a_few(monkeypatch):
    monkeypatch.setattr(delivery, "BACKOFF_S", 0.01)
    port = object_store.free_port()  # nothing listens there
    ds = sr.structured_report(ROW, source(), (0, 1, 0, 1, 0, 1), malignant=True)
    tried: list[str] = []

    def build(pid):
        return lambda: tried.append(pid) or [ds]

    work = [(f"P{i}", "s", build(f"P{i}")) for i in range(6)]
    out = delivery.push(f"dicomweb+http://127.0.0.1:{port}/dicom-web", work)
    assert out.sent == 0 and [e["patient_id"] for e in out.errors] == [f"P{i}" for i in range(6)]
    assert {e["error_type"] for e in out.errors} == {"PacsUnreachable"} and tried == ["P0", "P1", "P2"]
    assert all(f"127.0.0.1:{port}" in e["message"] and e["stage"] == "sr" for e in out.errors)


# ---------------------------------------------------------------- the real PACS
@pytest.fixture(scope="module")
def cohort(synth_cohort, tmp_path_factory, pacs_server):
    if pacs_server is None:
        pytest.skip("Orthanc is not installed (make test installs orthanc orthanc-dicomweb as root)")
    root, work = synth_cohort(patients=6, seed=11), str(tmp_path_factory.mktemp("sr"))
    torch.manual_seed(0)
    model = os.path.join(work, "model.pt")
    save_model(build_model("resnet18", pretrained="none"), model, "resnet18")
    return {"root": root, "work": work, "model": model, "ann": os.path.join(root, "annotations.csv")}


def orthanc_srs(server, modality: str = "SR") -> dict[str, bytes]:
    """Every instance of a modality in Orthanc, by SOP Instance UID, through Orthanc's REST API."""
    auth = (server.user, server.password)
    found = requests.post(f"{server.url}/tools/find", json={"Level": "Instance", "Query": {"Modality": modality}},
                          auth=auth, timeout=30).json()
    out = {}
    for oid in found:
        data = requests.get(f"{server.url}/instances/{oid}/file", auth=auth, timeout=30).content
        out[pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID] = data
    return out


@pytest.mark.slow
@needs_dsrdump
def test_score_sends_one_sr_per_patient_to_orthanc_and_a_rerun_sends_none(cohort, pacs_server, ray_session,
                                                                          tmp_path):
    out = os.path.join(cohort["work"], "scores")
    before, images_before = set(orthanc_srs(pacs_server)), set(orthanc_srs(pacs_server, "OT"))
    summary = score.run_score(f"{cohort['root']}/dicom", cohort["ann"], cohort["model"], out, CFG, progress=False,
                              sr_out=pacs_server.dicomweb_uri, key_images=True)
    scores = storage.read_table(os.path.join(out, "scores.parquet")).to_pandas().set_index("patient_id")
    assert summary["sr_objects_sent"] == 2 * summary["sr_patients"] == 2 * len(scores) == 12, summary
    assert summary["sr_errors"] == 0
    cams = committed_parts.committed_cams(out, scores["model_id"].iloc[0])  # what the key images drew
    assert set(cams) == set(scores.index) and {len(c) for c in cams.values()} == {4 * 2 * 2}  # 1 model, 2x2
    reports = {k: v for k, v in orthanc_srs(pacs_server).items() if k not in before}
    images = {k: pydicom.dcmread(io.BytesIO(v)) for k, v in orthanc_srs(pacs_server, "OT").items()
              if k not in images_before}
    assert len(reports) == len(images) == 6
    by_patient = {}
    for data in reports.values():
        dsrdump_ok(data, tmp_path)
        ds = pydicom.dcmread(io.BytesIO(data))
        by_patient[ds.PatientID] = ds
    assert set(by_patient) == set(scores.index)
    for pid, ds in by_patient.items():
        src = pydicom.dcmread(next(Path(cohort["root"], "dicom", pid).rglob("*.dcm")), stop_before_pixels=True)
        assert (ds.StudyInstanceUID, ds.PatientName, ds.PatientBirthDate) == (
            src.StudyInstanceUID, src.PatientName, src.get("PatientBirthDate", ""))
        key_image = [i for i in images.values() if i.PatientID == pid]
        assert len(key_image) == 1 and key_image[0].StudyInstanceUID == ds.StudyInstanceUID
        assert referenced_series(ds) == {scores.loc[pid, "series_instance_uid"], key_image[0].SeriesInstanceUID}
        assert nums(ds)["111047"] == pytest.approx(scores.loc[pid, "probability"], abs=1e-12)
        assert codes_of(ds)["Predicted fracture type"].lower() == scores.loc[pid, "prediction"]

    again = score.run_score(f"{cohort['root']}/dicom", cohort["ann"], cohort["model"], out, CFG, progress=False,
                            sr_out=pacs_server.dicomweb_uri)
    assert again["sr_objects_sent"] == 0 and again["sr_objects_already_there"] == 6  # SRs only this time
    assert len(orthanc_srs(pacs_server)) == len(before) + 6


@pytest.mark.slow
def test_pacs_down_leaves_scores_written_and_error_rows(cohort, ray_session, monkeypatch):
    monkeypatch.setattr(delivery, "BACKOFF_S", 0.01)
    out = os.path.join(cohort["work"], "scores_down")
    down = f"dicomweb+http://127.0.0.1:{object_store.free_port()}/dicom-web"
    summary = score.run_score(f"{cohort['root']}/dicom", cohort["ann"], cohort["model"], out, CFG, progress=False,
                              sr_out=down)
    assert summary["rows"] == 6 and summary["sr_objects_sent"] == 0
    errors = storage.read_table(os.path.join(out, "errors.parquet")).to_pandas()
    sr_errors = errors[errors.stage == "sr"]
    scores = storage.read_table(os.path.join(out, "scores.parquet")).to_pandas()
    assert sorted(sr_errors.patient_id) == sorted(scores.patient_id)  # every patient accounted for
    assert set(sr_errors.error_type) == {"PacsUnreachable"}


def test_a_scored_patient_no_longer_planned_gets_an_error_row_not_a_report(tmp_path, monkeypatch):
    import pyarrow as pa

    from vfx_ray.export import patient_reports
    from vfx_ray.imaging.pseudonym import KEY_ENV, Pseudonymizer

    table = pa.Table.from_pylist([{**ROW, "series_instance_uid": "1.2.3.4"}])
    out = delivery.push(str(tmp_path), patient_reports.work(table, [], [], CFG, None, None))
    assert out.sent == 0 and [(e["patient_id"], e["error_type"]) for e in out.errors] == [("P7", "LookupError")]
    assert "no longer in the annotations" in out.errors[0]["message"] and not list(tmp_path.iterdir())
    monkeypatch.setenv(KEY_ENV, "k" * 32)
    pseudo = Pseudonymizer.from_env()
    hidden = pa.Table.from_pylist([{**ROW, "patient_id": pseudo.patient("P7"), "series_instance_uid": "2.25.1"}])
    out = delivery.push(str(tmp_path), patient_reports.work(hidden, [], [], CFG, pseudo, None))
    assert out.errors[0]["patient_id"] is None and pseudo.patient("P7") in out.errors[0]["message"]
