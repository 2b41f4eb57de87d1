"""Cross-validation on Ray Train: outputs, resume, worker failure, and a real `ray job submit`."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from vfx_ray import storage
from vfx_ray.config import TrainConfig, with_params
from vfx_ray.errors import VfxError
from vfx_ray.evaluation import folds
from vfx_ray.ml import model as vmodel
from vfx_ray.stages import fold_trainer as vtrain
from vfx_ray.stages import train_cv

REPO = Path(__file__).resolve().parents[1]
TINY = TrainConfig(arch="resnet18", pretrained="none", lr=1e-3, batch_size=16, max_epochs=2, patience=5,
                   augment_factor=2, n_folds=2, val_fraction=0.1)


@pytest.fixture(scope="module")
def crops_uri(tiny_crops) -> str:
    return tiny_crops(n_patients=24, slices=3, size=32)


def test_params_resolve_onto_the_config_and_gpu_workers_reserve_cpus():
    cfg = TrainConfig(num_workers=1)
    assert with_params(cfg, {"lr": 3e-4, "scale": [0.8, 1.2]}).scale == (0.8, 1.2)
    with pytest.raises(ValueError, match="unknown training parameters"):
        with_params(cfg, {"learning_rate": 1.0})
    assert vtrain.worker_resources(TrainConfig(use_gpu=False)) == {"CPU": 1}
    assert vtrain.worker_resources(TrainConfig(use_gpu=True)) == {"CPU": 2, "GPU": 1}
    assert vtrain.worker_resources(TrainConfig(use_gpu=True, gpu_worker_cpus=6)) == {"CPU": 6, "GPU": 1}


def test_a_worker_placed_for_a_gpu_without_cuda_fails():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    vmodel.require_cuda(False, "x")  # CPU workers never need CUDA
    with pytest.raises(RuntimeError, match="placed for a GPU but finds no CUDA device"):
        vmodel.require_cuda(True, "this training worker")


@pytest.mark.slow
def test_cross_validation_writes_run_folder_and_rerun_skips_done_folds(ray_session, crops_uri):
    out = f"s3://test/cv-{uuid.uuid4().hex[:8]}"
    m = train_cv.run_train_cv(crops_uri, out, TINY)
    for name in ("config.json", "splits.json", "oof_predictions.parquet", "metrics.json"):
        assert storage.exists(storage.join(out, name)), name
    splits = folds.splits_from_json(storage.read_text(storage.join(out, "splits.json")))
    oof = storage.read_table(storage.join(out, "oof_predictions.parquet")).to_pandas()
    assert len(oof) == 72 and oof["probability"].between(0, 1).all()
    assert oof.groupby("patient_id")["fold"].nunique().eq(1).all() and oof["patient_id"].nunique() == 24
    for f in splits["folds"]:
        assert set(oof.loc[oof["fold"] == f["fold"], "patient_id"]) == set(f["test"])
        done = json.loads(storage.read_text(storage.join(out, f"fold_{f['fold']}", "done.json")))
        _, rec = vmodel.load_model(storage.join(out, f"fold_{f['fold']}", "model.pt"))
        assert done["model_id"] == rec["model_id"] and done["epochs"] == 2
        assert not storage.exists(storage.join(out, "ray_train", f"fold_{f['fold']}"))  # checkpoints cleaned
    assert m["pooled"]["per_patient"]["n"] == 24 and m["pooled"]["per_slice"]["n"] == 72
    assert m["pooled"]["per_patient"]["accuracy"] >= 0.75  # the fixture's pattern is easy
    assert m["params_protocol"]["protocol"] == "none" and m["params_protocol"]["params"] == {}  # the recipe's lr
    assert [r["lr"] for r in m["fold_runs"]] == [TINY.lr, TINY.lr]
    assert json.loads(storage.read_text(storage.join(out, "metrics.json"))) == m
    dones = [storage.read_text(storage.join(out, f"fold_{k}", "done.json")) for k in range(2)]
    again = train_cv.run_train_cv(crops_uri, out, TINY)  # every fold has done.json: nothing retrains
    assert again == m  # and no fold was written again (its done.json holds its seconds):
    assert [storage.read_text(storage.join(out, f"fold_{k}", "done.json")) for k in range(2)] == dones
    with pytest.raises(VfxError, match="different settings"):
        train_cv.run_train_cv(crops_uri, out, TINY, params={"lr": 1e-2})


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint_with_whole_epochs(ray_session, crops_uri, tmp_path):
    import ray.train

    class KillRank0AfterEpoch2(ray.train.UserCallback):
        """On the Train controller, once epoch 2's checkpoint is persisted: SIGKILL rank 0, once.
        (Defined here, so Ray pickles it by value: the controller cannot import tests/.)"""

        def __init__(self, marker: str) -> None:
            self.marker = marker

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics[0]["epoch"] == 2 and checkpoint is not None and not os.path.exists(self.marker):
                with open(self.marker, "w") as f:
                    f.write(f"killed pid {metrics[0]['worker_pid']} after epoch 2\n")
                os.kill(metrics[0]["worker_pid"], signal.SIGKILL)

    crops = storage.read_table(crops_uri)
    train, val = crops.slice(0, 60), crops.slice(60)
    marker = tmp_path / "killed.txt"
    # 5 epochs: the controller polls its workers every 2 s, so the kill lands an epoch or two later
    cfg = TrainConfig(**{**TINY.__dict__, "max_epochs": 5, "patience": 10})
    fit = vtrain.fit_fold(train, val, cfg, fold=0, storage_path=str(tmp_path / "ray"), name="f0", max_failures=1,
                          callbacks=[KillRank0AfterEpoch2(str(marker))])
    assert marker.exists()  # rank 0 was killed after epoch 2
    s = fit.summary
    assert s["epochs"] == 5 and [h["epoch"] for h in s["history"]] == [1, 2, 3, 4, 5]
    assert len(s["resumed_from"]) == 1 and 2 <= s["resumed_from"][0] < 5  # from a checkpoint, not from scratch
    assert s["history"][-1]["worker_pid"] != s["history"][0]["worker_pid"]  # a new process trained the last epoch
    # a later run with the same name resumes the finished state and trains on to the new limit
    more = TrainConfig(**{**cfg.__dict__, "max_epochs": 6})
    fit2 = vtrain.fit_fold(train, val, more, fold=0, storage_path=str(tmp_path / "ray"), name="f0")
    assert fit2.summary["epochs"] == 6 and fit2.summary["resumed_from"][-1] == 5
    assert [h["epoch"] for h in fit2.summary["history"]] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_ray_job_submit_on_a_local_cluster(crops_uri, tmp_path):
    """`ray start --head` (token auth on), `ray job submit` of jobs/train_cv.py, SUCCEEDED, outputs."""
    from ray_nodes import local_cluster, until_agent_ready, wait_for_job

    out = tmp_path / "run"
    (tmp_path / "params.json").write_text(json.dumps({"max_epochs": 2, "n_folds": 2, "augment_factor": 1}))
    entry = ["python", "jobs/train_cv.py", "--crops", crops_uri, "--out", str(out),
             "--profile", "demo", "--params", str(tmp_path / "params.json")]  # fmt: skip
    job_id = f"vfx-test-{uuid.uuid4().hex[:8]}"
    with local_cluster(tmp_path) as cluster:
        address = cluster.dashboard

        def submit() -> None:
            sub = cluster.ray("job", "submit", "--address", address, "--working-dir", str(REPO),
                              "--submission-id", job_id, "--no-wait", "--", *entry, timeout=120)  # fmt: skip
            if sub.returncode != 0:
                raise RuntimeError(sub.stderr[-3000:])

        until_agent_ready(submit)
        wait_for_job(cluster, job_id, timeout=300)  # in-process: a `ray` CLI poll costs a second of CPU
        status = cluster.ray("job", "status", "--address", address, job_id).stdout.lower()
        logs = cluster.ray("job", "logs", "--address", address, job_id).stdout
        assert "succeeded" in status, f"{status}\n{logs[-4000:]}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pooled"]["per_patient"]["n"] == 24
    assert len(pq.read_table(out / "oof_predictions.parquet")) == 72
    assert all((out / f"fold_{k}" / "done.json").exists() for k in range(2))


@pytest.mark.slow
def test_a_fold_on_ray_depends_on_its_seed_and_data_only(ray_session, crops_uri, tmp_path, monkeypatch):
    """Trained twice, from crops cut into many blocks, a fold gives the same model: its result
    does not depend on the order in which blocks reach the worker or on what else runs, which is
    what lets K folds share one GPU (--folds-per-gpu) and train as they would alone."""
    crops = storage.read_table(crops_uri)
    monkeypatch.setattr(vtrain, "to_dataset", functools.partial(vtrain.to_dataset, block_rows=7))
    cfg = dataclasses.replace(TINY, max_epochs=1)
    ids = [vmodel.model_id(vtrain.fit_fold(crops.slice(0, 60), crops.slice(60), cfg, fold=0, storage_path=str(tmp_path),
                                           name=f"twice_{i}").best_state) for i in range(2)]
    torch.manual_seed(vtrain.seed_for(cfg.seed, 0))  # the fold's initial weights, as fit_fold makes them
    assert ids[0] == ids[1] != vmodel.model_id(vmodel.build_model(cfg.arch, pretrained="none"))


def test_checkpoints_every_n_epochs_and_always_at_the_end():
    def due(cfg: TrainConfig, losses: list[float | None], has_val: bool = True) -> list[int]:
        state, epochs = vtrain.FitState(), []
        for loss in losses:
            state.update(loss)
            if vtrain.checkpoint_due(state, cfg, has_val):
                epochs.append(state.epoch)
            if state.finished(cfg, has_val):
                break
        return epochs

    every4 = TrainConfig(max_epochs=20, patience=3, checkpoint_every=4)
    assert due(every4, [1.0, 0.9, 0.8, 0.85, 0.86, 0.87, 0.5]) == [4, 6]  # early stop at 6 keeps its best
    assert due(TrainConfig(max_epochs=5, checkpoint_every=2), [None] * 5, has_val=False) == [2, 4, 5]
    assert due(TrainConfig(max_epochs=3), [1.0, 0.9, 0.8]) == [1, 2, 3]  # default: every epoch
