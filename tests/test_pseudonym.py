"""--pseudonymize: keyed, stable pseudonyms; no identifying header field reaches an output or log.

The end-to-end test plants sentinel values in every identifying DICOM field of a small
archive (PatientName, PatientBirthDate, AccessionNumber, InstitutionName, and the PatientID,
UIDs and folder names that pseudonyms must replace), runs crops and score with
``pseudonymize=True``, then searches every output, the captured output and the Ray session's
logs for them (``leakscan``: Parquet decoded, whatever the compression).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pydicom
import pytest
import torch
from leakscan import find, needles, scan_tree

from vfx_ray import storage
from vfx_ray.errors import VfxError
from vfx_ray.imaging.pseudonym import KEY_ENV, Pseudonymizer
from vfx_ray.ml.model import build_model, save_model
from vfx_ray.stages.crops import run_crops
from vfx_ray.stages.score import run_score

KEY = "k" * 8 + secrets.token_hex(16)


def test_pseudonyms_are_keyed_stable_and_valid():
    a, b, other = Pseudonymizer(KEY), Pseudonymizer(KEY), Pseudonymizer(KEY + "x")
    assert a.patient("P001") == b.patient("P001") != other.patient("P001")
    assert a.patient("P001") != a.patient("P002")
    assert re.fullmatch(r"P[0-9a-f]{24}", a.patient("P001"))
    uid = a.uid("1.2.826.0.1.3680043.8.498.1")
    assert re.fullmatch(r"2\.25\.[1-9]\d*", uid) and len(uid) <= 64  # a valid DICOM UID
    assert uid == b.uid("1.2.826.0.1.3680043.8.498.1") != a.uid("1.2.826.0.1.3680043.8.498.2")
    assert a.key("s3://b/x/P001/1.dcm").startswith("obj-") and a.key_id == b.key_id != other.key_id
    assert a.patient(None) is None and a.uid(None) is None


def test_messages_are_scrubbed_of_keys_uids_and_known_patients():
    p = Pseudonymizer(KEY, archive_uri="s3://b/arch/")
    p.know_patients(["DOE-7", "P2"])
    row = {"patient_id": "DOE-7", "series_instance_uid": "1.2.3.4.5", "object_key": "s3://b/arch/DOE 7/a.dcm",
           "stage": "annotations", "error_type": "X",
           "message": "s3://b/arch/DOE 7/a.dcm: series 1.2.3.4.9 belongs to patient P2, not DOE-7; see s3://b/arch/P2/b.dcm"}
    out = p.row(row)
    assert out["patient_id"] == p.patient("DOE-7") and out["series_instance_uid"] == p.uid("1.2.3.4.5")
    assert out["object_key"] == p.key("s3://b/arch/DOE 7/a.dcm") and out["stage"] == "annotations"
    for raw in ("DOE", "P2,", "1.2.3.4.9", "arch/"):
        assert raw not in out["message"], out["message"]
    assert p.uid("1.2.3.4.9") in out["message"] and p.patient("P2") in out["message"]
    assert p.key("s3://b/arch/P2/b.dcm") in out["message"]
    endpoint = "object store http://127.0.0.1:9000 unreachable; series 1.2.3.4.9: gone"
    assert p.scrub(endpoint) == f"object store http://127.0.0.1:9000 unreachable; series {p.uid('1.2.3.4.9')}: gone"
    # a series without PatientID (a DICOMDIR's index row) keeps its empty id, and messages stay whole
    table = p.table(pa.table({"patient_id": ["", None, "P2"]}))
    assert table["patient_id"].to_pylist() == ["", None, p.patient("P2")]
    assert p.scrub("plain words stay") == "plain words stay"


@pytest.mark.slow
def test_key_is_required_and_must_be_long(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(VfxError, match=KEY_ENV):
        Pseudonymizer.from_env()
    with pytest.raises(VfxError, match="shorter than"):
        Pseudonymizer("short")
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    res = subprocess.run([sys.executable, "-m", "vfx_ray.cli", "crops", "--archive", "a", "--annotations", "b.csv",
                          "--out", "o", "--pseudonymize"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and KEY_ENV in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


SENTINELS = {
    "name": "SENTINELNAME^ZORBA",
    "birth_date": "19010203",
    "accession": "ACCSENTINEL77",
    "institution": "SENTINEL INSTITUTE OF ZORBA",
}


def plant_sentinels(src: Path, dst: Path) -> dict[str, str]:
    """Copy a synthetic archive with identifying values in every object; folders named by
    the (new) patient id. Returns {old patient id: sentinel patient id}."""
    ids: dict[str, str] = {}
    for path in sorted((src / "dicom").rglob("*")):
        if not path.is_file():
            continue
        ds = pydicom.dcmread(path)
        new = ids.setdefault(ds.PatientID, f"PIDSENTINEL{len(ids)}X{secrets.token_hex(3)}")
        ds.PatientID, ds.PatientName, ds.PatientBirthDate = new, SENTINELS["name"], SENTINELS["birth_date"]
        ds.AccessionNumber, ds.InstitutionName = SENTINELS["accession"], SENTINELS["institution"]
        out = dst / "dicom" / new / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out)
    (dst / "dicom" / next(iter(ids.values())) / "broken.dcm").write_bytes(b"DICM" + b"\0" * 300)
    ann = pd.read_csv(src / "annotations.csv", dtype={"patient_id": str, "series_instance_uid": str})
    ann["patient_id"] = ann["patient_id"].map(ids)
    extra = ann.iloc[[0]].assign(patient_id="PIDSENTINELMISSING", series_instance_uid="1.2.3.999.1")
    pd.concat([ann, extra]).to_csv(dst / "annotations.csv", index=False)
    return ids


@pytest.mark.slow
def test_no_identifier_reaches_outputs_or_logs(synth_cohort, tmp_path, ray_session, monkeypatch, capfd):
    import ray

    src, work = Path(synth_cohort(patients=3, seed=21)), tmp_path / "work"
    ids = plant_sentinels(src, work)
    headers = [
        pydicom.dcmread(p, stop_before_pixels=True) for p in (work / "dicom").rglob("*.dcm") if p.name != "broken.dcm"
    ]
    uids = (
        {str(h.StudyInstanceUID) for h in headers}
        | {str(h.SeriesInstanceUID) for h in headers}
        | {str(h.SOPInstanceUID) for h in headers}
    )
    monkeypatch.setenv(KEY_ENV, KEY)
    torch.manual_seed(0)
    model = str(tmp_path / "model.pt")
    save_model(build_model("resnet18", pretrained="none"), model, "resnet18")
    archive, ann = str(work / "dicom"), str(work / "annotations.csv")
    out = tmp_path / "out"
    crops = run_crops(archive, ann, str(out / "crops"), progress=True, pseudonymize=True)
    scores = run_score(archive, ann, model, str(out / "scores"), progress=True, pseudonymize=True,
                       sr_out=str(out / "reports"), key_images=True)
    assert crops["pseudonymized"] and crops["patients_with_crops"] == 3 and crops["errors"] >= 2, crops
    assert scores["rows"] == 3 and scores["pseudonym_key_id"] == Pseudonymizer(KEY).key_id, scores

    p = Pseudonymizer(KEY)
    c = storage.read_table(str(out / "crops" / "crops.parquet")).to_pandas()
    s = storage.read_table(str(out / "scores" / "scores.parquet")).to_pandas()
    assert set(c.patient_id) == set(s.patient_id) == {p.patient(i) for i in ids.values()}  # stable: they join
    reports = [pydicom.dcmread(f) for f in sorted((out / "reports").rglob("*.dcm"))]
    assert scores["sr_objects_sent"] == 6 and len(reports) == 6, scores  # an SR and a key image per patient
    assert {r.PatientID for r in reports} == {r.PatientName.family_name for r in reports} == set(s.patient_id)
    errs = storage.read_table(str(out / "crops" / "errors.parquet")).to_pandas()
    assert {"SeriesNotFound"} <= set(errs.error_type) and errs.object_key.dropna().str.startswith("obj-").all()
    index = storage.read_table(str(out / "crops" / "series_index.parquet")).to_pandas()
    assert index.series_description.isna().all() and all(k.startswith("obj-") for ks in index.object_keys for k in ks)

    wanted = needles(**SENTINELS, **{f"patient {i}": v for i, v in enumerate([*ids.values(), "PIDSENTINELMISSING"])},
                     **{f"uid {i}": u for i, u in enumerate(sorted(uids | {"1.2.3.999.1"}))})
    captured = capfd.readouterr()
    hits = [*find("stdout", captured.out.encode(), wanted), *find("stderr", captured.err.encode(), wanted)]
    output_hits, n_files = scan_tree(out, wanted)
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    log_hits, n_logs = scan_tree(session / "logs", wanted)
    assert n_files >= 8 and n_logs >= 5, (n_files, n_logs)
    leaks = hits + output_hits + log_hits
    assert not leaks, "identifiers found in:\n" + "\n".join(leaks)
