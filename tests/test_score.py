"""Batch scoring: per-patient max of the model's slice probabilities, resumable, readable."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import duckdb
import duckdb_ext
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from vfx_ray import contracts, storage
from vfx_ray.config import CropConfig
from vfx_ray.imaging import dicom, geometry
from vfx_ray.imaging.annotations import read_annotations
from vfx_ray.imaging.roi import RoiBox
from vfx_ray.ml.model import build_model, load_model, predict_proba, save_model
from vfx_ray.pipeline import tasks, wire
from vfx_ray.stages import committed_parts, score

CFG = CropConfig()


@pytest.fixture(scope="module")
def cohort(synth_cohort, tmp_path_factory):
    """The shared 6-patient cohort (read only) and this module's model and unlabelled
    annotations (in ``work``, where the tests' outputs go too)."""
    root, work = synth_cohort(patients=6, seed=11), str(tmp_path_factory.mktemp("score"))
    ann = read_annotations(os.path.join(root, "annotations.csv"))
    torch.manual_seed(0)
    net = build_model("resnet18", pretrained="none")
    model_uri = os.path.join(work, "model.pt")
    mid = save_model(net, model_uri, "resnet18")
    ann.assign(label=None).to_csv(os.path.join(work, "unlabelled.csv"), index=False)
    return {"root": root, "work": work, "ann": ann, "model": model_uri, "model_id": mid}


def pure_slice_probabilities(cohort, pid):
    """What the pipeline must reproduce: pure crops + eager predict_proba."""
    row = cohort["ann"].set_index("patient_id").loc[pid]
    files = [(e.uri, storage.read_bytes(e.uri)) for e in storage.list_files(os.path.join(cohort["root"], "dicom", pid))]
    crops = geometry.crop_samples(dicom.load_volume(files, CFG), RoiBox.from_record(row), CFG)
    net, _ = load_model(cohort["model"])
    return predict_proba(net, np.stack([c["image"] for c in crops]))


def duckdb_connect():
    con = duckdb.connect()
    ext = glob.glob(os.path.join(next(iter(duckdb_ext.__path__)), "extensions", "*", "*", "httpfs.duckdb_extension"))[0]
    con.execute(f"LOAD '{ext}'")
    return con


@pytest.fixture(scope="module")
def scored(cohort, ray_session):
    out = os.path.join(cohort["work"], "scores_unlabelled")
    summary = score.run_score(
        f"{cohort['root']}/dicom",
        f"{cohort['work']}/unlabelled.csv",
        cohort["model"],
        out,
        CFG,
        features=True,
        progress=False,
    )
    return out, summary


@pytest.mark.slow
def test_scores_are_the_max_of_the_models_slice_probabilities(cohort, scored):
    out, summary = scored
    table = storage.read_table(f"{out}/scores.parquet")
    df = table.to_pandas()
    assert sorted(df["patient_id"]) == sorted(cohort["ann"]["patient_id"])
    assert summary["errors"] == 0 and "metrics" not in summary  # no labels, no metrics
    for _, r in df.iterrows():
        want = pure_slice_probabilities(cohort, r["patient_id"])
        np.testing.assert_allclose(r["slice_probabilities"], want, atol=1e-5)
        assert r["probability"] == max(r["slice_probabilities"]) and r["n_slices"] == len(want)
        assert r["prediction"] == ("malignant" if r["probability"] >= 0.5 else "benign")
    assert set(df["model_id"]) == {cohort["model_id"]} and set(df["n_models"]) == {1}
    assert df["label"].isna().all()
    config = json.loads(table.schema.metadata[b"vfx_ray.config"])
    assert config["model"]["model_id"] == cohort["model_id"] and config["threshold"] == 0.5
    feats = storage.read_table(f"{out}/features.parquet")
    assert feats.num_rows == int(df["n_slices"].sum())
    assert feats.schema.field("embedding").type.list_size == 512  # resnet18; 2048 for resnet50


@pytest.mark.slow
def test_duckdb_and_pandas_read_the_scores_locally(scored):
    out, _ = scored
    n, pmax = duckdb.sql(f"select count(*), max(probability) from '{out}/scores.parquet'").fetchone()
    assert n == 6 and 0 < pmax < 1
    assert pd.read_parquet(f"{out}/scores.parquet")["n_slices"].between(3, 5).all()


@pytest.mark.slow
def test_rerun_skips_scored_patients(cohort, scored, ray_session):
    out, _ = scored
    summary = score.run_score(
        f"{cohort['root']}/dicom", f"{cohort['work']}/unlabelled.csv", cohort["model"], out, CFG, progress=False
    )
    assert summary["scored_now"] == 0 and summary["skipped_already_scored"] == 6 and summary["rows"] == 6


@pytest.mark.slow
def test_labels_give_metrics_and_s3_output_reads_in_duckdb_and_pandas(cohort, ray_session, objectstore_server):
    out = f"s3://vfx/{uuid.uuid4().hex}/scores"
    summary = score.run_score(
        f"{cohort['root']}/dicom", f"{cohort['root']}/annotations.csv", cohort["model"], out, CFG, progress=False
    )
    m = json.loads(storage.read_text(f"{out}/metrics.json"))
    assert m["per_patient"]["confusion_matrix"] == summary["metrics"]["per_patient"]["confusion_matrix"]
    assert sum(map(sum, m["per_patient"]["confusion_matrix"])) == 6
    con = duckdb_connect()
    env = objectstore_server.env()
    con.execute(
        "CREATE SECRET s (TYPE s3, KEY_ID ?, SECRET ?, ENDPOINT ?, URL_STYLE 'path', USE_SSL false, "
        "REGION 'us-east-1')",
        [env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env["AWS_ENDPOINT_URL"].removeprefix("http://")],
    )
    labels = dict(con.execute(f"select patient_id, label from read_parquet('{out}/scores.parquet')").fetchall())
    assert labels == dict(zip(cohort["ann"]["patient_id"], cohort["ann"]["label"], strict=True))
    fs, path = storage.filesystem(f"{out}/scores.parquet")
    assert len(pd.read_parquet(path, filesystem=fs)) == 6


@pytest.mark.slow
def test_killed_run_resumes_with_one_row_per_patient(cohort, scored, tmp_path):
    """Killed in the first pass (a chunk per patient folder here): the re-run takes the
    committed chunks instead of reading them again, and writes one row per patient."""
    out = str(tmp_path / "killed")
    chunks = f"{out}/_parts/{committed_parts.CHUNK_DIR}/*/*.parquet"
    cmd = [
        sys.executable,
        "-m",
        "vfx_ray.cli",
        "score",
        "--archive",
        f"{cohort['root']}/dicom",
        "--annotations",
        f"{cohort['work']}/unlabelled.csv",
        "--model",
        cohort["model"],
        "--out",
        out,
        "--commit-every",
        "1",
        "--batch-size",
        "2",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if glob.glob(chunks):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(f"{out}/scores.parquet")
    kept = len(glob.glob(chunks))
    assert 1 <= kept < 6
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    df = pd.read_parquet(f"{out}/scores.parquet")
    assert sorted(df["patient_id"]) == sorted(cohort["ann"]["patient_id"])  # exactly one row each
    assert "6 patients scored (6 now, 0 already done)" in res.stdout
    assert f"read once: 6 patients, second pass: 0; {kept} of 6 chunks taken from an interrupted run" in res.stdout
    assert not glob.glob(f"{out}/_parts/{committed_parts.CHUNK_DIR}")  # the finished run leaves no chunks
    np.testing.assert_allclose(
        df.sort_values("patient_id")["probability"],
        pd.read_parquet(f"{cohort['work']}/scores_unlabelled/scores.parquet").sort_values("patient_id")["probability"],
        atol=1e-6,
    )


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["whole", "roi"])
def test_patients_split_across_chunks_take_the_second_pass_with_the_same_scores(
    cohort, scored, ray_session, tmp_path, monkeypatch, plan
):
    monkeypatch.setattr(tasks, "CHUNK_OBJECTS", 5)  # every series is cut: none can be vouched for
    monkeypatch.setattr(tasks, "ROI_CHUNK_OBJECTS", 5)  # the roi plan's chunks too
    out = str(tmp_path / "second")
    cfg = dataclasses.replace(CFG, read_plan=plan)  # roi: the ROI's objects only, in both passes
    summary = score.run_score(
        f"{cohort['root']}/dicom", f"{cohort['work']}/unlabelled.csv", cohort["model"], out, cfg, progress=False
    )
    assert (summary["patients_read_once"], summary["patients_second_pass"], summary["errors"]) == (0, 6, 0)
    got, want = (pd.read_parquet(f"{o}/scores.parquet").set_index("patient_id").sort_index() for o in (out, scored[0]))
    assert got.index.tolist() == want.index.tolist()
    for pid in want.index:  # same crops; the model's batches differ, so float noise only
        np.testing.assert_allclose(got.loc[pid, "slice_probabilities"], want.loc[pid, "slice_probabilities"], atol=1e-6)


@pytest.mark.slow
def test_rerun_over_some_committed_patients_scores_the_rest_from_the_header_index(
    cohort, scored, ray_session, tmp_path
):
    out = str(tmp_path / "grown")
    first = cohort["ann"].assign(label=None).head(3)  # the archive's annotations grew since
    first.to_csv(tmp_path / "first.csv", index=False)
    score.run_score(f"{cohort['root']}/dicom", str(tmp_path / "first.csv"), cohort["model"], out, CFG, progress=False)
    summary = score.run_score(
        f"{cohort['root']}/dicom", f"{cohort['work']}/unlabelled.csv", cohort["model"], out, CFG, progress=False
    )
    assert (summary["skipped_already_scored"], summary["scored_now"], summary["rows"]) == (3, 3, 6)
    assert (summary["chunks"], summary["patients_second_pass"]) == (0, 3)  # headers only, then 3 patients
    got, want = (pd.read_parquet(f"{o}/scores.parquet").set_index("patient_id").sort_index() for o in (out, scored[0]))
    np.testing.assert_allclose(got["probability"], want["probability"], atol=1e-6)


@pytest.mark.slow
def test_fold_checkpoint_reproduces_its_out_of_fold_probabilities(synth_cohort, tmp_path, ray_session):
    """crops -> train-cv -> score with fold 0's model.pt: the fold's test slices agree to 1e-5."""
    from vfx_ray.config import TrainConfig
    from vfx_ray.stages.crops import run_crops
    from vfx_ray.stages.train_cv import run_train_cv

    data, root = synth_cohort(patients=12, seed=5), str(tmp_path)
    run_crops(f"{data}/dicom", f"{data}/annotations.csv", f"{root}/crops", CFG, progress=False)
    cfg = TrainConfig(arch="resnet18", pretrained="none", max_epochs=1, n_folds=2, augment_factor=1, batch_size=16)
    run_train_cv(f"{root}/crops/crops.parquet", f"{root}/run", cfg)
    out = f"{root}/scores"
    summary = score.run_score(
        f"{data}/dicom", f"{data}/annotations.csv", f"{root}/run/fold_0/model.pt", out, CFG, progress=False
    )
    assert summary["n_models"] == 1
    oof = pd.read_parquet(f"{root}/run/oof_predictions.parquet")
    fold0 = oof[oof["fold"] == 0].sort_values(["patient_id", "slice_index"])
    scores = pd.read_parquet(f"{out}/scores.parquet").set_index("patient_id")
    assert len(fold0) > 0
    for pid, part in fold0.groupby("patient_id"):
        assert scores.loc[pid, "slice_indices"].tolist() == part["slice_index"].tolist()
        np.testing.assert_allclose(scores.loc[pid, "slice_probabilities"], part["probability"], atol=1e-5)
    # the ensemble of both folds is a different model with its own id
    ens = score.run_score(
        f"{data}/dicom", f"{data}/annotations.csv", f"{root}/run", f"{root}/scores_ens", CFG, progress=False
    )
    assert ens["n_models"] == 2 and ens["model_id"] != summary["model_id"]


def test_first_pass_results_wait_on_disk_and_come_back_per_patient(tmp_path):
    def scored(pid: str, slices: list[int]) -> list[dict]:
        meta = [{"patient_id": pid, "series_instance_uid": f"u{pid}", "slice_index": i} for i in slices]
        return [{"patient_id": pid, "kind": "crop", "meta": json.dumps(m), "probability": m["slice_index"] / 10,
                 "embedding": b""} for m in meta]

    def table(rows: list[dict]) -> pa.Table:
        return pa.Table.from_pylist(rows, schema=wire.SCORED_WIRE)

    error = {"patient_id": "C", "kind": "error", "meta": json.dumps({"patient_id": "C", "stage": "crop"}),
             "probability": None, "embedding": b""}
    first = score.FirstPassResults(str(tmp_path / "spill.parquet"))
    first.take(table(scored("A", [1, 2]) + scored("B", [3])))
    first.take(table(scored("B", [4]) + [error] + scored("D", [5])))  # B's rows run on into the next chunk table
    assert first.errors == {"C": [{"patient_id": "C", "stage": "crop"}]}
    got = [(pid, [(s["slice_index"], s["probability"]) for s in slices]) for pid, slices in first.patients({"B", "A"})]
    assert got == [("A", [(1, 0.1), (2, 0.2)]), ("B", [(3, 0.3), (4, 0.4)])]  # D was not asked for
    apart = score.FirstPassResults(str(tmp_path / "apart.parquet"))
    apart.take(table(scored("A", [1]) + scored("B", [2]) + scored("A", [3])))
    with pytest.raises(RuntimeError, match="not together"):
        list(apart.patients({"A", "B"}))
    assert list(score.FirstPassResults(str(tmp_path / "none.parquet")).patients({"A"})) == []


def test_label_metrics_take_each_slice_of_each_patient_with_its_label():
    table = pa.table({"patient_id": ["A", "B", "C", "D"], "label": ["benign", "malignant", "benign", "malignant"],
                      "slice_probabilities": [[0.1, 0.7], [0.6], [0.2, 0.3, 0.9], [0.8, 0.4]]})
    slices = pd.DataFrame({"patient_id": list("AABCCCDD"), "label": [0, 0, 1, 0, 0, 0, 1, 1],
                           "probability": [0.1, 0.7, 0.6, 0.2, 0.3, 0.9, 0.8, 0.4]})
    got = score.label_metrics(table, 0.5, ("benign", "malignant"))
    assert got == {"threshold": 0.5, **score.metrics.level_metrics(slices, 0.5)}
    assert got["per_slice"]["n"] == 8 and got["per_patient"]["n"] == 4 and got["per_slice"]["tp"] == 2


def test_the_key_slice_s_maps_are_those_of_the_slice_the_key_image_shows():
    slices = [{"slice_index": i, "probability": p, "cam": bytes([i]), "series_instance_uid": "S"}
              for i, p in [(7, 0.9), (3, 0.2), (5, 0.9)]]  # a tie: the first in slice order, 5
    row = score.patient_row("P", slices, {"model_id": "m", "n_models": 1}, 0.5, ("benign", "malignant"))
    assert row["slice_indices"][contracts.key_slice(row)] == 5 and score.key_slice_cam(slices, row) == bytes([5])
