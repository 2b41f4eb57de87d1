"""An archive on a PACS (``dicomweb+http://…``) read through the storage layer, against a real
Orthanc: the listing and the bytes are those of the files sent, a PACS that is away or failing
is named by host:port only, and the crops job gives the same crops from the PACS as from the
folder the instances came from."""

from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import requests

from vfx_ray import contracts, dicomweb, storage
from vfx_ray.config import CropConfig
from vfx_ray.pipeline import shards
from vfx_ray.services.object_store import free_port
from vfx_ray.stages.crops import run_crops

COHORT = {"patients": 3, "seed": 21}  # test_pseudonym's: the session generates it once


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(dicomweb, "ATTEMPTS", 3)
    monkeypatch.setattr(dicomweb, "BACKOFF_S", 0.01)


@pytest.fixture(scope="module")
def uploaded(synth_cohort, pacs_server):
    """The cohort's DICOM files, every one sent to Orthanc (its REST API), by SOP Instance UID;
    the session's Orthanc emptied first, so that its root holds this cohort alone."""
    if pacs_server is None:
        pytest.skip("Orthanc is not installed (make test installs orthanc orthanc-dicomweb as root)")
    root = Path(synth_cohort(**COHORT))
    files = {}
    with requests.Session() as http:
        http.auth = (pacs_server.user, pacs_server.password)
        for patient in http.get(f"{pacs_server.url}/patients", timeout=30).json():  # other tests' reports
            http.delete(f"{pacs_server.url}/patients/{patient}", timeout=30).raise_for_status()
        for path in sorted(p for p in (root / "dicom").rglob("*") if p.is_file()):
            data = path.read_bytes()
            http.post(f"{pacs_server.url}/instances", data=data, timeout=30).raise_for_status()
            files[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
    return {"root": root, "files": files}


def sop_of(uri: str) -> str:
    return dicomweb.locate(uri).instance


def test_a_study_lists_as_its_instances_and_reads_byte_for_byte(uploaded, pacs_server):
    ds = pydicom.dcmread(next(iter(uploaded["files"].values())), stop_before_pixels=True)
    study = f"{pacs_server.dicomweb_uri}/studies/{ds.StudyInstanceUID}"
    entries = storage.list_files(study)
    mine = {k for k, p in uploaded["files"].items()
            if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == ds.StudyInstanceUID}
    assert {sop_of(e.uri) for e in entries} == mine
    assert [e.uri for e in entries] == sorted(e.uri for e in entries)
    assert all(e.uri.startswith(f"{study}/series/{ds.SeriesInstanceUID}/instances/") for e in entries)
    assert all(0 < e.size < os.path.getsize(uploaded["files"][sop_of(e.uri)]) for e in entries)  # pixel bytes
    some = [e.uri for e in entries[:3]]
    assert storage.read_many(some) == [uploaded["files"][sop_of(u)].read_bytes() for u in some]
    assert storage.read_prefix(some[0], 16) == storage.read_bytes(some[0])  # no ranged reads: the whole instance
    assert storage.exists(some[0]) and storage.exists(study)
    assert {e.uri for e in storage.list_files(pacs_server.dicomweb_uri)} >= {e.uri for e in entries}


def test_the_pipeline_sees_a_study_as_a_folder_and_a_series_as_a_folder(uploaded, pacs_server):
    entries = storage.list_files(pacs_server.dicomweb_uri)
    archive = pacs_server.dicomweb_uri + "/"
    assert not any(shards.escapes_prefix(archive, e.uri) for e in entries)
    assert shards.escapes_prefix(archive, f"{pacs_server.dicomweb_uri}/studies/../x")
    uri = entries[0].uri
    loc = dicomweb.locate(uri)
    assert shards.folder(uri) == f"{pacs_server.dicomweb_uri}/studies/{loc.study}/series/{loc.series}/instances"
    assert shards.study_folder(uri, pacs_server.dicomweb_uri) == f"studies/{loc.study}"
    studies, files = storage.list_top(pacs_server.dicomweb_uri)  # the shards: a folder per study
    assert files == [] and studies == sorted({f"{pacs_server.dicomweb_uri}/{shards.study_folder(e.uri, archive)}"
                                              for e in entries})
    assert sorted(e.uri for s in studies for e in storage.list_files(s)) == sorted(e.uri for e in entries)


def test_a_missing_instance_is_file_not_found(uploaded, pacs_server):
    uri = next(e.uri for e in storage.list_files(pacs_server.dicomweb_uri))
    missing = uri.rsplit("/", 1)[0] + "/1.2.3.4.5.6.7"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(missing)
    assert not storage.exists(missing)
    with pytest.raises(FileNotFoundError):
        storage.list_files(f"{pacs_server.dicomweb_uri}/studies/1.2.3.4.5.6.7")


def test_credentials_in_the_uri_are_refused():
    uri = "dicomweb+http://user:secret@127.0.0.1:8042/dicom-web/studies/1/series/2/instances/3"
    for call in (storage.read_bytes, storage.list_files, storage.exists):
        with pytest.raises(ValueError, match="VFX_RAY_DICOMWEB_USER") as info:
            call(uri)
        assert "secret" not in str(info.value)


def test_a_closed_port_fails_naming_the_pacs_not_the_patient():
    port = free_port()
    study = "1.2.826.0.1.3680043.8.498.99"
    uri = f"dicomweb+http://127.0.0.1:{port}/dicom-web/studies/{study}/series/1.2/instances/1.3"
    for call in (storage.read_bytes, storage.list_files):
        with pytest.raises(storage.StoreUnavailable, match=f"PACS 127.0.0.1:{port} unreachable") as info:
            call(uri)
        assert study not in str(info.value)


def test_a_failing_pacs_is_retried_then_named():
    """A 503 on every try: ATTEMPTS requests, then an error naming host:port (an error row)."""
    hits = []

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            hits.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        uri = f"dicomweb+http://127.0.0.1:{port}/dicom-web/studies/1.2.9/series/1.2/instances/1.3"
        with pytest.raises(OSError, match=f"PACS 127.0.0.1:{port} answered HTTP 503 to 3 attempts") as info:
            storage.read_bytes(uri)
        assert "1.2.9" not in str(info.value) and len(hits) == 3
    finally:
        server.shutdown()
        server.server_close()


def test_single_part_takes_the_one_body_of_a_multipart_answer():
    one = b"preamble\r\n--b1\r\nContent-Type: application/dicom\r\n\r\n\x00DICM\r\n\r\n\r\n--b1--\r\n"
    assert dicomweb.single_part(one, 'multipart/related; boundary="b1"', "h:1") == b"\x00DICM\r\n\r\n"
    assert dicomweb.single_part(b"DICM", "application/dicom", "h:1") == b"DICM"
    with pytest.raises(OSError, match="2 parts"):
        dicomweb.single_part(b"--b\r\n\r\nA\r\n--b\r\n\r\nB\r\n--b--", "multipart/related; boundary=b", "h:1")
    with pytest.raises(OSError, match="h:1 answered text/html"):
        dicomweb.single_part(b"<html>", "text/html", "h:1")


@pytest.mark.slow
def test_crops_from_the_pacs_equal_crops_from_the_folder(uploaded, pacs_server, ray_session, tmp_path):
    """The whole PACS as the archive; one annotation names a series neither holds (an error row)."""
    cfg = CropConfig(max_file_bytes=4 * 1024 * 1024)
    rows = pd.read_csv(uploaded["root"] / "annotations.csv", dtype=str)
    annotations = str(tmp_path / "annotations.csv")
    pd.concat([rows, rows.iloc[[0]].assign(patient_id="NOSERIES", series_instance_uid="1.2.3.999")]).to_csv(
        annotations, index=False)
    local = run_crops(str(uploaded["root"] / "dicom"), annotations, str(tmp_path / "local"), cfg, progress=False)
    pacs = run_crops(pacs_server.dicomweb_uri, annotations, str(tmp_path / "pacs"), cfg, progress=False)
    assert local["patients_with_crops"] == pacs["patients_with_crops"] == COHORT["patients"]
    assert local["errors"] == pacs["errors"] == 1 and local["crops"] == pacs["crops"]
    # sizes estimated below the objects' own: each instance read once, whole, as from the folder
    assert pacs["reads"] == local["reads"] and pacs["patients_read_once"] == COHORT["patients"]
    a, b = (storage.read_table(str(tmp_path / run / "crops.parquet")).sort_by(
        [("patient_id", "ascending"), ("slice_index", "ascending")]) for run in ("local", "pacs"))
    assert a.drop(["image"]).equals(b.drop(["image"]))
    np.testing.assert_array_equal(contracts.images_from_arrow(a["image"]), contracts.images_from_arrow(b["image"]))
    errors = [storage.read_table(str(tmp_path / run / "errors.parquet")).to_pandas() for run in ("local", "pacs")]
    assert [len(e) for e in errors] == [1, 1] and errors[0].error_type.tolist() == errors[1].error_type.tolist()


@pytest.mark.slow
def test_scores_from_the_pacs_equal_scores_from_the_folder(uploaded, pacs_server, ray_session, tmp_path):
    """``score --archive dicomweb+http://…``: the same pipeline, the same probabilities."""
    import torch

    from vfx_ray.ml.model import build_model, save_model
    from vfx_ray.stages.score import run_score

    torch.manual_seed(0)
    model = str(tmp_path / "model.pt")
    save_model(build_model("resnet18", pretrained="none"), model, "resnet18")
    cfg, annotations = CropConfig(), str(uploaded["root"] / "annotations.csv")
    runs = {name: run_score(archive, annotations, model, str(tmp_path / name), cfg, progress=False)
            for name, archive in (("local", str(uploaded["root"] / "dicom")), ("pacs", pacs_server.dicomweb_uri))}
    assert runs["local"]["rows"] == runs["pacs"]["rows"] == COHORT["patients"]
    local, pacs = (storage.read_table(str(tmp_path / n / "scores.parquet")).to_pandas().set_index("patient_id")
                   .sort_index() for n in runs)
    assert local.series_instance_uid.equals(pacs.series_instance_uid)
    np.testing.assert_allclose(local.probability, pacs.probability, rtol=0, atol=1e-6)
