"""Crops and a tiny train-cv on a two-node Ray cluster (head + worker via `ray start`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from ray_nodes import local_cluster

from vfx_ray.config import EASY, SynthConfig
from vfx_ray.synth.cohort import generate_cohort

DRIVER = """
import json, sys, ray
from ray.util.state import list_tasks
from vfx_ray.config import CropConfig, TrainConfig
from vfx_ray.stages.train_cv import run_train_cv
from vfx_ray.stages.crops import run_crops

root = sys.argv[1]
ray.init()  # RAY_ADDRESS names the cluster
crops = run_crops(f"{root}/dicom", f"{root}/annotations.csv", f"{root}/crops", CropConfig(), progress=False)
cfg = TrainConfig(arch="resnet18", pretrained="none", max_epochs=1, n_folds=2, augment_factor=1, batch_size=16)
metrics = run_train_cv(f"{root}/crops/crops.parquet", f"{root}/run", cfg)
decode_nodes = {t.node_id for t in list_tasks(limit=10000, detail=True, raise_on_missing_output=False)
                if any(f in (t.name or "") for f in ("shard_batch", "patient_batch")) and t.node_id}
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
json.dump({"crops": crops, "decode_nodes": sorted(decode_nodes), "nodes": nodes,
           "n_patients": metrics["pooled"]["per_patient"]["n"]}, open(f"{root}/result.json", "w"))
"""


@pytest.mark.slow
def test_crops_and_train_cv_across_two_nodes(tmp_path):
    root = tmp_path / "data"
    generate_cohort(str(root), SynthConfig(patients=10, matrix=128, seed=3, difficulty=EASY), workers=1, progress=False)
    with local_cluster(tmp_path, head_cpus=1, worker_cpus=[1]) as cluster:
        env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}
        res = subprocess.run(
            [sys.executable, "-c", DRIVER, str(root)], env=env, capture_output=True, text=True, timeout=600
        )
        assert res.returncode == 0, res.stderr[-4000:]
    result = json.loads((root / "result.json").read_text())
    assert len(result["nodes"]) == 2
    assert result["crops"]["patients_with_crops"] == 10 and result["crops"]["errors"] == 0
    assert len(result["decode_nodes"]) == 2, "decoding did not spread over both nodes"
    assert result["n_patients"] == 10
    assert all((root / "run" / f"fold_{k}" / "done.json").exists() for k in range(2))
